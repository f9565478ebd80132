//! Environment access through a small trait, so tests parse a `HashMap` and never touch the
//! process environment. Every variable's name and default sit side by side here.
//!
//! Owns: `Strings`, `Env`, the `ENV_*`/`DEFAULT_*` constants and the typed value parsers.
//! Imports: std, `decide::money`.

use std::collections::HashMap;

use crate::decide::Micros;

/// A source of configuration strings.
pub trait Strings {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Env;

impl Strings for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl Strings for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|s| s.to_string())
    }
}

// Listeners and upstream. The proxy listens on all interfaces (it is the pod's entry point);
// the admin listener defaults to loopback because it can change policy.
pub const ENV_LISTEN_ADDR: &str = "PREAUTH_LISTEN_ADDR";
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8080";
pub const ENV_ADMIN_ADDR: &str = "PREAUTH_ADMIN_ADDR";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";
pub const ENV_UPSTREAM_URL: &str = "PREAUTH_UPSTREAM_URL";
pub const ENV_UPSTREAM_API_KEY: &str = "PREAUTH_UPSTREAM_API_KEY";
pub const ENV_THREADS: &str = "PREAUTH_THREADS";
pub const ENV_MAX_BODY_BYTES: &str = "PREAUTH_MAX_BODY_BYTES";
/// 10 MiB: larger than any real prompt with inline images, small enough to bound memory.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10_485_760;
pub const ENV_UPSTREAM_TIMEOUT_SECONDS: &str = "PREAUTH_UPSTREAM_TIMEOUT_SECONDS";
/// LLM calls with long reasoning can take minutes.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECONDS: u64 = 600;

// Identity.
pub const ENV_IDENTITY: &str = "PREAUTH_IDENTITY";
pub const ENV_JWT_SECRET: &str = "SUPABASE_JWT_SECRET";
pub const ENV_JWT_AUDIENCE: &str = "PREAUTH_JWT_AUDIENCE";
pub const DEFAULT_JWT_AUDIENCE: &str = "authenticated";
pub const ENV_JWT_TENANT_CLAIM: &str = "PREAUTH_JWT_TENANT_CLAIM";
pub const DEFAULT_JWT_TENANT_CLAIM: &str = "tenant_id";
pub const ENV_JWT_TIER_CLAIM: &str = "PREAUTH_JWT_TIER_CLAIM";
pub const DEFAULT_JWT_TIER_CLAIM: &str = "tier";

// Files.
pub const ENV_TENANTS_FILE: &str = "PREAUTH_TENANTS_FILE";
pub const ENV_TIERS_FILE: &str = "PREAUTH_TIERS_FILE";
pub const ENV_PRICING_FILE: &str = "PREAUTH_PRICING_FILE";

// Abuse guards: names and defaults of the reference system, so its runbook applies unchanged.
pub const ENV_GLOBAL_GUARDS_ENABLED: &str = "LLM_GLOBAL_ABUSE_GUARDS_ENABLED";
pub const ENV_KILL_SWITCH: &str = "LLM_GLOBAL_ABUSE_KILL_SWITCH";
pub const ENV_GLOBAL_PER_MINUTE_CAP: &str = "LLM_GLOBAL_ABUSE_PER_MINUTE_CAP";
pub const DEFAULT_GLOBAL_PER_MINUTE_CAP: u64 = 600;
pub const ENV_GLOBAL_UNIQUE_TENANTS: &str = "LLM_GLOBAL_ABUSE_UNIQUE_TENANTS_THRESHOLD";
pub const DEFAULT_GLOBAL_UNIQUE_TENANTS: u64 = 30;
pub const ENV_GLOBAL_BLOCK_SECONDS: &str = "LLM_GLOBAL_ABUSE_BLOCK_SECONDS";
pub const DEFAULT_GLOBAL_BLOCK_SECONDS: u64 = 120;
pub const ENV_FAIR_USE_ENABLED: &str = "LLM_FAIR_USE_GUARDS_ENABLED";
pub const ENV_FAIR_USE_PER_MINUTE_CAP: &str = "LLM_FAIR_USE_PER_MINUTE_CAP";
pub const DEFAULT_FAIR_USE_PER_MINUTE_CAP: i64 = 30;
pub const ENV_FAIR_USE_CONCURRENCY_CAP: &str = "LLM_FAIR_USE_PER_TENANT_CONCURRENCY_CAP";
pub const DEFAULT_FAIR_USE_CONCURRENCY_CAP: i64 = 4;
pub const ENV_FAIR_USE_LEASE_TTL_SECONDS: &str = "LLM_FAIR_USE_CONCURRENCY_LEASE_TTL_SECONDS";
pub const DEFAULT_FAIR_USE_LEASE_TTL_SECONDS: u64 = 180;
pub const ENV_FAIR_USE_PRO_DAILY: &str = "LLM_FAIR_USE_PRO_DAILY_SOFT_CAP";
pub const DEFAULT_FAIR_USE_PRO_DAILY: i64 = 1200;
pub const ENV_FAIR_USE_ENTERPRISE_DAILY: &str = "LLM_FAIR_USE_ENTERPRISE_DAILY_SOFT_CAP";
pub const DEFAULT_FAIR_USE_ENTERPRISE_DAILY: i64 = 4000;
pub const ENV_TOKENS_PER_MINUTE: &str = "PREAUTH_TENANT_TOKENS_PER_MINUTE";

