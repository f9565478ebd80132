//! The differential test of the request-body path (test builds only): the `serde_json::Value`
//! implementation that parsing, estimation and the `include_usage` / clamp rewrites had before
//! the borrowed [`Doc`](crate::decide::json::Doc), kept verbatim in `oracle` (with a char-by-char
//! token counter), against the current code, on hand-written and random bodies for every route.
//! Any difference in errors, model, stream flag, estimate, output choices or rewritten bytes
//! fails.
//!
//! Owns: nothing outside tests. Imports: `proxy::extract`, `decide::{estimate, json, testgen}`.

use bytes::Bytes;
use serde_json::Value;

use super::{clamp_body, inject_include_usage, parse_body};
use crate::decide::estimate::{estimate, output_choices, Estimate};
use crate::decide::testgen::{self, Rng};
use crate::decide::Route;

/// The Value-based code as it was, unchanged but for visibility and a char-by-char counter.
mod oracle {
    use bytes::Bytes;
    use serde_json::{Map, Value};

    use crate::decide::estimate::*;
    use crate::decide::Route;

    fn approx_tokens(text: &str) -> u64 {
        let mut c = TokenCounter::new();
        text.chars().for_each(|ch| c.push(ch));
        c.tokens()
    }

    /// Estimate of a JSON value's serialized size in tokens, without allocating the serialization.
    fn json_tokens(v: &Value) -> u64 {
        struct W(TokenCounter);
        impl std::io::Write for W {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                // serde_json writes string pieces split only at ASCII escapes, so each piece is valid
                // UTF-8; fall back to byte-wise counting if not.
                match std::str::from_utf8(buf) {
                    Ok(s) => s.chars().for_each(|c| self.0.push(c)),
                    Err(_) => buf.iter().for_each(|&b| self.0.push(char::from(b))),
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = W(TokenCounter::new());
        if serde_json::to_writer(&mut w, v).is_err() {
            return 0;
        }
        w.0.tokens()
    }

    fn as_count(v: &Value) -> Option<u64> {
        match v {
            Value::Number(n) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19).map(|f| f as u64)),
            _ => None,
        }
    }

    fn str_tokens(v: Option<&Value>) -> u64 {
        match v {
            Some(Value::String(s)) => approx_tokens(s),
            _ => 0,
        }
    }

    /// Every string leaf and key of an unknown structure (binary and id fields skipped); numbers and
    /// literals one token each.
    fn generic_tokens(v: &Value) -> u64 {
        match v {
            Value::String(s) => approx_tokens(s),
            Value::Array(a) => a.iter().map(generic_tokens).sum(),
            Value::Object(o) => o
                .iter()
                .filter(|(k, _)| !SKIP_KEYS.contains(&k.as_str()))
                .map(|(k, v)| approx_tokens(k) + generic_tokens(v))
                .sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 1,
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Dialect {
        OpenAi,
        Anthropic,
    }

    fn content_tokens(v: &Value, d: Dialect) -> u64 {
        match v {
            Value::String(s) => approx_tokens(s),
            Value::Array(parts) => parts.iter().map(|p| part_tokens(p, d)).sum(),
            Value::Null => 0,
            other => part_tokens(other, d),
        }
    }

    fn part_tokens(p: &Value, d: Dialect) -> u64 {
        let o = match p {
            Value::Object(o) => o,
            Value::String(s) => return approx_tokens(s),
            other => return generic_tokens(other),
        };
        let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
        match ty {
            "text" | "input_text" | "output_text" => str_tokens(o.get("text")),
            "refusal" => str_tokens(o.get("refusal")),
            "tool_use" | "server_tool_use" => str_tokens(o.get("name")) + o.get("input").map_or(0, json_tokens),
            "tool_result" | "web_search_tool_result" => o.get("content").map_or(0, |c| content_tokens(c, d)),
            "thinking" => str_tokens(o.get("thinking")),
            "redacted_thinking" => 0,
            "document" => match o.get("source") {
                Some(Value::Object(src)) if src.get("type").and_then(Value::as_str) == Some("text") => {
                    str_tokens(src.get("data"))
                }
                Some(Value::Object(src)) if src.get("type").and_then(Value::as_str) == Some("content") => {
                    src.get("content").map_or(0, |c| content_tokens(c, d))
                }
                _ => FILE_PART_TOKENS,
            },
            "file" | "input_file" | "input_audio" | "audio" => FILE_PART_TOKENS,
            t if t.contains("image") => {
                let low = o.get("detail").and_then(Value::as_str) == Some("low")
                    || o.get("image_url").and_then(|u| u.get("detail")).and_then(Value::as_str) == Some("low");
                match (d, low) {
                    (_, true) => IMAGE_TOKENS_LOW_DETAIL,
                    (Dialect::OpenAi, false) => IMAGE_TOKENS,
                    (Dialect::Anthropic, false) => ANTHROPIC_IMAGE_TOKENS,
                }
            }
            _ => generic_tokens(p),
        }
    }

    /// One chat / Anthropic message (or Responses item): framing + role name + content + tool calls.
    fn message_tokens(m: &Value, d: Dialect) -> u64 {
        let o = match m {
            Value::Object(o) => o,
            other => return MESSAGE_OVERHEAD_TOKENS + content_tokens(other, d),
        };
        let mut n = MESSAGE_OVERHEAD_TOKENS;
        if let Some(c) = o.get("content") {
            n += content_tokens(c, d);
        }
        if let Some(name) = o.get("name").and_then(Value::as_str) {
            n += 1 + approx_tokens(name);
        }
        for key in ["tool_calls", "function_call", "audio"] {
            if let Some(v) = o.get(key) {
                n += generic_tokens(v);
            }
        }
        if o.get("content").is_none() {
            // Responses API items without `content`: function_call (name, arguments),
            // function_call_output (output), reasoning summaries, ...
            n += o
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "role" | "name" | "status"))
                .filter(|(k, _)| !SKIP_KEYS.contains(&k.as_str()))
                .map(|(_, v)| content_tokens(v, d))
                .sum::<u64>();
        }
        n
    }

