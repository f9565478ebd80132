//! `preauth-sidecar demo`: the built-in fake OpenAI-compatible upstream plus the sidecar in front
//! of it, with a minted tenant JWT and ready-to-paste examples. Also home of the fake upstream
//! that the integration tests and benchmarks use as the LLM gateway.
//!
//! Owns: `upstream` (the fake gateway), `mint_tenant_jwt`. Imports: decide::jwt.

pub mod upstream;

use serde_json::json;

use crate::decide::jwt::sign_hs256;

/// A tenant JWT as a Supabase-style issuer would mint it (HS256, `aud = authenticated`).
pub fn mint_tenant_jwt(secret: &str, tenant: &str, tier: &str, now_s: i64, ttl_s: i64) -> String {
    let claims = json!({
        "sub": format!("user-of-{tenant}"),
        "aud": "authenticated",
        "role": "authenticated",
        "tenant_id": tenant,
        "tier": tier,
        "iat": now_s,
        "exp": now_s + ttl_s,
    });
    sign_hs256(&claims, secret.as_bytes(), None)
}