// Spend, approvals, modes.
pub const ENV_REQUIRE_APPROVAL_ABOVE: &str = "PREAUTH_REQUIRE_APPROVAL_ABOVE_USD";
pub const DEFAULT_REQUIRE_APPROVAL_ABOVE: &str = "1.00";
pub const ENV_HARD_DENY_ABOVE: &str = "PREAUTH_HARD_DENY_ABOVE_USD";
pub const DEFAULT_HARD_DENY_ABOVE: &str = "50.00";
pub const ENV_CLAMP: &str = "PREAUTH_CLAMP_MAX_TOKENS_TO_BUDGET";
pub const ENV_CLAMP_MIN_OUTPUT: &str = "PREAUTH_CLAMP_MIN_OUTPUT_TOKENS";
pub const DEFAULT_CLAMP_MIN_OUTPUT: u64 = 64;
pub const ENV_RESERVATION_TTL_SECONDS: &str = "PREAUTH_RESERVATION_TTL_SECONDS";
/// 30 minutes: longer than any sane LLM call (the upstream timeout defaults to 10).
pub const DEFAULT_RESERVATION_TTL_SECONDS: u64 = 1800;
pub const ENV_MODE: &str = "PREAUTH_ENFORCEMENT_MODE";
pub const ENV_SOURCE_MODES: &str = "PREAUTH_SOURCE_MODES";
pub const ENV_GATE_TIMEOUT_MS: &str = "PREAUTH_GATE_TIMEOUT_MS";
pub const DEFAULT_GATE_TIMEOUT_MS: u64 = 50;
pub const ENV_APPROVAL_SECRET: &str = "ENFORCEMENT_APPROVAL_TOKEN_SECRET";
pub const ENV_APPROVAL_FALLBACKS: &str = "ENFORCEMENT_APPROVAL_TOKEN_FALLBACK_SECRETS";
pub const ENV_APPROVAL_TTL_SECONDS: &str = "ENFORCEMENT_APPROVAL_TOKEN_TTL_SECONDS";
pub const DEFAULT_APPROVAL_TTL_SECONDS: u64 = 900;
pub const ENV_APPROVAL_FROZEN: &str = "ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN";
pub const ENV_APPROVAL_ISSUER: &str = "PREAUTH_APPROVAL_ISSUER";
pub const DEFAULT_APPROVAL_ISSUER: &str = "preauth-sidecar";
pub const ENV_APPROVAL_KID: &str = "PREAUTH_APPROVAL_SIGNING_KID";

// State, ledger, ops.
pub const ENV_REDIS_URL: &str = "PREAUTH_REDIS_URL";
pub const ENV_REDIS_KEY_PREFIX: &str = "PREAUTH_REDIS_KEY_PREFIX";
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "preauth:";
pub const ENV_STORE_TIMEOUT_MS: &str = "PREAUTH_STORE_TIMEOUT_MS";
pub const DEFAULT_STORE_TIMEOUT_MS: u64 = 20;
pub const ENV_DATA_DIR: &str = "PREAUTH_DATA_DIR";
pub const DEFAULT_DATA_DIR: &str = "./data";
pub const ENV_LEDGER_URL: &str = "PREAUTH_LEDGER_URL";
pub const ENV_LOCAL_LEDGER_RETENTION_HOURS: &str = "PREAUTH_LOCAL_LEDGER_RETENTION_HOURS";
pub const DEFAULT_LOCAL_LEDGER_RETENTION_HOURS: u64 = 168;
pub const ENV_OUTBOX_MAX_BYTES: &str = "PREAUTH_OUTBOX_MAX_BYTES";
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 1_073_741_824;
pub const ENV_OUTBOX_FULL_POLICY: &str = "PREAUTH_OUTBOX_FULL_POLICY";
pub const ENV_ADMIN_API_KEY: &str = "ADMIN_API_KEY";
pub const ENV_AUDIT_SAMPLE_RATE: &str = "PREAUTH_AUDIT_SAMPLE_RATE";
pub const DEFAULT_AUDIT_SAMPLE_RATE: f64 = 0.01;
pub const ENV_INSTANCE_ID: &str = "PREAUTH_INSTANCE_ID";
pub const ENV_LOG_FORMAT: &str = "PREAUTH_LOG_FORMAT";

