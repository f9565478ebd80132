//! Approval tokens (CONTRACT §5): minting, verification and the binding of a token to one request.
//!
//! A token is a compact JWS, `alg` HS256 only (pinned in [`super::jwt::verify_hs256`], which
//! refuses `none`, HS384/HS512, RS*/ES* and therefore the RS→HS key-confusion trick), with exactly
//! these claims, all required: `iss`, `aud` = [`AUDIENCE`], `sub` = `enforcement_approval:<id>`,
//! `jti` = `<id>`, `iat`, `nbf`, `exp` (integers, seconds), `tenant_id`, `approval_id` = `<id>`,
//! `request_fingerprint` (64 lowercase hex), `max_cost_usd` (decimal string, 6 places when we
//! mint), `token_type` = [`TOKEN_TYPE`].
//!
//! The steps, in the order the proxy runs them (step 8 of CONTRACT §3):
//! 1. [`verify`] — signature with the primary key then each fallback, algorithm, time, and every
//!    claim's presence, type and value. A token whose signature verifies but which is expired is
//!    still checked for the other claims first, so a foreign token is `Invalid`, never `Expired`.
//! 2. [`check_binding`] — tenant and fingerprint (constant time) and `max_cost_usd` ≥ the request's
//!    estimated cost.
//! 3. Single use (`jti`) is the store's business (`store::approvals::Approvals::consume`), called
//!    only once the request is admitted; it answers [`ApprovalError::Replayed`] through the glue.
//!
//! Pure: no I/O, no clock (`now_s` is injected, Unix seconds), no store.
//!
//! Owns: `ApprovalClaims`, `MintRequest`, `mint`, `sign`, `verify`, `check_binding`,
//! `ApprovalError`, the claim constants. Imports: `decide::jwt`, `decide::money`, std, serde_json,
//! sha2, base64.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jwt::{self, JwtError};
use super::money::Micros;

/// The `aud` of every approval token.
pub const AUDIENCE: &str = "llm_preauth";
/// The `token_type` of every approval token.
pub const TOKEN_TYPE: &str = "enforcement_approval";
/// `sub` is this prefix followed by the approval id.
pub const SUBJECT_PREFIX: &str = "enforcement_approval:";
/// Longest accepted approval id / tenant id (bytes). Ours are UUIDs (36).
pub const MAX_ID_LEN: usize = 256;

/// Why an approval token was refused. Messages never contain the token or a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// Bad signature, wrong alg/aud/iss/token_type, missing or mistyped claim. The detail names
    /// what failed (`signature`, `alg`, `malformed`, `nbf`, or a claim name); for logs and audit.
    #[error("approval token is invalid ({0})")]
    Invalid(&'static str),
    #[error("approval token has expired")]
    Expired,
    /// The token is genuine but for another tenant, another request, or a lower amount. The
    /// detail is `tenant_id`, `request_fingerprint` or `max_cost_usd`.
    #[error("approval token does not match this request ({0})")]
    Mismatch(&'static str),
    #[error("approval token has already been used")]
    Replayed,
}

impl ApprovalError {
    /// The `error.code` of the response (CONTRACT §3).
    pub fn code(&self) -> &'static str {
        match self {
            ApprovalError::Invalid(_) => "approval_token_invalid",
            ApprovalError::Expired => "approval_token_expired",
            ApprovalError::Mismatch(_) => "approval_token_mismatch",
            ApprovalError::Replayed => "approval_token_replayed",
        }
    }

    /// The HTTP status of the response (CONTRACT §5).
    pub fn status(&self) -> u16 {
        match self {
            ApprovalError::Invalid(_) => 401,
            ApprovalError::Expired | ApprovalError::Replayed => 409,
            ApprovalError::Mismatch(_) => 403,
        }
    }

    /// The `event` label of `valdrics_ops_enforcement_approval_token_events_total`.
    pub fn metric_event(&self) -> &'static str {
        match self {
            ApprovalError::Invalid(_) => "invalid",
            ApprovalError::Expired => "expired",
            ApprovalError::Mismatch(_) => "mismatch",
            ApprovalError::Replayed => "replay",
        }
    }

    /// What exactly failed, for logs and the audit line (`None` for expired/replayed).
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            ApprovalError::Invalid(d) | ApprovalError::Mismatch(d) => Some(d),
            ApprovalError::Expired | ApprovalError::Replayed => None,
        }
    }
}

