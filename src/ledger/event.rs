//! The ledger event (CONTRACT §7): one record per decision, settlement, release, approval step
//! and runtime change. Money fields are decimal strings with six places; timestamps RFC 3339 UTC
//! with microseconds. Field names are the contract's; never rename, only add.
//!
//! Owns: `Event`, `EventType`. Imports: decide (money, usage, time), serde.

use serde::{Deserialize, Serialize};

use crate::decide::usage_types::Usage;
use crate::decide::Micros;

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

/// One ledger event. `Option` fields serialise as `null` (the contract lists them all).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub event_type: EventType,
    pub occurred_at: String,
    pub instance_id: String,
    pub request_id: Option<String>,
    pub tenant_id: Option<String>,
    pub tenant_tier: Option<String>,
    pub source: Option<String>,
    pub mode: Option<String>,
    pub policy_version: u64,
    pub decision: Option<String>,
    pub reasons: Vec<String>,
    pub model: Option<String>,
    pub reservation_id: Option<String>,
    pub estimated_cost_usd: Option<Micros>,
    pub reserved_usd: Option<Micros>,
    pub actual_cost_usd: Option<Micros>,
    pub drift_usd: Option<Micros>,
    pub usage: Option<Usage>,
    /// `reported` (from the provider's usage) or `estimated` (stream cut, no usage seen).
    pub usage_source: Option<String>,
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
        Event {
            event_id: crate::ids::v7(),
            event_type,
            occurred_at: crate::decide::time::rfc3339_micros(occurred_at_us),
            instance_id: instance_id.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
