//! The ledger event (CONTRACT §7): one record per decision, settlement, release, approval step
//! and runtime change. Money fields are decimal strings with six places; timestamps RFC 3339 UTC
//! with microseconds. Field names are the contract's; never rename, only add.
//!
//! Owns: `Event`, `EventType`, `EventLine`. Imports: decide (money, usage, time), serde.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::decide::usage_types::Usage;
use crate::decide::Micros;
use crate::jsonw::{json_str, opt_money, opt_str, str_field, uint, uint_field};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Decision,
    ReservationSettled,
    ReservationReleased,
    ApprovalRequested,
    ApprovalGranted,
    ApprovalDenied,
    ApprovalConsumed,
    RuntimeChanged,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::Decision,
        EventType::ReservationSettled,
        EventType::ReservationReleased,
        EventType::ApprovalRequested,
        EventType::ApprovalGranted,
        EventType::ApprovalDenied,
        EventType::ApprovalConsumed,
        EventType::RuntimeChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Decision => "decision",
            EventType::ReservationSettled => "reservation_settled",
            EventType::ReservationReleased => "reservation_released",
            EventType::ApprovalRequested => "approval_requested",
            EventType::ApprovalGranted => "approval_granted",
            EventType::ApprovalDenied => "approval_denied",
            EventType::ApprovalConsumed => "approval_consumed",
            EventType::RuntimeChanged => "runtime_changed",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// One ledger event. `Option` fields serialise as `null` (the contract lists them all). The text
/// fields that every event of one request repeats are `Arc<str>`: a request's follow-up events
/// are clones of its decision event, and a clone then copies no text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub event_type: EventType,
    pub occurred_at: String,
    pub instance_id: Arc<str>,
    pub request_id: Option<Arc<str>>,
    pub tenant_id: Option<Arc<str>>,
    pub tenant_tier: Option<Arc<str>>,
    pub source: Option<Arc<str>>,
    pub mode: Option<Arc<str>>,
    pub policy_version: u64,
    pub decision: Option<Arc<str>>,
    pub reasons: Vec<String>,
    pub model: Option<Arc<str>>,
    pub reservation_id: Option<String>,
    pub estimated_cost_usd: Option<Micros>,
    pub reserved_usd: Option<Micros>,
    pub actual_cost_usd: Option<Micros>,
    pub drift_usd: Option<Micros>,
    pub usage: Option<Usage>,
    /// `reported` (from the provider's usage) or `estimated` (stream cut, no usage seen).
    pub usage_source: Option<Arc<str>>,
    pub request_fingerprint: Option<String>,
    pub approval_id: Option<String>,
    pub upstream_status: Option<u16>,
    /// Extra context: the applied change and its reason for `runtime_changed`, the trigger of a
    /// release (`reservation_auto_released_sla`, `upstream_error`), … Not in v1 of the contract;
    /// added, never required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl Event {
    /// A blank event of `event_type` with a fresh v7 id, stamped `occurred_at_us` (Unix µs).
    pub fn new(event_type: EventType, instance_id: &str, occurred_at_us: u64, policy_version: u64) -> Event {
        Event::by(event_type, instance_id.into(), occurred_at_us, policy_version)
    }

    /// [`Event::new`] for an instance id already shared (no copy of it per event).
    pub fn by(event_type: EventType, instance_id: Arc<str>, occurred_at_us: u64, policy_version: u64) -> Event {
        Event {
            event_id: crate::ids::v7_at_ms(occurred_at_us / 1000),
            event_type,
            occurred_at: crate::decide::time::rfc3339_micros(occurred_at_us),
            instance_id,
            request_id: None,
            tenant_id: None,
            tenant_tier: None,
            source: None,
            mode: None,
            policy_version,
            decision: None,
            reasons: Vec::new(),
            model: None,
            reservation_id: None,
            estimated_cost_usd: None,
            reserved_usd: None,
            actual_cost_usd: None,
            drift_usd: None,
            usage: None,
            usage_source: None,
            request_fingerprint: None,
            approval_id: None,
            upstream_status: None,
            details: None,
        }
    }
}

