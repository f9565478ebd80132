//! Configuration: the environment (CONTRACT §2) and the tier/tenant files, parsed once into a
//! typed `Config`. Every bad variable is reported, all at once; the binary exits 64 before
//! binding any port. The internal `Config` is not the external surface: names live in `env.rs`.
//!
//! Owns: `Config` and its parts, `parse`, `describe` (check-config output, secrets redacted).
//! Imports: `decide` (policy types, money), std.

pub mod env;

use std::path::PathBuf;
use std::sync::Arc;

use crate::decide::policy::{bounds, Directory, FairUse, GlobalAbuse, SpendPolicy};
use crate::decide::pricing::PriceTable;
use crate::decide::{Mode, Policy};
use env::*;
pub use env::{ConfigError, Env, Secret, Strings};

/// Exit code for configuration errors (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// How callers prove who they are.
#[derive(Clone, Debug, PartialEq)]
pub enum Identity {
    /// `Authorization: Bearer <HS256 JWT>`.
    Jwt { secret: Secret, audience: String, tenant_claim: String, tier_claim: String },
    /// Trust `x-tenant-id`/`x-tenant-tier`/`x-user-id` (an authenticating gateway sits in front).
    Header,
}

/// The upstream LLM gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The URL as configured (for logs).
    pub url: String,
}

impl Upstream {
    /// Parses `http(s)://host[:port][/]`. A path prefix is not supported (requests keep their path).
    pub fn parse(url: &str) -> Result<Upstream, String> {
        // Errors name the URL without its credentials, userinfo or query values (they reach logs
        // and terminals; `?api_key=…` is a credential as much as `user:password@`).
        let shown = redact_url(url);
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{shown}` must start with http:// or https://"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('?') || authority.contains('@') {
            return Err(format!("`{shown}`: give only scheme, host and port (no path, query or credentials)"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| format!("`{shown}`: unclosed IPv6 bracket"))?;
            let port = match p {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| format!("`{shown}`: `{p}` after the IPv6 address"))?),
            };
            let addr = h.split_once('%').map_or(h, |(a, _zone)| a);
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("`{shown}`: `{h}` is not an IPv6 address"));
            }
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("`{shown}` has no host"));
        }
        let v6 = authority.starts_with('[');
        let host_char =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') || (v6 && matches!(c, ':' | '%'));
        // A name's labels are not empty (`..`, `.x`); one final dot is the DNS root.
        let empty_label = !v6 && host.strip_suffix('.').unwrap_or(&host).split('.').any(str::is_empty);
        if !host.chars().all(host_char) || empty_label {
            return Err(format!("`{shown}`: `{host}` is not a host name or IP address"));
        }
        let port = match port {
            Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!("`{shown}`: port `{p}` is not a port number"));
            }
            Some(p) => match p.parse::<u16>() {
                Ok(0) => return Err(format!("`{shown}`: port 0 is not a port a gateway listens on")),
                Ok(n) => n,
                Err(_) => return Err(format!("`{shown}`: port `{p}` is not a port number")),
            },
            None if tls => 443,
            None => 80,
        };
        Ok(Upstream { tls, host, port, url: url.to_string() })
    }
}

/// `url` with any `user:password@` of its authority replaced by `<redacted>@`.
fn redact_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    // Up to the last `@` of the whole URL, not of the authority as a strict parser ends it: a
    // password with a raw `/`, `?` or `#` (common in generated ones) is taken whole by the
    // Postgres and Redis drivers. An `@` in a path or query redacts a little more; never less.
    match url[start..].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &url[start + at..]),
        None => url.to_string(),
    }
}

