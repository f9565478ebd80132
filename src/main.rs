//! `preauth-sidecar` binary: the composition root's command line. Parses the environment (exit
//! 64 listing every bad variable before any port is bound), sets up logging and runs a command.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use pingora::server::RunArgs;
use preauth_sidecar::clock::{Clock, SystemClock};
use preauth_sidecar::config::{self, Config, Env, LogFormat, Purpose, Strings, EXIT_CONFIG};
use preauth_sidecar::demo::{mint_tenant_jwt, upstream};
use preauth_sidecar::server;

/// mimalloc: fewer instructions per allocation than glibc's malloc on pingora's per-request
/// allocations (measured in the pingora cost study this project started from).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
preauth-sidecar: pre-authorization sidecar for LLM gateways

USAGE:
    preauth-sidecar [run]        start the proxy, admin listener and workers (configured by env)
    preauth-sidecar demo         start a built-in fake LLM upstream plus the sidecar, print examples
    preauth-sidecar check-config validate the environment, print the effective config (secrets redacted)
    preauth-sidecar mint-approval --tenant T --fingerprint F --max-cost-usd X [--ttl-seconds S] [--approval-id ID]
                                 print an approval token signed with ENFORCEMENT_APPROVAL_TOKEN_SECRET
                                 (exit 1 while ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN=true)
    preauth-sidecar migrate      create/update the enforcement_ledger schema at PREAUTH_LEDGER_URL (Postgres)
    preauth-sidecar rebuild-spend [--month YYYY-MM] [--wait-seconds N]
                                 restore each tenant's month spend in Redis from the Postgres ledger