    fn messages_tokens(v: Option<&Value>, d: Dialect) -> u64 {
        match v {
            Some(Value::Array(ms)) => ms.iter().map(|m| message_tokens(m, d)).sum(),
            Some(other) => content_tokens(other, d),
            None => 0,
        }
    }

    /// Strings, arrays of strings, token-id arrays (one token per id) and arrays of those.
    fn prompt_like_tokens(v: Option<&Value>) -> u64 {
        match v {
            Some(Value::String(s)) => approx_tokens(s),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => approx_tokens(s),
                    Value::Number(_) => 1,
                    Value::Array(ids) => ids.len() as u64,
                    other => generic_tokens(other),
                })
                .sum(),
            Some(other) => generic_tokens(other),
            None => 0,
        }
    }

    fn opt_json_tokens(v: Option<&Value>) -> u64 {
        match v {
            None | Some(Value::Null) => 0,
            Some(v) => json_tokens(v),
        }
    }

    /// Estimates the prompt tokens of a request body and reads its requested output maximum.
    /// Counts (see the constants for the fixed amounts):
    /// - chat: `messages` (string or part-array content; images; tool calls; per-message framing),
    ///   `tools`, `functions`, `response_format`;
    /// - completions: `prompt` (string, strings, token-id arrays), `suffix`;
    /// - responses: `instructions`, `input` (string or items), `tools`, `text` (output format schema);
    /// - messages (Anthropic): `system` (string or blocks), `messages`, `tools`;
    /// - embeddings: `input` (string, strings, token-id arrays); no output.
    pub(super) fn estimate(route: Route, body: &Value) -> Estimate {
        let g = |k: &str| body.get(k);
        let prompt_tokens = match route {
            Route::ChatCompletions => {
                REPLY_PRIMING_TOKENS
                    + messages_tokens(g("messages"), Dialect::OpenAi)
                    + opt_json_tokens(g("tools"))
                    + opt_json_tokens(g("functions"))
                    + opt_json_tokens(g("response_format"))
            }
            Route::Completions => prompt_like_tokens(g("prompt")) + str_tokens(g("suffix")),
            Route::Responses => {
                let input = match g("input") {
                    Some(Value::String(s)) => MESSAGE_OVERHEAD_TOKENS + approx_tokens(s),
                    other => messages_tokens(other, Dialect::OpenAi),
                };
                let instructions = match g("instructions") {
                    Some(Value::String(s)) => MESSAGE_OVERHEAD_TOKENS + approx_tokens(s),
                    _ => 0,
                };
                REPLY_PRIMING_TOKENS + input + instructions + opt_json_tokens(g("tools")) + {
                    match g("text").and_then(|t| t.get("format")) {
                        Some(f) if f.get("type").and_then(Value::as_str) != Some("text") => json_tokens(f),
                        _ => 0,
                    }
                }
            }
            Route::Messages => {
                let system = match g("system") {
                    None | Some(Value::Null) => 0,
                    Some(s) => MESSAGE_OVERHEAD_TOKENS + content_tokens(s, Dialect::Anthropic),
                };
                REPLY_PRIMING_TOKENS
                    + system
                    + messages_tokens(g("messages"), Dialect::Anthropic)
                    + opt_json_tokens(g("tools"))
            }
            Route::Embeddings => prompt_like_tokens(g("input")),
        };
        let requested_max_output = if route.has_output() {
            let limits =
                ["max_tokens", "max_completion_tokens", "max_output_tokens"].map(|k| body.get(k).and_then(as_count));
            limits.into_iter().flatten().reduce(u64::max)
        } else {
            None
        };
        Estimate { prompt_tokens, requested_max_output }
    }

    /// How many completions a request asks for: `n` (chat, completions) and `best_of` (completions,
    /// which generates `best_of` and returns `n`), at least 1. Output cost scales with it, so
    /// callers multiply the output maximum by it.
    pub(super) fn output_choices(route: Route, body: &Value) -> u64 {
        let n = |k: &str| body.get(k).and_then(as_count).unwrap_or(1).max(1);
        match route {
            Route::ChatCompletions => n("n"),
            Route::Completions => {
                let prompts = match body.get("prompt") {
                    Some(Value::Array(items)) if !items.iter().any(Value::is_number) => items.len().max(1) as u64,
                    _ => 1,
                };
                n("n").max(n("best_of")).saturating_mul(prompts)
            }
            _ => 1,
        }
    }

    /// A parsed LLM request body.
    #[derive(Clone, Debug)]
    pub(super) struct LlmRequest {
        pub(super) json: Value,
        pub(super) model: String,
        pub(super) stream: bool,
    }

    /// Parses and validates the body of an inspected route (CONTRACT §10 required fields).
    pub(super) fn parse_body(route: Route, body: &[u8]) -> Result<LlmRequest, String> {
        let json: Value = serde_json::from_slice(body).map_err(|e| format!("Request body is not valid JSON: {e}"))?;
        let obj = json.as_object().ok_or("Request body must be a JSON object.")?;
        for field in route.required_fields() {
            match obj.get(*field) {
                None | Some(Value::Null) => {
                    return Err(format!("Missing required field `{field}` for {}.", route.path()));
                }
                _ => {}
            }
        }
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .ok_or("Field `model` must be a non-empty string.")?
            .to_string();
        if model.len() > 256 {
            return Err("Field `model` must be at most 256 bytes.".to_string());
        }
        if route == Route::Messages && obj.get("max_tokens").is_none_or(|v| v.as_u64().is_none()) {
            return Err("Field `max_tokens` must be a non-negative integer.".to_string());
        }
        if route.has_output() {
            for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
                if obj.get(field).is_some_and(|v| !v.is_null() && as_count(v).is_none()) {
                    return Err(format!("Field `{field}` must be a non-negative integer."));
                }
            }
        }
        let counts: &[&str] = match route {
            Route::ChatCompletions => &["n"],
            Route::Completions => &["n", "best_of"],
            _ => &[],
        };
        for field in counts {
            if obj.get(*field).is_some_and(|v| !v.is_null() && as_count(v).is_none()) {
                return Err(format!("Field `{field}` must be a non-negative integer."));
            }
        }
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        Ok(LlmRequest { json, model, stream })
    }

    /// For streaming OpenAI-shape requests without `stream_options.include_usage`, returns the body
    /// with `"stream_options":{"include_usage":true}` added, so the stream reports usage. When the
    /// body has no `stream_options` at all, the field is spliced in after the opening brace and every
    /// original byte is kept; otherwise the object is re-serialised.
    pub(super) fn inject_include_usage(route: Route, req: &LlmRequest, original: &[u8]) -> Option<Bytes> {
        if !req.stream || !route.wants_include_usage() {
            return None;
        }
        let obj = req.json.as_object()?;
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
            // Changed since: only `true` is left alone (`false` is set too, its usage chunk
            // taken out of the answer; `null` and others get `true`).
            Some(Value::Object(so)) if so.get("include_usage") == Some(&Value::Bool(true)) => None,
            _ => {
                let mut obj: Map<String, Value> = obj.clone();
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

    /// The request body with its max output tokens lowered to `max_output` (clamp-to-budget),
    /// re-serialised; `include_usage` is injected at the same time when the request needs it.
    /// Every non-null output limit is lowered to `max_output` (one already lower stays); when
    /// there is none, the route's field is added.
    pub(super) fn clamp_body(route: Route, req: &LlmRequest, max_output: u64) -> Option<Bytes> {
        let mut obj = req.json.as_object()?.clone();
        let mut any = false;
        for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            match obj.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => {
                    any = true;
                    let kept = v.as_u64().filter(|n| *n <= max_output);
                    obj.insert(field.to_string(), Value::from(kept.unwrap_or(max_output)));
                }
            }
        }
        if !any {
            // Changed since: chat gets `max_completion_tokens` (o-series and gpt-5 refuse `max_tokens`).
            let field = match route {
                Route::Responses => "max_output_tokens",
                Route::ChatCompletions => "max_completion_tokens",
                _ => "max_tokens",
            };
            obj.insert(field.to_string(), Value::from(max_output));
        }
        if req.stream
            && route.wants_include_usage()
            && obj.get("stream_options").is_none_or(|so| so.get("include_usage") != Some(&Value::Bool(true)))
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
}

