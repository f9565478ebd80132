use std::collections::HashMap;

use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
    let mut m: HashMap<&str, &str> = HashMap::new();
    m.insert("PREAUTH_UPSTREAM_URL", "http://127.0.0.1:4000");
    m.insert("SUPABASE_JWT_SECRET", SECRET);
    m.extend(pairs.iter().copied());
    m
}

#[test]
fn defaults_match_the_contract() {
    let c = parse(&env(&[]), Purpose::Run).unwrap();
    assert_eq!(c.listen_addr.to_string(), "0.0.0.0:8080");
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:9090");
    assert_eq!(c.max_body_bytes, 10_485_760);
    assert_eq!(c.policy.global.per_minute_cap, 600);
    assert_eq!(c.policy.global.unique_tenants_threshold, 30);
    assert_eq!(c.policy.global.block_seconds, 120);
    assert!(c.policy.global.enabled && !c.policy.kill_switch && !c.policy.fair_use.enabled);
    assert_eq!(c.policy.spend.require_approval_above.to_string(), "1.000000");
    assert_eq!(c.policy.spend.hard_deny_above.to_string(), "50.000000");
    assert_eq!(c.policy.mode, Mode::Hard);
    assert_eq!(c.gate_timeout_ms, 50);
    assert_eq!(c.reservation_ttl_seconds, 1800);
    assert_eq!(c.upstream.unwrap().port, 4000);
}

#[test]
fn every_bad_variable_is_reported() {
    let e = parse(
        &env(&[
            ("LLM_FAIR_USE_GUARDS_ENABLED", "maybe"),
            ("LLM_GLOBAL_ABUSE_PER_MINUTE_CAP", "0"),
            ("LLM_GLOBAL_ABUSE_BLOCK_SECONDS", "10"),
            ("PREAUTH_ENFORCEMENT_MODE", "strict"),
            ("PREAUTH_SOURCE_MODES", "batch=loud"),
            ("SUPABASE_JWT_SECRET", "short"),
            ("PREAUTH_UPSTREAM_URL", "ftp://x"),
            ("PREAUTH_AUDIT_SAMPLE_RATE", "2"),
            ("ENFORCEMENT_APPROVAL_TOKEN_SECRET", "tiny"),
        ]),
        Purpose::Run,
    )
    .unwrap_err();
    let vars: Vec<&str> = e.iter().map(|e| e.var.as_str()).collect();
    for want in [
        "LLM_FAIR_USE_GUARDS_ENABLED",
        "LLM_GLOBAL_ABUSE_PER_MINUTE_CAP",
        "LLM_GLOBAL_ABUSE_BLOCK_SECONDS",
        "PREAUTH_ENFORCEMENT_MODE",
        "PREAUTH_SOURCE_MODES",
        "SUPABASE_JWT_SECRET",
        "PREAUTH_UPSTREAM_URL",
        "PREAUTH_AUDIT_SAMPLE_RATE",
        "ENFORCEMENT_APPROVAL_TOKEN_SECRET",
    ] {
        assert!(vars.contains(&want), "{want} missing from {vars:?}");
    }
    assert!(!e.iter().any(|e| e.message.contains(SECRET)), "secrets never appear in errors");
}

#[test]
fn booleans_are_strict() {
    for (v, want) in [("TRUE", true), ("yes", true), ("1", true), ("No", false), ("0", false)] {
        let c = parse(&env(&[("LLM_GLOBAL_ABUSE_KILL_SWITCH", v)]), Purpose::Run).unwrap();
        assert_eq!(c.policy.kill_switch, want, "{v}");
    }
    assert!(parse(&env(&[("LLM_GLOBAL_ABUSE_KILL_SWITCH", "on")]), Purpose::Run).is_err());
}

#[test]
fn upstream_is_required_except_in_demo() {
    let mut m = env(&[]);
    m.remove("PREAUTH_UPSTREAM_URL");
    assert!(parse(&m, Purpose::Run).is_err());
    assert!(parse(&m, Purpose::Demo).unwrap().upstream.is_none());
}

#[test]
fn header_identity_needs_no_secret() {
    let mut m = env(&[("PREAUTH_IDENTITY", "header")]);
    m.remove("SUPABASE_JWT_SECRET");
    assert_eq!(parse(&m, Purpose::Run).unwrap().identity, Identity::Header);
}

#[test]
fn source_modes_parse() {
    let v = parse_source_modes("batch=soft, evals=shadow").unwrap();
    assert_eq!(v, vec![("batch".to_string(), Mode::Soft), ("evals".to_string(), Mode::Shadow)]);
    assert!(parse_source_modes("default=soft").is_err());
    assert!(parse_source_modes("a=soft,a=hard").is_err());
    assert!(parse_source_modes("nonsense").is_err());
}

#[test]
fn upstream_urls() {
    let u = Upstream::parse("https://gw.internal").unwrap();
    assert_eq!((u.tls, u.host.as_str(), u.port), (true, "gw.internal", 443));
    let u = Upstream::parse("http://[::1]:4000/").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("::1", 4000));
    assert!(Upstream::parse("http://gw/v1").is_err());
}

#[test]
fn thresholds_must_be_consistent() {
    let e = parse(
        &env(&[("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "10"), ("PREAUTH_HARD_DENY_ABOVE_USD", "5")]),
        Purpose::Run,
    )
    .unwrap_err();
    assert_eq!(e[0].var, "PREAUTH_HARD_DENY_ABOVE_USD");
}

#[test]
fn describe_redacts_secrets() {
    let c = parse(
        &env(&[("ADMIN_API_KEY", "admin-key-value"), ("PREAUTH_LEDGER_URL", "postgres://u:pw@db/ledger")]),
        Purpose::Run,
    )
    .unwrap();
    let text: String = describe(&c).iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    assert!(!text.contains(SECRET) && !text.contains("admin-key-value") && !text.contains("pw@"), "{text}");
    assert!(text.contains("PREAUTH_LEDGER_URL=postgres://<redacted>@db/ledger"));
}