/// One outbox line as the relay hands it to a sink: the event object as it was written (one
/// line of JSON, CONTRACT §7) and the fields the sinks index, read from it without building an
/// [`Event`] — parsing every line into an event only to write it out again was ≈ 16% of a busy
/// sidecar's CPU with a Postgres ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    pub event_id: String,
    pub event_type: EventType,
    pub occurred_at: String,
    pub tenant_id: Option<String>,
    pub reservation_id: Option<String>,
    pub decision: Option<String>,
    /// The event object (no newline).
    pub json: String,
}

impl EventLine {
    /// The outbox line `line` (without its newline); `None` when it is not one JSON object with
    /// an event's `event_id`, `event_type` and `occurred_at` (the whole line is checked).
    pub fn parse(line: &[u8]) -> Option<EventLine> {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            event_id: Cow<'a, str>,
            event_type: EventType,
            #[serde(borrow)]
            occurred_at: Cow<'a, str>,
            #[serde(borrow, default)]
            tenant_id: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            reservation_id: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            decision: Option<Cow<'a, str>>,
        }
        let json = std::str::from_utf8(line).ok()?;
        let h: Head<'_> = serde_json::from_str(json).ok()?;
        Some(EventLine {
            event_id: h.event_id.into_owned(),
            event_type: h.event_type,
            occurred_at: h.occurred_at.into_owned(),
            tenant_id: h.tenant_id.map(Cow::into_owned),
            reservation_id: h.reservation_id.map(Cow::into_owned),
            decision: h.decision.map(Cow::into_owned),
            json: json.to_owned(),
        })
    }

    /// `e` as the outbox writes it.
    pub fn of(e: &Event) -> EventLine {
        let mut line = Vec::with_capacity(1024);
        e.write_json(&mut line);
        EventLine::parse(&line).expect("an event's own JSON is an event line")
    }

    /// The whole event (tests, tools): `None` when the line is not a v1 event.
    pub fn event(&self) -> Option<Event> {
        serde_json::from_str(&self.json).ok()
    }
}

/// `label` (one of the crate's fixed label strings: tiers, modes, verdicts, usage sources) as
/// a shared string, allocated once per thread: events carry these on every request.
pub fn label(label: &'static str) -> Arc<str> {
    thread_local! {
        static LABELS: crate::intern::Table = const { std::cell::RefCell::new(Vec::new()) };
    }
    crate::intern::shared(&LABELS, label)
}

impl Event {
    /// Another event of the same request: `fresh`'s id, type and time, this event's other
    /// fields except its decision and reasons (a clone that copies no id or time text).
    pub fn sibling(&self, fresh: Event) -> Event {
        Event {
            event_id: fresh.event_id,
            event_type: fresh.event_type,
            occurred_at: fresh.occurred_at,
            instance_id: self.instance_id.clone(),
            request_id: self.request_id.clone(),
            tenant_id: self.tenant_id.clone(),
            tenant_tier: self.tenant_tier.clone(),
            source: self.source.clone(),
            mode: self.mode.clone(),
            policy_version: self.policy_version,
            decision: None,
            reasons: Vec::new(),
            model: self.model.clone(),
            reservation_id: self.reservation_id.clone(),
            estimated_cost_usd: self.estimated_cost_usd,
            reserved_usd: self.reserved_usd,
            actual_cost_usd: self.actual_cost_usd,
            drift_usd: self.drift_usd,
            usage: self.usage,
            usage_source: self.usage_source.clone(),
            request_fingerprint: self.request_fingerprint.clone(),
            approval_id: self.approval_id.clone(),
            upstream_status: self.upstream_status,
            details: self.details.clone(),
        }
    }

