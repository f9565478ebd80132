//! The policy snapshot every decision is made against: tiers, tenant overrides, guard settings,
//! modes and thresholds. Built from config at start, replaced (never mutated) by the admin API or
//! `SIGHUP`; shared as `Arc<Policy>`.
//!
//! Owns: `Policy`, `Tier`, `Mode`, tier/tenant tables and their TOML schemas.
//! Imports: `decide::money`, serde, toml.

use std::sync::Arc;

use super::money::Micros;

/// Subscription tier. Every tenant has exactly one; unknown names fall back to `Free`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Free,
    Starter,
    Growth,
    Pro,
    Enterprise,
}

impl Tier {
    pub const ALL: [Tier; 5] = [Tier::Free, Tier::Starter, Tier::Growth, Tier::Pro, Tier::Enterprise];

    pub fn parse(s: &str) -> Option<Tier> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "free" => Tier::Free,
            "starter" => Tier::Starter,
            "growth" => Tier::Growth,
            "pro" => Tier::Pro,
            "enterprise" => Tier::Enterprise,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Starter => "starter",
            Tier::Growth => "growth",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Enforcement mode: what a violation of steps 5–9 turns into (CONTRACT §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Shadow,
    Soft,
    Hard,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "shadow" => Mode::Shadow,
            "soft" => Mode::Soft,
            "hard" => Mode::Hard,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shadow => "shadow",
            Mode::Soft => "soft",
            Mode::Hard => "hard",
        }
    }
}

/// Per-tier defaults (`PREAUTH_TIERS_FILE`, built-in copy in `config/tiers.toml`).
#[derive(Clone, Debug, PartialEq)]
pub struct TierDefaults {
    pub monthly_budget: Micros,
    /// Requests per UTC day; `None` = unlimited.
    pub daily_request_quota: Option<u64>,
}

/// Per-tenant settings (`PREAUTH_TENANTS_FILE`); every field optional except the tier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantSettings {
    pub tier: Option<Tier>,
    pub monthly_budget: Option<Micros>,
    pub daily_request_quota: Option<u64>,
    pub fair_use_per_minute_cap: Option<i64>,
    pub concurrency_cap: Option<i64>,
    pub tokens_per_minute: Option<i64>,
}

/// Tier defaults and tenant overrides: the file-backed part of the policy, reloaded on `SIGHUP`.
#[derive(Clone, Debug, PartialEq)]
pub struct Directory {
    tiers: [TierDefaults; 5],
    tenants: super::FastMap<String, TenantSettings>,
}

/// TOML schema of `PREAUTH_TIERS_FILE`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TiersFile {
    #[serde(default)]
    tiers: super::FastMap<String, TierEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TierEntry {
    monthly_budget_usd: Option<Micros>,
    daily_request_quota: Option<i64>,
}

/// TOML schema of `PREAUTH_TENANTS_FILE`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenants: super::FastMap<String, TenantEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    tier: Option<String>,
    monthly_budget_usd: Option<Micros>,
    daily_request_quota: Option<i64>,
    fair_use_per_minute_cap: Option<i64>,
    concurrency_cap: Option<i64>,
    tokens_per_minute: Option<i64>,
}

/// The built-in tier table (reference values, CONTRACT §2); `config/tiers.toml` is its copy.
pub const BUILTIN_TIERS_TOML: &str = include_str!("../../config/tiers.toml");

impl Directory {
    /// Built-in tiers, no tenants.
    pub fn builtin() -> Directory {
        Directory::from_files(None, None).expect("built-in config/tiers.toml is valid")
    }

