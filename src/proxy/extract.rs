//! Request facts from headers and body: who the caller is, and what the LLM request asks for.
//! Works on `http` types, not pingora's `Session`, so every rule here is a unit test.
//!
//! Owns: `Caller`, `identify`, `VerifiedTokens`, `LlmRequest`, `parse_body`,
//! `inject_include_usage`, `clamp_body`. Imports: config (identity settings),
//! `decide::{json, jwt, route}`, serde_json (only for the rare rewrites that re-serialise a body).

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value};

use crate::config::Identity;
use crate::decide::estimate;
use crate::decide::json::{Doc, Json};
use crate::decide::jwt;
use crate::decide::Route;

/// Header names the sidecar reads or writes.
pub mod names {
    pub const REQUEST_ID: &str = "x-preauth-request-id";
    pub const DECISION: &str = "x-preauth-decision";
    pub const RESERVATION_ID: &str = "x-preauth-reservation-id";
    pub const ERROR: &str = "x-preauth-error";
    pub const SOURCE: &str = "x-preauth-source";
    pub const APPROVAL_TOKEN: &str = "x-approval-token";
    pub const TENANT_ID: &str = "x-tenant-id";
    pub const TENANT_TIER: &str = "x-tenant-tier";
    pub const USER_ID: &str = "x-user-id";
}

/// Longest tenant id accepted (ids are keys in every store).
pub const MAX_TENANT_ID_LEN: usize = 128;

/// The authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
/// Shared text: a remembered token's caller is handed out on every request without copying.
pub struct Caller {
    pub tenant: Arc<str>,
    /// The tier named by the token (or `x-tenant-tier`), if any; the tenants file wins over it.
    pub claimed_tier: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_TENANT_ID_LEN && t.bytes().all(|b| b.is_ascii_graphic())
}

/// Bearer tokens that passed verification, so that a client sending the same token on every
/// call (the common case) pays one HMAC and two JSON parses per token, not per request. Keyed by
/// the whole token; `exp` and `nbf` are checked again on every hit; the audience and claims are
/// fixed by the token's bytes and the (static) identity settings. Bounded: a full shard is
/// emptied (re-verification is the only cost).
pub struct VerifiedTokens {
    shards: Vec<parking_lot::Mutex<crate::decide::FastMap<Box<str>, CachedCaller>>>,
    per_shard: usize,
}

#[derive(Clone)]
struct CachedCaller {
    caller: Caller,
    exp: i64,
    nbf: Option<i64>,
}

impl VerifiedTokens {
    const SHARDS: usize = 8;

    /// At most `capacity` tokens (0 disables the cache).
    pub fn new(capacity: usize) -> VerifiedTokens {
        VerifiedTokens {
            shards: (0..Self::SHARDS).map(|_| parking_lot::Mutex::new(crate::decide::FastMap::default())).collect(),
            per_shard: capacity.div_ceil(Self::SHARDS),
        }
    }

    fn shard(&self, token: &str) -> &parking_lot::Mutex<crate::decide::FastMap<Box<str>, CachedCaller>> {
        // The tail is the signature: uniformly distributed.
        let b = token.as_bytes();
        let h = b.iter().rev().take(8).fold(0usize, |h, &x| h.wrapping_mul(31).wrapping_add(x as usize));
        &self.shards[h % Self::SHARDS]
    }

    fn get(&self, token: &str, now_s: i64) -> Option<Result<Caller, &'static str>> {
        let hit = self.shard(token).lock().get(token).cloned()?;
        Some(if now_s >= hit.exp {
            Err("token_expired")
        } else if hit.nbf.is_some_and(|nbf| now_s + jwt::NBF_LEEWAY_SECONDS < nbf) {
            Err("token_not_yet_valid")
        } else {
            Ok(hit.caller)
        })
    }

    fn put(&self, token: &str, entry: CachedCaller) {
        if self.per_shard == 0 {
            return;
        }
        let mut m = self.shard(token).lock();
        if m.len() >= self.per_shard {
            *m = crate::decide::FastMap::default();
        }
        m.insert(token.into(), entry);
    }
}

/// Authenticates the caller from its request headers. The error is a short machine reason for
/// the 401's details.
pub fn identify(identity: &Identity, headers: &HeaderMap, now_s: i64) -> Result<Caller, &'static str> {
    identify_cached(identity, |n| header_str(headers, n), now_s, None)
}