/// The claims of a verified (or about to be signed) approval token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub jti: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub tenant_id: String,
    pub approval_id: String,
    pub request_fingerprint: String,
    pub max_cost_usd: Micros,
    pub token_type: String,
}

impl ApprovalClaims {
    /// The JSON object that is signed: exactly the CONTRACT §5 claims.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "iss": self.iss,
            "aud": self.aud,
            "sub": self.sub,
            "jti": self.jti,
            "iat": self.iat,
            "nbf": self.nbf,
            "exp": self.exp,
            "tenant_id": self.tenant_id,
            "approval_id": self.approval_id,
            "request_fingerprint": self.request_fingerprint,
            "max_cost_usd": self.max_cost_usd.to_string(),
            "token_type": self.token_type,
        })
    }

    /// `exp` in Unix milliseconds (for `expires_at` in admin answers and the store).
    pub fn expires_at_ms(&self) -> u64 {
        u64::try_from(self.exp).unwrap_or(0).saturating_mul(1000)
    }
}

/// What an approval token is minted from.
#[derive(Clone, Copy, Debug)]
pub struct MintRequest<'a> {
    /// `PREAUTH_APPROVAL_ISSUER`.
    pub issuer: &'a str,
    pub tenant_id: &'a str,
    /// Becomes `approval_id`, `jti` and the tail of `sub`.
    pub approval_id: &'a str,
    pub request_fingerprint: &'a str,
    pub max_cost: Micros,
    /// Unix seconds: `iat` and `nbf`.
    pub now_s: i64,
    /// `exp` = `now_s` + this (`ENFORCEMENT_APPROVAL_TOKEN_TTL_SECONDS`, or the CLI's `--ttl-seconds`).
    pub ttl_seconds: u64,
}

impl<'a> MintRequest<'a> {
    /// Checks the inputs so that the minted token would verify; `Err` names the bad field
    /// (`tenant_id`, `approval_id`, `request_fingerprint`, `max_cost_usd`, `ttl_seconds`).
    /// The CLI and the admin API call it before [`mint`].
    pub fn validate(&self) -> Result<(), &'static str> {
        if !valid_id(self.tenant_id) {
            return Err("tenant_id");
        }
        if !valid_id(self.approval_id) {
            return Err("approval_id");
        }
        if !is_fingerprint(self.request_fingerprint) {
            return Err("request_fingerprint");
        }
        if self.max_cost.0 < 0 {
            return Err("max_cost_usd");
        }
        if self.ttl_seconds == 0 {
            return Err("ttl_seconds");
        }
        Ok(())
    }

    /// The claims [`mint`] signs.
    pub fn claims(&self) -> ApprovalClaims {
        let ttl = i64::try_from(self.ttl_seconds).unwrap_or(i64::MAX);
        ApprovalClaims {
            iss: self.issuer.to_owned(),
            aud: AUDIENCE.to_owned(),
            sub: format!("{SUBJECT_PREFIX}{}", self.approval_id),
            jti: self.approval_id.to_owned(),
            iat: self.now_s,
            nbf: self.now_s,
            exp: self.now_s.saturating_add(ttl),
            tenant_id: self.tenant_id.to_owned(),
            approval_id: self.approval_id.to_owned(),
            request_fingerprint: self.request_fingerprint.to_owned(),
            max_cost_usd: self.max_cost,
            token_type: TOKEN_TYPE.to_owned(),
        }
    }
}

/// Mints an approval token signed with `secret` (the primary secret; `kid` =
/// `PREAUTH_APPROVAL_SIGNING_KID`). Does not validate: call [`MintRequest::validate`] first.
pub fn mint(req: &MintRequest<'_>, secret: &[u8], kid: Option<&str>) -> String {
    sign(&req.claims(), secret, kid)
}

/// Signs already-built claims (HS256).
pub fn sign(claims: &ApprovalClaims, secret: &[u8], kid: Option<&str>) -> String {
    jwt::sign_hs256(&claims.to_json(), secret, kid)
}

/// Verifies an approval token: `keys` is the primary secret first, then the fallbacks; `issuer`
/// is `PREAUTH_APPROVAL_ISSUER`. Does not check the binding (see [`check_binding`]) nor single use.
pub fn verify(token: &str, keys: &[&[u8]], issuer: &str, now_s: i64) -> Result<ApprovalClaims, ApprovalError> {
    verify_keyed(token, keys, issuer, now_s).map(|(c, _)| c)
}