    /// Tier defaults (built-in, overridden by `tiers_toml`) and tenants (from `tenants_toml`).
    /// Errors name the file section and field.
    pub fn from_files(tiers_toml: Option<&str>, tenants_toml: Option<&str>) -> Result<Directory, String> {
        let mut tiers =
            std::array::from_fn(|_| TierDefaults { monthly_budget: Micros::ZERO, daily_request_quota: None });
        for text in std::iter::once(BUILTIN_TIERS_TOML).chain(tiers_toml) {
            let file: TiersFile = toml::from_str(text).map_err(|e| format!("tiers file: {}", toml_error(text, &e)))?;
            for (name, entry) in file.tiers {
                let tier = Tier::parse(&name).ok_or_else(|| {
                    format!(
                        "tiers file: unknown tier [tiers.{name}] (expected free, starter, growth, pro or enterprise)"
                    )
                })?;
                let slot: &mut TierDefaults = &mut tiers[tier.index()];
                if let Some(b) = entry.monthly_budget_usd {
                    if b.0 < 0 {
                        return Err(format!("tiers file: [tiers.{name}] monthly_budget_usd must not be negative"));
                    }
                    slot.monthly_budget = b;
                }
                if let Some(q) = entry.daily_request_quota {
                    if q < 0 {
                        return Err(format!(
                            "tiers file: [tiers.{name}] daily_request_quota must not be negative (0 = unlimited)"
                        ));
                    }
                    slot.daily_request_quota = (q > 0).then_some(q as u64);
                }
            }
        }
        let mut tenants = super::FastMap::default();
        if let Some(text) = tenants_toml {
            let file: TenantsFile =
                toml::from_str(text).map_err(|e| format!("tenants file: {}", toml_error(text, &e)))?;
            for (id, e) in file.tenants {
                let tier = match e.tier.as_deref() {
                    None => None,
                    Some(t) => Some(Tier::parse(t).ok_or_else(|| {
                        format!("tenants file: [tenants.\"{id}\"] tier = \"{t}\" is not a tier (free, starter, growth, pro, enterprise)")
                    })?),
                };
                if e.monthly_budget_usd.is_some_and(|b| b.0 < 0) {
                    return Err(format!("tenants file: [tenants.\"{id}\"] monthly_budget_usd must not be negative"));
                }
                if e.daily_request_quota.is_some_and(|q| q < 0) {
                    return Err(format!(
                        "tenants file: [tenants.\"{id}\"] daily_request_quota must not be negative (0 = unlimited)"
                    ));
                }
                tenants.insert(
                    id,
                    TenantSettings {
                        tier,
                        monthly_budget: e.monthly_budget_usd,
                        daily_request_quota: e.daily_request_quota.map(|q| q.max(0) as u64),
                        fair_use_per_minute_cap: e.fair_use_per_minute_cap,
                        concurrency_cap: e.concurrency_cap,
                        tokens_per_minute: e.tokens_per_minute,
                    },
                );
            }
        }
        Ok(Directory { tiers, tenants })
    }

    pub fn tier_defaults(&self, tier: Tier) -> &TierDefaults {
        &self.tiers[tier.index()]
    }

    pub fn tenant(&self, id: &str) -> Option<&TenantSettings> {
        self.tenants.get(id)
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// The tenant's tier: tenants file, else the identity's claim if it names a tier, else free.
    pub fn resolve_tier(&self, tenant: &str, claimed: Option<&str>) -> Tier {
        resolve_tier(self.tenant(tenant), claimed)
    }

    pub fn monthly_budget(&self, tenant: &str, tier: Tier) -> Micros {
        self.monthly_budget_of(self.tenant(tenant), tier)
    }

    fn monthly_budget_of(&self, settings: Option<&TenantSettings>, tier: Tier) -> Micros {
        settings.and_then(|t| t.monthly_budget).unwrap_or(self.tier_defaults(tier).monthly_budget)
    }

    /// Daily request quota; `None` = unlimited. A tenant override of 0 means unlimited.
    pub fn daily_quota(&self, tenant: &str, tier: Tier) -> Option<u64> {
        self.daily_quota_of(self.tenant(tenant), tier)
    }

    fn daily_quota_of(&self, settings: Option<&TenantSettings>, tier: Tier) -> Option<u64> {
        match settings.and_then(|t| t.daily_request_quota) {
            Some(0) => None,
            Some(q) => Some(q),
            None => self.tier_defaults(tier).daily_request_quota,
        }
    }
}

fn resolve_tier(settings: Option<&TenantSettings>, claimed: Option<&str>) -> Tier {
    settings.and_then(|t| t.tier).or_else(|| claimed.and_then(Tier::parse)).unwrap_or(Tier::Free)
}

/// One tenant's settings under a policy, looked up once for the several gates of a request
/// (each `Policy` method taking a tenant id is one map lookup).
#[derive(Clone, Copy)]
pub struct TenantLimits<'p> {
    policy: &'p Policy,
    settings: Option<&'p TenantSettings>,
}