/// Header identity: a request that names its tenant, tier or user more than once is refused
/// (`duplicate_identity_header`) — a front proxy that appends its own `x-tenant-id` instead of
/// replacing the client's would otherwise let the client's first one win. `count(name)` counts
/// the request's lines of a header.
///
/// JWT identity: two `Authorization` lines are refused alike (`duplicate_authorization_header`),
/// rather than letting the first one win silently.
pub fn ambiguous_identity(identity: &Identity, count: impl Fn(&str) -> usize) -> Option<&'static str> {
    match identity {
        Identity::Header => [names::TENANT_ID, names::TENANT_TIER, names::USER_ID]
            .into_iter()
            .any(|n| count(n) > 1)
            .then_some("duplicate_identity_header"),
        Identity::Jwt { .. } => (count("authorization") > 1).then_some("duplicate_authorization_header"),
    }
}

/// [`identify`] over a header lookup (`header(name)`: the first value, trimmed, when non-empty
/// text), reusing (and filling) `cache` for bearer tokens.
pub fn identify_cached<'h>(
    identity: &Identity,
    header: impl Fn(&str) -> Option<&'h str>,
    now_s: i64,
    cache: Option<&VerifiedTokens>,
) -> Result<Caller, &'static str> {
    match identity {
        Identity::Header => {
            let tenant = header(names::TENANT_ID).ok_or("missing_tenant_header")?;
            if !valid_tenant(tenant) {
                return Err("invalid_tenant_id");
            }
            Ok(Caller {
                tenant: tenant.into(),
                claimed_tier: header(names::TENANT_TIER).map(Arc::from),
                user: header(names::USER_ID).map(Arc::from),
            })
        }
        Identity::Jwt { secret, audience, tenant_claim, tier_claim } => {
            let auth = header("authorization").ok_or("missing_bearer_token")?;
            let token = auth
                .strip_prefix("Bearer ")
                .or_else(|| auth.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or("missing_bearer_token")?;
            if let Some(hit) = cache.and_then(|c| c.get(token, now_s)) {
                return hit;
            }
            let v = jwt::verify_hs256(token, &[secret.expose().as_bytes()], now_s).map_err(|e| match e {
                jwt::JwtError::Expired => "token_expired",
                jwt::JwtError::NotYetValid => "token_not_yet_valid",
                jwt::JwtError::Algorithm => "token_algorithm_not_allowed",
                jwt::JwtError::Signature => "token_signature_invalid",
                _ => "token_invalid",
            })?;
            if !jwt::audience_matches(&v.claims, audience) {
                return Err("token_audience_mismatch");
            }
            let tenant = jwt::claim_str(&v.claims, tenant_claim).ok_or("token_missing_tenant_claim")?;
            if !valid_tenant(&tenant) {
                return Err("invalid_tenant_id");
            }
            let caller = Caller {
                tenant: tenant.into(),
                claimed_tier: jwt::claim_str(&v.claims, tier_claim).map(Arc::from),
                user: jwt::claim_str(&v.claims, "sub").map(Arc::from),
            };
            if let Some(c) = cache {
                // Both were validated by verify_hs256 (an `exp` is required).
                let exp = v.claims.get("exp").and_then(jwt::as_int).unwrap_or(i64::MIN);
                let nbf = v.claims.get("nbf").and_then(jwt::as_int);
                c.put(token, CachedCaller { caller: caller.clone(), exp, nbf });
            }
            Ok(caller)
        }
    }
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| super::downstream::header_text(v.as_bytes()))
}

/// A parsed LLM request body; its strings borrow the body.
#[derive(Clone, Debug)]
pub struct LlmRequest<'a> {
    pub json: Doc<'a>,
    /// The body as received (re-read in full by the rare rewrites that re-serialise it).
    pub raw: &'a [u8],
    pub model: String,
    pub stream: bool,
}

/// The longest `model` accepted (provider model ids, fine-tuned ones included, are far shorter).
pub const MAX_MODEL_BYTES: usize = 256;

