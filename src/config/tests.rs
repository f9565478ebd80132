use std::collections::HashMap;

use super::*;
use crate::decide::Tier;

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
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(c.threads, (cpus / 2).max(1), "half the CPUs, at least one");
}

#[test]
fn proxy_threads_default_to_half_the_cpus_and_the_variable_wins() {
    let halves: Vec<u64> = [1, 2, 3, 4, 16].into_iter().map(default_threads).collect();
    assert_eq!(halves, [1, 1, 1, 2, 8]);
    assert_eq!(parse(&env(&[("PREAUTH_THREADS", "6")]), Purpose::Run).unwrap().threads, 6);
    assert!(parse(&env(&[("PREAUTH_THREADS", "0")]), Purpose::Run).is_err());
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

/// The lease TTL sits in the contract's fair-use list, where "a value ≤ 0 disables that one
/// gate": ≤ 0 starts (as the reference system, which applies `max(30, ttl)`), it is not a
/// configuration error (before: exit 64). The shortest lease and `Retry-After` 5 apply.
#[test]
fn a_lease_ttl_at_or_below_zero_is_the_shortest_lease_not_an_error() {
    for v in ["0", "-5"] {
        let c = parse(&env(&[("LLM_FAIR_USE_CONCURRENCY_LEASE_TTL_SECONDS", v)]), Purpose::Run).unwrap();
        assert_eq!(c.policy.fair_use.lease_ttl_seconds, 0, "{v}");
        assert_eq!(c.policy.fair_use.lease_life_ms(), 30_000, "{v}");
    }
    let c = parse(&env(&[("LLM_FAIR_USE_CONCURRENCY_LEASE_TTL_SECONDS", "86400")]), Purpose::Run).unwrap();
    assert_eq!(c.policy.fair_use.lease_ttl_seconds, 86_400);
    for v in ["86401", "soon", "1.5"] {
        let e = parse(&env(&[("LLM_FAIR_USE_CONCURRENCY_LEASE_TTL_SECONDS", v)]), Purpose::Run).unwrap_err();
        assert!(e.iter().any(|e| e.var == "LLM_FAIR_USE_CONCURRENCY_LEASE_TTL_SECONDS"), "{v}: {e:?}");
    }
}

/// A mistyped identity mode does not hide the errors of the jwt settings it most likely meant.
#[test]
fn a_bad_identity_mode_still_reports_bad_jwt_settings() {
    let e = parse(
        &env(&[
            ("PREAUTH_IDENTITY", "jtw"),
            ("SUPABASE_JWT_SECRET", "short"),
            ("PREAUTH_JWT_TENANT_CLAIM", "app_metadata..tenant"),
        ]),
        Purpose::Run,
    )
    .unwrap_err();
    let vars: Vec<&str> = e.iter().map(|e| e.var.as_str()).collect();
    assert_eq!(vars, ["PREAUTH_IDENTITY", "SUPABASE_JWT_SECRET", "PREAUTH_JWT_TENANT_CLAIM"]);
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
fn an_empty_switch_or_store_url_is_an_error_not_a_default() {
    for var in [
        "LLM_GLOBAL_ABUSE_KILL_SWITCH",
        "ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN",
        "PREAUTH_REDIS_URL",
        "PREAUTH_LEDGER_URL",
    ] {
        for blank in ["", "  "] {
            let e = parse(&env(&[(var, blank)]), Purpose::Run).unwrap_err();
            assert_eq!(e.len(), 1, "{var}={blank:?}: {e:?}");
            assert_eq!(e[0].var, var);
            assert!(e[0].message.starts_with("is set but empty: "), "{}", e[0].message);
        }
    }
    // Lists and optional texts: empty is unset (the rotation procedure clears the fallbacks so).
    let c =
        parse(&env(&[("ENFORCEMENT_APPROVAL_TOKEN_FALLBACK_SECRETS", ""), ("PREAUTH_TENANTS_FILE", "")]), Purpose::Run)
            .unwrap();
    assert!(c.approvals.fallback_secrets.is_empty());
}

#[test]
fn a_redis_url_is_checked_as_the_start_would() {
    for bad in ["redis://:pw@127.0.0.1:notaport/0", "redis://127.0.0.1:6379/abc", "redis+cluster://"] {
        let e = parse(&env(&[("PREAUTH_REDIS_URL", bad)]), Purpose::Run).unwrap_err();
        assert_eq!(e[0].var, "PREAUTH_REDIS_URL", "{bad}");
        assert!(!e[0].message.contains("pw"), "no credential in {:?}", e[0].message);
    }
    for good in ["redis://127.0.0.1:6379/0", "rediss://:pw@redis.internal:6380", "redis+cluster://a:7000,b:7001"] {
        assert!(parse(&env(&[("PREAUTH_REDIS_URL", good)]), Purpose::Run).is_ok(), "{good}");
    }
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
fn upstream_hosts_and_ports_are_checked() {
    for bad in [
        "http://ho st:80",
        "http://127.0.0.1:0",
        "http://gw\u{0}x",
        "https://gw,b:443",
        "http://[::1]x:4000",
        "http://[zz]:80",
        "http://..:80",
        "http://gw:+80",
        "http://gw:",
    ] {
        assert!(Upstream::parse(bad).is_err(), "{bad}");
    }
    for good in ["http://gw_1.internal:4000", "http://[::1]:4000", "http://[fe80::1%eth0]:80", "https://GW-2"] {
        assert!(Upstream::parse(good).is_ok(), "{good}");
    }
}

#[test]
fn a_data_directory_that_cannot_be_written_is_an_error() {
    let e = parse(&env(&[("PREAUTH_DATA_DIR", "/proc/preauth-data")]), Purpose::Run).unwrap_err();
    assert_eq!(e[0].var, "PREAUTH_DATA_DIR");
    assert!(e[0].message.contains("cannot be written"), "{}", e[0].message);
    let dir = std::env::temp_dir().join(format!("preauth-cfg-{}", std::process::id())).join("new/sub");
    let mut m = env(&[]);
    let dir = dir.display().to_string();
    m.insert("PREAUTH_DATA_DIR", &dir);
    assert!(parse(&m, Purpose::Run).is_ok());
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

#[test]
fn describe_redacts_credentials_in_url_query_strings() {
    for (url, shown) in [
        (
            "postgres://db/ledger?user=preauth&password=pw5ecret&sslmode=disable",
            "postgres://db/ledger?user=<redacted>&password=<redacted>&sslmode=<redacted>",
        ),
        ("https://ledger.example/ingest?token=qtok123", "https://ledger.example/ingest?token=<redacted>"),
        (
            "https://u:p@ledger.example/ingest?key=k#frag",
            "https://<redacted>@ledger.example/ingest?key=<redacted>#frag",
        ),
        // Generated passwords with a raw `/`, `?` or `#`: the drivers take them whole.
        ("postgres://app:pw5ecret/x1@db:5432/ledger", "postgres://<redacted>@db:5432/ledger"),
        ("postgres://app:pw5ecret#x1@db/ledger", "postgres://<redacted>@db/ledger"),
        ("postgres://app:pw5ecret?x1@db/ledger", "postgres://<redacted>@db/ledger"),
    ] {
        let c = parse(&env(&[("PREAUTH_LEDGER_URL", url)]), Purpose::Run).unwrap();
        let text: String = describe(&c).iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        assert!(!text.contains("pw5ecret") && !text.contains("qtok123") && !text.contains("key=k"), "{text}");
        assert!(text.contains(&format!("PREAUTH_LEDGER_URL={shown}\n")), "{text}");
    }
    let bad = parse(&env(&[("PREAUTH_UPSTREAM_URL", "http://u:pw5ecret/x1@gw:80")]), Purpose::Run).err();
    let said = format!("{bad:?}");
    assert!(said.contains("give only scheme, host and port") && !said.contains("pw5ecret"), "{said}");
    let c = parse(&env(&[("PREAUTH_REDIS_URL", "redis://db:6379/0?password=rpw")]), Purpose::Run).unwrap();
    let text: String = describe(&c).iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    assert!(!text.contains("rpw"), "{text}");
}

/// Writes `text` to a fresh file under the system temp directory; its path lives for the test.
fn file(name: &str, text: &str) -> &'static str {
    let dir = std::env::temp_dir().join(format!("preauth-config-{}-{name}", std::process::id()));
    std::fs::write(&dir, text).unwrap();
    Box::leak(dir.to_string_lossy().into_owned().into_boxed_str())
}

#[test]
fn every_bad_file_is_reported_at_once() {
    let tenants = file("tenants.toml", "[tenants.\"x\"]\ntier = \"pro\"\nbogus_key = 1\n");
    let tiers = file("tiers.toml", "[tiers.pro]\nbogus = 1\n");
    let pricing = file("pricing.toml", "[models.default]\nbogus = 1\n");
    let e = parse(
        &env(&[("PREAUTH_TENANTS_FILE", tenants), ("PREAUTH_TIERS_FILE", tiers), ("PREAUTH_PRICING_FILE", pricing)]),
        Purpose::Run,
    )
    .unwrap_err();
    let vars: Vec<&str> = e.iter().map(|e| e.var.as_str()).collect();
    assert_eq!(vars, ["PREAUTH_TENANTS_FILE", "PREAUTH_TIERS_FILE", "PREAUTH_PRICING_FILE"], "{e:?}");
    assert!(e[0].message.contains("bogus_key"), "{}", e[0].message);

    // A missing file and a bad one: both named.
    let missing = "/nonexistent/preauth/tenants.toml";
    let e = parse(&env(&[("PREAUTH_TENANTS_FILE", missing), ("PREAUTH_TIERS_FILE", tiers)]), Purpose::Run).unwrap_err();
    let vars: Vec<&str> = e.iter().map(|e| e.var.as_str()).collect();
    assert_eq!(vars, ["PREAUTH_TENANTS_FILE", "PREAUTH_TIERS_FILE"], "{e:?}");
    assert!(e[0].message.contains("cannot read"), "{}", e[0].message);

    // Good files still combine: the tenant's tier comes from the tenants file, budgets from tiers.
    let tenants = file("good-tenants.toml", "[tenants.\"x\"]\ntier = \"pro\"\n");
    let tiers = file("good-tiers.toml", "[tiers.pro]\nmonthly_budget_usd = \"7.00\"\n");
    let c = parse(&env(&[("PREAUTH_TENANTS_FILE", tenants), ("PREAUTH_TIERS_FILE", tiers)]), Purpose::Run).unwrap();
    let d = &c.policy.directory;
    let tier = d.resolve_tier("x", None);
    assert_eq!(tier, Tier::Pro);
    assert_eq!(d.monthly_budget("x", tier).to_string(), "7.000000");
}

/// An env file read the way `docker run --env-file` and systemd's `EnvironmentFile=` read it:
/// `KEY=VALUE` lines, the value verbatim to the end of the line; `#` lines and blank lines skipped.
fn env_file(text: &'static str) -> HashMap<&'static str, &'static str> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l}")))
        .collect()
}

#[test]
fn the_example_env_files_load_as_docker_and_systemd_read_them() {
    for (name, text) in [
        ("sidecar.env.example", include_str!("../../config/sidecar.env.example")),
        ("header-identity.env.example", include_str!("../../config/header-identity.env.example")),
    ] {
        if let Err(e) = parse(&env_file(text), Purpose::Run) {
            panic!("config/{name} does not load: {e:?}");
        }
    }
    let e = parse(&env_file(include_str!("../../config/invalid.env.example")), Purpose::Run).unwrap_err();
    assert!(e.len() >= 5, "config/invalid.env.example names each of its bad lines: {e:?}");
}

#[test]
fn upstream_url_errors_do_not_echo_credentials() {
    for bad in ["http://svc:s3cr3t-pw@gw:4000", "https://svc:s3cr3t-pw@gw:4000/v1", "ftp://svc:s3cr3t-pw@gw"] {
        let errors = parse(&env(&[("PREAUTH_UPSTREAM_URL", bad)]), Purpose::Run).unwrap_err();
        let text = format!("{errors:?}");
        assert!(text.contains("PREAUTH_UPSTREAM_URL"), "{text}");
        assert!(!text.contains("s3cr3t-pw"), "the password is printed: {text}");
    }
}

/// A ledger URL that `run` cannot use is a configuration error found by `check-config` too (and
/// reported with the others, exit 64), without echoing its credentials.
#[test]
fn unusable_ledger_urls_are_config_errors() {
    for url in [
        "postgres://postgres:pw5ecret@127.0.0.1:notaport/db",
        "postgres://postgres:pw5ecret@127.0.0.1/db?sslmode=require",
        "http://u:pw5ecret@[::1/ingest",
    ] {
        let e = parse(&env(&[("PREAUTH_LEDGER_URL", url), ("PREAUTH_OUTBOX_FULL_POLICY", "nope")]), Purpose::Run)
            .unwrap_err();
        let vars: Vec<&str> = e.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(vars, ["PREAUTH_LEDGER_URL", "PREAUTH_OUTBOX_FULL_POLICY"], "{url}: {e:?}");
        assert!(!format!("{e:?}").contains("pw5ecret"), "{e:?}");
    }
    for ok in ["postgres://postgres@127.0.0.1:5432/db?sslmode=disable", "https://ledger.example:8443/ingest"] {
        assert!(parse(&env(&[("PREAUTH_LEDGER_URL", ok)]), Purpose::Run).is_ok(), "{ok}");
    }
}

#[test]
fn approvals_without_a_signing_secret_are_warned_about() {
    let c = parse(&env(&[]), Purpose::Run).unwrap();
    let w = warnings(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("ENFORCEMENT_APPROVAL_TOKEN_SECRET") && w[0].contains("1.000000"), "{w:?}");
    assert!(!w[0].contains(SECRET));
    let c = parse(&env(&[("ENFORCEMENT_APPROVAL_TOKEN_SECRET", "approval-secret-0123456789abcdef0123")]), Purpose::Run)
        .unwrap();
    assert!(warnings(&c).is_empty());
}

#[test]
fn a_reservation_ttl_a_request_can_outlive_is_warned_about() {
    let secret = ("ENFORCEMENT_APPROVAL_TOKEN_SECRET", "approval-secret-0123456789abcdef0123");
    let c = parse(&env(&[secret, ("PREAUTH_RESERVATION_TTL_SECONDS", "600")]), Purpose::Run).unwrap();
    let w = warnings(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with(
        "PREAUTH_RESERVATION_TTL_SECONDS (600) is not longer than PREAUTH_UPSTREAM_TIMEOUT_SECONDS (600)"
    ));
    let c = parse(&env(&[secret, ("PREAUTH_RESERVATION_TTL_SECONDS", "601")]), Purpose::Run).unwrap();
    assert!(warnings(&c).is_empty());
}

#[test]
fn a_data_directory_under_a_file_is_refused_and_tools_do_not_care() {
    let file = std::env::temp_dir().join(format!("preauth-cfg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, b"x").unwrap();
    let under: &'static str = Box::leak(file.join("sub").display().to_string().into_boxed_str());
    let e = parse(&env(&[("PREAUTH_DATA_DIR", under)]), Purpose::Run).unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].var, "PREAUTH_DATA_DIR");
    assert!(e[0].message.contains("is a file"), "{e:?}");
    assert!(parse(&env(&[("PREAUTH_DATA_DIR", under)]), Purpose::Tool).is_ok(), "offline tools read no data dir");
    let missing: &'static str = Box::leak(format!("{}.d/a/b", file.display()).into_boxed_str());
    assert!(parse(&env(&[("PREAUTH_DATA_DIR", missing)]), Purpose::Run).is_ok(), "created when missing");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn every_variable_is_known_and_a_misspelled_one_is_named_with_the_nearest() {
    let declared = include_str!("env.rs").lines().filter(|l| l.starts_with("pub const ENV_")).count();
    assert_eq!(env::ALL.len(), declared, "env::ALL lists every ENV_ constant");
    let names = [
        "LLM_GLOBAL_ABUSE_KILLSWITCH",
        "PREAUTH_ENFORCMENT_MODE",
        "PREAUTH_SOMETHING_ELSE_ENTIRELY",
        "PREAUTH_ENFORCEMENT_MODE",
        "PREAUTH_TEST_REDIS_URL",
        "PATH",
        "LLM_PROVIDER",
    ];
    let w = env::unknown_variables(names.iter().map(|n| n.to_string()));
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(
        w[0].starts_with("LLM_GLOBAL_ABUSE_KILLSWITCH is not a variable")
            && w[0].ends_with("LLM_GLOBAL_ABUSE_KILL_SWITCH?")
    );
    assert!(w[1].ends_with("did you mean PREAUTH_ENFORCEMENT_MODE?"), "{w:?}");
    assert!(w[2].starts_with("PREAUTH_SOMETHING_ELSE_ENTIRELY") && !w[2].contains("did you mean"), "{w:?}");
}