impl TenantLimits<'_> {
    /// See [`Directory::resolve_tier`].
    pub fn tier(&self, claimed: Option<&str>) -> Tier {
        resolve_tier(self.settings, claimed)
    }

    pub fn monthly_budget(&self, tier: Tier) -> Micros {
        self.policy.directory.monthly_budget_of(self.settings, tier)
    }

    /// See [`Directory::daily_quota`].
    pub fn daily_quota(&self, tier: Tier) -> Option<u64> {
        self.policy.directory.daily_quota_of(self.settings, tier)
    }

    /// Effective per-minute cap (override, else global); ≤ 0 disabled.
    pub fn per_minute_cap(&self) -> i64 {
        self.settings.and_then(|t| t.fair_use_per_minute_cap).unwrap_or(self.policy.fair_use.per_minute_cap)
    }

    pub fn concurrency_cap(&self) -> i64 {
        self.settings.and_then(|t| t.concurrency_cap).unwrap_or(self.policy.fair_use.concurrency_cap)
    }

    pub fn tokens_per_minute(&self) -> i64 {
        self.settings.and_then(|t| t.tokens_per_minute).unwrap_or(self.policy.fair_use.tokens_per_minute)
    }

    /// Whether a request of this tenant needs a concurrency lease (the gate is active for it).
    pub fn wants_lease(&self) -> bool {
        self.policy.fair_use.enabled && self.concurrency_cap() > 0
    }
}

/// The ranges the bounded runtime knobs may take, wherever they come from: the environment
/// (`config`), `PATCH /runtime` (`admin`), and a saved runtime policy read back at start
/// (`store::runtime_policy`). The caps and thresholds not listed take any integer (≤ 0 disables
/// a fair-use gate).
pub mod bounds {
    use std::ops::RangeInclusive;

    pub const GLOBAL_PER_MINUTE_CAP: RangeInclusive<u64> = 1..=100_000;
    pub const GLOBAL_UNIQUE_TENANTS: RangeInclusive<u64> = 1..=10_000;
    pub const GLOBAL_BLOCK_SECONDS: RangeInclusive<u64> = 30..=86_400;
    /// 0 (what a value ≤ 0 in the environment becomes) gives the shortest lease, as the
    /// reference system's `max(30, ttl)` does.
    pub const LEASE_TTL_SECONDS: RangeInclusive<u64> = 0..=86_400;
    pub const AUDIT_SAMPLE_RATE: RangeInclusive<f64> = 0.0..=1.0;
}

/// Global abuse guard settings (names from the reference system).
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalAbuse {
    pub enabled: bool,
    pub per_minute_cap: u64,
    pub unique_tenants_threshold: u64,
    pub block_seconds: u64,
}

/// Fair-use settings. A cap ≤ 0 disables that gate.
#[derive(Clone, Debug, PartialEq)]
pub struct FairUse {
    pub enabled: bool,
    pub per_minute_cap: i64,
    pub concurrency_cap: i64,
    pub lease_ttl_seconds: u64,
    pub pro_daily_soft_cap: i64,
    pub enterprise_daily_soft_cap: i64,
    /// Estimated tokens per tenant per minute; ≤ 0 disabled.
    pub tokens_per_minute: i64,
}