/// [`verify`], also telling which key verified it (0 = primary, n = the n-th fallback) — worth a
/// log line during a rotation.
pub fn verify_keyed(
    token: &str,
    keys: &[&[u8]],
    issuer: &str,
    now_s: i64,
) -> Result<(ApprovalClaims, usize), ApprovalError> {
    if keys.is_empty() {
        return Err(ApprovalError::Invalid("no_key_configured"));
    }
    match jwt::verify_hs256(token, keys, now_s) {
        Ok(v) => Ok((parse_claims(&v.claims, issuer)?, v.key_index)),
        Err(JwtError::Expired) => {
            // The signature verified (jwt checks it before `exp`): classify a foreign or broken
            // token as invalid rather than expired.
            let claims = payload(token).ok_or(ApprovalError::Invalid("malformed"))?;
            parse_claims(&claims, issuer)?;
            Err(ApprovalError::Expired)
        }
        Err(e) => Err(ApprovalError::Invalid(match e {
            JwtError::Malformed => "malformed",
            JwtError::Algorithm => "alg",
            JwtError::Signature => "signature",
            JwtError::NotYetValid => "nbf",
            JwtError::Claim(name) => name,
            JwtError::Expired => "exp",
        })),
    }
}

/// Binds a verified token to this request: same tenant, same fingerprint (both compared in
/// constant time) and `max_cost_usd` ≥ `estimated_cost`.
pub fn check_binding(
    claims: &ApprovalClaims,
    tenant: &str,
    fingerprint: &str,
    estimated_cost: Micros,
) -> Result<(), ApprovalError> {
    // Evaluate both before branching so timing does not tell which one differed.
    let tenant_ok = ct_eq(claims.tenant_id.as_bytes(), tenant.as_bytes());
    let fingerprint_ok = ct_eq(claims.request_fingerprint.as_bytes(), fingerprint.as_bytes());
    if !tenant_ok {
        return Err(ApprovalError::Mismatch("tenant_id"));
    }
    if !fingerprint_ok {
        return Err(ApprovalError::Mismatch("request_fingerprint"));
    }
    if claims.max_cost_usd < estimated_cost {
        return Err(ApprovalError::Mismatch("max_cost_usd"));
    }
    Ok(())
}

/// Constant-time equality that does not leak the length either: both sides are hashed to 32
/// bytes first, then compared without early exit.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    let diff = ha.iter().zip(hb.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// 64 lowercase hex digits (a SHA-256 in hex, as `proxy::fingerprint` produces).
pub fn is_fingerprint(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && !s.chars().any(char::is_control)
}

