//! The runtime knobs of a [`Policy`] as one serialisable value: the settings an operator changes
//! at runtime (`PATCH /api/v1/enforcement/runtime`) — kill switch, global and fair-use guards,
//! modes, source modes, approval issuance freeze, audit sample rate — without the parts that come
//! only from the local configuration (the tenants/tiers directory, spend thresholds).
//!
//! One serialisation shared by the stores that keep the knobs outside the process: the fleet's
//! document in Redis (`store::redis::policy`) and the embedded runtime-policy file
//! (`store::runtime_policy`). Field names are the admin API's setting names and stable across
//! versions. Pure: no I/O.
//!
//! Owns: `Knobs`. Imports: `decide` policy types, serde, serde_json.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::decide::policy::bounds;
use crate::decide::{Mode, Policy};

/// The runtime knobs of a policy (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Knobs {
    pub(crate) kill_switch: bool,
    pub(crate) global_abuse_guards_enabled: bool,
    pub(crate) global_abuse_per_minute_cap: u64,
    pub(crate) global_abuse_unique_tenants_threshold: u64,
    pub(crate) global_abuse_block_seconds: u64,
    pub(crate) fair_use_guards_enabled: bool,
    pub(crate) fair_use_per_minute_cap: i64,
    pub(crate) fair_use_per_tenant_concurrency_cap: i64,
    pub(crate) fair_use_concurrency_lease_ttl_seconds: u64,
    pub(crate) fair_use_pro_daily_soft_cap: i64,
    pub(crate) fair_use_enterprise_daily_soft_cap: i64,
    pub(crate) fair_use_tokens_per_minute: i64,
    pub(crate) enforcement_mode: String,
    pub(crate) source_modes: Vec<(String, String)>,
    pub(crate) approval_issuance_frozen: bool,
    pub(crate) audit_sample_rate: f64,
}

impl Knobs {
    /// The knobs of `p`.
    pub(crate) fn of(p: &Policy) -> Knobs {
        Knobs {
            kill_switch: p.kill_switch,
            global_abuse_guards_enabled: p.global.enabled,
            global_abuse_per_minute_cap: p.global.per_minute_cap,
            global_abuse_unique_tenants_threshold: p.global.unique_tenants_threshold,
            global_abuse_block_seconds: p.global.block_seconds,
            fair_use_guards_enabled: p.fair_use.enabled,
            fair_use_per_minute_cap: p.fair_use.per_minute_cap,
            fair_use_per_tenant_concurrency_cap: p.fair_use.concurrency_cap,
            fair_use_concurrency_lease_ttl_seconds: p.fair_use.lease_ttl_seconds,
            fair_use_pro_daily_soft_cap: p.fair_use.pro_daily_soft_cap,
            fair_use_enterprise_daily_soft_cap: p.fair_use.enterprise_daily_soft_cap,
            fair_use_tokens_per_minute: p.fair_use.tokens_per_minute,
            enforcement_mode: p.mode.as_str().to_string(),
            source_modes: p.source_modes.iter().map(|(s, m)| (s.clone(), m.as_str().to_string())).collect(),
            approval_issuance_frozen: p.approval_issuance_frozen,
            audit_sample_rate: p.audit_sample_rate,
        }
    }

    /// Sets `p`'s knobs to these (a mode that does not parse leaves `p`'s; see [`Knobs::check`]).
    pub(crate) fn apply(&self, p: &mut Policy) {
        p.kill_switch = self.kill_switch;
        p.global.enabled = self.global_abuse_guards_enabled;
        p.global.per_minute_cap = self.global_abuse_per_minute_cap;
        p.global.unique_tenants_threshold = self.global_abuse_unique_tenants_threshold;
        p.global.block_seconds = self.global_abuse_block_seconds;
        p.fair_use.enabled = self.fair_use_guards_enabled;
        p.fair_use.per_minute_cap = self.fair_use_per_minute_cap;
        p.fair_use.concurrency_cap = self.fair_use_per_tenant_concurrency_cap;
        p.fair_use.lease_ttl_seconds = self.fair_use_concurrency_lease_ttl_seconds;
        p.fair_use.pro_daily_soft_cap = self.fair_use_pro_daily_soft_cap;
        p.fair_use.enterprise_daily_soft_cap = self.fair_use_enterprise_daily_soft_cap;
        p.fair_use.tokens_per_minute = self.fair_use_tokens_per_minute;
        if let Some(m) = Mode::parse(&self.enforcement_mode) {
            p.mode = m;
        }
        p.source_modes = self.source_modes.iter().filter_map(|(s, m)| Mode::parse(m).map(|m| (s.clone(), m))).collect();
        p.approval_issuance_frozen = self.approval_issuance_frozen;
        p.audit_sample_rate = self.audit_sample_rate;
    }

    /// Whether every mode names one (`apply` would otherwise skip it) and every bounded knob is
    /// within the range the admin API accepts ([`bounds`]): a set read back from outside the
    /// process (a saved runtime policy) is held to what `PATCH /runtime` could have written.
    pub(crate) fn check(&self) -> Result<(), String> {
        let modes = std::iter::once(&self.enforcement_mode).chain(self.source_modes.iter().map(|(_, m)| m));
        if let Some(bad) = modes.into_iter().find(|m| Mode::parse(m).is_none()) {
            return Err(format!("`{bad}` is not a mode"));
        }
        let counts = [
            ("global_abuse_per_minute_cap", self.global_abuse_per_minute_cap, bounds::GLOBAL_PER_MINUTE_CAP),
            (
                "global_abuse_unique_tenants_threshold",
                self.global_abuse_unique_tenants_threshold,
                bounds::GLOBAL_UNIQUE_TENANTS,
            ),
            ("global_abuse_block_seconds", self.global_abuse_block_seconds, bounds::GLOBAL_BLOCK_SECONDS),
            (
                "fair_use_concurrency_lease_ttl_seconds",
                self.fair_use_concurrency_lease_ttl_seconds,
                bounds::LEASE_TTL_SECONDS,
            ),
        ];
        for (knob, value, range) in counts {
            if !range.contains(&value) {
                return Err(format!("`{knob}` is {value}, outside {}..={}", range.start(), range.end()));
            }
        }
        if !bounds::AUDIT_SAMPLE_RATE.contains(&self.audit_sample_rate) {
            return Err(format!("`audit_sample_rate` is {}, outside 0..=1", self.audit_sample_rate));
        }
        Ok(())
    }