/// `url` for display: `user:password@` replaced by `<redacted>@`, and the value of every query
/// parameter by `<redacted>` (`?password=…`, `?token=…` carry credentials just as well).
fn redact_url(url: &str) -> String {
    let url = redact_userinfo(url);
    let Some(q) = url.find('?') else { return url };
    let end = url[q..].find('#').map_or(url.len(), |i| q + i);
    let query: Vec<String> = url[q + 1..end]
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !v.is_empty() => format!("{k}=<redacted>"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{}?{}{}", &url[..q], query.join("&"), &url[end..])
}

/// What to do when the outbox is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxFullPolicy {
    Failsafe,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Approval-token settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Approvals {
    pub secret: Option<Secret>,
    pub fallback_secrets: Vec<Secret>,
    pub ttl_seconds: u64,
    pub issuer: String,
    pub kid: Option<String>,
}

/// The whole configuration, typed and validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    pub upstream: Option<Upstream>,
    pub upstream_api_key: Option<Secret>,
    pub threads: usize,
    pub max_body_bytes: u64,
    pub upstream_timeout_seconds: u64,
    pub identity: Identity,
    pub tenants_file: Option<PathBuf>,
    pub tiers_file: Option<PathBuf>,
    pub pricing_file: Option<PathBuf>,
    /// The initial policy snapshot (version 1).
    pub policy: Policy,
    pub reservation_ttl_seconds: u64,
    pub gate_timeout_ms: u64,
    pub approvals: Approvals,
    pub redis_url: Option<String>,
    pub redis_key_prefix: String,
    pub store_timeout_ms: u64,
    pub data_dir: PathBuf,
    pub ledger_url: Option<String>,
    pub local_ledger_retention_hours: u64,
    pub outbox_max_bytes: u64,
    pub outbox_full_policy: OutboxFullPolicy,
    pub admin_api_key: Option<Secret>,
    pub instance_id: String,
    pub log_format: LogFormat,
}

/// Minimum length of every HMAC secret (CONTRACT §2, §5).
pub const MIN_SECRET_LEN: usize = 32;
/// Bound on configured sources: they are metric label values.
pub const MAX_SOURCES: usize = 32;

/// Where the demo and tests may skip the upstream requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Run,
    /// `demo`: the upstream is the built-in fake, set after parsing.
    Demo,
    /// Offline tools (`mint-approval`, `migrate`): no listener, so neither the upstream nor the
    /// caller-identity secret is required.
    Tool,
}