/// What one route makes of one body, for comparison.
#[derive(Debug, PartialEq)]
enum Outcome {
    Refused(String),
    Parsed {
        model: String,
        stream: bool,
        estimate: Estimate,
        choices: u64,
        include_usage: Option<(usize, Bytes)>,
        clamped: Vec<Option<Bytes>>,
    },
}

const CLAMPS: [u64; 3] = [0, 7, 300];

/// An `include_usage` rewrite as compared: the old one re-serialised bodies that had a
/// `stream_options`, the current one writes into it and keeps every other byte, so the two are
/// compared as JSON values (serde_json's, keys in order), with the length change kept: +40 for
/// the field spliced at the top, which both do byte for byte.
fn same_json(original: &[u8], rewritten: Bytes) -> (usize, Bytes) {
    let grew = rewritten.len().wrapping_sub(original.len());
    let v: Value = serde_json::from_slice(&rewritten).expect("a rewrite is valid JSON");
    let top = if grew == 40 { 40 } else { 0 };
    (top, Bytes::from(serde_json::to_vec(&v).expect("serialises")))
}

fn current(route: Route, body: &[u8]) -> Outcome {
    match parse_body(route, body) {
        Err(e) => Outcome::Refused(e),
        Ok(req) => Outcome::Parsed {
            estimate: estimate(route, &req.json),
            choices: output_choices(route, &req.json),
            include_usage: inject_include_usage(route, &req, body).map(|b| same_json(body, b)),
            clamped: CLAMPS.iter().map(|&n| clamp_body(route, &req, n)).collect(),
            model: req.model,
            stream: req.stream,
        },
    }
}