/// Every variable above (a test keeps the list complete).
pub const ALL: &[&str] = &[
    ENV_LISTEN_ADDR,
    ENV_ADMIN_ADDR,
    ENV_UPSTREAM_URL,
    ENV_UPSTREAM_API_KEY,
    ENV_THREADS,
    ENV_MAX_BODY_BYTES,
    ENV_UPSTREAM_TIMEOUT_SECONDS,
    ENV_IDENTITY,
    ENV_JWT_SECRET,
    ENV_JWT_AUDIENCE,
    ENV_JWT_TENANT_CLAIM,
    ENV_JWT_TIER_CLAIM,
    ENV_TENANTS_FILE,
    ENV_TIERS_FILE,
    ENV_PRICING_FILE,
    ENV_GLOBAL_GUARDS_ENABLED,
    ENV_KILL_SWITCH,
    ENV_GLOBAL_PER_MINUTE_CAP,
    ENV_GLOBAL_UNIQUE_TENANTS,
    ENV_GLOBAL_BLOCK_SECONDS,
    ENV_FAIR_USE_ENABLED,
    ENV_FAIR_USE_PER_MINUTE_CAP,
    ENV_FAIR_USE_CONCURRENCY_CAP,
    ENV_FAIR_USE_LEASE_TTL_SECONDS,
    ENV_FAIR_USE_PRO_DAILY,
    ENV_FAIR_USE_ENTERPRISE_DAILY,
    ENV_TOKENS_PER_MINUTE,
    ENV_REQUIRE_APPROVAL_ABOVE,
    ENV_HARD_DENY_ABOVE,
    ENV_CLAMP,
    ENV_CLAMP_MIN_OUTPUT,
    ENV_RESERVATION_TTL_SECONDS,
    ENV_MODE,
    ENV_SOURCE_MODES,
    ENV_GATE_TIMEOUT_MS,
    ENV_APPROVAL_SECRET,
    ENV_APPROVAL_FALLBACKS,
    ENV_APPROVAL_TTL_SECONDS,
    ENV_APPROVAL_FROZEN,
    ENV_APPROVAL_ISSUER,
    ENV_APPROVAL_KID,
    ENV_REDIS_URL,
    ENV_REDIS_KEY_PREFIX,
    ENV_STORE_TIMEOUT_MS,
    ENV_DATA_DIR,
    ENV_LEDGER_URL,
    ENV_LOCAL_LEDGER_RETENTION_HOURS,
    ENV_OUTBOX_MAX_BYTES,
    ENV_OUTBOX_FULL_POLICY,
    ENV_ADMIN_API_KEY,
    ENV_AUDIT_SAMPLE_RATE,
    ENV_INSTANCE_ID,
    ENV_LOG_FORMAT,
];

/// Prefixes of the sidecar's own variables: one of these that is not in [`ALL`] is a typo (or a
/// setting of another version), warned about with the nearest known name.
pub const OWN_PREFIXES: &[&str] =
    &["PREAUTH_", "LLM_GLOBAL_ABUSE_", "LLM_FAIR_USE_", "ENFORCEMENT_APPROVAL_", "SUPABASE_JWT", "ADMIN_API"];

/// Read by the test suite only, not by the sidecar (never warned about).
const TEST_ONLY: &[&str] = &["PREAUTH_TEST_REDIS_URL"];

/// A warning for each of `names` that looks like the sidecar's (an [`OWN_PREFIXES`] prefix) but
/// is not one of its variables, naming the nearest known one when it is close: a misspelled
/// `LLM_GLOBAL_ABUSE_KILLSWITCH` is not applied, and an operator must hear of it.
pub fn unknown_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| OWN_PREFIXES.iter().any(|p| n.starts_with(p)))
        .filter(|n| !ALL.contains(&n.as_str()) && !TEST_ONLY.contains(&n.as_str()))
        .collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|n| {
            let (dist, near) = ALL.iter().map(|k| (edit_distance(&n, k), *k)).min().expect("ALL is not empty");
            if dist <= 4 {
                format!("{n} is not a variable of this sidecar and is ignored: did you mean {near}?")
            } else {
                format!("{n} is not a variable of this sidecar and is ignored (README, Configuration, lists them)")
            }
        })
        .collect()
}