/// Parses everything, collecting every error.
pub fn parse(src: &(impl Strings + ?Sized), purpose: Purpose) -> Result<Config, Vec<ConfigError>> {
    let mut r = Reader::new(src);

    let listen_addr = r.socket_addr(ENV_LISTEN_ADDR, DEFAULT_LISTEN_ADDR);
    let admin_addr = r.socket_addr(ENV_ADMIN_ADDR, DEFAULT_ADMIN_ADDR);
    if admin_addr == listen_addr && admin_addr.port() != 0 {
        r.error(
            ENV_ADMIN_ADDR,
            format!("{admin_addr} is also {ENV_LISTEN_ADDR}: give the admin listener a port of its own"),
        );
    }
    let upstream = match (r.raw(ENV_UPSTREAM_URL), purpose) {
        (Some(u), _) => match Upstream::parse(&u) {
            Ok(up) => Some(up),
            Err(e) => {
                r.error(ENV_UPSTREAM_URL, e);
                None
            }
        },
        (None, Purpose::Demo | Purpose::Tool) => None,
        (None, Purpose::Run) => {
            r.error(ENV_UPSTREAM_URL, "is required: the URL of the LLM gateway, e.g. http://127.0.0.1:4000");
            None
        }
    };
    let upstream_api_key = r.raw(ENV_UPSTREAM_API_KEY).map(Secret::new);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let threads = r.u64_in(ENV_THREADS, default_threads(cpus), 1..=1024) as usize;
    let max_body_bytes = r.u64_in(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES, 1..=1 << 30);
    let upstream_timeout_seconds = r.u64_in(ENV_UPSTREAM_TIMEOUT_SECONDS, DEFAULT_UPSTREAM_TIMEOUT_SECONDS, 1..=86_400);

    let identity = match r.string(ENV_IDENTITY, "jwt").to_ascii_lowercase().as_str() {
        "jwt" => {
            let secret = r.secret(ENV_JWT_SECRET, MIN_SECRET_LEN);
            if secret.is_none() && r.raw(ENV_JWT_SECRET).is_none() && purpose != Purpose::Tool {
                r.error(
                    ENV_JWT_SECRET,
                    "is required with PREAUTH_IDENTITY=jwt (the HS256 secret callers' tokens are signed with)",
                );
            }
            Identity::Jwt {
                secret: secret.unwrap_or_else(|| Secret::new("")),
                audience: r.string(ENV_JWT_AUDIENCE, DEFAULT_JWT_AUDIENCE),
                tenant_claim: claim_path(&mut r, ENV_JWT_TENANT_CLAIM, DEFAULT_JWT_TENANT_CLAIM),
                tier_claim: claim_path(&mut r, ENV_JWT_TIER_CLAIM, DEFAULT_JWT_TIER_CLAIM),
            }
        }
        "header" => Identity::Header,
        other => {
            r.error(ENV_IDENTITY, format!("`{other}` is not an identity mode (use jwt or header)"));
            // A mistyped mode (`jtw`) most likely meant jwt: its settings are checked too, so
            // every bad variable is reported at once.
            let _ = r.secret(ENV_JWT_SECRET, MIN_SECRET_LEN);
            claim_path(&mut r, ENV_JWT_TENANT_CLAIM, DEFAULT_JWT_TENANT_CLAIM);
            claim_path(&mut r, ENV_JWT_TIER_CLAIM, DEFAULT_JWT_TIER_CLAIM);
            Identity::Header
        }
    };

    let tenants_file = r.raw(ENV_TENANTS_FILE).map(PathBuf::from);
    let tiers_file = r.raw(ENV_TIERS_FILE).map(PathBuf::from);
    let pricing_file = r.raw(ENV_PRICING_FILE).map(PathBuf::from);
    let directory = match load_directory(tiers_file.as_deref(), tenants_file.as_deref()) {
        Ok(d) => d,
        Err(errors) => {
            for (var, e) in errors {
                r.error(var, e);
            }
            Directory::builtin()
        }
    };
    if let Err(e) = read_pricing(pricing_file.as_deref()) {
        r.error(ENV_PRICING_FILE, e);
    }

    let global = GlobalAbuse {
        enabled: r.bool(ENV_GLOBAL_GUARDS_ENABLED, true),
        per_minute_cap: r.u64_in(
            ENV_GLOBAL_PER_MINUTE_CAP,
            DEFAULT_GLOBAL_PER_MINUTE_CAP,
            bounds::GLOBAL_PER_MINUTE_CAP,
        ),
        unique_tenants_threshold: r.u64_in(
            ENV_GLOBAL_UNIQUE_TENANTS,
            DEFAULT_GLOBAL_UNIQUE_TENANTS,
            bounds::GLOBAL_UNIQUE_TENANTS,
        ),
        block_seconds: r.u64_in(ENV_GLOBAL_BLOCK_SECONDS, DEFAULT_GLOBAL_BLOCK_SECONDS, bounds::GLOBAL_BLOCK_SECONDS),
    };
    let kill_switch = r.bool(ENV_KILL_SWITCH, false);
    let tokens_per_minute = r.opt_i64(ENV_TOKENS_PER_MINUTE).unwrap_or(0);
    let fair_use = FairUse {
        enabled: r.bool(ENV_FAIR_USE_ENABLED, false),
        per_minute_cap: r.i64(ENV_FAIR_USE_PER_MINUTE_CAP, DEFAULT_FAIR_USE_PER_MINUTE_CAP),
        concurrency_cap: r.i64(ENV_FAIR_USE_CONCURRENCY_CAP, DEFAULT_FAIR_USE_CONCURRENCY_CAP),
        // ≤ 0: the shortest lease (30 s; `Retry-After` 5), never a configuration error.
        lease_ttl_seconds: {
            let n = r.i64(ENV_FAIR_USE_LEASE_TTL_SECONDS, DEFAULT_FAIR_USE_LEASE_TTL_SECONDS as i64);
            FairUse::lease_ttl_of(n).unwrap_or_else(|| {
                let max = bounds::LEASE_TTL_SECONDS.end();
                r.error(ENV_FAIR_USE_LEASE_TTL_SECONDS, format!("{n} is out of range (at most {max})"));
                DEFAULT_FAIR_USE_LEASE_TTL_SECONDS
            })
        },
        pro_daily_soft_cap: r.i64(ENV_FAIR_USE_PRO_DAILY, DEFAULT_FAIR_USE_PRO_DAILY),
        enterprise_daily_soft_cap: r.i64(ENV_FAIR_USE_ENTERPRISE_DAILY, DEFAULT_FAIR_USE_ENTERPRISE_DAILY),
        tokens_per_minute,
    };
    let require_approval_above = r.usd(ENV_REQUIRE_APPROVAL_ABOVE, DEFAULT_REQUIRE_APPROVAL_ABOVE);
    let hard_deny_above = r.usd(ENV_HARD_DENY_ABOVE, DEFAULT_HARD_DENY_ABOVE);
    if hard_deny_above < require_approval_above {
        r.error(
            ENV_HARD_DENY_ABOVE,
            format!("{hard_deny_above} is below {ENV_REQUIRE_APPROVAL_ABOVE} ({require_approval_above}): no request could ever be approved; raise it"),
        );
    }
    let spend = SpendPolicy {
        require_approval_above,
        hard_deny_above,
        clamp_max_tokens_to_budget: r.bool(ENV_CLAMP, false),
        clamp_min_output_tokens: r.u64_in(ENV_CLAMP_MIN_OUTPUT, DEFAULT_CLAMP_MIN_OUTPUT, 1..=1_000_000),
    };
    let reservation_ttl_seconds =
        r.u64_in(ENV_RESERVATION_TTL_SECONDS, DEFAULT_RESERVATION_TTL_SECONDS, 1..=7 * 86_400);
    let mode = match r.raw(ENV_MODE) {
        None => Mode::Hard,
        Some(m) => Mode::parse(&m).unwrap_or_else(|| {
            r.error(ENV_MODE, format!("`{m}` is not a mode (use shadow, soft or hard)"));
            Mode::Hard
        }),
    };
    let source_modes = match r.raw(ENV_SOURCE_MODES) {
        None => Vec::new(),
        Some(s) => parse_source_modes(&s).unwrap_or_else(|e| {
            r.error(ENV_SOURCE_MODES, e);
            Vec::new()
        }),
    };
    let gate_timeout_ms = r.u64_in(ENV_GATE_TIMEOUT_MS, DEFAULT_GATE_TIMEOUT_MS, 1..=60_000);

    let approval_secret = r.secret(ENV_APPROVAL_SECRET, MIN_SECRET_LEN);
    let fallback_secrets = match r.raw(ENV_APPROVAL_FALLBACKS) {
        None => Vec::new(),
        Some(list) => {
            let items: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            if items.len() > 5 {
                r.error(ENV_APPROVAL_FALLBACKS, format!("{} secrets given; at most 5 are allowed", items.len()));
            }
            if items.iter().any(|s| s.chars().count() < MIN_SECRET_LEN) {
                r.error(
                    ENV_APPROVAL_FALLBACKS,
                    format!("every fallback secret must be at least {MIN_SECRET_LEN} characters"),
                );
            }
            items.into_iter().take(5).map(Secret::new).collect()
        }
    };
    let approvals = Approvals {
        secret: approval_secret,
        fallback_secrets,
        ttl_seconds: r.u64_in(ENV_APPROVAL_TTL_SECONDS, DEFAULT_APPROVAL_TTL_SECONDS, 60..=86_400),
        issuer: r.string(ENV_APPROVAL_ISSUER, DEFAULT_APPROVAL_ISSUER),
        kid: r.raw(ENV_APPROVAL_KID),
    };
    let approval_issuance_frozen = r.bool(ENV_APPROVAL_FROZEN, false);

    let redis_url =
        r.raw_not_blank(ENV_REDIS_URL, "remove the variable for embedded (one-replica) state, or give the Redis URL");
    if let Some(u) = &redis_url {
        if !["redis://", "rediss://", "redis+cluster://"].iter().any(|p| u.starts_with(p)) {
            r.error(ENV_REDIS_URL, "must start with redis://, rediss:// or redis+cluster://");
        } else if let Err(e) = crate::store::redis::check_url(u) {
            r.error(ENV_REDIS_URL, e);
        }
    }
    let redis_key_prefix = r.string(ENV_REDIS_KEY_PREFIX, DEFAULT_REDIS_KEY_PREFIX);
    let store_timeout_ms = r.u64_in(ENV_STORE_TIMEOUT_MS, DEFAULT_STORE_TIMEOUT_MS, 1..=60_000);
    let data_dir = PathBuf::from(r.string(ENV_DATA_DIR, DEFAULT_DATA_DIR));
    if purpose != Purpose::Tool {
        if let Some(e) = unusable_dir(&data_dir) {
            r.error(ENV_DATA_DIR, e);
        }
    }
    let ledger_url =
        r.raw_not_blank(ENV_LEDGER_URL, "remove the variable to keep the ledger local, or give the ledger's URL");
    if let Some(u) = &ledger_url {
        if !["postgres://", "postgresql://", "http://", "https://"].iter().any(|p| u.starts_with(p)) {
            r.error(ENV_LEDGER_URL, "must start with postgres://, postgresql://, http:// or https://");
        } else if let Err(e) = crate::ledger::sink::check_url(u) {
            r.error(ENV_LEDGER_URL, e);
        }
    }
    let local_ledger_retention_hours =
        r.u64_in(ENV_LOCAL_LEDGER_RETENTION_HOURS, DEFAULT_LOCAL_LEDGER_RETENTION_HOURS, 1..=24 * 366);
    let outbox_max_bytes = r.u64_in(ENV_OUTBOX_MAX_BYTES, DEFAULT_OUTBOX_MAX_BYTES, 1 << 20..=1 << 40);
    let outbox_full_policy = match r.string(ENV_OUTBOX_FULL_POLICY, "failsafe").to_ascii_lowercase().as_str() {
        "failsafe" => OutboxFullPolicy::Failsafe,
        "drop" => OutboxFullPolicy::Drop,
        other => {
            r.error(ENV_OUTBOX_FULL_POLICY, format!("`{other}` is not a policy (use failsafe or drop)"));
            OutboxFullPolicy::Failsafe
        }
    };
    let admin_api_key = r.raw(ENV_ADMIN_API_KEY).map(Secret::new);
    let audit_sample_rate = r.f64_in(
        ENV_AUDIT_SAMPLE_RATE,
        DEFAULT_AUDIT_SAMPLE_RATE,
        *bounds::AUDIT_SAMPLE_RATE.start(),
        *bounds::AUDIT_SAMPLE_RATE.end(),
    );
    let instance_id = r.raw(ENV_INSTANCE_ID).unwrap_or_else(default_instance_id);
    let log_format = match r.string(ENV_LOG_FORMAT, "json").to_ascii_lowercase().as_str() {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => {
            r.error(ENV_LOG_FORMAT, format!("`{other}` is not a log format (use json or text)"));
            LogFormat::Json
        }
    };

    if !r.errors.is_empty() {
        return Err(r.errors);
    }
    Ok(Config {
        listen_addr,
        admin_addr,
        upstream,
        upstream_api_key,
        threads,
        max_body_bytes,
        upstream_timeout_seconds,
        identity,
        tenants_file,
        tiers_file,
        pricing_file,
        policy: Policy {
            version: 1,
            kill_switch,
            global,
            fair_use,
            spend,
            mode,
            source_modes,
            approval_issuance_frozen,
            audit_sample_rate,
            directory: Arc::new(directory),
        },
        reservation_ttl_seconds,
        gate_timeout_ms,
        approvals,
        redis_url,
        redis_key_prefix,
        store_timeout_ms,
        data_dir,
        ledger_url,
        local_ledger_retention_hours,
        outbox_max_bytes,
        outbox_full_policy,
        admin_api_key,
        instance_id,
        log_format,
    })
}

