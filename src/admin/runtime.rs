//! The runtime-policy document of `GET/PATCH /api/v1/enforcement/runtime`: rendering a policy
//! snapshot and applying a validated patch to one. Pure (no I/O), so every rule is a unit test.
//!
//! Owns: `view`, `apply_patch`, `PATCHABLE`. Imports: decide policy types, config parsers.

use std::ops::RangeInclusive;

use serde_json::{json, Map, Value};

use crate::config::parse_source_modes;
use crate::decide::policy::{bounds, FairUse};
use crate::decide::{Mode, Policy};

/// Fields `PATCH` accepts (besides the required `reason`).
pub const PATCHABLE: &[&str] = &[
    "kill_switch",
    "global_abuse_guards_enabled",
    "global_abuse_per_minute_cap",
    "global_abuse_unique_tenants_threshold",
    "global_abuse_block_seconds",
    "fair_use_guards_enabled",
    "fair_use_per_minute_cap",
    "fair_use_per_tenant_concurrency_cap",
    "fair_use_concurrency_lease_ttl_seconds",
    "fair_use_pro_daily_soft_cap",
    "fair_use_enterprise_daily_soft_cap",
    "fair_use_tokens_per_minute",
    "enforcement_mode",
    "source_modes",
    "approval_issuance_frozen",
    "audit_sample_rate",
];

/// Settings of the global abuse guard: changing any of them lifts a block in force.
pub const GLOBAL_GUARD: &[&str] = &[
    "global_abuse_guards_enabled",
    "global_abuse_per_minute_cap",
    "global_abuse_unique_tenants_threshold",
    "global_abuse_block_seconds",
];

/// Whether `patch` changes a setting of the global abuse guard.
pub fn changes_global_guard(patch: &Map<String, Value>) -> bool {
    GLOBAL_GUARD.iter().any(|k| patch.contains_key(*k))
}

/// The runtime document for a policy snapshot.
pub fn view(p: &Policy) -> Value {
    let sources: Map<String, Value> = p.source_modes.iter().map(|(s, m)| (s.clone(), json!(m.as_str()))).collect();
    json!({
        "policy_version": p.version,
        "kill_switch": p.kill_switch,
        "global_abuse_guards_enabled": p.global.enabled,
        "global_abuse_per_minute_cap": p.global.per_minute_cap,
        "global_abuse_unique_tenants_threshold": p.global.unique_tenants_threshold,
        "global_abuse_block_seconds": p.global.block_seconds,
        "fair_use_guards_enabled": p.fair_use.enabled,
        "fair_use_per_minute_cap": p.fair_use.per_minute_cap,
        "fair_use_per_tenant_concurrency_cap": p.fair_use.concurrency_cap,
        "fair_use_concurrency_lease_ttl_seconds": p.fair_use.lease_ttl_seconds,
        "fair_use_pro_daily_soft_cap": p.fair_use.pro_daily_soft_cap,
        "fair_use_enterprise_daily_soft_cap": p.fair_use.enterprise_daily_soft_cap,
        "fair_use_tokens_per_minute": p.fair_use.tokens_per_minute,
        "enforcement_mode": p.mode.as_str(),
        "source_modes": sources,
        "approval_issuance_frozen": p.approval_issuance_frozen,
        "audit_sample_rate": p.audit_sample_rate,
    })
}

fn boolean(v: &Value, k: &str) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| format!("`{k}` must be true or false"))
}

fn int_in(v: &Value, k: &str, lo: i64, hi: i64) -> Result<i64, String> {
    match v.as_i64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!("`{k}` must be an integer between {lo} and {hi}")),
    }
}

fn count_in(v: &Value, k: &str, range: RangeInclusive<u64>) -> Result<u64, String> {
    match v.as_u64() {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(format!("`{k}` must be an integer between {} and {}", range.start(), range.end())),
    }
}