    /// The knobs as a JSON object, one field per knob.
    pub(crate) fn to_map(&self) -> Map<String, Json> {
        match serde_json::to_value(self) {
            Ok(Json::Object(m)) => m,
            _ => Map::new(),
        }
    }

    /// The knobs of a JSON object with every field ([`Knobs::to_map`]'s inverse).
    pub(crate) fn from_map(m: Map<String, Json>) -> Result<Knobs, String> {
        serde_json::from_value(Json::Object(m)).map_err(|e| e.to_string())
    }

    /// The knobs of `base` with the fields of `over` laid on top, one field at a time (unknown
    /// fields ignored). A field of the wrong type, or with a value [`Knobs::check`] refuses (one
    /// the admin API would not have written), keeps `base`'s value and is named in the second
    /// result: one bad field of a stored document must not keep its other knobs — a kill switch
    /// — from acting.
    pub(crate) fn merged(base: &Knobs, over: &Map<String, Json>) -> (Knobs, Vec<String>) {
        let (mut knobs, mut m, mut rejected) = (base.clone(), base.to_map(), Vec::new());
        for (k, v) in over {
            let Some(old) = m.insert(k.clone(), v.clone()) else {
                m.remove(k); // not a knob
                continue;
            };
            if old == *v {
                continue;
            }
            match Knobs::from_map(m.clone()) {
                // A base that fails the check itself (never from a validated configuration)
                // still takes well-typed fields.
                Ok(next) if next.check().is_ok() || knobs.check().is_err() => knobs = next,
                _ => {
                    m.insert(k.clone(), old);
                    rejected.push(k.clone());
                }
            }
        }
        (knobs, rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn knobs_round_trip_through_a_policy_and_json() {
        let mut p = Policy::for_test();
        p.kill_switch = true;
        p.fair_use.per_minute_cap = -1;
        p.mode = Mode::Soft;
        p.source_modes = vec![("batch".into(), Mode::Shadow)];
        let k = Knobs::of(&p);
        assert_eq!(Knobs::from_map(k.to_map()).unwrap(), k);
        let mut q = Policy::for_test();
        k.apply(&mut q);
        assert_eq!(Knobs::of(&q), k);
        assert_eq!(k.to_map().len(), 16, "one field per PATCHable setting");
    }

    #[test]
    fn one_bad_field_keeps_its_base_value_and_the_others_still_act() {
        let base = Knobs::of(&Policy::for_test());
        let doc = json!({
            "kill_switch": true,
            "audit_sample_rate": 7.0,
            "global_abuse_per_minute_cap": "lots",
            "global_abuse_block_seconds": 0,
            "enforcement_mode": "strict",
            "fair_use_per_minute_cap": 42,
        });
        let (m, mut rejected) = Knobs::merged(&base, doc.as_object().unwrap());
        assert!(m.kill_switch, "the kill switch acts despite the bad fields");
        assert_eq!(m.fair_use_per_minute_cap, 42);
        assert_eq!(
            (m.audit_sample_rate, m.global_abuse_per_minute_cap, m.global_abuse_block_seconds),
            (base.audit_sample_rate, base.global_abuse_per_minute_cap, base.global_abuse_block_seconds)
        );
        assert_eq!(m.enforcement_mode, base.enforcement_mode);
        assert!(m.check().is_ok());
        rejected.sort();
        assert_eq!(
            rejected,
            ["audit_sample_rate", "enforcement_mode", "global_abuse_block_seconds", "global_abuse_per_minute_cap"]
        );
    }

    #[test]
    fn merged_lays_known_fields_over_and_check_names_a_bad_mode_or_an_out_of_range_value() {
        let base = Knobs::of(&Policy::for_test());
        let (m, rejected) = Knobs::merged(&base, json!({"kill_switch": true, "nonsense": 1}).as_object().unwrap());
        assert!(m.kill_switch && m.global_abuse_per_minute_cap == base.global_abuse_per_minute_cap);
        assert!(rejected.is_empty(), "unknown fields are ignored, not rejected: {rejected:?}");
        let (m, rejected) = Knobs::merged(&base, json!({"kill_switch": "yes"}).as_object().unwrap());
        assert_eq!((m, rejected), (base.clone(), vec!["kill_switch".to_string()]));
        assert!(base.check().is_ok());
        let bad = Knobs { source_modes: vec![("batch".into(), "strict".into())], ..base.clone() };
        assert!(bad.check().unwrap_err().contains("strict"));
        // Values the admin API would refuse are refused when read back too.
        let zero_cap = Knobs { global_abuse_per_minute_cap: 0, ..base.clone() };
        assert!(zero_cap.check().unwrap_err().contains("global_abuse_per_minute_cap"));
        let rate = Knobs { audit_sample_rate: 2.0, ..base };
        assert!(rate.check().unwrap_err().contains("audit_sample_rate"));
    }
}