fn claim_path<S: Strings + ?Sized>(r: &mut Reader<'_, S>, var: &str, default: &str) -> String {
    let v = r.string(var, default);
    if v.split('.').any(|p| p.is_empty()) {
        r.error(var, format!("`{v}` is not a dotted claim path like app_metadata.tenant_id"));
    }
    v
}

/// Loads the price table: built-in, overridden by `PREAUTH_PRICING_FILE`.
pub fn load_pricing(config: &Config) -> Result<PriceTable, String> {
    read_pricing(config.pricing_file.as_deref()).map_err(|e| format!("{ENV_PRICING_FILE}: {e}"))
}

fn read_pricing(path: Option<&std::path::Path>) -> Result<PriceTable, String> {
    match path {
        None => Ok(PriceTable::builtin()),
        Some(p) => PriceTable::builtin_with_overrides(&read_regular(p)?).map_err(|e| e.to_string()),
    }
}

/// The text of the regular file at `p`. A FIFO, a device or a directory is refused before it is
/// opened (reading a FIFO would wait for a writer, for ever).
fn read_regular(p: &std::path::Path) -> Result<String, String> {
    match std::fs::metadata(p) {
        Ok(m) if !m.is_file() => Err(format!("{} is not a regular file", p.display())),
        Ok(_) => std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display())),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Reads the tier and tenant files. Each error carries the variable that names the bad file;