fn old(route: Route, body: &[u8]) -> Outcome {
    match oracle::parse_body(route, body) {
        Err(e) => Outcome::Refused(e),
        Ok(req) => Outcome::Parsed {
            estimate: oracle::estimate(route, &req.json),
            choices: oracle::output_choices(route, &req.json),
            include_usage: oracle::inject_include_usage(route, &req, body).map(|b| {
                if b.len() == body.len() + 40 {
                    same_json(body, b)
                } else {
                    // Re-serialised by the old code: the same change made to the original's
                    // value (a float re-read from serde_json's own output can differ in its last
                    // digit from the original text read once, which the current code keeps).
                    let mut v: Value = serde_json::from_slice(body).expect("parsed before");
                    let so = &mut v["stream_options"];
                    if !so.is_object() {
                        *so = Value::Object(serde_json::Map::new());
                    }
                    so["include_usage"] = Value::Bool(true);
                    (0, Bytes::from(serde_json::to_vec(&v).expect("serialises")))
                }
            }),
            clamped: CLAMPS.iter().map(|&n| oracle::clamp_body(route, &req, n)).collect(),
            model: req.model,
            stream: req.stream,
        },
    }
}

/// Tallies, so that a corpus that stopped reaching the interesting paths is noticed.
#[derive(Default, Debug)]
struct Seen {
    parsed: usize,
    refused: usize,
    spliced: usize,
    reserialised: usize,
    /// Valid JSON whose estimate was compared on every route (validation aside).
    walked: usize,
}

/// Compares old and current on every route; the estimator and `output_choices` also on bodies
/// that validation refuses (any JSON object or not).
fn compare(body: &[u8], seen: &mut Seen) {
    for route in Route::ALL {
        let (want, got) = (old(route, body), current(route, body));
        if got != want {
            // The decision-relevant fields first, so that a failure reads easily.
            let brief = |o: &Outcome| match o {
                Outcome::Refused(e) => format!("refused: {e}"),
                Outcome::Parsed { model, stream, estimate, choices, include_usage, .. } => format!(
                    "model {model:?}, stream {stream}, {estimate:?}, choices {choices}, include_usage {:?}",
                    include_usage.as_ref().map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                ),
            };
            assert_eq!(brief(&got), brief(&want), "{route:?} {}", String::from_utf8_lossy(body));
            assert_eq!(got, want, "{route:?} {}", String::from_utf8_lossy(body));
        }
        match &got {
            Outcome::Refused(_) => seen.refused += 1,
            Outcome::Parsed { include_usage: Some((40, _)), .. } => seen.spliced += 1,
            Outcome::Parsed { include_usage: Some(_), .. } => seen.reserialised += 1,
            Outcome::Parsed { .. } => {}
        }
        seen.parsed += usize::from(matches!(got, Outcome::Parsed { .. }));
    }
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let doc = crate::decide::json::Doc::parse(body).expect("serde_json accepted it");
        for route in Route::ALL {
            assert_eq!(estimate(route, &doc), oracle::estimate(route, &v), "{route:?} {v}");
            assert_eq!(output_choices(route, &doc), oracle::output_choices(route, &v), "{route:?} {v}");
        }
        seen.walked += 1;
    }
}