/// Parses and validates the body of an inspected route (CONTRACT §10 required fields).
pub fn parse_body(route: Route, body: &[u8]) -> Result<LlmRequest<'_>, String> {
    let json = Doc::parse(body).map_err(|e| format!("Request body is not valid JSON: {e}"))?;
    let obj = json.root().as_object().ok_or("Request body must be a JSON object.")?;
    // The fields read here, in one pass (keys are unique in a `Doc`).
    let (mut model, mut messages, mut prompt, mut input, mut max_tokens, mut stream) =
        (None, None, None, None, None, None);
    let (mut max_completion_tokens, mut max_output_tokens, mut n, mut best_of) = (None, None, None, None);
    for (k, v) in obj {
        let slot = match k {
            "n" => &mut n,
            "best_of" => &mut best_of,
            "model" => &mut model,
            "messages" => &mut messages,
            "prompt" => &mut prompt,
            "input" => &mut input,
            "max_tokens" => &mut max_tokens,
            "max_completion_tokens" => &mut max_completion_tokens,
            "max_output_tokens" => &mut max_output_tokens,
            "stream" => &mut stream,
            _ => continue,
        };
        *slot = Some(v);
    }
    for field in route.required_fields() {
        let value = match *field {
            "model" => model,
            "messages" => messages,
            "prompt" => prompt,
            "input" => input,
            "max_tokens" => max_tokens,
            other => obj.get(other),
        };
        if value.is_none_or(Json::is_null) {
            return Err(format!("Missing required field `{field}` for {}.", route.path()));
        }
    }
    let model = model
        .and_then(Json::as_str)
        .filter(|m| !m.is_empty())
        .ok_or("Field `model` must be a non-empty string.")?
        .to_string();
    // Every event of the request carries the model: an unbounded one would let one caller fill
    // the outbox (and push the replica onto its failsafe path).
    if model.len() > MAX_MODEL_BYTES {
        return Err(format!("Field `model` must be at most {MAX_MODEL_BYTES} bytes."));
    }
    if route == Route::Messages && max_tokens.is_none_or(|v| v.as_u64().is_none()) {
        return Err("Field `max_tokens` must be a non-negative integer.".to_string());
    }
    // The output limit prices the request: a limit the estimate cannot read (a string, a
    // negative or fractional number) would otherwise be priced at the model's default while a
    // lenient gateway might still honour it. `null` means absent, as for the providers.
    if route.has_output() {
        let limits = [
            ("max_tokens", max_tokens),
            ("max_completion_tokens", max_completion_tokens),
            ("max_output_tokens", max_output_tokens),
        ];
        for (field, v) in limits {
            if v.is_some_and(|v| !v.is_null() && estimate::as_count(v).is_none()) {
                return Err(format!("Field `{field}` must be a non-negative integer."));
            }
        }
    }
    // So do the number of choices: a gateway that coerces `"n": "5"` would generate five while the
    // estimate priced one.
    let counts = match route {
        Route::ChatCompletions => [("n", n), ("best_of", None)],
        Route::Completions => [("n", n), ("best_of", best_of)],
        _ => [("n", None), ("best_of", None)],
    };
    for (field, v) in counts {
        if v.is_some_and(|v| !v.is_null() && estimate::as_count(v).is_none()) {
            return Err(format!("Field `{field}` must be a non-negative integer."));
        }
    }
    let stream = stream.and_then(Json::as_bool).unwrap_or(false);
    Ok(LlmRequest { json, raw: body, model, stream })
}

/// The body as a `serde_json` object, for the rare rewrites that re-serialise it.
fn body_object(req: &LlmRequest<'_>) -> Option<Map<String, Value>> {
    match serde_json::from_slice(req.raw) {
        Ok(Value::Object(obj)) => Some(obj),
        _ => None,
    }
}