/// both files are checked, so an operator sees every bad file at once (tenants name tiers from a
/// fixed set, so the tenants file is checked on its own whatever the tiers file holds).
pub fn load_directory(
    tiers: Option<&std::path::Path>,
    tenants: Option<&std::path::Path>,
) -> Result<Directory, Vec<(&'static str, String)>> {
    let read = |var: &'static str, p: Option<&std::path::Path>| -> Result<Option<String>, (&'static str, String)> {
        p.map(|p| read_regular(p).map_err(|e| (var, e))).transpose()
    };
    let (tiers_text, tenants_text) = (read(ENV_TIERS_FILE, tiers), read(ENV_TENANTS_FILE, tenants));
    let mut errors = Vec::new();
    if let Ok(Some(t)) = &tiers_text {
        if let Err(e) = Directory::from_files(Some(t), None) {
            errors.push((ENV_TIERS_FILE, e));
        }
    }
    if let Ok(Some(t)) = &tenants_text {
        if let Err(e) = Directory::from_files(None, Some(t)) {
            errors.push((ENV_TENANTS_FILE, e));
        }
    }
    match (tiers_text, tenants_text) {
        (Ok(tiers), Ok(tenants)) if errors.is_empty() => {
            Directory::from_files(tiers.as_deref(), tenants.as_deref()).map_err(|e| vec![(ENV_TENANTS_FILE, e)])
        }
        (tiers, tenants) => {
            errors.extend(tiers.err());
            errors.extend(tenants.err());
            errors.sort_by_key(|(var, _)| *var);
            Err(errors)
        }
    }
}