impl FairUse {
    /// The shortest a concurrency lease lives, whatever `lease_ttl_seconds` says (the reference
    /// system applies `max(30, ttl)`): a lease is given back when its request ends, and its TTL
    /// only reclaims the slot of a request that never ended — a short one would free the slots
    /// of requests still streaming.
    pub const MIN_LEASE_SECONDS: u64 = 30;

    /// `lease_ttl_seconds` from a value the environment or a `PATCH` gives: ≤ 0 is the shortest
    /// lease (0; not a gate, but listed with them where "≤ 0 disables", and the reference system
    /// takes any value); `None` past the end of [`bounds::LEASE_TTL_SECONDS`].
    pub fn lease_ttl_of(n: i64) -> Option<u64> {
        let max = *bounds::LEASE_TTL_SECONDS.end();
        (n <= max as i64).then(|| n.max(0) as u64)
    }

    /// How long a lease lives (ms): `lease_ttl_seconds`, at least [`Self::MIN_LEASE_SECONDS`].
    /// `Retry-After` still says `lease_ttl_seconds` (5..60).
    pub fn lease_life_ms(&self) -> u64 {
        self.lease_ttl_seconds.max(Self::MIN_LEASE_SECONDS).saturating_mul(1000)
    }
}

/// Spend thresholds (CONTRACT §3 step 7, §4).
#[derive(Clone, Debug, PartialEq)]
pub struct SpendPolicy {
    pub require_approval_above: Micros,
    pub hard_deny_above: Micros,
    pub clamp_max_tokens_to_budget: bool,
    pub clamp_min_output_tokens: u64,
}

/// One immutable policy snapshot. `version` grows with every runtime change.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub version: u64,
    pub kill_switch: bool,
    pub global: GlobalAbuse,
    pub fair_use: FairUse,
    pub spend: SpendPolicy,
    pub mode: Mode,
    /// Per-source mode overrides; a source not listed here is `default`.
    pub source_modes: Vec<(String, Mode)>,
    pub approval_issuance_frozen: bool,
    pub audit_sample_rate: f64,
    pub directory: Arc<Directory>,
}

impl Policy {
    /// The configured source a request belongs to: its `x-preauth-source` when that names a
    /// configured source, else `default`. Returned as the configured spelling (bounded set).
    pub fn source_of<'a>(&'a self, header: Option<&str>) -> &'a str {
        if let Some(h) = header {
            for (name, _) in &self.source_modes {
                if name == h {
                    return name;
                }
            }
        }
        "default"
    }

    pub fn mode_for(&self, source: &str) -> Mode {
        self.source_modes.iter().find(|(s, _)| s == source).map(|(_, m)| *m).unwrap_or(self.mode)
    }

    /// `tenant`'s settings, looked up once for several questions.
    pub fn limits(&self, tenant: &str) -> TenantLimits<'_> {
        TenantLimits { policy: self, settings: self.directory.tenant(tenant) }
    }

    pub fn soft_daily_cap(&self, tier: Tier) -> i64 {
        match tier {
            Tier::Pro => self.fair_use.pro_daily_soft_cap,
            Tier::Enterprise => self.fair_use.enterprise_daily_soft_cap,
            _ => 0,
        }
    }

    /// A policy with the reference defaults, for tests and benches.
    pub fn for_test() -> Policy {
        Policy {
            version: 1,
            kill_switch: false,
            global: GlobalAbuse {
                enabled: true,
                per_minute_cap: 600,
                unique_tenants_threshold: 30,
                block_seconds: 120,
            },
            fair_use: FairUse {
                enabled: false,
                per_minute_cap: 30,
                concurrency_cap: 4,
                lease_ttl_seconds: 180,
                pro_daily_soft_cap: 1200,
                enterprise_daily_soft_cap: 4000,
                tokens_per_minute: 0,
            },
            spend: SpendPolicy {
                require_approval_above: Micros(1_000_000),
                hard_deny_above: Micros(50_000_000),
                clamp_max_tokens_to_budget: false,
                clamp_min_output_tokens: 64,
            },
            mode: Mode::Hard,
            source_modes: Vec::new(),
            approval_issuance_frozen: false,
            audit_sample_rate: 0.01,
            directory: Arc::new(Directory::builtin()),
        }
    }
}