/// Hand-written bodies: every route's shapes, and the edges of JSON itself.
fn corpus() -> Vec<Vec<u8>> {
    let texts: &[&str] = &[
        // chat
        r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},{"role":"user","content":"Say hello to the load benchmark in five words."}],"max_tokens":16}"#,
        r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},{"role":"user","content":"Say hello to the load benchmark in five words."}],"max_tokens":16,"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"  {"model":"m","stream":true,"messages":[]}  "#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{}}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":false}}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":null}}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":null}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":"yes"}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":[{"include_usage":true}]}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{"continuous":1},"z":[1.50,2e3,-0]}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true},"stream_options":{}}"#,
        r#"{"model":"m","stream":true,"messages":[],"stream_options":{},"stream_options":{"include_usage":1}}"#,
        r#"{"model":"m","stream":"true","messages":[]}"#,
        r#"{"model":"m","stream":1,"messages":[]}"#,
        r#"{"model":"m","stream":true,"stream":false,"messages":[]}"#,
        r#"{"model":"m","stream":null,"messages":[]}"#,
        r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","name":"bob","content":[{"type":"text","text":"What is the capital of Australia?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}},{"type":"image_url","detail":"low"},{"type":"input_audio","input_audio":{"data":"UklG","format":"wav"}},{"type":"file","file":{"file_id":"f1"}},{"type":"refusal","refusal":"No."}]}],"n":3}"#,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Weather?"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"22 C and sunny"},{"role":"assistant","function_call":{"name":"f","arguments":"{}"}},{"role":"assistant","audio":{"id":"a1"}}],"tools":[{"type":"function","function":{"name":"get_weather","description":"Weather by city","parameters":{"type":"object","properties":{"city":{"type":"string","enum":["Paris","Oslo"]},"days":{"type":"integer","minimum":1,"maximum":7.5}},"required":["city"]}}}],"functions":[{"name":"f","parameters":{}}],"response_format":{"type":"json_schema","json_schema":{"name":"x","strict":true,"schema":{"type":"object","b":1,"a":[null,false]}}},"max_completion_tokens":4000}"#,
        r#"{"model":"m","messages":"just a string","response_format":null,"tools":null,"max_tokens":16.0,"n":2.0}"#,
        r#"{"model":"m","messages":{"role":"user","content":"an object"},"max_tokens":1e2,"n":-1}"#,
        r#"{"model":"m","messages":[["nested"],"str",7,null,true,{"content":{"type":"text","text":"obj content"}}],"max_tokens":-16}"#,
        r#"{"model":"m","messages":[],"max_tokens":18446744073709551615,"max_completion_tokens":5}"#,
        r#"{"model":"m","messages":[],"max_tokens":18446744073709551616,"max_output_tokens":5}"#,
        r#"{"model":"m","messages":[],"max_tokens":1.8e19,"n":17999999999999999999}"#,
        r#"{"model":"m","messages":[],"max_tokens":1.5,"n":0.5,"max_completion_tokens":"9"}"#,
        r#"{"model":"m","messages":[],"max_tokens":null,"max_completion_tokens":20}"#,
        r#"{"model":"m","messages":[],"max_tokens":10,"max_tokens":20}"#,
        r#"{"model":"first","model":"second","messages":[],"messages":[{"role":"user","content":"dup wins"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"a","content":"bbb bbb","name":"x","name":7}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"\u00e9\u4e16\ud83c\udf89 \"quoted\" \\ back\/slash\ttab\nnew\u0000nul"}]}"#,
        "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"caf\u{e9} \u{4e16}\u{754c} \u{1f389}\u{200d}\u{1f525} \u{7f}\"}]}",
        r#"{"model":"m","mess\u0061ges":[{"role":"user","content":"escaped key"}]}"#,
        r#"{"model":"","messages":[]}"#,
        r#"{"model":7,"messages":[]}"#,
        r#"{"model":null,"messages":[]}"#,
        r#"{"messages":[]}"#,
        r#"{"model":"m","messages":null}"#,
        r#"{"model":"m"}"#,
        // completions
        r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test","suffix":"end","max_tokens":7,"n":2,"best_of":5,"stream":true}"#,
        r#"{"model":"m","prompt":["a b","c d",[1,2,3],42,{"x":"y"},null]}"#,
        r#"{"model":"m","prompt":[[1,2],[3,4,5]],"best_of":3,"n":9}"#,
        r#"{"model":"m","prompt":{"type":"text","text":"obj"},"suffix":7}"#,
        r#"{"model":"m","prompt":12}"#,
        // responses
        r#"{"model":"gpt-5","input":"Tell me a joke","instructions":"Be funny","max_output_tokens":500,"text":{"format":{"type":"text"}}}"#,
        r#"{"model":"gpt-5","input":[{"role":"user","content":[{"type":"input_text","text":"What is in this image?"},{"type":"input_image","image_url":"https://example.com/a.jpg","detail":"low"},{"type":"input_file","file_id":"f"}]},{"type":"function_call","call_id":"c1","name":"lookup","arguments":"{\"q\":\"cats\"}","status":"completed"},{"type":"function_call_output","call_id":"c1","output":"Cats are mammals."},{"type":"reasoning","id":"r1","summary":[{"type":"summary_text","text":"Thinking about cats"}],"encrypted_content":"xyz"},{"role":"assistant","content":[{"type":"output_text","text":"Meow"}]}],"tools":[{"type":"web_search"}],"text":{"format":{"type":"json_schema","name":"person","schema":{"type":"object","properties":{"name":{"type":"string"}}}}}}"#,
        r#"{"model":"gpt-5","input":"x","instructions":7,"text":{"format":"json"}}"#,
        r#"{"model":"gpt-5","input":{"role":"user"},"text":"plain"}"#,
        r#"{"model":"gpt-5","input":null}"#,
        // messages (Anthropic)
        r#"{"model":"claude-sonnet-4","max_tokens":1024,"system":"You are terse.","messages":[{"role":"user","content":"Hello, Claude"}]}"#,
        r#"{"model":"claude-sonnet-4","max_tokens":10,"system":[{"type":"text","text":"You are terse.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},{"type":"text","text":"Describe it"},{"type":"document","source":{"type":"text","media_type":"text/plain","data":"Inline document text."}},{"type":"document","source":{"type":"content","content":[{"type":"text","text":"chunk"}]}},{"type":"document","source":{"type":"base64","data":"JVBER"}},{"type":"document","source":"nope"}]},{"role":"assistant","content":[{"type":"thinking","thinking":"Let me zoom.","signature":"sig"},{"type":"redacted_thinking","data":"xx"},{"type":"tool_use","id":"t1","name":"zoom","input":{"factor":2,"center":[0.5,-0.25],"label":"z\"q"}},{"type":"server_tool_use","id":"s1","name":"web_search","input":{"query":"q"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"zoomed"},{"type":"web_search_tool_result","tool_use_id":"s1","content":[{"type":"web_search_result","url":"https://a","title":"A"}]},{"type":"tool_result","tool_use_id":"t2","content":[{"type":"text","text":"nested"},{"type":"image","source":{"type":"url","url":"https://i"}}]}]}],"tools":[{"name":"zoom","input_schema":{"type":"object"}}]}"#,
        r#"{"model":"claude","max_tokens":16.0,"messages":[]}"#,
        r#"{"model":"claude","max_tokens":-1,"messages":[]}"#,
        r#"{"model":"claude","max_tokens":null,"messages":[]}"#,
        r#"{"model":"claude","max_tokens":"16","messages":[]}"#,
        r#"{"model":"claude","max_tokens":5,"system":null,"messages":[{"role":"user","content":null}]}"#,
        r#"{"model":"claude","max_tokens":5,"system":{"type":"text","text":"object system"},"messages":[]}"#,
        // embeddings
        r#"{"model":"text-embedding-3-small","input":"The food was delicious"}"#,
        r#"{"model":"text-embedding-3-small","input":["x y z","x y z"],"max_tokens":5}"#,
        r#"{"model":"text-embedding-3-small","input":[[10,20,30],[]]}"#,
        r#"{"model":"text-embedding-3-small","input":[]}"#,
        // not objects, not JSON
        "[1]",
        "\"string\"",
        "12",
        "null",
        "true",
        "{}",
        "",
        "   ",
        "{not json",
        r#"{"model":"m","messages":[]} trailing"#,
        r#"{"model":"m","messages":[],}"#,
        r#"{"model":"m","messages":[{"content":"\ud83c"}]}"#,
        r#"{"model":"m","messages":[{"content":"\udf89"}]}"#,
        r#"{"model":"m","messages":[{"content":"\x"}]}"#,
        r#"{"model":"m","messages":[],"max_tokens":01}"#,
        r#"{"model":"m","messages":[],"max_tokens":1e400}"#,
        r#"{"model":"m","messages":[],"max_tokens":-}"#,
    ];
    let mut bodies: Vec<Vec<u8>> = texts.iter().map(|t| t.as_bytes().to_vec()).collect();
    // Raw bytes serde_json refuses: invalid UTF-8, a control character, a byte-order mark.
    bodies.push(b"{\"model\":\"m\xff\",\"messages\":[]}".to_vec());
    bodies.push(b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xc3\"}]}".to_vec());
    bodies.push(b"{\"model\":\"m\",\"messages\":[{\"content\":\"a\x01b\"}]}".to_vec());
    bodies.push(b"\xef\xbb\xbf{\"model\":\"m\",\"messages\":[]}".to_vec());
    // Nesting around serde_json's limit (127 levels accepted, 128 refused), in content.
    for depth in [60, 99, 100, 101, 125, 126, 127, 200] {
        let content = format!("{}\"deep\"{}", "[".repeat(depth), "]".repeat(depth));
        bodies.push(format!(r#"{{"model":"m","messages":[{{"role":"user","content":{content}}}]}}"#).into_bytes());
        let obj = format!("{}1{}", "{\"text\":".repeat(depth), "}".repeat(depth));
        bodies.push(format!(r#"{{"model":"m","input":{obj},"tools":{obj}}}"#).into_bytes());
    }
    // A large object: the repeated-key check's sorting path.
    let mut big = String::from(r#"{"model":"m","messages":[],"tools":[{"#);
    for i in 0..90 {
        big.push_str(&format!("\"p{}\":{i},", i % 40));
    }
    big.push_str(r#""end":true}],"max_tokens":3}"#);
    bodies.push(big.into_bytes());
    bodies
}

const TOP_KEYS: &[&str] = &[
    "messages",
    "input",
    "prompt",
    "system",
    "instructions",
    "suffix",
    "tools",
    "functions",
    "response_format",
    "text",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "model",
    "temperature",
];

const PART_TYPES: &[&str] = &[
    "text",
    "input_text",
    "output_text",
    "refusal",
    "tool_use",
    "server_tool_use",
    "tool_result",
    "web_search_tool_result",
    "thinking",
    "redacted_thinking",
    "document",
    "file",
    "input_file",
    "input_audio",
    "audio",
    "image",
    "image_url",
    "input_image",
    "function_call",
    "function_call_output",
    "reasoning",
    "other",
];

fn random_part(rng: &mut Rng, depth: u32) -> String {
    if rng.chance(10) {
        return testgen::json_text(rng, depth.min(2));
    }
    let mut fields = vec![format!("\"type\":\"{}\"", rng.pick(PART_TYPES))];
    for _ in 0..rng.below(4) {
        let key = rng.pick(&[
            "text",
            "refusal",
            "name",
            "input",
            "content",
            "thinking",
            "source",
            "detail",
            "image_url",
            "data",
            "id",
            "output",
            "arguments",
        ]);
        let value = match *key {
            "detail" => rng.pick(&["\"low\"", "\"high\"", "null"]).to_string(),
            "image_url" if rng.chance(50) => {
                format!("{{\"url\":\"u\",\"detail\":{}}}", rng.pick(&["\"low\"", "\"auto\""]))
            }
            "source" => format!(
                "{{\"type\":{},\"data\":{},\"content\":{}}}",
                rng.pick(&["\"text\"", "\"content\"", "\"base64\"", "1"]),
                testgen::json_string(rng, 30),
                random_content(rng, depth.saturating_sub(1))
            ),
            "content" => random_content(rng, depth.saturating_sub(1)),
            _ if rng.chance(70) => testgen::json_string(rng, 40),
            _ => testgen::json_text(rng, depth.min(3)),
        };
        fields.push(format!("\"{key}\":{value}"));
    }
    format!("{{{}}}", fields.join(","))
}

fn random_content(rng: &mut Rng, depth: u32) -> String {
    match rng.below(10) {
        0..=3 => testgen::json_string(rng, 60),
        4..=7 if depth > 0 => {
            let parts: Vec<String> = (0..rng.below(4)).map(|_| random_part(rng, depth - 1)).collect();
            format!("[{}]", parts.join(","))
        }
        8 => "null".into(),
        _ => testgen::json_text(rng, depth.min(2)),
    }
}

fn random_message(rng: &mut Rng) -> String {
    if rng.chance(8) {
        return testgen::json_text(rng, 2);
    }
    let mut fields = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let key = rng.pick(&[
            "role",
            "content",
            "content",
            "name",
            "tool_calls",
            "function_call",
            "audio",
            "type",
            "call_id",
            "status",
            "output",
            "arguments",
            "summary",
        ]);
        let value = match *key {
            "role" => rng.pick(&["\"user\"", "\"assistant\"", "\"system\"", "\"tool\""]).to_string(),
            "content" => random_content(rng, 3),
            "type" => {
                rng.pick(&["\"function_call\"", "\"function_call_output\"", "\"message\"", "\"reasoning\""]).to_string()
            }
            _ if rng.chance(50) => testgen::json_string(rng, 30),
            _ => testgen::json_text(rng, 3),
        };
        fields.push(format!("\"{key}\":{value}"));
    }
    format!("{{{}}}", fields.join(","))
}

/// A random request body: a top-level object made mostly of the fields the routes read.
fn random_body(rng: &mut Rng) -> String {
    let mut fields = Vec::new();
    if rng.chance(90) {
        let model = if rng.chance(90) { "\"gpt-4o-mini\"".to_string() } else { testgen::json_text(rng, 1) };
        fields.push(format!("\"model\":{model}"));
    }
    for _ in 0..rng.below(7) {
        let key = *rng.pick(TOP_KEYS);
        let value = match key {
            "messages" | "input" | "prompt" | "system" if rng.chance(70) => {
                let items: Vec<String> = (0..rng.below(5)).map(|_| random_message(rng)).collect();
                format!("[{}]", items.join(","))
            }
            "messages" | "input" | "prompt" | "system" | "instructions" | "suffix" => random_content(rng, 2),
            "stream" => rng.pick(&["true", "true", "false", "null", "1", "\"true\""]).to_string(),
            "stream_options" => rng
                .pick(&["{}", "{\"include_usage\":true}", "{\"include_usage\":false}", "null", "[]", "{\"x\":1}", "7"])
                .to_string(),
            "max_tokens" | "max_completion_tokens" | "max_output_tokens" | "n" | "best_of" | "temperature" => {
                if rng.chance(85) {
                    testgen::json_number(rng)
                } else {
                    testgen::json_text(rng, 1)
                }
            }
            "text" => format!("{{\"format\":{}}}", testgen::json_text(rng, 3)),
            _ => testgen::json_text(rng, 4),
        };
        fields.push(format!("\"{key}\":{value}"));
    }
    if rng.chance(60) {
        // What some route requires, so that validation passes more often.
        for field in rng.pick(&Route::ALL).required_fields().iter().filter(|f| **f != "model") {
            let value = match *field {
                "max_tokens" => rng.below(100).to_string(),
                "messages" if rng.chance(50) => "[]".to_string(),
                _ => random_content(rng, 2),
            };
            fields.push(format!("\"{field}\":{value}"));
        }
    }
    if rng.chance(40) {
        fields.push("\"stream\":true".into());
        if rng.chance(50) {
            let options = rng.pick(&["{}", "{\"include_usage\":true}", "null", "[]", "{\"x\":1.0}", "\"\\u0041\""]);
            fields.push(format!("\"stream_options\":{options}"));
        }
    }
    // Shuffle, so duplicates and the spliced-in field land anywhere.
    for i in (1..fields.len()).rev() {
        fields.swap(i, rng.below(i as u64 + 1) as usize);
    }
    format!("{{{}}}", fields.join(","))
}

#[test]
fn hand_written_bodies_match_the_value_implementation() {
    let mut seen = Seen::default();
    for body in corpus() {
        compare(&body, &mut seen);
    }
    println!("{seen:?}");
    assert!(seen.parsed >= 80 && seen.refused >= 300 && seen.walked >= 70, "{seen:?}");
    assert!(seen.spliced >= 3 && seen.reserialised >= 6, "{seen:?}");
}

#[test]
fn random_bodies_match_the_value_implementation() {
    let mut rng = Rng::new(42);
    let mut seen = Seen::default();
    for _ in 0..3000 {
        let body = random_body(&mut rng);
        compare(body.as_bytes(), &mut seen);
        // The same body, corrupted at one byte.
        let mut bad = body.into_bytes();
        let at = rng.below(bad.len() as u64) as usize;
        bad[at] = *rng.pick(b"\"\\{}[],:0-.e \xff");
        compare(&bad, &mut seen);
    }
    // Random JSON of any shape (mostly not request bodies): the walkers on every route.
    for i in 0..2000 {
        let body = testgen::json_text(&mut rng, 1 + i % 5);
        compare(body.as_bytes(), &mut seen);
    }
    println!("{seen:?}");
    assert!(seen.parsed >= 3500 && seen.walked >= 6000, "{seen:?}");
    assert!(seen.spliced >= 250 && seen.reserialised >= 200, "{seen:?}");
}