/// Levenshtein distance (bytes; the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// One bad variable: its name and what is wrong, phrased so the operator knows what to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.var, self.message)
    }
}

/// Reads typed values and collects every error instead of stopping at the first.
pub struct Reader<'a, S: Strings + ?Sized> {
    src: &'a S,
    pub errors: Vec<ConfigError>,
}

impl<'a, S: Strings + ?Sized> Reader<'a, S> {
    pub fn new(src: &'a S) -> Self {
        Reader { src, errors: Vec::new() }
    }

    pub fn error(&mut self, var: &str, message: impl Into<String>) {
        self.errors.push(ConfigError { var: var.to_string(), message: message.into() });
    }

    /// The raw value; an empty or all-blank value counts as unset.
    pub fn raw(&self, var: &str) -> Option<String> {
        self.src.get(var).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
    }

    /// Like `raw`, but a variable that is set to an empty or all-blank value is an error (`fix`
    /// says what to do instead): for settings where an empty value silently meaning "unset" would
    /// be a surprise — a switch left off, a fleet replica running on state of its own.
    pub fn raw_not_blank(&mut self, var: &str, fix: &str) -> Option<String> {
        let v = self.raw(var);
        if v.is_none() && self.src.get(var).is_some() {
            self.error(var, format!("is set but empty: {fix}"));
        }
        v
    }

    pub fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_string())
    }

    pub fn bool(&mut self, var: &str, default: bool) -> bool {
        match self.raw_not_blank(var, "set true or false (1/0, yes/no), or remove the variable for the default") {
            None => default,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    self.error(var, format!("`{v}` is not a boolean (use true/false, 1/0 or yes/no)"));
                    default
                }
            },
        }
    }

    /// An unsigned integer within `range` (inclusive).
    pub fn u64_in(&mut self, var: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
        match self.raw(var) {
            None => default,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if range.contains(&n) => n,
                Ok(n) => {
                    self.error(var, format!("{n} is out of range (allowed {}..={})", range.start(), range.end()));
                    default
                }
                Err(_) => {
                    self.error(var, format!("`{v}` is not a whole number"));
                    default
                }
            },
        }
    }

    /// A signed integer; values ≤ 0 are meaningful (they disable a gate).
    pub fn i64(&mut self, var: &str, default: i64) -> i64 {
        match self.raw(var) {
            None => default,
            Some(v) => v.parse::<i64>().unwrap_or_else(|_| {
                self.error(var, format!("`{v}` is not a whole number"));
                default
            }),
        }
    }

    pub fn opt_i64(&mut self, var: &str) -> Option<i64> {
        let v = self.raw(var)?;
        match v.parse::<i64>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(var, format!("`{v}` is not a whole number"));
                None
            }
        }
    }

    pub fn f64_in(&mut self, var: &str, default: f64, lo: f64, hi: f64) -> f64 {
        match self.raw(var) {
            None => default,
            Some(v) => match v.parse::<f64>() {
                Ok(n) if n.is_finite() && (lo..=hi).contains(&n) => n,
                _ => {
                    self.error(var, format!("`{v}` is not a number between {lo} and {hi}"));
                    default
                }
            },
        }
    }

    /// Decimal USD, at most 6 places, not negative.
    pub fn usd(&mut self, var: &str, default: &str) -> Micros {
        let v = self.string(var, default);
        match Micros::from_usd_str(&v) {
            Ok(m) if m.0 >= 0 => m,
            Ok(_) => {
                self.error(var, "must not be negative");
                Micros::from_usd_str(default).unwrap_or_default()
            }
            Err(e) => {
                self.error(var, format!("`{v}`: {e}"));
                Micros::from_usd_str(default).unwrap_or_default()
            }
        }
    }

    pub fn socket_addr(&mut self, var: &str, default: &str) -> std::net::SocketAddr {
        let v = self.string(var, default);
        v.parse().unwrap_or_else(|_| {
            self.error(var, format!("`{v}` is not an address like 127.0.0.1:8080 or [::]:8080"));
            default.parse().expect("default address parses")
        })
    }

    /// A secret of at least `min_len` characters.
    pub fn secret(&mut self, var: &str, min_len: usize) -> Option<Secret> {
        let v = self.raw(var)?;
        if v.chars().count() < min_len {
            self.error(var, format!("is shorter than {min_len} characters; generate one with `openssl rand -hex 32`"));
            return None;
        }
        Some(Secret(v))
    }
}

/// A secret string: never printed. `Debug` and `Display` show `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}