/// For streaming OpenAI-shape requests without `stream_options.include_usage: true`, returns
/// the body with `"stream_options":{"include_usage":true}` added, so the stream reports usage,
/// every original byte kept: when the body has no `stream_options`, the field is spliced in after
/// the opening brace; when it has one (an object, or `null`), `"include_usage":true` goes into it
/// (replacing a `false`, a `null` or another value). Only a `stream_options` that cannot be found
/// in the bytes as written (an escaped key) makes the object re-serialised. A client that said
/// `false` does not see the usage chunk ([`refuses_usage`], `strip`).
pub fn inject_include_usage(route: Route, req: &LlmRequest<'_>, original: &[u8]) -> Option<Bytes> {
    if !req.stream || !route.wants_include_usage() {
        return None;
    }
    let obj = req.json.root().as_object()?;
    match obj.get("stream_options") {
        None => {
            let brace = original.iter().position(|b| *b == b'{')?;
            const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
            let mut out = Vec::with_capacity(original.len() + FIELD.len());
            out.extend_from_slice(&original[..=brace]);
            out.extend_from_slice(FIELD);
            out.extend_from_slice(&original[brace + 1..]);
            Some(Bytes::from(out))
        }
        Some(so) if so.get("include_usage").and_then(|v| v.as_bool()) == Some(true) => None,
        Some(so) => {
            let spliced = match so.get("include_usage") {
                None => splice_into_stream_options(original),
                Some(_) => set_include_usage_in_place(original),
            };
            // Checked by a full read (a rare path): a key written with an escape elsewhere in the
            // body could make the bytes found here not the ones a reader keeps.
            let read = |b: &[u8]| serde_json::from_slice::<Value>(b).ok();
            if let Some(out) = spliced.filter(|out| {
                read(out).is_some_and(|v| v.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)))
            }) {
                return Some(Bytes::from(out));
            }
            let mut obj = body_object(req)?;
            let mut so = match obj.remove("stream_options") {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            };
            so.insert("include_usage".into(), Value::Bool(true));
            obj.insert("stream_options".into(), Value::Object(so));
            serde_json::to_vec(&obj).ok().map(Bytes::from)
        }
    }
}

/// Whether a streaming OpenAI-shape request said `stream_options.include_usage: false`: it goes
/// to the gateway with `true` (its usage is what it is charged from; reasoning tokens never show
/// in the text), and the usage chunk is taken out of the answer on its way to the client.
pub fn refuses_usage(route: Route, req: &LlmRequest<'_>) -> bool {
    req.stream
        && route.wants_include_usage()
        && req.json.root().get("stream_options").and_then(|so| so.get("include_usage")).and_then(|v| v.as_bool())
            == Some(false)
}

/// `original` (a valid JSON object whose `stream_options` object has an `include_usage` that is
/// not `true`) with that value replaced by `true`, every other byte kept. `None` when either
/// member is not found as written.
fn set_include_usage_in_place(original: &[u8]) -> Option<Vec<u8>> {
    let (so_start, so_end) = top_level_member(original, b"stream_options")?;
    let (start, end) = top_level_member(&original[so_start..so_end], b"include_usage")?;
    let (start, end) = (so_start + start, so_start + end);
    let mut out = Vec::with_capacity(original.len());
    out.extend_from_slice(&original[..start]);
    out.extend_from_slice(b"true");
    out.extend_from_slice(&original[end..]);
    Some(out)
}