/// The payload of a compact JWS whose signature has already been verified.
fn payload(token: &str) -> Option<Map<String, Value>> {
    let p64 = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(p64.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn str_claim<'m>(claims: &'m Map<String, Value>, name: &'static str) -> Result<&'m str, ApprovalError> {
    claims.get(name).and_then(Value::as_str).ok_or(ApprovalError::Invalid(name))
}

fn int_claim(claims: &Map<String, Value>, name: &'static str) -> Result<i64, ApprovalError> {
    claims.get(name).and_then(jwt::as_int).ok_or(ApprovalError::Invalid(name))
}

/// Every claim present, of the right type and value (time claims are jwt's business, but must
/// be present integers here).
fn parse_claims(claims: &Map<String, Value>, issuer: &str) -> Result<ApprovalClaims, ApprovalError> {
    let invalid = ApprovalError::Invalid;
    let token_type = str_claim(claims, "token_type")?;
    if token_type != TOKEN_TYPE {
        return Err(invalid("token_type"));
    }
    let aud = str_claim(claims, "aud")?;
    if aud != AUDIENCE {
        return Err(invalid("aud"));
    }
    let iss = str_claim(claims, "iss")?;
    if iss != issuer {
        return Err(invalid("iss"));
    }
    let iat = int_claim(claims, "iat")?;
    let nbf = int_claim(claims, "nbf")?;
    let exp = int_claim(claims, "exp")?;
    let approval_id = str_claim(claims, "approval_id")?;
    if !valid_id(approval_id) {
        return Err(invalid("approval_id"));
    }
    let jti = str_claim(claims, "jti")?;
    if jti != approval_id {
        return Err(invalid("jti"));
    }
    let sub = str_claim(claims, "sub")?;
    if sub.strip_prefix(SUBJECT_PREFIX) != Some(approval_id) {
        return Err(invalid("sub"));
    }
    let tenant_id = str_claim(claims, "tenant_id")?;
    if !valid_id(tenant_id) {
        return Err(invalid("tenant_id"));
    }
    let request_fingerprint = str_claim(claims, "request_fingerprint")?;
    if !is_fingerprint(request_fingerprint) {
        return Err(invalid("request_fingerprint"));
    }
    let max_cost_usd = Micros::from_usd_str(str_claim(claims, "max_cost_usd")?)
        .ok()
        .filter(|m| m.0 >= 0)
        .ok_or(invalid("max_cost_usd"))?;
    Ok(ApprovalClaims {
        iss: iss.to_owned(),
        aud: aud.to_owned(),
        sub: sub.to_owned(),
        jti: jti.to_owned(),
        iat,
        nbf,
        exp,
        tenant_id: tenant_id.to_owned(),
        approval_id: approval_id.to_owned(),
        request_fingerprint: request_fingerprint.to_owned(),
        max_cost_usd,
        token_type: token_type.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    //! Tokens here are built by hand (serde_json + base64 + raw HMAC), never with `sign`/`mint`,
    //! except where the product's minting itself is under test.
    use super::*;
    use hmac::{Hmac, Mac};
    use serde_json::json;

    const KEY: &[u8] = b"primary-secret-0123456789abcdef-0123";
    const OLD: &[u8] = b"old-secret-0123456789abcdef-0123456789";
    const ISS: &str = "preauth-sidecar";
    const FP: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const NOW: i64 = 1_800_000_000;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn hs256(input: &str, key: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(input.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn hand_token(header: &Value, claims: &Value, key: &[u8]) -> String {
        let input = format!("{}.{}", b64(&header.to_string()), b64(&claims.to_string()));
        let sig = URL_SAFE_NO_PAD.encode(hs256(&input, key));
        format!("{input}.{sig}")
    }

    fn header() -> Value {
        json!({"alg": "HS256", "typ": "JWT"})
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": "llm_preauth",
            "sub": "enforcement_approval:0190f5c2-7b1e-7c3a-9a8e-1234567890ab",
            "jti": "0190f5c2-7b1e-7c3a-9a8e-1234567890ab",
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "exp": NOW + 900,
            "tenant_id": "acme",
            "approval_id": "0190f5c2-7b1e-7c3a-9a8e-1234567890ab",
            "request_fingerprint": FP,
            "max_cost_usd": "2.500000",
            "token_type": "enforcement_approval",
        })
    }

    fn with(mut c: Value, name: &str, v: Value) -> Value {
        c[name] = v;
        c
    }

    fn check(c: &Value) -> Result<ApprovalClaims, ApprovalError> {
        verify(&hand_token(&header(), c, KEY), &[KEY], ISS, NOW)
    }

    #[test]
    fn accepts_an_independently_minted_token() {
        let t = hand_token(&json!({"alg": "HS256", "typ": "JWT", "kid": "k1"}), &claims(), KEY);
        let c = verify(&t, &[KEY], ISS, NOW).unwrap();
        assert_eq!(c.tenant_id, "acme");
        assert_eq!(c.approval_id, "0190f5c2-7b1e-7c3a-9a8e-1234567890ab");
        assert_eq!(c.jti, c.approval_id);
        assert_eq!(c.max_cost_usd, Micros(2_500_000));
        assert_eq!(c.exp, NOW + 900);
        assert_eq!(check_binding(&c, "acme", FP, Micros(2_500_000)), Ok(()));
        assert_eq!(check_binding(&c, "acme", FP, Micros(1)), Ok(()));
        // A short decimal string and float-typed integers, as other libraries emit them.
        let c2 = with(with(claims(), "max_cost_usd", json!("2.5")), "exp", json!((NOW + 900) as f64));
        assert_eq!(check(&c2).unwrap().max_cost_usd, Micros(2_500_000));
    }

    #[test]
    fn bad_signature_is_invalid() {
        let t = hand_token(&header(), &claims(), b"another-secret-0123456789abcdef-012");
        assert_eq!(verify(&t, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("signature")));
        // Payload swapped under a valid signature.
        let good = hand_token(&header(), &claims(), KEY);
        let other = hand_token(&header(), &with(claims(), "max_cost_usd", json!("999.00")), KEY);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2]);
        assert_eq!(verify(&forged, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("signature")));
        assert_eq!(verify("not-a-token", &[KEY], ISS, NOW), Err(ApprovalError::Invalid("malformed")));
        assert_eq!(verify(&good, &[], ISS, NOW), Err(ApprovalError::Invalid("no_key_configured")));
    }

    #[test]
    fn other_algorithms_are_invalid() {
        let c = claims().to_string();
        // alg none, unsigned and "signed".
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&c));
        assert!(matches!(verify(&none, &[KEY], ISS, NOW), Err(ApprovalError::Invalid(_))));
        let none_signed = hand_token(&json!({"alg": "none"}), &claims(), KEY);
        assert_eq!(verify(&none_signed, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("alg")));
        // Real HS384 / HS512 tokens with the right key.
        let input384 = format!("{}.{}", b64(r#"{"alg":"HS384"}"#), b64(&c));
        let mut m384 = Hmac::<sha2::Sha384>::new_from_slice(KEY).unwrap();
        m384.update(input384.as_bytes());
        let t384 = format!("{input384}.{}", URL_SAFE_NO_PAD.encode(m384.finalize().into_bytes()));
        assert_eq!(verify(&t384, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("alg")));
        let input512 = format!("{}.{}", b64(r#"{"alg":"HS512"}"#), b64(&c));
        let mut m512 = Hmac::<sha2::Sha512>::new_from_slice(KEY).unwrap();
        m512.update(input512.as_bytes());
        let t512 = format!("{input512}.{}", URL_SAFE_NO_PAD.encode(m512.finalize().into_bytes()));
        assert_eq!(verify(&t512, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("alg")));
        // Key confusion: RS256 header, HMAC-SHA256 signature with the shared secret.
        for alg in ["RS256", "ES256", "PS256", "hs256", ""] {
            let t = hand_token(&json!({"alg": alg}), &claims(), KEY);
            assert_eq!(verify(&t, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("alg")), "{alg}");
        }
        let t = hand_token(&json!({"typ": "JWT"}), &claims(), KEY);
        assert_eq!(verify(&t, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("alg")));
    }

    #[test]
    fn wrong_claim_values_are_invalid() {
        let cases = [
            ("aud", json!("authenticated"), "aud"),
            ("aud", json!(["llm_preauth"]), "aud"),
            ("iss", json!("someone-else"), "iss"),
            ("token_type", json!("access"), "token_type"),
            ("sub", json!("enforcement_approval:other"), "sub"),
            ("sub", json!("0190f5c2-7b1e-7c3a-9a8e-1234567890ab"), "sub"),
            ("jti", json!("other"), "jti"),
            ("request_fingerprint", json!("abc"), "request_fingerprint"),
            ("request_fingerprint", json!(FP.to_uppercase()), "request_fingerprint"),
            ("max_cost_usd", json!(2.5), "max_cost_usd"),
            ("max_cost_usd", json!("two"), "max_cost_usd"),
            ("max_cost_usd", json!("-1.00"), "max_cost_usd"),
            ("iat", json!("1800000000"), "iat"),
            ("nbf", json!(1.5), "nbf"),
            ("tenant_id", json!(42), "tenant_id"),
            ("tenant_id", json!(""), "tenant_id"),
        ];
        for (name, v, want) in cases {
            let got = check(&with(claims(), name, v.clone()));
            assert_eq!(got, Err(ApprovalError::Invalid(want)), "{name}={v}");
        }
        assert_eq!(
            verify(&hand_token(&header(), &claims(), KEY), &[KEY], "other-issuer", NOW).unwrap_err().code(),
            "approval_token_invalid"
        );
    }

    #[test]
    fn every_claim_is_required() {
        for name in claims().as_object().unwrap().keys() {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(name);
            let got = check(&c);
            assert!(matches!(got, Err(ApprovalError::Invalid(_))), "without {name}: {got:?}");
        }
    }

    #[test]
    fn time() {
        let t = hand_token(&header(), &claims(), KEY);
        assert!(verify(&t, &[KEY], ISS, NOW + 899).is_ok());
        assert_eq!(verify(&t, &[KEY], ISS, NOW + 900), Err(ApprovalError::Expired));
        assert_eq!(ApprovalError::Expired.status(), 409);
        // Not yet valid (beyond the leeway).
        let future = with(claims(), "nbf", json!(NOW + 60));
        assert_eq!(check(&future), Err(ApprovalError::Invalid("nbf")));
        // Expired and foreign: invalid wins.
        let t = hand_token(&header(), &with(claims(), "aud", json!("x")), KEY);
        assert_eq!(verify(&t, &[KEY], ISS, NOW + 10_000), Err(ApprovalError::Invalid("aud")));
        // Expired with a bad signature: invalid.
        let t = hand_token(&header(), &claims(), OLD);
        assert_eq!(verify(&t, &[KEY], ISS, NOW + 10_000), Err(ApprovalError::Invalid("signature")));
    }

    #[test]
    fn binding_mismatches() {
        let c = check(&claims()).unwrap();
        let other_fp = "0".repeat(64);
        assert_eq!(check_binding(&c, "globex", FP, Micros(1)), Err(ApprovalError::Mismatch("tenant_id")));
        assert_eq!(check_binding(&c, "acm", FP, Micros(1)), Err(ApprovalError::Mismatch("tenant_id")));
        assert_eq!(
            check_binding(&c, "acme", &other_fp, Micros(1)),
            Err(ApprovalError::Mismatch("request_fingerprint"))
        );
        assert_eq!(check_binding(&c, "acme", FP, Micros(2_500_001)), Err(ApprovalError::Mismatch("max_cost_usd")));
        let e = ApprovalError::Mismatch("tenant_id");
        assert_eq!((e.code(), e.status(), e.metric_event()), ("approval_token_mismatch", 403, "mismatch"));
    }

    #[test]
    fn rotation_primary_then_fallbacks() {
        let old_token = hand_token(&header(), &claims(), OLD);
        let (c, idx) = verify_keyed(&old_token, &[KEY, OLD], ISS, NOW).unwrap();
        assert_eq!((c.tenant_id.as_str(), idx), ("acme", 1));
        let new_token = hand_token(&header(), &claims(), KEY);
        assert_eq!(verify_keyed(&new_token, &[KEY, OLD], ISS, NOW).unwrap().1, 0);
        // The old secret removed: refused.
        assert_eq!(verify(&old_token, &[KEY], ISS, NOW), Err(ApprovalError::Invalid("signature")));
    }

    #[test]
    fn mint_produces_exactly_the_contract_claims() {
        let req = MintRequest {
            issuer: ISS,
            tenant_id: "acme",
            approval_id: "ap-1",
            request_fingerprint: FP,
            max_cost: Micros(1_500_000),
            now_s: NOW,
            ttl_seconds: 900,
        };
        assert_eq!(req.validate(), Ok(()));
        let t = mint(&req, KEY, Some("k-2026"));
        let mut parts = t.split('.');
        let h: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap();
        assert_eq!(h, json!({"alg": "HS256", "typ": "JWT", "kid": "k-2026"}));
        let p: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap();
        assert_eq!(
            p,
            json!({
                "iss": ISS, "aud": "llm_preauth", "sub": "enforcement_approval:ap-1", "jti": "ap-1",
                "iat": NOW, "nbf": NOW, "exp": NOW + 900, "tenant_id": "acme", "approval_id": "ap-1",
                "request_fingerprint": FP, "max_cost_usd": "1.500000", "token_type": "enforcement_approval",
            })
        );
        // Independently checked signature.
        let input = format!("{}.{}", t.split('.').next().unwrap(), t.split('.').nth(1).unwrap());
        assert_eq!(URL_SAFE_NO_PAD.encode(hs256(&input, KEY)), t.split('.').nth(2).unwrap());
        let c = verify(&t, &[KEY], ISS, NOW).unwrap();
        assert_eq!(c, req.claims());
        assert_eq!(c.expires_at_ms(), (NOW as u64 + 900) * 1000);
        assert_eq!(MintRequest { request_fingerprint: "xyz", ..req }.validate(), Err("request_fingerprint"));
        assert_eq!(MintRequest { tenant_id: "", ..req }.validate(), Err("tenant_id"));
        assert_eq!(MintRequest { max_cost: Micros(-1), ..req }.validate(), Err("max_cost_usd"));
        assert_eq!(MintRequest { ttl_seconds: 0, ..req }.validate(), Err("ttl_seconds"));
    }

    #[test]
    fn error_codes() {
        let all = [
            (ApprovalError::Invalid("x"), "approval_token_invalid", 401, "invalid"),
            (ApprovalError::Expired, "approval_token_expired", 409, "expired"),
            (ApprovalError::Mismatch("x"), "approval_token_mismatch", 403, "mismatch"),
            (ApprovalError::Replayed, "approval_token_replayed", 409, "replay"),
        ];
        for (e, code, status, event) in all {
            assert_eq!((e.code(), e.status(), e.metric_event()), (code, status, event));
        }
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"abcd"));
        assert!(is_fingerprint(FP) && !is_fingerprint(&FP[1..]));
    }
}