    /// Appends this event as one line of JSON (no newline), byte for byte what
    /// `serde_json::to_writer` writes, without serde's per-field machinery: the outbox writes
    /// two of these per request.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.reserve(640);
        self.write_head(out);
        self.write_shared_a(out);
        self.write_verdict(out);
        self.write_shared_b(out);
        self.write_tail(out);
    }

    /// `{"event_id":…,"event_type":…,"occurred_at":…`
    fn write_head(&self, out: &mut Vec<u8>) {
        str_field(out, b"{\"event_id\":", &self.event_id);
        out.extend_from_slice(b",\"event_type\":\"");
        out.extend_from_slice(self.event_type.as_str().as_bytes());
        out.push(b'"');
        str_field(out, b",\"occurred_at\":", &self.occurred_at);
    }

    /// `,"instance_id":…` to `,"policy_version":…` (what a request's events repeat).
    fn write_shared_a(&self, out: &mut Vec<u8>) {
        str_field(out, b",\"instance_id\":", &self.instance_id);
        opt_str(out, b",\"request_id\":", self.request_id.as_deref());
        opt_str(out, b",\"tenant_id\":", self.tenant_id.as_deref());
        opt_str(out, b",\"tenant_tier\":", self.tenant_tier.as_deref());
        opt_str(out, b",\"source\":", self.source.as_deref());
        opt_str(out, b",\"mode\":", self.mode.as_deref());
        uint_field(out, b",\"policy_version\":", self.policy_version);
    }

    /// `,"decision":…,"reasons":[…]`
    fn write_verdict(&self, out: &mut Vec<u8>) {
        opt_str(out, b",\"decision\":", self.decision.as_deref());
        out.extend_from_slice(b",\"reasons\":[");
        for (i, r) in self.reasons.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, r);
        }
        out.push(b']');
    }

    /// `,"model":…,"reservation_id":…,"estimated_cost_usd":…` (what a request's events repeat).
    fn write_shared_b(&self, out: &mut Vec<u8>) {
        opt_str(out, b",\"model\":", self.model.as_deref());
        opt_str(out, b",\"reservation_id\":", self.reservation_id.as_deref());
        opt_money(out, b",\"estimated_cost_usd\":", self.estimated_cost_usd);
    }

    /// `,"reserved_usd":…` to the closing brace.
    fn write_tail(&self, out: &mut Vec<u8>) {
        opt_money(out, b",\"reserved_usd\":", self.reserved_usd);
        opt_money(out, b",\"actual_cost_usd\":", self.actual_cost_usd);
        opt_money(out, b",\"drift_usd\":", self.drift_usd);
        out.extend_from_slice(b",\"usage\":");
        match &self.usage {
            None => out.extend_from_slice(b"null"),
            Some(u) => {
                uint_field(out, b"{\"prompt_tokens\":", u.prompt_tokens);
                uint_field(out, b",\"completion_tokens\":", u.completion_tokens);
                uint_field(out, b",\"cached_tokens\":", u.cached_tokens);
                uint_field(out, b",\"reasoning_tokens\":", u.reasoning_tokens);
                out.push(b'}');
            }
        }
        opt_str(out, b",\"usage_source\":", self.usage_source.as_deref());
        opt_str(out, b",\"request_fingerprint\":", self.request_fingerprint.as_deref());
        opt_str(out, b",\"approval_id\":", self.approval_id.as_deref());
        out.extend_from_slice(b",\"upstream_status\":");
        match self.upstream_status {
            None => out.extend_from_slice(b"null"),
            Some(s) => uint(out, s),
        }
        if let Some(d) = &self.details {
            out.extend_from_slice(b",\"details\":");
            serde_json::to_writer(&mut *out, d).expect("a JSON value serialises");
        }
        out.push(b'}');
    }
}

/// A request's decision event kept as the template of its follow-up events (settlement,
/// release). The fields those repeat (`instance_id` … `policy_version`, `model` …
/// `estimated_cost_usd`) are kept as the JSON the decision's own line carried, so a follow-up's
/// line copies them instead of writing and escaping them again.
#[derive(Debug)]
pub struct Template {
    event: Event,
    /// The two repeated runs of the decision's line, one after the other; the second starts at
    /// `split`.
    shared: Vec<u8>,
    split: usize,
}

impl Template {
    /// Writes `event`'s line (no newline) to `out` and keeps it as a template.
    pub fn write(event: Event, out: &mut Vec<u8>) -> Template {
        out.reserve(640);
        let mut shared = Vec::with_capacity(384);
        event.write_head(out);
        let a = out.len();
        event.write_shared_a(out);
        shared.extend_from_slice(&out[a..]);
        let split = shared.len();
        event.write_verdict(out);
        let b = out.len();
        event.write_shared_b(out);
        shared.extend_from_slice(&out[b..]);
        event.write_tail(out);
        Template { event, shared, split }
    }

    /// The decision event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// A follow-up with `fresh`'s id, type and time. It holds only what differs from the
    /// template: the caller sets `reserved_usd`, `actual_cost_usd`, `drift_usd`, `usage`,
    /// `usage_source`, `upstream_status` and `details`; the fingerprint and approval id are the
    /// template's. [`Template::write_follow_up`] writes it as
    /// `self.event().sibling(fresh)` with those fields would be written.
    pub fn follow_up(&self, mut fresh: Event) -> Event {
        fresh.decision = None;
        fresh.reasons.clear();
        fresh.request_fingerprint.clone_from(&self.event.request_fingerprint);
        fresh.approval_id.clone_from(&self.event.approval_id);
        fresh
    }

