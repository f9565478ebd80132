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
        .env("LLM_GLOBAL_ABUSE_KILLSWITCH", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("warning: LLM_GLOBAL_ABUSE_KILLSWITCH is not a variable of this sidecar and is ignored: did you mean LLM_GLOBAL_ABUSE_KILL_SWITCH?"),
        "a misspelled variable is named: {warned}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PREAUTH_UPSTREAM_URL=http://127.0.0.1:4000"));
    assert!(text.contains("LLM_GLOBAL_ABUSE_PER_MINUTE_CAP=600"));
    assert!(!text.contains(secret) && !text.contains("admin-secret-key"), "{text}");
}

/// `check-config | head -1`: a reader that stops early is not a crash (exit 0, not a panic's 101).
#[test]
fn check_config_into_a_closed_pipe_exits_0() {
    let mut child = clean_command()
        .arg("check-config")
        .env("PREAUTH_UPSTREAM_URL", "http://127.0.0.1:4000")
        .env("SUPABASE_JWT_SECRET", "s3cret-0123456789abcdef0123456789abcdef")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
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

/// A listener address another process holds stops the start (exit 64, the variable named):
/// before, pingora retried for 30 s, then lost the proxy listener in a panicked thread while the
/// process and its admin `/readyz` (200) lived on, refusing every LLM call.
#[test]
fn a_listener_address_in_use_stops_the_start() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let dir = crate::support::temp_dir();
    for (var, other) in [("PREAUTH_LISTEN_ADDR", "PREAUTH_ADMIN_ADDR"), ("PREAUTH_ADMIN_ADDR", "PREAUTH_LISTEN_ADDR")] {
        let free = format!("127.0.0.1:{}", crate::support::free_port());
        let mut child = clean_command()
            .arg("run")
            .env("PREAUTH_UPSTREAM_URL", "http://127.0.0.1:9")
            .env("SUPABASE_JWT_SECRET", crate::support::JWT_SECRET)
            .env("PREAUTH_DATA_DIR", &dir)
            .env(var, &busy)
            .env(other, &free)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{var} in use: the process kept running");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(64), "{var}: {err}");
        assert!(err.contains(var) && err.contains(&busy), "{var}: {err}");
    }
    // One address for both listeners is a configuration error, reported with the others.
    let out = clean_command()
        .arg("check-config")
        .env("PREAUTH_UPSTREAM_URL", "http://127.0.0.1:9")
        .env("SUPABASE_JWT_SECRET", crate::support::JWT_SECRET)
        .env("PREAUTH_LISTEN_ADDR", "127.0.0.1:28999")
        .env("PREAUTH_ADMIN_ADDR", "127.0.0.1:28999")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PREAUTH_ADMIN_ADDR"));
    drop(held);
}

/// Configuration is environment only: `run --listen …` is refused (exit 64) instead of starting
/// on the defaults with the argument ignored.
#[test]
fn commands_refuse_arguments_they_do_not_take() {
    for cmd in ["run", "demo", "check-config", "migrate"] {
        let out = clean_command().args([cmd, "--listen", "127.0.0.1:1"]).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unexpected argument `--listen`"), "{cmd}: {err}");
    }
}

/// One process per data directory: a second `run` on a directory a running sidecar holds exits
/// 64 naming it (before, it rewrote the journals under the first process, whose later spend was
/// then lost at its next restart); the first one keeps serving, and once it is gone the
/// directory can be taken again.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_the_same_data_directory_is_refused() {
    use crate::support::*;
    let up = preauth_sidecar::demo::upstream::FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let dir = temp_dir();
    let mut first = Binary::start(&up, &dir, &[]);
    let mut second = clean_command();
    second.arg("run");
    for (k, v) in &first.env {
        second.env(k, v);
    }
    let (proxy, admin) = free_pair();
    let (proxy, admin) = (proxy.to_string(), admin.to_string());
    let out = second.env("PREAUTH_LISTEN_ADDR", &proxy).env("PREAUTH_ADMIN_ADDR", &admin).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(said.contains("is in use by another preauth-sidecar process (pid "), "{said}");
    assert!(said.contains(&dir.display().to_string()), "names the directory: {said}");
    assert_eq!(first.call("acme", &chat("gpt-4o-mini"), &[]).await.status(), 200, "the first one serves on");
    first.restart_with(&[], &[]);
    assert_eq!(first.call("acme", &chat("gpt-4o-mini"), &[]).await.status(), 200, "taken again after the first exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_uses_its_own_upstream_and_local_state_whatever_the_shell_has() {
    use crate::support::*;
    let dir = temp_dir();
    let (proxy, admin) = free_pair();
    // A shell that sourced a real deployment's env file: the demo must not use any of these.
    let unused = free_port();
    let mut child = clean_command()
        .arg("demo")
        .env("PREAUTH_UPSTREAM_URL", format!("http://127.0.0.1:{unused}"))
        .env("PREAUTH_REDIS_URL", format!("redis://127.0.0.1:{unused}/0"))
        .env("PREAUTH_LEDGER_URL", format!("postgres://postgres@127.0.0.1:{unused}/nope"))
        .env("PREAUTH_LISTEN_ADDR", proxy.to_string())
        .env("PREAUTH_ADMIN_ADDR", admin.to_string())
        .env("PREAUTH_DATA_DIR", &dir)
        .env("SUPABASE_JWT_SECRET", JWT_SECRET)
        .env("ADMIN_API_KEY", "real-admin-key-of-a-deployment")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = std::io::BufReader::new(child.stdout.take().unwrap());
    let printing = std::thread::spawn(move || {
        let mut printed = String::new();
        let _ = std::io::Read::read_to_string(&mut banner, &mut printed);
        printed
    });
    wait_listening(proxy);
    let r = client()
        .post(format!("http://{proxy}/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    let printed = printing.join().unwrap();
    assert_eq!(status, 200, "answered by the demo's own upstream:\n{said}");
    // Nothing printed is a credential of the deployment: not its admin key, not a tenant token
    // signed with its JWT secret.
    assert!(printed.contains("ADMIN_API_KEY=$ADMIN_API_KEY"), "{printed}");
    assert!(!printed.contains("real-admin-key-of-a-deployment") && !printed.contains("eyJ"), "{printed}");
    assert!(
        said.contains(
            "demo: ignoring PREAUTH_LEDGER_URL, PREAUTH_REDIS_URL, PREAUTH_UPSTREAM_URL from the environment"
        ),
        "{said}"
    );
    assert!(!said.contains("shared state store (redis)"), "no Redis was contacted:\n{said}");
}
