//! Compact JWS with HS256 only: signature check (constant time, primary key then fallbacks),
//! `alg` pinned, time claims checked against an injected `now`. Used for caller identity
//! (`SUPABASE_JWT_SECRET`) and approval tokens.
//!
//! Owns: `verify_hs256`, `sign_hs256`, `JwtError`. Imports: hmac, sha2, base64, serde_json.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. Messages never contain the token or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a compact JWS (header.payload.signature)")]
    Malformed,
    #[error("token algorithm is not HS256")]
    Algorithm,
    #[error("token signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token claim `{0}` is missing or has the wrong type")]
    Claim(&'static str),
}

/// A verified token: its header `kid` (if any), the index of the key that verified it
/// (0 = primary), and its claims.
#[derive(Debug, Clone)]
pub struct Verified {
    pub kid: Option<String>,
    pub key_index: usize,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// Allowed clock skew for `nbf`/`iat` in the future. `exp` gets none: an expired token is expired.
pub const NBF_LEEWAY_SECONDS: i64 = 5;

/// Verifies signature and algorithm with each key in turn, then `exp` (required) and `nbf`
/// (optional) against `now_s`. Claims other than time are the caller's business.
pub fn verify_hs256(token: &str, keys: &[&[u8]], now_s: i64) -> Result<Verified, JwtError> {
    let mut parts = token.splitn(3, '.');
    let (Some(h64), Some(p64), Some(s64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
    if s64.contains('.') {
        return Err(JwtError::Malformed);
    }
    let header: serde_json::Map<String, serde_json::Value> = decode_json(h64)?;
    if header.get("alg").and_then(|v| v.as_str()) != Some("HS256") {
        return Err(JwtError::Algorithm);
    }
    if header.get("crit").is_some() {
        return Err(JwtError::Malformed);
    }
    let sig = URL_SAFE_NO_PAD.decode(s64).map_err(|_| JwtError::Malformed)?;
    let signing_input = &token[..h64.len() + 1 + p64.len()];
    let key_index = keys
        .iter()
        .position(|k| {
            let mut mac = HmacSha256::new_from_slice(k).expect("HMAC accepts any key length");
            mac.update(signing_input.as_bytes());
            mac.verify_slice(&sig).is_ok()
        })
        .ok_or(JwtError::Signature)?;
    let claims: serde_json::Map<String, serde_json::Value> = decode_json(p64)?;
    let exp = claims.get("exp").and_then(as_int).ok_or(JwtError::Claim("exp"))?;
    if now_s >= exp {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = as_int(nbf).ok_or(JwtError::Claim("nbf"))?;
        if now_s + NBF_LEEWAY_SECONDS < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    let kid = header.get("kid").and_then(|v| v.as_str()).map(str::to_owned);
    Ok(Verified { kid, key_index, claims })
}

/// A JSON number that is an integer (floats with no fraction are accepted, as many libraries emit them).
pub fn as_int(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64))
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

/// Signs `claims` with HS256. `kid` goes into the header when given.
pub fn sign_hs256(claims: &serde_json::Value, key: &[u8], kid: Option<&str>) -> String {
    let header = match kid {
        Some(k) => serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": k}),
        None => serde_json::json!({"alg": "HS256", "typ": "JWT"}),
    };
    let mut out = URL_SAFE_NO_PAD.encode(header.to_string());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(out.as_bytes());
    let sig = mac.finalize().into_bytes();
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(sig));
    out
}

/// Looks up a dotted claim path (`app_metadata.tenant_id`) and returns it as a string
/// (numbers are rendered, other types are absent).
pub fn claim_str(claims: &serde_json::Map<String, serde_json::Value>, path: &str) -> Option<String> {
    let mut parts = path.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    match cur {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `aud` is a string or an array of strings; true when it contains `want`.
pub fn audience_matches(claims: &serde_json::Map<String, serde_json::Value>, want: &str) -> bool {
    match claims.get("aud") {
        Some(serde_json::Value::String(s)) => s == want,
        Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const K: &[u8] = b"0123456789abcdef0123456789abcdef";
    const K2: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn raw(header: &str, payload: &str, key: &[u8]) -> String {
        let mut t = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(t.as_bytes());
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        t
    }

    #[test]
    fn verifies_and_picks_the_key() {
        let t = sign_hs256(&json!({"exp": 2000, "sub": "x"}), K2, Some("k2"));
        let v = verify_hs256(&t, &[K, K2], 1000).unwrap();
        assert_eq!(v.key_index, 1);
        assert_eq!(v.kid.as_deref(), Some("k2"));
        assert_eq!(verify_hs256(&t, &[K], 1000).unwrap_err(), JwtError::Signature);
    }

    #[test]
    fn refuses_other_algorithms_and_none() {
        let p = r#"{"exp":2000}"#;
        for alg in ["none", "HS384", "HS512", "RS256", "hs256"] {
            let t = raw(&format!(r#"{{"alg":"{alg}"}}"#), p, K);
            assert_eq!(verify_hs256(&t, &[K], 1000).unwrap_err(), JwtError::Algorithm, "{alg}");
        }
        let unsigned = format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(p));
        assert!(verify_hs256(&unsigned, &[K], 1000).is_err());
    }

    #[test]
    fn time_claims() {
        let t = sign_hs256(&json!({"exp": 1000}), K, None);
        assert_eq!(verify_hs256(&t, &[K], 1000).unwrap_err(), JwtError::Expired);
        assert!(verify_hs256(&t, &[K], 999).is_ok());
        let t = sign_hs256(&json!({"exp": 5000, "nbf": 2000}), K, None);
        assert_eq!(verify_hs256(&t, &[K], 1000).unwrap_err(), JwtError::NotYetValid);
        assert!(verify_hs256(&t, &[K], 1996).is_ok());
        let t = sign_hs256(&json!({"sub": "no-exp"}), K, None);
        assert_eq!(verify_hs256(&t, &[K], 1000).unwrap_err(), JwtError::Claim("exp"));
    }

    #[test]
    fn malformed_tokens() {
        for t in ["", "a.b", "a.b.c.d", "!!.!!.!!", "eyJhbGciOiJIUzI1NiJ9.e30.AAAA"] {
            assert!(verify_hs256(t, &[K], 1).is_err(), "{t}");
        }
    }

    #[test]
    fn dotted_claims_and_audience() {
        let v = json!({"app_metadata": {"tenant_id": "acme", "n": 7}, "aud": ["a", "authenticated"]});
        let m = v.as_object().unwrap();
        assert_eq!(claim_str(m, "app_metadata.tenant_id").as_deref(), Some("acme"));
        assert_eq!(claim_str(m, "app_metadata.n").as_deref(), Some("7"));
        assert_eq!(claim_str(m, "app_metadata.missing"), None);
        assert!(audience_matches(m, "authenticated"));
        assert!(!audience_matches(m, "anon"));
    }
}
