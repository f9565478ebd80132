//! The binary's commands: `check-config` and start-up validation (exit 64).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_preauth-sidecar");

fn clean_command() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("PREAUTH_")
            || k.starts_with("LLM_")
            || k.starts_with("ENFORCEMENT_")
            || k == "SUPABASE_JWT_SECRET"
            || k == "ADMIN_API_KEY"
        {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn check_config_reports_every_bad_variable_and_exits_64() {
    let out = clean_command()
        .arg("check-config")
        .env("PREAUTH_UPSTREAM_URL", "ftp://nope")
        .env("SUPABASE_JWT_SECRET", "too-short")
        .env("LLM_GLOBAL_ABUSE_PER_MINUTE_CAP", "0")
        .env("LLM_FAIR_USE_GUARDS_ENABLED", "maybe")
        .env("PREAUTH_ENFORCEMENT_MODE", "strict")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for var in [
        "PREAUTH_UPSTREAM_URL",
        "SUPABASE_JWT_SECRET",
        "LLM_GLOBAL_ABUSE_PER_MINUTE_CAP",
        "LLM_FAIR_USE_GUARDS_ENABLED",
        "PREAUTH_ENFORCEMENT_MODE",
    ] {
        assert!(err.contains(var), "{var} not named in:\n{err}");
    }
    assert!(!err.contains("too-short"), "secret values are never printed");
}

#[test]
fn check_config_prints_effective_config_redacted() {
    let secret = "s3cret-0123456789abcdef0123456789abcdef";
    let out = clean_command()
        .arg("check-config")
        .env("PREAUTH_UPSTREAM_URL", "http://127.0.0.1:4000")
        .env("SUPABASE_JWT_SECRET", secret)
        .env("ADMIN_API_KEY", "admin-secret-key")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PREAUTH_UPSTREAM_URL=http://127.0.0.1:4000"));
    assert!(text.contains("LLM_GLOBAL_ABUSE_PER_MINUTE_CAP=600"));
    assert!(!text.contains(secret) && !text.contains("admin-secret-key"), "{text}");
}

#[test]
fn run_refuses_bad_config_before_binding() {
    let out = clean_command().env("PREAUTH_LISTEN_ADDR", "not-an-address").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PREAUTH_LISTEN_ADDR") && err.contains("PREAUTH_UPSTREAM_URL"), "{err}");
}

#[test]
fn help_after_a_command_explains_instead_of_starting_it() {
    for cmd in ["demo", "run", "check-config"] {
        let out = clean_command().args([cmd, "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("preauth-sidecar demo") && text.contains("check-config"), "{cmd}: {text}");
    }
}

#[test]
fn a_bad_upstream_url_is_reported_without_its_credentials() {
    for url in ["http://gw:4000/v1?api_key=sk-live-leak123", "http://user:sk-live-leak123@gw:4000"] {
        let out = clean_command()
            .arg("check-config")
            .env("PREAUTH_UPSTREAM_URL", url)
            .env("SUPABASE_JWT_SECRET", "s3cret-0123456789abcdef0123456789abcdef")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("PREAUTH_UPSTREAM_URL") && err.contains("gw:4000"), "{err}");
        assert!(!err.contains("sk-live-leak123"), "credential printed: {err}");
    }
}