Configuration is environment only; see README.md and config/*.env.example.
Exit codes: 0 ok, 64 configuration error, 69 upstream unresolvable.";

fn main() -> ExitCode {
    // No transparent huge pages: mimalloc commits its arenas eagerly and asks for huge pages, so
    // every 2 MiB region it touches became resident whole (idle RSS 22 → 11 MB, and the same
    // rounding on every arena under load). A proxy's heap gains nothing from huge pages.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().skip(1).any(|a| a == "-h" || a == "--help") {
        // `preauth-sidecar demo --help` explains, it does not start the demo.
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    // Configuration is environment only: an argument after a command that takes none
    // (`run --listen 0.0.0.0:9000`) would otherwise be ignored silently.
    if let (Some("run" | "demo" | "check-config" | "migrate"), Some(extra)) =
        (args.first().map(String::as_str), args.get(1))
    {
        eprintln!(
            "unexpected argument `{extra}`: `{}` takes none (configuration is environment only)\n\n{USAGE}",
            args[0]
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    match args.first().map(String::as_str) {
        None | Some("run") => run(&Env, Purpose::Run),
        Some("demo") => demo(),
        Some("check-config") => check_config(),
        Some("mint-approval") => mint_approval(&args[1..]),
        Some("migrate") => migrate(),
        Some("rebuild-spend") => rebuild_spend(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version" | "version") => {
            println!("preauth-sidecar {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
    }
}

fn parse_or_report(src: &dyn Strings, purpose: Purpose) -> Result<Config, ExitCode> {
    config::parse(src, purpose).map_err(|errors| {
        eprintln!("configuration error: {} bad variable(s); nothing was started", errors.len());
        for e in &errors {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn check_config() -> ExitCode {
    match parse_or_report(&Env, Purpose::Run) {
        Ok(c) => {
            // `parse` has read the tier, tenant and price files too: any bad one was reported.
            // Written without `println!`: a reader that stops early (`| head`) is not an error.
            let mut out = std::io::stdout().lock();
            for (k, v) in config::describe(&c) {
                if writeln!(out, "{k}={v}").is_err() {
                    break;
                }
            }
            for w in config::warnings(&c).into_iter().chain(unknown_variables()) {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Warnings for variables of the process environment that look like the sidecar's but are not.
fn unknown_variables() -> Vec<String> {
    config::env::unknown_variables(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))
}

/// `migrate`: creates or updates the central ledger schema (idempotent).
fn migrate() -> ExitCode {
    let config = match parse_or_report(&Env, Purpose::Tool) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(url) = config.ledger_url.as_deref().filter(|u| preauth_sidecar::ledger::sink::is_postgres_url(u)) else {
        eprintln!("PREAUTH_LEDGER_URL must be a postgres:// URL for `migrate`");
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(preauth_sidecar::ledger::postgres::migrate(url)) {
        Ok(created) => {
            println!(
                "{}",
                if created {
                    "enforcement_ledger created (table, indexes, append-only trigger)"
                } else {
                    "enforcement_ledger already there; its indexes and append-only trigger are in place"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migrate failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long `rebuild-spend` waits by default for the fleet's outboxes to deliver the
/// settlements written before it started.
const REBUILD_WAIT_SECONDS: u64 = 120;

/// `rebuild-spend`: after the shared store lost data, restores each tenant's month spend from
/// the settlements in the Postgres ledger. Only raises spend (a store ahead of the ledger, e.g.
/// events not yet delivered, is left alone and reported). First waits until every live replica
/// says its outbox holds no settlement written before the run started (they are in neither
/// total otherwise: a restore made meanwhile would stay short of them).
fn rebuild_spend(args: &[String]) -> ExitCode {
    use preauth_sidecar::decide::time::Month;
    use preauth_sidecar::decide::Micros;
    use preauth_sidecar::store::budget::Budgets;
    const USAGE: &str = "usage: preauth-sidecar rebuild-spend [--month YYYY-MM] [--wait-seconds N]";
    let (mut month, mut wait_seconds) = (Month::of(SystemClock.now_ms()), REBUILD_WAIT_SECONDS);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--month", Some(m)) => match Month::parse(m) {
                Some(m) => month = m,
                None => {
                    eprintln!("--month `{m}` is not YYYY-MM");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            },
            ("--wait-seconds", Some(n)) => match n.parse::<u64>() {
                Ok(n) => wait_seconds = n,
                Err(_) => {
                    eprintln!("--wait-seconds `{n}` is not a whole number of seconds");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    }
    let config = match parse_or_report(&Env, Purpose::Tool) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (Some(redis_url), Some(ledger)) = (config.redis_url.clone(), config.ledger_url.clone()) else {
        eprintln!("rebuild-spend needs PREAUTH_REDIS_URL (the store to restore) and a postgres:// PREAUTH_LEDGER_URL");
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    if !(ledger.starts_with("postgres://") || ledger.starts_with("postgresql://")) {
        eprintln!(
            "rebuild-spend reads the central ledger table: PREAUTH_LEDGER_URL must be its postgres:// URL (an \
             HTTP ledger cannot be queried)"
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let timeout = std::time::Duration::from_millis(config.store_timeout_ms.max(1000));
    let store = match preauth_sidecar::store::redis::RedisStore::connect_blocking(
        &redis_url,
        &config.redis_key_prefix,
        timeout,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("PREAUTH_REDIS_URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = store.probe_blocking() {
        eprintln!(
            "rebuild-spend: cannot use the Redis store at PREAUTH_REDIS_URL: {e}; check the address, the \
             password and that Redis is up (nothing was changed)"
        );
        return ExitCode::FAILURE;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result: Result<Vec<(String, Micros, Micros)>, String> = rt.block_on(async {
        await_outboxes(&store, wait_seconds).await?;
        let (client, conn) = tokio_postgres::connect(&ledger, tokio_postgres::NoTls).await.map_err(|e| {
            format!(
                "cannot connect to the ledger at PREAUTH_LEDGER_URL: {}; check the address, database and credentials",
                pg_cause(&e)
            )
        })?;
        tokio::spawn(conn);
        let start = preauth_sidecar::decide::time::rfc3339_seconds(month.start());
        let end = preauth_sidecar::decide::time::rfc3339_seconds(month.next().start());
        let rows = client
            .query(
                // One settlement per reservation, as the store charged it: an operator's manual
                // reconcile wins over the settlement its request wrote when it ended (that one
                // found the hold reconciled and charged nothing, but its event was already
                // written); settlements without a hold (shadow mode) each count.
                "SELECT tenant_id, sum(cost)::bigint, (array_agg(tier ORDER BY occurred_at DESC))[1] FROM ( \
                 SELECT DISTINCT ON (coalesce(reservation_id, event_id::text)) tenant_id, occurred_at, \
                 round((payload->>'actual_cost_usd')::numeric * 1000000) AS cost, payload->>'tenant_tier' AS tier \
                 FROM enforcement_ledger WHERE event_type = 'reservation_settled' AND tenant_id IS NOT NULL \
                 AND payload->>'actual_cost_usd' IS NOT NULL \
                 AND occurred_at >= $1::text::timestamptz AND occurred_at < $2::text::timestamptz \
                 ORDER BY coalesce(reservation_id, event_id::text), \
                 (payload->'details'->>'trigger' = 'manual') DESC NULLS LAST, occurred_at \
                 ) settled GROUP BY tenant_id",
                &[&start, &end],
            )
            .await
            .map_err(|e| {
                let hint = if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
                    " (no enforcement_ledger table: run `preauth-sidecar migrate` with this PREAUTH_LEDGER_URL)"
                } else {
                    ""
                };
                format!("ledger query: {}{hint}", pg_cause(&e))
            })?;
        let mut out = Vec::new();
        let key = month.to_string();
        let run = uuid::Uuid::new_v4().simple();
        for row in rows {
            let tenant: String = row.get(0);
            let ledger_total = Micros(row.get::<_, i64>(1));
            let tier: Option<String> = row.get(2);
            let current = store.tenant_spend(&tenant, &key).await.map_err(|e| format!("store: {e}"))?.spent;
            if ledger_total > current {
                store
                    .charge(
                        &format!("rebuild:{run}:{tenant}"),
                        &tenant,
                        &key,
                        Micros(ledger_total.0 - current.0),
                        SystemClock.now_ms(),
                    )
                    .await
                    .map_err(|e| format!("store: {e}"))?;
                // The tier the tenant view shows comes with the spend (its latest settlement's).
                if let Some(tier) = tier.filter(|t| !t.is_empty()) {
                    store.restore_tier(&tenant, &key, &tier).await.map_err(|e| format!("store: {e}"))?;
                }
            }
            out.push((tenant, current, ledger_total));
        }
        Ok(out)
    });
    match result {
        Ok(rows) => {
            println!("month {month}: {} tenant(s)", rows.len());
            for (tenant, before, ledger_total) in rows {
                let note = if ledger_total > before {
                    "restored"
                } else if ledger_total == before {
                    "ok"
                } else {
                    "store ahead of ledger; left as is"
                };
                println!("{tenant}\tstore {before}\tledger {ledger_total}\t{note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rebuild-spend failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits (at most `wait_seconds`, at least [`PRESENCE_SETTLES`]) until no live replica's outbox
/// holds a settlement written before now for the ledger (each says so every 2 s with its fleet
/// presence, which Redis may just have lost: the wait covers one round of them). `Err`: still
/// waiting at the deadline — nothing is changed. With 0 it does not wait, and warns.
async fn await_outboxes(store: &preauth_sidecar::store::redis::RedisStore, wait_seconds: u64) -> Result<(), String> {
    /// Every live replica has said what its outbox holds since a moment within this.
    const PRESENCE_SETTLES: std::time::Duration = std::time::Duration::from_secs(3);
    let since = SystemClock.now_ms();
    let start = std::time::Instant::now();
    let deadline = start + std::time::Duration::from_secs(wait_seconds).max(PRESENCE_SETTLES);
    let mut said = false;
    loop {
        let (behind, silent) =
            store.outboxes_behind(since, SystemClock.now_ms()).await.map_err(|e| format!("store: {e}"))?;
        if behind.is_empty() {
            if wait_seconds > 0 && start.elapsed() < PRESENCE_SETTLES {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            if silent > 0 {
                eprintln!(
                    "note: {silent} live replica(s) say nothing of their outbox (no PREAUTH_LEDGER_URL, or an older \
                     version): settlements they still hold are not in the ledger's total; run rebuild-spend again once \
                     their preauth_outbox_depth is 0 (it only raises spend: a second run completes the restore)"
                );
            }
            return Ok(());
        }
        let oldest = behind.iter().map(|b| b.oldest_ms).filter(|t| *t > 1).min();
        let what = format!(
            "{} replica(s) still hold settlements for the ledger from before this run{}",
            behind.len(),
            oldest
                .map(|t| format!(" (oldest written {})", preauth_sidecar::decide::time::rfc3339_seconds(t)))
                .unwrap_or_default()
        );
        if wait_seconds == 0 {
            eprintln!(
                "warning: {what}; restoring what the ledger has now — run rebuild-spend again once their \
                 preauth_outbox_depth is 0 (it only raises spend: a second run completes the restore)"
            );
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{what} after {wait_seconds} s (is the ledger reachable? see preauth_outbox_depth and the replicas' \
                 logs); nothing was changed. Run it again once they have delivered, or with --wait-seconds 0 to \
                 restore what the ledger has now and again later"
            ));
        }
        if !said {
            eprintln!("{what}: waiting (at most {wait_seconds} s) for them to reach the ledger");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What a Postgres error says, down to its cause (its own text is often just "db error").
fn pg_cause(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => preauth_sidecar::ledger::sink::error_chain(e),
    }
}

/// `mint-approval`: signs an approval token offline with the primary secret.
fn mint_approval(args: &[String]) -> ExitCode {
    use preauth_sidecar::decide::approval::{mint, MintRequest};
    use preauth_sidecar::decide::Micros;
    let usage = "usage: preauth-sidecar mint-approval --tenant T --fingerprint F --max-cost-usd X [--ttl-seconds S] [--approval-id ID]";
    let mut opts: HashMap<&str, &str> = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let known = ["--tenant", "--fingerprint", "--max-cost-usd", "--ttl-seconds", "--approval-id"];
        match (known.contains(&flag.as_str()), it.next()) {
            (true, Some(v)) => {
                opts.insert(flag.as_str(), v.as_str());
            }
            _ => {
                eprintln!("unknown or incomplete option `{flag}`\n{usage}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    }
    let config = match parse_or_report(&Env, Purpose::Tool) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.policy.approval_issuance_frozen {
        eprintln!("approval issuance is frozen (ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN=true): no token minted");
        return ExitCode::from(1);
    }
    // A freeze set at runtime (`PATCH approval_issuance_frozen`) binds this tool too, read where
    // the sidecar keeps it: the fleet's store, or the data directory (embedded:
    // `runtime-policy.json`, merged with the environment as the sidecar does at start). When it
    // cannot be read, no token is minted.
    let (runtime, version_of, cannot_read, hint) = match &config.redis_url {
        Some(url) => {
            let timeout = std::time::Duration::from_millis(config.store_timeout_ms.max(1000));
            let read =
                preauth_sidecar::store::redis::RedisStore::connect_blocking(url, &config.redis_key_prefix, timeout)
                    .and_then(|store| store.read_policy_blocking(&config.policy));
            (
                read.map(Some).map_err(|e| e.to_string()),
                "fleet policy version",
                "PREAUTH_REDIS_URL: the fleet's runtime policy could not be read",
                "",
            )
        }
        None => (
            preauth_sidecar::store::runtime_policy::peek(&config.data_dir, &config.policy),
            "policy version",
            "PREAUTH_DATA_DIR: the runtime policy could not be read",
            "; check the file, or run mint-approval with the sidecar's PREAUTH_DATA_DIR",
        ),
    };
    match runtime {
        Ok(Some(p)) if p.approval_issuance_frozen => {
            eprintln!("approval issuance is frozen at runtime ({version_of} {}): no token minted", p.version);
            return ExitCode::from(1);
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("{cannot_read} ({e}): no token minted{hint}");
            return ExitCode::from(1);
        }
    }
    let Some(secret) = config.approvals.secret.as_ref() else {
        eprintln!("ENFORCEMENT_APPROVAL_TOKEN_SECRET is not set: it signs approval tokens (at least 32 characters)");
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    let (Some(tenant), Some(fingerprint), Some(cost)) =
        (opts.get("--tenant"), opts.get("--fingerprint"), opts.get("--max-cost-usd"))
    else {
        eprintln!("--tenant, --fingerprint and --max-cost-usd are required\n{usage}");
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    let Ok(max_cost) = Micros::from_usd_str(cost) else {
        eprintln!("--max-cost-usd `{cost}` is not a decimal amount like 2.50");
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    let ttl_seconds = match opts.get("--ttl-seconds").map(|t| t.parse::<u64>()) {
        None => config.approvals.ttl_seconds,
        Some(Ok(t)) if (60..=86_400).contains(&t) => t,
        Some(_) => {
            eprintln!("--ttl-seconds must be a whole number between 60 and 86400");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let generated = uuid::Uuid::now_v7().to_string();
    let req = MintRequest {
        issuer: &config.approvals.issuer,
        tenant_id: tenant,
        approval_id: opts.get("--approval-id").copied().unwrap_or(&generated),
        request_fingerprint: fingerprint,
        max_cost,
        now_s: (SystemClock.now_ms() / 1000) as i64,
        ttl_seconds,
    };
    if let Err(field) = req.validate() {
        let (flag, what) = match field {
            "request_fingerprint" => {
                ("--fingerprint", "64 lowercase hex characters (the request_fingerprint of the 403)")
            }
            "max_cost_usd" => ("--max-cost-usd", "a decimal amount of at least 0, like 2.50"),
            "approval_id" => ("--approval-id", "1 to 256 bytes, no control characters"),
            "tenant_id" => ("--tenant", "1 to 256 bytes, no control characters"),
            _ => ("--ttl-seconds", "a whole number between 60 and 86400"),
        };
        eprintln!("{flag} must be {what}\n{usage}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    println!("{}", mint(&req, secret.expose().as_bytes(), config.approvals.kid.as_deref()));
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // pingora's trace lines, and the debug lines of its proxy and HTTP clients, print whole
    // request and response heads and bodies (`Authorization: Bearer <admin key>` on the admin
    // listener, the upstream key and prompts on the h2c path): never logged, whatever RUST_LOG
    // says. Nor is its HTTP server app at any level: its error line for a malformed request head
    // on the admin listener quotes that head, credentials included (the sidecar's own h2c failure
    // line replaces pingora's, see `suppress_error_log`).
    let no_pingora_trace = tracing_subscriber::filter::filter_fn(|meta| {
        let (level, target) = (*meta.level(), meta.target());
        let proxy_or_client = target.starts_with("pingora_proxy")
            || (target.starts_with("pingora_core::protocols::http::") && target.ends_with("::client"));
        let quiet = level == tracing::Level::TRACE
            || (level == tracing::Level::DEBUG && proxy_or_client)
            || target.starts_with("pingora_core::apps::http_app");
        !(quiet && target.starts_with("pingora"))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => {
            builder.json().with_ansi(false).with_current_span(false).finish().with(no_pingora_trace).try_init()
        }
        // Colour only for a terminal: a file or a log collector gets plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .finish()
            .with(no_pingora_trace)
            .try_init(),
    };
}

fn run(src: &dyn Strings, purpose: Purpose) -> ExitCode {
    let config = match parse_or_report(src, purpose) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log_format);
    for w in config::warnings(&config).into_iter().chain(unknown_variables()) {
        tracing::warn!("{w}");
    }
    let (listen, admin) = (config.listen_addr, config.admin_addr);
    // Held until the process exits: one process per data directory.
    let _data_dir = match server::lock_data_dir(&config.data_dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let built = match server::build(config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot start: {e}");
            let code = if e.contains("resolve") { 69 } else { EXIT_CONFIG as u8 };
            return ExitCode::from(code);
        }
    };
    tracing::info!(%listen, %admin, "preauth-sidecar starting");
    let signals = server::Draining(built.state.clone());
    server::run(built, RunArgs { shutdown_signal: Box::new(signals) });
    ExitCode::SUCCESS
}

/// The environment with demo defaults for whatever the user did not set, except the variables
/// the demo owns (`forced`: its own upstream, nothing shared), whatever the environment says.
struct Overlay {
    defaults: HashMap<&'static str, String>,
    forced: HashMap<&'static str, Option<String>>,
}

impl Strings for Overlay {
    fn get(&self, key: &str) -> Option<String> {
        if let Some(v) = self.forced.get(key) {
            return v.clone();
        }
        Env.get(key).or_else(|| self.defaults.get(key).cloned())
    }
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes * 2 {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(bytes * 2);
    s
}

fn demo() -> ExitCode {
    let (fake, _thread) = match upstream::spawn_on_thread("127.0.0.1:0") {
        Ok(v) => v,
        Err(e) => {
            eprintln!("demo: cannot start the fake upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    fake.set_recording(false);
    // Secrets from the environment apply (tests drive the demo with their own), but what is
    // printed is never derived from one: a shell that sourced a real deployment's env file must
    // not print its admin key, nor tenant tokens signed with its JWT secret.
    let own_secret = Env.get("SUPABASE_JWT_SECRET").is_none();
    let own_admin_key = Env.get("ADMIN_API_KEY").is_none();
    let secret = Env.get("SUPABASE_JWT_SECRET").unwrap_or_else(|| random_hex(32));
    let admin_key = Env.get("ADMIN_API_KEY").unwrap_or_else(|| random_hex(16));
    // The demo talks to its own fake upstream and keeps all state and events local, even when
    // the shell has a real deployment's variables (a sourced sidecar.env): demo traffic must not
    // reach a real gateway, Redis or ledger.
    let forced: HashMap<&'static str, Option<String>> = HashMap::from([
        ("PREAUTH_UPSTREAM_URL", Some(fake.base_url())),
        ("PREAUTH_UPSTREAM_API_KEY", None),
        ("PREAUTH_REDIS_URL", None),
        ("PREAUTH_LEDGER_URL", None),
    ]);
    let mut ignored: Vec<&str> = forced.keys().copied().filter(|k| Env.get(k).is_some()).collect();
    ignored.sort_unstable();
    let mut defaults: HashMap<&'static str, String> = HashMap::new();
    defaults.insert("PREAUTH_LISTEN_ADDR", "127.0.0.1:8080".into());
    defaults.insert("SUPABASE_JWT_SECRET", secret.clone());
    defaults.insert("ADMIN_API_KEY", admin_key.clone());
    // Approvals work in the demo (POST /api/v1/enforcement/approvals/{id}/approve issues tokens).
    defaults.insert("ENFORCEMENT_APPROVAL_TOKEN_SECRET", random_hex(32));
    defaults.insert("PREAUTH_LOG_FORMAT", "text".into());
    defaults.insert("LLM_FAIR_USE_GUARDS_ENABLED", "true".into());
    defaults.insert("LLM_FAIR_USE_PER_MINUTE_CAP", "5".into());
    // A fresh state each run (the daily quota and a kill switch left on would otherwise carry
    // over from the last demo): the demo's own directory is emptied first. With PREAUTH_DATA_DIR
    // set, that directory is used as is.
    let demo_dir = std::env::temp_dir().join("preauth-demo");
    if Env.get("PREAUTH_DATA_DIR").is_none() {
        // Not the directory of a demo still running (its lock is let go before `run` takes it).
        if let Err(e) = server::lock_data_dir(&demo_dir) {
            eprintln!("demo: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
        let _ = std::fs::remove_dir_all(&demo_dir);
    }
    defaults.insert("PREAUTH_DATA_DIR", demo_dir.display().to_string());
    let overlay = Overlay { defaults, forced };
    if !ignored.is_empty() {
        eprintln!(
            "demo: ignoring {} from the environment (the demo uses its own fake upstream and local state only)",
            ignored.join(", ")
        );
    }
    let per_minute = overlay.get("LLM_FAIR_USE_PER_MINUTE_CAP").unwrap_or_default();
    // Read as the configuration reads it (a bad value is reported by `run` below).
    let fair_use_on = config::env::Reader::new(&overlay).bool("LLM_FAIR_USE_GUARDS_ENABLED", false);
    let example_4 = if fair_use_on {
        format!(
            "  # 4. denied: more than {per_minute} calls in a minute for one tenant (LLM_FAIR_USE_PER_MINUTE_CAP={per_minute};\n  \
             #    the demo's default is 5) -> 429 once the tenant's minute is full (examples 1 and 2 used two)"
        )
    } else {
        "  # 4. (fair use is off: LLM_FAIR_USE_GUARDS_ENABLED in your environment; these all answer 200)".to_string()
    };
    let listen = overlay.get("PREAUTH_LISTEN_ADDR").unwrap_or_default();
    let admin = overlay.get("PREAUTH_ADMIN_ADDR").unwrap_or_else(|| "127.0.0.1:9090".into());
    let now = (SystemClock.now_ms() / 1000) as i64;
    let (pro, free) = if own_secret {
        (mint_tenant_jwt(&secret, "acme", "pro", now, 86_400), mint_tenant_jwt(&secret, "tiny-co", "free", now, 86_400))
    } else {
        let not_printed = "<not printed: SUPABASE_JWT_SECRET comes from your environment; sign your own>";
        (not_printed.to_string(), not_printed.to_string())
    };
    let admin_shown = if own_admin_key { admin_key.clone() } else { "$ADMIN_API_KEY".to_string() };
    println!(
        r#"
preauth-sidecar demo
====================
fake LLM upstream : {upstream}
sidecar (proxy)   : http://{listen}
admin API         : http://{admin}   (ADMIN_API_KEY={admin_shown})
state             : {data_dir}   (fresh each run unless PREAUTH_DATA_DIR is set)

Tenant JWTs (HS256, valid 24 h):
  PRO  tenant "acme"    : {pro}
  FREE tenant "tiny-co" : {free}

Try these in another terminal:

  export PRO={pro}
  export FREE={free}

  # 1. allowed: a chat completion through the sidecar
  curl -s -i http://{listen}/v1/chat/completions -H "authorization: Bearer $PRO" \
    -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","max_tokens":50,"messages":[{{"role":"user","content":"hello"}}]}}'

  # 2. streamed (SSE passes through as the upstream emits it)
  curl -s -N http://{listen}/v1/chat/completions -H "authorization: Bearer $PRO" \
    -H 'content-type: application/json' -H 'x-mock-delay-ms: 300' \
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"hello"}}]}}'

  # 3. denied: no token (401), then the free tier's daily quota of 1 request (second call: 402)
  curl -s http://{listen}/v1/chat/completions -d '{{}}'
  for i in 1 2; do curl -s -o /dev/null -w '%{{http_code}}\n' http://{listen}/v1/chat/completions \
    -H "authorization: Bearer $FREE" -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}'; done

{example_4}
  for i in $(seq 6); do curl -s -o /dev/null -w '%{{http_code}} ' http://{listen}/v1/chat/completions \
    -H "authorization: Bearer $PRO" -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}'; done; echo

  # 5. the kill switch, flipped at runtime by the on-call engineer (and back)
  curl -s -X PATCH http://{admin}/api/v1/enforcement/runtime -H "authorization: Bearer {admin_shown}" \
    -d '{{"kill_switch": true, "reason": "demo: incident drill"}}'
  curl -s -X PATCH http://{admin}/api/v1/enforcement/runtime -H "authorization: Bearer {admin_shown}" \
    -d '{{"kill_switch": false, "reason": "demo: drill over"}}'

  # 6. metrics
  curl -s http://{admin}/metrics | grep ^valdrics_ops

OpenAI SDK (Python: pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="http://{listen}/v1", api_key="{pro}")
  print(client.chat.completions.create(model="gpt-4o-mini",
        messages=[{{"role": "user", "content": "hello"}}]).choices[0].message.content)

Ctrl-C stops the demo.
"#,
        upstream = fake.base_url(),
        data_dir = overlay.get("PREAUTH_DATA_DIR").unwrap_or_default(),
    );
    let code = run(&overlay, Purpose::Demo);
    drop(fake);
    code
}