/// Parses `batch=soft,evals=shadow`.
pub fn parse_source_modes(s: &str) -> Result<Vec<(String, Mode)>, String> {
    let mut out: Vec<(String, Mode)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, mode) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not source=mode (e.g. batch=soft,evals=shadow)"))?;
        let name = name.trim();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !valid || name == "default" {
            return Err(format!("`{name}` is not a source name (letters, digits, _ - .; up to 64; not `default`)"));
        }
        let mode = Mode::parse(mode).ok_or_else(|| format!("`{}` is not a mode (shadow, soft, hard)", mode.trim()))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("source `{name}` is listed twice"));
        }
        out.push((name.to_string(), mode));
    }
    if out.len() > MAX_SOURCES {
        return Err(format!("{} sources configured; at most {MAX_SOURCES}", out.len()));
    }
    Ok(out)
}

fn default_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "preauth-sidecar".to_string())
}

/// Why `dir` cannot be the data directory (without creating anything): it, or the nearest of its
/// ancestors that exists, is not a directory, or is one this process may not write in (read-only
/// file system, permissions).
fn unusable_dir(dir: &std::path::Path) -> Option<String> {
    let existing = dir.ancestors().find(|a| !a.as_os_str().is_empty() && a.exists())?;
    if !existing.is_dir() {
        return Some(format!(
            "`{}` cannot be a directory: `{}` is a file; set a directory path (created if missing)",
            dir.display(),
            existing.display()
        ));
    }
    let writable =
        nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).is_ok();
    let what = if existing == dir { "it" } else { "its nearest existing parent" };
    (!writable || existing.starts_with("/proc") || existing.starts_with("/sys")).then(|| {
        format!(
            "`{}` cannot be written: {what} `{}` is read-only or not writable by this user; set a \
             directory this process may write in (created if missing)",
            dir.display(),
            existing.display()
        )
    })
}

/// Settings that are valid but leave a feature unusable: logged as warnings at start and printed
/// by `check-config`, each saying what to set.
/// A tenants file that names no tenant: legal, but every tenant then gets its tier's defaults —
/// after a truncated copy or a wrong file, every per-tenant budget and cap (a tenant stopped with
/// `monthly_budget_usd = "0"`) would lapse without a word.
pub fn directory_warnings(tenants_file: Option<&std::path::Path>, directory: &Directory) -> Vec<String> {
    match tenants_file {
        Some(p) if directory.tenant_count() == 0 => vec![format!(
            "{ENV_TENANTS_FILE} ({}) names no tenant: every tenant gets its tier's defaults (no per-tenant budget, \
             quota or cap applies); check the file if it should hold [tenants.\"<id>\"] entries",
            p.display()
        )],
        _ => Vec::new(),
    }
}