/// `original` (a valid JSON object whose `stream_options` is an object without
/// `include_usage`, or `null`) with `"include_usage":true` written into that value. `None` when
/// the member is not found as written, or its value is of another type.
fn splice_into_stream_options(original: &[u8]) -> Option<Vec<u8>> {
    let (start, end) = top_level_member(original, b"stream_options")?;
    let (at, insert, skip): (usize, &[u8], usize) = match original[start] {
        b'{' if original.get(skip_blank(original, start + 1)) == Some(&b'}') => {
            (start + 1, br#""include_usage":true"#, 0)
        }
        b'{' => (start + 1, br#""include_usage":true,"#, 0),
        b'n' => (start, br#"{"include_usage":true}"#, end - start),
        _ => return None,
    };
    let mut out = Vec::with_capacity(original.len() + insert.len());
    out.extend_from_slice(&original[..at]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&original[at + skip..]);
    Some(out)
}

fn skip_blank(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// The end (exclusive) of the JSON value starting at `i` of the valid document `b`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    let string_end = |mut j: usize| loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    };
    match b.get(i)? {
        b'"' => string_end(i + 1),
        b'{' | b'[' => {
            let (mut depth, mut j) = (0usize, i);
            loop {
                match b.get(j)? {
                    b'"' => j = string_end(j + 1)?,
                    b'{' | b'[' => {
                        depth += 1;
                        j += 1;
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        j += 1;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => j += 1,
                }
            }
        }
        _ => Some(i + b[i..].iter().position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))?),
    }
}

/// The span of the value of the last member of the top-level object of the valid document `b`
/// whose key is `key` as written (the one a JSON reader keeps).
fn top_level_member(b: &[u8], key: &[u8]) -> Option<(usize, usize)> {
    let mut i = skip_blank(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut found = None;
    loop {
        i = skip_blank(b, i);
        match b.get(i)? {
            b'}' => return found,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = value_end(b, i)?;
        let name = &b[i + 1..key_end - 1];
        i = skip_blank(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_blank(b, i + 1);
        let end = value_end(b, start)?;
        if name == key {
            found = Some((start, end));
        }
        i = end;
    }
}

/// The request body with its max output tokens lowered to `max_output` (clamp-to-budget),
/// re-serialised; `include_usage` is injected at the same time when the request needs it.
/// Every output limit the request named (`max_tokens`, `max_completion_tokens`,
/// `max_output_tokens`) is lowered, whichever the gateway honours; when it named none, the
/// route's field is added.
pub fn clamp_body(route: Route, req: &LlmRequest<'_>, max_output: u64) -> Option<Bytes> {
    let mut obj = body_object(req)?;
    let named: Vec<&str> = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .into_iter()
        .filter(|f| obj.get(*f).is_some_and(|v| !v.is_null()))
        .collect();
    if named.is_empty() {
        // Chat: `max_completion_tokens`, which every current chat model takes (o-series and
        // gpt-5 refuse `max_tokens`).
        let field = match route {
            Route::Responses => "max_output_tokens",
            Route::ChatCompletions => "max_completion_tokens",
            _ => "max_tokens",
        };
        obj.insert(field.to_string(), Value::from(max_output));
    }
    for field in named {
        let lower = obj.get(field).and_then(Value::as_u64).is_none_or(|v| v > max_output);
        if lower {
            obj.insert(field.to_string(), Value::from(max_output));
        }
    }
    if req.stream
        && route.wants_include_usage()
        && obj.get("stream_options").is_none_or(|so| so.get("include_usage").and_then(Value::as_bool) != Some(true))
    {
        let mut so = match obj.remove("stream_options") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        so.insert("include_usage".into(), Value::Bool(true));
        obj.insert("stream_options".into(), Value::Object(so));
    }
    serde_json::to_vec(&obj).ok().map(Bytes::from)
}

#[cfg(test)]
#[path = "extract_oracle_tests.rs"]
mod oracle_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use http::HeaderValue;
    use serde_json::json;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn jwt_identity() -> Identity {
        Identity::Jwt {
            secret: Secret::new(KEY),
            audience: "authenticated".into(),
            tenant_claim: "app_metadata.tenant_id".into(),
            tier_claim: "tier".into(),
        }
    }

    fn bearer(claims: Value) -> HeaderMap {
        let mut h = HeaderMap::new();
        let t = jwt::sign_hs256(&claims, KEY.as_bytes(), None);
        h.insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
        h
    }

    #[test]
    fn jwt_identity_with_dotted_claims() {
        let h =
            bearer(json!({"exp": 2000, "aud": "authenticated", "app_metadata": {"tenant_id": "acme"}, "tier": "pro"}));
        let c = identify(&jwt_identity(), &h, 1000).unwrap();
        assert_eq!((&*c.tenant, c.claimed_tier.as_deref()), ("acme", Some("pro")));
    }

    #[test]
    fn jwt_rejections() {
        let id = jwt_identity();
        assert_eq!(identify(&id, &HeaderMap::new(), 1000), Err("missing_bearer_token"));
        let h = bearer(json!({"exp": 2000, "aud": "anon", "app_metadata": {"tenant_id": "a"}}));
        assert_eq!(identify(&id, &h, 1000), Err("token_audience_mismatch"));
        let h = bearer(json!({"exp": 999, "aud": "authenticated", "app_metadata": {"tenant_id": "a"}}));
        assert_eq!(identify(&id, &h, 1000), Err("token_expired"));
        let h = bearer(json!({"exp": 2000, "aud": "authenticated"}));
        assert_eq!(identify(&id, &h, 1000), Err("token_missing_tenant_claim"));
    }

    #[test]
    fn verified_tokens_are_remembered_but_time_still_counts() {
        let id = jwt_identity();
        let cache = VerifiedTokens::new(16);
        let claims = json!({"exp": 2000, "nbf": 1500, "aud": "authenticated", "app_metadata": {"tenant_id": "acme"}});
        let h = bearer(claims);
        // Not yet valid: nothing cached.
        assert_eq!(identify_cached(&id, |n| header_str(&h, n), 1000, Some(&cache)), Err("token_not_yet_valid"));
        let first = identify_cached(&id, |n| header_str(&h, n), 1600, Some(&cache)).unwrap();
        assert_eq!(identify_cached(&id, |n| header_str(&h, n), 1601, Some(&cache)), Ok(first));
        // A hit still honours `exp` and `nbf`.
        assert_eq!(identify_cached(&id, |n| header_str(&h, n), 2000, Some(&cache)), Err("token_expired"));
        assert_eq!(identify_cached(&id, |n| header_str(&h, n), 1000, Some(&cache)), Err("token_not_yet_valid"));
        // A token differing in one signature byte is verified afresh, never served from the cache.
        let auth = h.get("authorization").unwrap().to_str().unwrap().to_string();
        let last = auth.chars().last().unwrap();
        let forged = format!("{}{}", &auth[..auth.len() - 1], if last == 'A' { 'B' } else { 'A' });
        let mut f = HeaderMap::new();
        f.insert("authorization", HeaderValue::from_str(&forged).unwrap());
        assert!(identify_cached(&id, |n| header_str(&f, n), 1600, Some(&cache)).is_err());
        // Bounded: more tokens than capacity never grow a shard past its share.
        for i in 0..100 {
            let h =
                bearer(json!({"exp": 2000, "aud": "authenticated", "app_metadata": {"tenant_id": format!("t{i}")}}));
            assert_eq!(
                identify_cached(&id, |n| header_str(&h, n), 1600, Some(&cache)).unwrap().tenant.to_string(),
                format!("t{i}")
            );
        }
        assert!(cache.shards.iter().all(|s| s.lock().len() <= 2));
    }

    #[test]
    fn a_repeated_identity_header_or_token_is_ambiguous() {
        let twice = |n: &str| if n == names::TENANT_ID { 2 } else { 1 };
        assert_eq!(ambiguous_identity(&Identity::Header, twice), Some("duplicate_identity_header"));
        assert_eq!(ambiguous_identity(&Identity::Header, |_| 1), None);
        let jwt = Identity::Jwt {
            secret: crate::config::Secret::new("s".repeat(32)),
            audience: "a".into(),
            tenant_claim: "t".into(),
            tier_claim: "tier".into(),
        };
        assert_eq!(ambiguous_identity(&jwt, twice), None, "JWT mode: the token names the tenant");
        let two_tokens = |n: &str| if n == "authorization" { 2 } else { 1 };
        assert_eq!(ambiguous_identity(&jwt, two_tokens), Some("duplicate_authorization_header"));
        assert_eq!(ambiguous_identity(&Identity::Header, two_tokens), None, "header mode reads no token");
    }

    #[test]
    fn header_identity() {
        let mut h = HeaderMap::new();
        assert_eq!(identify(&Identity::Header, &h, 0), Err("missing_tenant_header"));
        h.insert("x-tenant-id", HeaderValue::from_static("t-1"));
        h.insert("x-tenant-tier", HeaderValue::from_static("growth"));
        let c = identify(&Identity::Header, &h, 0).unwrap();
        assert_eq!((&*c.tenant, c.claimed_tier.as_deref()), ("t-1", Some("growth")));
    }

    #[test]
    fn an_overlong_model_is_refused() {
        let ok = format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(MAX_MODEL_BYTES));
        assert!(parse_body(Route::ChatCompletions, ok.as_bytes()).is_ok());
        let long = format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(MAX_MODEL_BYTES + 1));
        assert!(parse_body(Route::ChatCompletions, long.as_bytes()).unwrap_err().contains("at most 256 bytes"));
    }

    #[test]
    fn required_fields() {
        assert!(parse_body(Route::ChatCompletions, br#"{"model":"m","messages":[]}"#).is_ok());
        assert!(parse_body(Route::ChatCompletions, br#"{"model":"m"}"#).unwrap_err().contains("messages"));
        assert!(parse_body(Route::Messages, br#"{"model":"m","messages":[]}"#).unwrap_err().contains("max_tokens"));
        // Output limits the estimate cannot read are refused, on every route with output.
        for (route, body) in [
            (Route::ChatCompletions, r#"{"model":"m","messages":[],"max_tokens":"100000"}"#),
            (Route::ChatCompletions, r#"{"model":"m","messages":[],"max_completion_tokens":-1}"#),
            (Route::Completions, r#"{"model":"m","prompt":"p","max_tokens":1.5}"#),
            (Route::Responses, r#"{"model":"m","input":"i","max_output_tokens":[1]}"#),
            (Route::ChatCompletions, r#"{"model":"m","messages":[],"n":"5"}"#),
            (Route::Completions, r#"{"model":"m","prompt":"p","best_of":-2}"#),
        ] {
            assert!(
                parse_body(route, body.as_bytes()).unwrap_err().contains("must be a non-negative integer"),
                "{body}"
            );
        }
        for (route, body) in [
            (Route::ChatCompletions, r#"{"model":"m","messages":[],"max_tokens":null}"#),
            (Route::ChatCompletions, r#"{"model":"m","messages":[],"max_tokens":100.0,"max_completion_tokens":0}"#),
            // Embeddings have no output: the field is not the sidecar's to judge.
            (Route::Embeddings, r#"{"model":"m","input":"i","max_tokens":"x"}"#),
        ] {
            assert!(parse_body(route, body.as_bytes()).is_ok(), "{body}");
        }
        assert!(parse_body(Route::Embeddings, br#"{"model":"m","input":"x"}"#).is_ok());
        assert!(parse_body(Route::Responses, b"[1]").is_err());
        assert!(parse_body(Route::Completions, b"{not json").is_err());
    }

    #[test]
    fn clamp_rewrites_the_field_in_use() {
        let raw = br#"{"model":"m","max_completion_tokens":4000,"stream":true,"messages":[]}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        let v: Value = serde_json::from_slice(&clamp_body(Route::ChatCompletions, &req, 300).unwrap()).unwrap();
        assert_eq!(v["max_completion_tokens"], 300);
        assert!(v.get("max_tokens").is_none());
        assert_eq!(v["stream_options"]["include_usage"], true);
        // Several limits: each is lowered (one already below stays).
        let raw =
            br#"{"model":"m","max_tokens":1,"max_completion_tokens":16384,"max_output_tokens":9000,"messages":[]}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        let v: Value = serde_json::from_slice(&clamp_body(Route::ChatCompletions, &req, 300).unwrap()).unwrap();
        assert_eq!(
            (&v["max_tokens"], &v["max_completion_tokens"], &v["max_output_tokens"]),
            (&json!(1), &json!(300), &json!(300))
        );
        let raw = br#"{"model":"m","input":"x"}"#;
        let req = parse_body(Route::Responses, raw).unwrap();
        let v: Value = serde_json::from_slice(&clamp_body(Route::Responses, &req, 64).unwrap()).unwrap();
        assert_eq!(v["max_output_tokens"], 64);
        // None named: the field each route's current models take.
        let raw = br#"{"model":"o3-mini","messages":[]}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        let v: Value = serde_json::from_slice(&clamp_body(Route::ChatCompletions, &req, 64).unwrap()).unwrap();
        assert_eq!((&v["max_completion_tokens"], v.get("max_tokens")), (&json!(64), None));
        let raw = br#"{"model":"m","prompt":"x"}"#;
        let req = parse_body(Route::Completions, raw).unwrap();
        let v: Value = serde_json::from_slice(&clamp_body(Route::Completions, &req, 64).unwrap()).unwrap();
        assert_eq!(v["max_tokens"], 64);
    }

    #[test]
    fn include_usage_is_spliced_byte_exact() {
        let raw = br#"  {"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        let out = inject_include_usage(Route::ChatCompletions, &req, raw).unwrap();
        assert_eq!(
            &out[..],
            &br#"  {"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#[..]
        );
        // `false` goes to the gateway as `true` (the answer's usage chunk is taken out again).
        let raw = br#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage": false}}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        assert!(refuses_usage(Route::ChatCompletions, &req));
        assert_eq!(
            &inject_include_usage(Route::ChatCompletions, &req, raw).unwrap()[..],
            &br#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage": true}}"#[..]
        );
        for (route, raw) in [
            (
                Route::ChatCompletions,
                &br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#[..],
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","messages":[],"stream":false,"stream_options":{"include_usage":false}}"#,
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":null}}"#,
            ),
            (Route::Responses, br#"{"model":"m","input":"x","stream":true,"stream_options":{"include_usage":false}}"#),
        ] {
            let req = parse_body(route, raw).unwrap();
            assert!(!refuses_usage(route, &req), "{}", String::from_utf8_lossy(raw));
        }
        let raw = br#"{"model":"m","stream":true,"messages":[],"stream_options":{}}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        let v: Value =
            serde_json::from_slice(&inject_include_usage(Route::ChatCompletions, &req, raw).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let raw = br#"{"model":"m","messages":[]}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        assert!(inject_include_usage(Route::ChatCompletions, &req, raw).is_none(), "not streaming");
    }

    /// A body that already has `stream_options` keeps every byte too (SDKs send
    /// `include_obfuscation` there; integers beyond 64 bits must not become floats).
    #[test]
    fn include_usage_goes_into_an_existing_stream_options_byte_exact() {
        let big = "123456789012345678901234567890";
        for (raw, want) in [
            (
                format!(
                    r#"{{"model":"m","messages":[],"big":{big},"stream":true,"stream_options":{{"include_obfuscation":false}},"z":"{{}}"}}"#
                ),
                format!(
                    r#"{{"model":"m","messages":[],"big":{big},"stream":true,"stream_options":{{"include_usage":true,"include_obfuscation":false}},"z":"{{}}"}}"#
                ),
            ),
            (
                r#"{"stream":true, "stream_options" : { } ,"model":"m","messages":[]}"#.to_string(),
                r#"{"stream":true, "stream_options" : {"include_usage":true } ,"model":"m","messages":[]}"#.to_string(),
            ),
            (
                r#"{"stream_options":null,"model":"m","messages":["}",{"a":"\"stream_options\""}],"stream":true}"#
                    .to_string(),
                r#"{"stream_options":{"include_usage":true},"model":"m","messages":["}",{"a":"\"stream_options\""}],"stream":true}"#
                    .to_string(),
            ),
            // Two of them: the last is the one a reader keeps, and the one written into.
            (
                r#"{"model":"m","messages":[],"stream":true,"stream_options":{"a":1},"stream_options":{"b":2}}"#.to_string(),
                r#"{"model":"m","messages":[],"stream":true,"stream_options":{"a":1},"stream_options":{"include_usage":true,"b":2}}"#
                    .to_string(),
            ),
        ] {
            let req = parse_body(Route::ChatCompletions, raw.as_bytes()).unwrap();
            let out = inject_include_usage(Route::ChatCompletions, &req, raw.as_bytes()).unwrap();
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
        // `include_usage` there but not a boolean: replaced by `true` in place (the last of
        // duplicates: the one a reader keeps), every other byte kept.
        let head = r#"{"model":"m","seed":123456789012345678901234567890,"messages":[],"stream":true,"#;
        for (so, want) in [
            (
                r#""stream_options":{"a":1, "include_usage" : null }}"#,
                r#""stream_options":{"a":1, "include_usage" : true }}"#,
            ),
            (r#""stream_options":{"include_usage":"false"}}"#, r#""stream_options":{"include_usage":true}}"#),
            (r#""stream_options":{"include_usage":{"x":[1]}}}"#, r#""stream_options":{"include_usage":true}}"#),
            (
                r#""stream_options":{"include_usage":true,"include_usage":0}}"#,
                r#""stream_options":{"include_usage":true,"include_usage":true}}"#,
            ),
        ] {
            let raw = format!("{head}{so}");
            let req = parse_body(Route::ChatCompletions, raw.as_bytes()).unwrap();
            let out = inject_include_usage(Route::ChatCompletions, &req, raw.as_bytes()).expect(so);
            assert_eq!(String::from_utf8_lossy(&out), format!("{head}{want}"));
        }
        // A key written with an escape is not found as written: re-serialised, still correct.
        let raw = br#"{"model":"m","messages":[],"stream":true,"stream\u005foptions":{"a":1}}"#;
        let req = parse_body(Route::ChatCompletions, raw).unwrap();
        let v: Value =
            serde_json::from_slice(&inject_include_usage(Route::ChatCompletions, &req, raw).unwrap()).unwrap();
        assert_eq!(v["stream_options"], serde_json::json!({"a": 1, "include_usage": true}));
    }
}