    /// The line (no newline) of `follow`, made by [`Template::follow_up`].
    pub fn write_follow_up(&self, follow: &Event, out: &mut Vec<u8>) {
        out.reserve(640);
        follow.write_head(out);
        out.extend_from_slice(&self.shared[..self.split]);
        follow.write_verdict(out);
        out.extend_from_slice(&self.shared[self.split..]);
        follow.write_tail(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_line_keeps_the_line_and_reads_the_indexed_fields() {
        let mut e = Event::new(EventType::Decision, "i-1", 1_795_600_000_000_001, 7);
        e.tenant_id = Some("t\"é\\1".into()); // escaped in the line: read into an owned string
        e.reservation_id = Some("r-1".to_string());
        e.decision = Some("ALLOW".into());
        let line = EventLine::of(&e);
        let mut written = Vec::new();
        e.write_json(&mut written);
        assert_eq!(line.json.as_bytes(), written, "the line as written");
        assert_eq!((line.event_id.as_str(), line.event_type), (e.event_id.as_str(), EventType::Decision));
        assert_eq!(line.occurred_at, e.occurred_at);
        assert_eq!(line.tenant_id.as_deref(), Some("t\"é\\1"));
        assert_eq!((line.reservation_id.as_deref(), line.decision.as_deref()), (Some("r-1"), Some("ALLOW")));
        assert_eq!(line.event(), Some(e.clone()));
        // Fields left null or out: none.
        let bare =
            EventLine::parse(br#"{"event_id":"x","event_type":"runtime_changed","occurred_at":"t","decision":null}"#)
                .unwrap();
        assert_eq!((bare.tenant_id, bare.reservation_id, bare.decision), (None, None, None));
        // Not an event: a cut line, another type, a missing id, invalid UTF-8, trailing bytes.
        let cut = &written[..written.len() - 3];
        for bad in [
            cut,
            br#"{"event_id":"x","event_type":"nope","occurred_at":"t"}"#.as_slice(),
            br#"{"event_type":"decision","occurred_at":"t"}"#.as_slice(),
            b"{\"event_id\":\"\xff\",\"event_type\":\"decision\",\"occurred_at\":\"t\"}".as_slice(),
            br#"{"event_id":"x","event_type":"decision","occurred_at":"t"} {}"#.as_slice(),
        ] {
            assert_eq!(EventLine::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn write_json_is_byte_for_byte_serde() {
        let tricky = "q\"b\\s/ \u{1}\u{8}\u{c}\n\r\t\u{1f}\u{7f} é 日本 🦀";
        let mut full = Event::new(EventType::ReservationSettled, tricky, 1_795_600_000_000_001, u64::MAX);
        full.request_id = Some("r-1".into());
        full.tenant_id = Some(tricky.into());
        full.tenant_tier = Some("pro".into());
        full.source = Some(String::new().into());
        full.mode = Some("hard".into());
        full.decision = Some("ALLOW".into());
        full.reasons = vec!["a".into(), tricky.into(), String::new()];
        full.model = Some("gpt-4o".into());
        full.reservation_id = Some("res".into());
        full.estimated_cost_usd = Some(Micros(0));
        full.reserved_usd = Some(Micros(1));
        full.actual_cost_usd = Some(Micros(123_456_789_012));
        full.drift_usd = Some(Micros(-1_000_001));
        full.usage =
            Some(Usage { prompt_tokens: 1, completion_tokens: 0, cached_tokens: u64::MAX, reasoning_tokens: 7 });
        full.usage_source = Some("reported".into());
        full.request_fingerprint = Some("f".into());
        full.approval_id = Some("a".into());
        full.upstream_status = Some(599);
        full.details = Some(serde_json::json!({"reason": tricky, "n": [1, 2.5, null]}));
        let blank = Event::new(EventType::Decision, "i", 0, 0);
        let mut negative_small = blank.clone();
        negative_small.drift_usd = Some(Micros(-5));
        negative_small.reasons = vec!["one".into()];
        // Every ASCII byte at every position of a word, against serde.
        for c in 0u8..0x80 {
            for pos in 0..9 {
                let mut t = "abcdefghi".to_string().into_bytes();
                t[pos] = c;
                let t = String::from_utf8(t).unwrap();
                let mut fast = Vec::new();
                json_str(&mut fast, &t);
                assert_eq!(
                    String::from_utf8(fast).unwrap(),
                    serde_json::to_string(&t).unwrap(),
                    "byte {c:#x} at {pos}"
                );
            }
        }
        for e in [full, blank, negative_small] {
            let mut fast = Vec::new();
            e.write_json(&mut fast);
            assert_eq!(String::from_utf8(fast).unwrap(), serde_json::to_string(&e).unwrap());
        }
    }

    /// A decision event with every repeated field set (tricky text where text is allowed).
    fn decision_template(tricky: &str, fp: Option<&str>, approval: Option<&str>) -> Event {
        let mut d = Event::new(EventType::Decision, tricky, 1_795_600_000_000_001, 42);
        d.request_id = Some("01a212ea-2553-722d-ae80-a3c5862df6d2".into());
        d.tenant_id = Some(tricky.into());
        d.tenant_tier = Some("enterprise".into());
        d.source = Some("batch".into());
        d.mode = Some("soft".into());
        d.decision = Some("ALLOW".into());
        d.reasons = vec!["max_tokens_clamped".into()];
        d.model = Some(tricky.into());
        d.reservation_id = Some("01a212ea-2553-722d-ae80-a3c5862df6d3".into());
        d.estimated_cost_usd = Some(Micros(1_234_567));
        d.reserved_usd = Some(Micros(1_000_000));
        d.request_fingerprint = fp.map(String::from);
        d.approval_id = approval.map(String::from);
        d
    }

    #[test]
    fn a_follow_up_written_from_its_template_is_the_siblings_line() {
        let tricky = "q\"b\\s \u{1}\n é 🦀";
        for (fp, approval) in [(None, None), (Some("fp-1"), Some(tricky))] {
            let decision = decision_template(tricky, fp, approval);
            let mut line = Vec::new();
            let t = Template::write(decision.clone(), &mut line);
            let mut direct = Vec::new();
            decision.write_json(&mut direct);
            assert_eq!(line, direct, "the decision's own line is unchanged");
            assert_eq!(t.event(), &decision);

            let settle = |e: &mut Event| {
                e.reserved_usd = Some(Micros(1_000_000));
                e.actual_cost_usd = Some(Micros(1_500_000));
                e.drift_usd = Some(Micros(500_000));
                e.usage =
                    Some(Usage { prompt_tokens: 46, completion_tokens: 16, cached_tokens: 3, reasoning_tokens: 0 });
                e.usage_source = Some("reported".into());
                e.upstream_status = Some(200);
            };
            let release = |e: &mut Event| {
                e.reserved_usd = Some(Micros(1_000_000));
                e.upstream_status = Some(503);
                e.details = Some(serde_json::json!({"reason": "upstream_error"}));
            };
            for (event_type, set) in [
                (EventType::ReservationSettled, &settle as &dyn Fn(&mut Event)),
                (EventType::ReservationReleased, &release),
            ] {
                let fresh = Event::new(event_type, "other-instance", 1_795_600_000_500_000, 42);
                let mut sibling = decision.sibling(fresh.clone());
                set(&mut sibling);
                let mut follow = t.follow_up(fresh);
                set(&mut follow);
                let mut fast = Vec::new();
                t.write_follow_up(&follow, &mut fast);
                let want = serde_json::to_string(&sibling).unwrap();
                assert_eq!(String::from_utf8(fast).unwrap(), want, "{event_type:?}");
            }
        }
    }

    #[test]
    fn serialises_with_contract_names_and_six_decimals() {
        let mut e = Event::new(EventType::Decision, "i-1", 1_795_600_000_123_456, 7);
        e.estimated_cost_usd = Some(Micros(150));
        e.decision = Some("ALLOW".into());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event_type"], "decision");
        assert_eq!(v["estimated_cost_usd"], "0.000150");
        assert_eq!(v["actual_cost_usd"], serde_json::Value::Null);
        assert_eq!(v["reasons"], serde_json::json!([]));
        assert!(v["occurred_at"].as_str().unwrap().ends_with(".123456Z"));
        assert!(v.get("details").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert_eq!(EventType::parse("approval_consumed"), Some(EventType::ApprovalConsumed));
    }
}