pub fn warnings(c: &Config) -> Vec<String> {
    let mut w = directory_warnings(c.tenants_file.as_deref(), &c.policy.directory);
    if c.approvals.secret.is_none() {
        w.push(format!(
            "{ENV_APPROVAL_SECRET} is not set: requests estimated above {ENV_REQUIRE_APPROVAL_ABOVE} ({}) and \
             soft-mode escalations are answered 403 approval_required, but no approval token can be issued \
             (approving answers 503) or verified; set it (at least {MIN_SECRET_LEN} characters) to use approvals",
            c.policy.spend.require_approval_above
        ));
    }
    if c.reservation_ttl_seconds <= c.upstream_timeout_seconds {
        w.push(format!(
            "{ENV_RESERVATION_TTL_SECONDS} ({}) is not longer than {ENV_UPSTREAM_TIMEOUT_SECONDS} ({}): the sweep can \
             release the hold of a request still running, whose budget is then free for other requests until it \
             ends (its cost is charged then); set {ENV_RESERVATION_TTL_SECONDS} above {ENV_UPSTREAM_TIMEOUT_SECONDS}",
            c.reservation_ttl_seconds, c.upstream_timeout_seconds
        ));
    }
    w
}

/// The effective configuration as `KEY=value` lines, secrets redacted (for `check-config`).
pub fn describe(c: &Config) -> Vec<(String, String)> {
    let p = &c.policy;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "(unset)".into());
    let path = |o: &Option<PathBuf>| o.as_ref().map_or("(built-in)".into(), |p| p.display().to_string());
    let secret = |o: &Option<Secret>| if o.is_some() { "<redacted>" } else { "(unset)" }.to_string();
    let redact_url = |o: &Option<String>| o.as_deref().map_or("(unset)".to_string(), redact_url);
    let mut v: Vec<(&str, String)> = vec![
        (ENV_LISTEN_ADDR, c.listen_addr.to_string()),
        (ENV_ADMIN_ADDR, c.admin_addr.to_string()),
        (ENV_UPSTREAM_URL, c.upstream.as_ref().map_or("(demo: built-in fake)".into(), |u| u.url.clone())),
        (ENV_UPSTREAM_API_KEY, secret(&c.upstream_api_key)),
        (ENV_THREADS, c.threads.to_string()),
        (ENV_MAX_BODY_BYTES, c.max_body_bytes.to_string()),
        (ENV_UPSTREAM_TIMEOUT_SECONDS, c.upstream_timeout_seconds.to_string()),
    ];
    match &c.identity {
        Identity::Jwt { audience, tenant_claim, tier_claim, .. } => v.extend([
            (ENV_IDENTITY, "jwt".to_string()),
            (ENV_JWT_SECRET, "<redacted>".to_string()),
            (ENV_JWT_AUDIENCE, audience.clone()),
            (ENV_JWT_TENANT_CLAIM, tenant_claim.clone()),
            (ENV_JWT_TIER_CLAIM, tier_claim.clone()),
        ]),
        Identity::Header => v.push((ENV_IDENTITY, "header".to_string())),
    }
    let modes: Vec<String> = p.source_modes.iter().map(|(s, m)| format!("{s}={}", m.as_str())).collect();
    v.extend([
        (ENV_TENANTS_FILE, path(&c.tenants_file)),
        (ENV_TIERS_FILE, path(&c.tiers_file)),
        (ENV_PRICING_FILE, path(&c.pricing_file)),
        (ENV_GLOBAL_GUARDS_ENABLED, p.global.enabled.to_string()),
        (ENV_KILL_SWITCH, p.kill_switch.to_string()),
        (ENV_GLOBAL_PER_MINUTE_CAP, p.global.per_minute_cap.to_string()),
        (ENV_GLOBAL_UNIQUE_TENANTS, p.global.unique_tenants_threshold.to_string()),
        (ENV_GLOBAL_BLOCK_SECONDS, p.global.block_seconds.to_string()),
        (ENV_FAIR_USE_ENABLED, p.fair_use.enabled.to_string()),
        (ENV_FAIR_USE_PER_MINUTE_CAP, p.fair_use.per_minute_cap.to_string()),
        (ENV_FAIR_USE_CONCURRENCY_CAP, p.fair_use.concurrency_cap.to_string()),
        (ENV_FAIR_USE_LEASE_TTL_SECONDS, p.fair_use.lease_ttl_seconds.to_string()),
        (ENV_FAIR_USE_PRO_DAILY, p.fair_use.pro_daily_soft_cap.to_string()),
        (ENV_FAIR_USE_ENTERPRISE_DAILY, p.fair_use.enterprise_daily_soft_cap.to_string()),
        (
            ENV_TOKENS_PER_MINUTE,
            if p.fair_use.tokens_per_minute > 0 { p.fair_use.tokens_per_minute.to_string() } else { "(unset)".into() },
        ),
        (ENV_REQUIRE_APPROVAL_ABOVE, p.spend.require_approval_above.to_string()),
        (ENV_HARD_DENY_ABOVE, p.spend.hard_deny_above.to_string()),
        (ENV_CLAMP, p.spend.clamp_max_tokens_to_budget.to_string()),
        (ENV_CLAMP_MIN_OUTPUT, p.spend.clamp_min_output_tokens.to_string()),
        (ENV_RESERVATION_TTL_SECONDS, c.reservation_ttl_seconds.to_string()),
        (ENV_MODE, p.mode.as_str().to_string()),
        (ENV_SOURCE_MODES, if modes.is_empty() { "(none)".into() } else { modes.join(",") }),
        (ENV_GATE_TIMEOUT_MS, c.gate_timeout_ms.to_string()),
        (ENV_APPROVAL_SECRET, secret(&c.approvals.secret)),
        (ENV_APPROVAL_FALLBACKS, format!("{} secret(s) <redacted>", c.approvals.fallback_secrets.len())),
        (ENV_APPROVAL_TTL_SECONDS, c.approvals.ttl_seconds.to_string()),
        (ENV_APPROVAL_FROZEN, p.approval_issuance_frozen.to_string()),
        (ENV_APPROVAL_ISSUER, c.approvals.issuer.clone()),
        (ENV_APPROVAL_KID, opt(&c.approvals.kid)),
        (ENV_REDIS_URL, redact_url(&c.redis_url)),
        (ENV_REDIS_KEY_PREFIX, c.redis_key_prefix.clone()),
        (ENV_STORE_TIMEOUT_MS, c.store_timeout_ms.to_string()),
        (ENV_DATA_DIR, c.data_dir.display().to_string()),
        (ENV_LEDGER_URL, redact_url(&c.ledger_url)),
        (ENV_LOCAL_LEDGER_RETENTION_HOURS, c.local_ledger_retention_hours.to_string()),
        (ENV_OUTBOX_MAX_BYTES, c.outbox_max_bytes.to_string()),
        (ENV_OUTBOX_FULL_POLICY, format!("{:?}", c.outbox_full_policy).to_ascii_lowercase()),
        (ENV_ADMIN_API_KEY, secret(&c.admin_api_key)),
        (ENV_AUDIT_SAMPLE_RATE, p.audit_sample_rate.to_string()),
        (ENV_INSTANCE_ID, c.instance_id.clone()),
        (ENV_LOG_FORMAT, format!("{:?}", c.log_format).to_ascii_lowercase()),
    ]);
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Proxy threads when `PREAUTH_THREADS` is unset: half the CPUs the process may use, at least one.
/// The sidecar shares its machine with the gateway it guards, and every thread past the first
/// runs work-stealing (shared run queues, cross-thread wake-ups): on 2 shared CPUs, unpinned,
/// under `wrk -t2 -c64`, one thread served ≈ 20% more JSON requests per second than two at
/// ≈ 23% less CPU each (≈ 6% / 17% on Redis; README, Performance). One thread handles tens of
/// thousands of requests a second; set `PREAUTH_THREADS` to the CPUs of a dedicated container.
pub fn default_threads(cpus: u64) -> u64 {
    (cpus / 2).max(1)
}

#[cfg(test)]
mod tests;