/// A TOML error as `line L, column C: message`, without the excerpt of the offending line the
/// parser's own text quotes: a variable pointed at the wrong file (an env file full of secrets)
/// must not have its lines printed.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tiers_match_contract() {
        let d = Directory::builtin();
        let budgets: Vec<_> = Tier::ALL.iter().map(|t| d.tier_defaults(*t).monthly_budget.to_string()).collect();
        assert_eq!(budgets, ["1.000000", "10.000000", "10.000000", "50.000000", "50.000000"]);
        let quotas: Vec<_> = Tier::ALL.iter().map(|t| d.tier_defaults(*t).daily_request_quota).collect();
        assert_eq!(quotas, [Some(1), Some(5), Some(20), Some(100), Some(2000)]);
    }

    #[test]
    fn tenants_override_and_unknown_keys_fail() {
        let d = Directory::from_files(
            Some("[tiers.free]\ndaily_request_quota = 3\n"),
            Some("[tenants.\"acme\"]\ntier = \"enterprise\"\nmonthly_budget_usd = \"500.00\"\nconcurrency_cap = 32\n"),
        )
        .unwrap();
        assert_eq!(d.daily_quota("nobody", Tier::Free), Some(3));
        assert_eq!(d.resolve_tier("acme", Some("free")), Tier::Enterprise);
        assert_eq!(d.resolve_tier("other", Some("pro")), Tier::Pro);
        assert_eq!(d.resolve_tier("other", Some("platinum")), Tier::Free);
        assert_eq!(d.monthly_budget("acme", Tier::Enterprise), Micros(500_000_000));
        let err = Directory::from_files(None, Some("[tenants.x]\nbudget = 1\n")).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let err = Directory::from_files(Some("[tiers.gold]\ndaily_request_quota = 1\n"), None).unwrap_err();
        assert!(err.contains("gold"), "{err}");
        // A negative quota is an error, not a silent "unlimited" (0 is the documented unlimited).
        let err = Directory::from_files(Some("[tiers.free]\ndaily_request_quota = -5\n"), None).unwrap_err();
        assert!(err.contains("daily_request_quota must not be negative"), "{err}");
        let err = Directory::from_files(None, Some("[tenants.neg]\ndaily_request_quota = -1\n")).unwrap_err();
        assert!(err.contains("daily_request_quota must not be negative"), "{err}");
        // PREAUTH_TENANTS_FILE pointed at an env file: where and what, not the line (a secret).
        let env_file = "# deployment\nPREAUTH_UPSTREAM_URL=http://gw:4000\nSUPABASE_JWT_SECRET=s3cret-s3cret\n";
        let err = Directory::from_files(None, Some(env_file)).unwrap_err();
        assert!(err.starts_with("tenants file: line 2, column "), "{err}");
        assert!(!err.contains("gw:4000") && !err.contains("s3cret"), "{err}");
    }

    #[test]
    fn sources_are_bounded() {
        let mut p = Policy::for_test();
        p.source_modes = vec![("batch".into(), Mode::Soft)];
        assert_eq!(p.source_of(Some("batch")), "batch");
        assert_eq!(p.source_of(Some("random-value")), "default");
        assert_eq!(p.mode_for("batch"), Mode::Soft);
        assert_eq!(p.mode_for("default"), Mode::Hard);
    }
}