/// Validates and applies `patch` (without `reason`) to `p`. Unknown fields are errors.
pub fn apply_patch(p: &mut Policy, patch: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in patch {
        match k.as_str() {
            "kill_switch" => p.kill_switch = boolean(v, k)?,
            "global_abuse_guards_enabled" => p.global.enabled = boolean(v, k)?,
            "global_abuse_per_minute_cap" => p.global.per_minute_cap = count_in(v, k, bounds::GLOBAL_PER_MINUTE_CAP)?,
            "global_abuse_unique_tenants_threshold" => {
                p.global.unique_tenants_threshold = count_in(v, k, bounds::GLOBAL_UNIQUE_TENANTS)?
            }
            "global_abuse_block_seconds" => p.global.block_seconds = count_in(v, k, bounds::GLOBAL_BLOCK_SECONDS)?,
            "fair_use_guards_enabled" => p.fair_use.enabled = boolean(v, k)?,
            "fair_use_per_minute_cap" => p.fair_use.per_minute_cap = int_in(v, k, i64::MIN, i64::MAX)?,
            // `fair_use_concurrency_cap` is accepted as a shorter spelling.
            "fair_use_per_tenant_concurrency_cap" | "fair_use_concurrency_cap" => {
                p.fair_use.concurrency_cap = int_in(v, k, i64::MIN, i64::MAX)?
            }
            // As the variable: ≤ 0 is the shortest lease, not an error.
            "fair_use_concurrency_lease_ttl_seconds" => {
                p.fair_use.lease_ttl_seconds = v.as_i64().and_then(FairUse::lease_ttl_of).ok_or_else(|| {
                    let max = bounds::LEASE_TTL_SECONDS.end();
                    format!("`{k}` must be an integer up to {max} (≤ 0: the shortest lease, 30 s)")
                })?
            }
            "fair_use_pro_daily_soft_cap" => p.fair_use.pro_daily_soft_cap = int_in(v, k, i64::MIN, i64::MAX)?,
            "fair_use_enterprise_daily_soft_cap" => {
                p.fair_use.enterprise_daily_soft_cap = int_in(v, k, i64::MIN, i64::MAX)?
            }
            // `tenant_tokens_per_minute` mirrors the env name PREAUTH_TENANT_TOKENS_PER_MINUTE.
            "fair_use_tokens_per_minute" | "tenant_tokens_per_minute" => {
                p.fair_use.tokens_per_minute = int_in(v, k, i64::MIN, i64::MAX)?
            }
            "enforcement_mode" => {
                p.mode =
                    v.as_str().and_then(Mode::parse).ok_or_else(|| format!("`{k}` must be shadow, soft or hard"))?
            }
            "source_modes" => {
                p.source_modes = match v {
                    Value::String(s) => parse_source_modes(s)?,
                    Value::Object(m) => {
                        // The object is read through the env syntax (`batch=soft,evals=shadow`):
                        // a key or mode holding that syntax's separators would name other sources.
                        if let Some((s, _)) = m.iter().find(|(s, mode)| {
                            s.contains(['=', ',']) || mode.as_str().is_some_and(|m| m.contains(['=', ',']))
                        }) {
                            return Err(format!("`{k}`: source name `{s}` or its mode contains `=` or `,`"));
                        }
                        let joined: Vec<String> =
                            m.iter().map(|(s, mode)| format!("{s}={}", mode.as_str().unwrap_or("?"))).collect();
                        parse_source_modes(&joined.join(","))?
                    }
                    _ => return Err(format!("`{k}` must be an object like {{\"batch\": \"soft\"}}")),
                }
            }
            "approval_issuance_frozen" => p.approval_issuance_frozen = boolean(v, k)?,
            "audit_sample_rate" => match v.as_f64() {
                Some(r) if bounds::AUDIT_SAMPLE_RATE.contains(&r) => p.audit_sample_rate = r,
                _ => return Err(format!("`{k}` must be a number between 0 and 1")),
            },
            other => {
                return Err(format!("`{other}` is not a runtime setting (settable: {})", PATCHABLE.join(", ")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn applies_every_field() {
        let mut p = Policy::for_test();
        apply_patch(
            &mut p,
            &patch(json!({
                "kill_switch": true, "global_abuse_per_minute_cap": 5, "fair_use_guards_enabled": true,
                "fair_use_per_minute_cap": 2, "enforcement_mode": "soft", "source_modes": {"batch": "shadow"},
                "audit_sample_rate": 1.0, "approval_issuance_frozen": true
            })),
        )
        .unwrap();
        assert!(p.kill_switch && p.fair_use.enabled && p.approval_issuance_frozen);
        assert_eq!((p.global.per_minute_cap, p.fair_use.per_minute_cap, p.mode), (5, 2, Mode::Soft));
        assert_eq!(p.source_modes, vec![("batch".to_string(), Mode::Shadow)]);
        let v = view(&p);
        assert_eq!(v["source_modes"]["batch"], "shadow");
        assert_eq!(v["kill_switch"], true);
    }

    #[test]
    fn rejects_bad_values_and_unknown_fields() {
        let mut p = Policy::for_test();
        for bad in [
            json!({"kill_switch": "yes"}),
            json!({"global_abuse_per_minute_cap": 0}),
            json!({"global_abuse_block_seconds": 5}),
            json!({"enforcement_mode": "strict"}),
            json!({"audit_sample_rate": 3}),
            json!({"nonsense": 1}),
            json!({"source_modes": {"default": "soft"}}),
            json!({"source_modes": {"batch=shadow,evil": "hard"}}),
            json!({"source_modes": {"batch": "hard,evil=shadow"}}),
            json!({"fair_use_concurrency_lease_ttl_seconds": 86_401}),
            json!({"fair_use_concurrency_lease_ttl_seconds": "60"}),
        ] {
            assert!(apply_patch(&mut p, &patch(bad.clone())).is_err(), "{bad}");
        }
    }

    /// The lease TTL, as its variable: ≤ 0 is the shortest lease, not a 400.
    #[test]
    fn a_lease_ttl_at_or_below_zero_is_the_shortest_lease() {
        let mut p = Policy::for_test();
        for (v, want) in [(json!(-3), 0), (json!(0), 0), (json!(45), 45), (json!(86_400), 86_400)] {
            apply_patch(&mut p, &patch(json!({"fair_use_concurrency_lease_ttl_seconds": v}))).unwrap();
            assert_eq!(p.fair_use.lease_ttl_seconds, want);
        }
        assert_eq!(p.fair_use.lease_life_ms(), 86_400_000);
    }
}
