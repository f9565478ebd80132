//! Model price table and exact cost arithmetic (CONTRACT §2 pricing file, §4 money and cost).
//!
//! Owns: `ModelPrice`, `PriceTable` (built-in table parsed from `config/pricing.toml`, pricing-file
//! parsing, validation and overrides, model lookup), `cost`, `worst_case_cost`,
//! `max_output_that_fits`. Imports: std, serde, toml, thiserror, and the sibling modules `money`
//! and `usage_types`. Pure: no I/O (the built-in table is embedded with `include_str!`), no clock.

use std::collections::BTreeMap;

use super::money::Micros;
use super::usage_types::Usage;

/// The built-in table's source text; `config/pricing.toml` is this very file.
pub const BUILTIN_PRICING_TOML: &str = include_str!("../../config/pricing.toml");

/// The name of the entry used for models that are not listed.
pub const DEFAULT_MODEL: &str = "default";

/// Prices of one model. Prices are micro-USD per 1M tokens (USD/Mtok × 1e6), so
/// `"0.15"` USD/Mtok is `Micros(150_000)`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelPrice {
    /// Shared: every admitted request's spend context carries a copy of its model's price.
    pub provider: std::sync::Arc<str>,
    pub input_per_mtok: Micros,
    pub cached_input_per_mtok: Micros,
    pub output_per_mtok: Micros,
    /// Output tokens reserved when the request sets no maximum.
    pub default_max_output_tokens: u64,
    /// The model's output ceiling; larger requested maxima are clamped to it.
    pub max_output_tokens: u64,
}

/// Why a pricing file was refused. Messages name the model and field and say what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("pricing file is not valid: {0}")]
    Parse(String),
    #[error("pricing file: model \"{model}\": {field}: {message}")]
    Invalid { model: String, field: &'static str, message: String },
    #[error("pricing file has no [models.default] entry: add one (it prices every model not listed)")]
    MissingDefault,
}

/// Price table: models by name plus the `default` entry. Parse once; share it behind an `Arc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    models: super::FastMap<String, ModelPrice>,
    default: ModelPrice,
}

/// The result of a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriceRef<'a> {
    /// The table key that matched, or `"default"`.
    pub name: &'a str,
    pub price: &'a ModelPrice,
    /// False when the model is not in the table and `default` prices it.
    pub known: bool,
}

// ------------------------------------------------------------------------------ file schema

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: Option<String>,
    #[serde(default, deserialize_with = "de_price")]
    input_per_mtok: Option<Micros>,
    #[serde(default, deserialize_with = "de_price")]
    cached_input_per_mtok: Option<Micros>,
    #[serde(default, deserialize_with = "de_price")]
    output_per_mtok: Option<Micros>,
    default_max_output_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// Prices must be quoted decimal strings; a bare TOML number gets a message that says so.
fn de_price<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Micros>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Micros;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a price in USD per 1M tokens as a quoted decimal string, e.g. \"0.15\"")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Micros, E> {
            Micros::from_usd_str(s).map_err(|e| {
                E::custom(format_args!(
                    "price \"{s}\": {e}; write USD per 1M tokens as a decimal string, e.g. \"0.15\""
                ))
            })
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Micros, E> {
            Err(E::custom(format_args!("price {v} is a bare number; quote it as a decimal string, e.g. \"{v}\"")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Micros, E> {
            Err(E::custom(format_args!("price {v} is a bare number; quote it as a decimal string, e.g. \"{v}.00\"")))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Micros, E> {
            Err(E::custom(format_args!("price {v} is a bare number; quote it as a decimal string, e.g. \"{v}.00\"")))
        }
    }
    d.deserialize_any(V).map(Some)
}

fn parse_raw(text: &str) -> Result<RawFile, PricingError> {
    toml::from_str::<RawFile>(text).map_err(|e| PricingError::Parse(super::policy::toml_error(text, &e)))
}

/// Builds a complete entry from a raw one, taking missing fields from `base` (an override of a
/// known model) or refusing them (a new model).
fn complete(name: &str, raw: RawModel, base: Option<&ModelPrice>) -> Result<ModelPrice, PricingError> {
    fn need<T: Clone>(name: &str, field: &'static str, v: Option<T>, base: Option<T>) -> Result<T, PricingError> {
        v.or(base).ok_or_else(|| PricingError::Invalid {
            model: name.to_string(),
            field,
            message: "missing; every field is required for a model that is not in the built-in \
                      table"
                .into(),
        })
    }
    let p = ModelPrice {
        provider: need(name, "provider", raw.provider.map(Into::into), base.map(|b| b.provider.clone()))?,
        input_per_mtok: need(name, "input_per_mtok", raw.input_per_mtok, base.map(|b| b.input_per_mtok))?,
        cached_input_per_mtok: need(
            name,
            "cached_input_per_mtok",
            raw.cached_input_per_mtok,
            base.map(|b| b.cached_input_per_mtok),
        )?,
        output_per_mtok: need(name, "output_per_mtok", raw.output_per_mtok, base.map(|b| b.output_per_mtok))?,
        default_max_output_tokens: need(
            name,
            "default_max_output_tokens",
            raw.default_max_output_tokens,
            base.map(|b| b.default_max_output_tokens),
        )?,
        max_output_tokens: need(name, "max_output_tokens", raw.max_output_tokens, base.map(|b| b.max_output_tokens))?,
    };
    validate(name, &p)?;
    Ok(p)
}

fn validate(name: &str, p: &ModelPrice) -> Result<(), PricingError> {
    let bad = |field: &'static str, message: String| PricingError::Invalid { model: name.to_string(), field, message };
    if name.is_empty() {
        return Err(bad("name", "model names must not be empty".into()));
    }
    if p.provider.trim().is_empty() {
        return Err(bad("provider", "must not be empty (e.g. \"openai\", or \"other\")".into()));
    }
    for (field, v) in [
        ("input_per_mtok", p.input_per_mtok),
        ("cached_input_per_mtok", p.cached_input_per_mtok),
        ("output_per_mtok", p.output_per_mtok),
    ] {
        if v.0 < 0 {
            return Err(bad(field, format!("is negative ({v}); prices must be >= 0")));
        }
    }
    if p.default_max_output_tokens == 0 {
        return Err(bad(
            "default_max_output_tokens",
            "must be > 0 (output tokens reserved when a request sets no maximum)".into(),
        ));
    }
    if p.max_output_tokens < p.default_max_output_tokens {
        return Err(bad(
            "max_output_tokens",
            format!(
                "is {} but must be >= default_max_output_tokens ({}); raise it or lower the default",
                p.max_output_tokens, p.default_max_output_tokens
            ),
        ));
    }
    Ok(())
}

impl PriceTable {
    /// The built-in table: `config/pricing.toml` as embedded at build time.
    pub fn builtin() -> PriceTable {
        PriceTable::from_toml_str(BUILTIN_PRICING_TOML)
            .expect("config/pricing.toml (the built-in price table) is valid")
    }

    /// A complete table from pricing-file text (CONTRACT §2 schema). Every entry must give every
    /// field and `[models.default]` must be present.
    pub fn from_toml_str(text: &str) -> Result<PriceTable, PricingError> {
        let raw = parse_raw(text)?;
        let mut models = super::FastMap::with_capacity_and_hasher(raw.models.len(), Default::default());
        let mut default = None;
        for (name, m) in raw.models {
            let p = complete(&name, m, None)?;
            if name == DEFAULT_MODEL {
                default = Some(p);
            } else {
                models.insert(name, p);
            }
        }
        Ok(PriceTable { models, default: default.ok_or(PricingError::MissingDefault)? })
    }

    /// The built-in table with a pricing file's entries applied (PREAUTH_PRICING_FILE): an entry
    /// for a known model (`default` included) overrides the fields it gives; an entry for a new
    /// model adds it and must give every field.
    pub fn builtin_with_overrides(text: &str) -> Result<PriceTable, PricingError> {
        PriceTable::builtin().with_overrides(text)
    }

    /// This table with a pricing file's entries applied (see `builtin_with_overrides`).
    pub fn with_overrides(mut self, text: &str) -> Result<PriceTable, PricingError> {
        let raw = parse_raw(text)?;
        for (name, m) in raw.models {
            if name == DEFAULT_MODEL {
                self.default = complete(&name, m, Some(&self.default))?;
            } else {
                let p = complete(&name, m, self.models.get(&name))?;
                self.models.insert(name, p);
            }
        }
        Ok(self)
    }

    /// The `default` entry.
    pub fn default_price(&self) -> &ModelPrice {
        &self.default
    }

    /// Listed models (without `default`), in no particular order.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        self.models.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Prices a model name: exact match; else the longest listed name that is a prefix of the model
    /// followed by `-` or `@` (dated snapshots and aliases); both also after stripping a leading
    /// provider path (`openai/gpt-4o` → `gpt-4o`); else `default` with `known = false`.
    /// Allocation-free.
    pub fn lookup(&self, model: &str) -> PriceRef<'_> {
        if let Some(r) = self.match_name(model) {
            return r;
        }
        if let Some((_, tail)) = model.rsplit_once('/') {
            if let Some(r) = self.match_name(tail) {
                return r;
            }
        }
        PriceRef { name: DEFAULT_MODEL, price: &self.default, known: false }
    }

    fn match_name(&self, model: &str) -> Option<PriceRef<'_>> {
        if let Some((k, v)) = self.models.get_key_value(model) {
            return Some(PriceRef { name: k, price: v, known: true });
        }
        let mut best: Option<(&String, &ModelPrice)> = None;
        for (k, v) in &self.models {
            let is_prefix = model.len() > k.len()
                && model.starts_with(k.as_str())
                && matches!(model.as_bytes()[k.len()], b'-' | b'@');
            if is_prefix && best.is_none_or(|(b, _)| k.len() > b.len()) {
                best = Some((k, v));
            }
        }
        best.map(|(k, v)| PriceRef { name: k, price: v, known: true })
    }
}

// ------------------------------------------------------------------------------------- cost

const TOKENS_PER_MTOK: i128 = 1_000_000;

fn ceil_to_micros(numerator: i128) -> Micros {
    // numerator is in micro-USD × tokens / Mtok; prices are >= 0 so numerator >= 0, but keep
    // the division correct for any sign.
    let q = numerator.div_euclid(TOKENS_PER_MTOK);
    let r = numerator.rem_euclid(TOKENS_PER_MTOK);
    let v = if r > 0 { q + 1 } else { q };
    Micros(v.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

/// Cost of a call in micro-USD, exact.
///
/// In i128: `numerator = (prompt_tokens − cached_tokens, saturating at 0) × input_per_mtok
/// + cached_tokens × cached_input_per_mtok + completion_tokens × output_per_mtok` (prices in
/// micro-USD per 1M tokens; reasoning tokens are already inside `completion_tokens` and are not
/// added again). Rounding: the result is `ceil(numerator / 1_000_000)` micro-USD — rounded up,
/// once, on the sum (never per component), so a call is never priced below its exact cost and by
/// less than one micro-USD above it. Saturates at `i64::MAX`.
pub fn cost(price: &ModelPrice, usage: &Usage) -> Micros {
    // Cached tokens are part of the prompt: a report claiming more cached than prompt tokens is
    // charged for the prompt it reports, no more.
    let cached = usage.cached_tokens.min(usage.prompt_tokens);
    let uncached = (usage.prompt_tokens - cached) as i128;
    let numerator = uncached * price.input_per_mtok.0 as i128
        + cached as i128 * price.cached_input_per_mtok.0 as i128
        + usage.completion_tokens as i128 * price.output_per_mtok.0 as i128;
    ceil_to_micros(numerator)
}

/// Worst-case cost of a request: `prompt_tokens` uncached input plus `max_output_tokens` output,
/// rounded as in [`cost`].
pub fn worst_case_cost(price: &ModelPrice, prompt_tokens: u64, max_output_tokens: u64) -> Micros {
    cost(price, &Usage { prompt_tokens, completion_tokens: max_output_tokens, cached_tokens: 0, reasoning_tokens: 0 })
}

/// The largest output token count `n` with `worst_case_cost(price, prompt_tokens, n) <= budget`
/// (for clamping max tokens to the remaining budget). 0 when even the prompt alone does not fit
/// (or no output token does). `u64::MAX` when output is free and the prompt fits: callers clamp
/// to the model maximum.
pub fn max_output_that_fits(price: &ModelPrice, prompt_tokens: u64, budget: Micros) -> u64 {
    // ceil(x / 1e6) <= B  <=>  x <= B × 1e6 (B integer).
    let limit = budget.0 as i128 * TOKENS_PER_MTOK;
    let prompt = prompt_tokens as i128 * price.input_per_mtok.0 as i128;
    if prompt > limit {
        return 0;
    }
    let out = price.output_per_mtok.0 as i128;
    if out <= 0 {
        return u64::MAX;
    }
    let n = (limit - prompt) / out;
    n.min(u64::MAX as i128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Micros {
        Micros::from_usd_str(s).unwrap()
    }

    fn usage(p: u64, c: u64, cached: u64, reasoning: u64) -> Usage {
        Usage { prompt_tokens: p, completion_tokens: c, cached_tokens: cached, reasoning_tokens: reasoning }
    }

    #[test]
    fn builtin_parses_and_has_contract_examples() {
        let t = PriceTable::builtin();
        let mini = t.lookup("gpt-4o-mini");
        assert!(mini.known);
        assert_eq!(mini.name, "gpt-4o-mini");
        assert_eq!(
            *mini.price,
            ModelPrice {
                provider: "openai".into(),
                input_per_mtok: m("0.15"),
                cached_input_per_mtok: m("0.075"),
                output_per_mtok: m("0.60"),
                default_max_output_tokens: 4096,
                max_output_tokens: 16384,
            }
        );
        assert_eq!(
            *t.default_price(),
            ModelPrice {
                provider: "other".into(),
                input_per_mtok: m("10"),
                cached_input_per_mtok: m("10"),
                output_per_mtok: m("10"),
                default_max_output_tokens: 4096,
                max_output_tokens: 32768,
            }
        );
    }

    #[test]
    fn builtin_covers_the_required_models() {
        let t = PriceTable::builtin();
        for name in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o1",
            "o3",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "gpt-3.5-turbo-instruct",
            "claude-opus-4",
            "claude-sonnet-4",
            "claude-3-7-sonnet",
            "claude-3-5-haiku",
            "claude-haiku-4-5",
            "claude-sonnet-4-5",
            "claude-opus-4-1",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-2.0-flash",
            "llama-3.3-70b-versatile",
            "llama-3.1-8b-instant",
            "mistral-large-latest",
            "mistral-small-latest",
            "codestral-latest",
            // Every model of the reference control plane's table, for migrated callers.
            "claude-3-5-sonnet",
            "claude-3-opus",
            "gemini-1.5-pro",
            "gemini-1.5-flash",
            "mixtral-8x7b-32768",
        ] {
            let r = t.lookup(name);
            assert!(r.known && r.name == name, "{name} missing from the built-in table");
            assert!(r.price.cached_input_per_mtok <= r.price.input_per_mtok, "{name}");
        }
        // The reference's dated names find them; Opus costs what Anthropic lists (15 / 75).
        let opus = t.lookup("claude-3-opus-20240229");
        assert_eq!(opus.name, "claude-3-opus");
        let u = Usage { prompt_tokens: 1000, completion_tokens: 10_000, cached_tokens: 0, reasoning_tokens: 0 };
        assert_eq!(cost(opus.price, &u), Micros(765_000));
        assert_eq!(t.lookup("claude-3-5-sonnet-20241022").name, "claude-3-5-sonnet");
    }

    #[test]
    fn config_file_is_the_builtin_table() {
        // Same text, by construction; this guards the path.
        let file = include_str!("../../config/pricing.toml");
        assert_eq!(PriceTable::from_toml_str(file).unwrap(), PriceTable::builtin());
    }

    #[test]
    fn lookup_prefix_and_provider_path() {
        let t = PriceTable::builtin();
        let cases = [
            ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
            ("claude-sonnet-4-20250514", "claude-sonnet-4"),
            ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
            ("claude-opus-4-1-20250805", "claude-opus-4-1"),
            ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
            ("claude-3-5-haiku@20241022", "claude-3-5-haiku"),
            ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
            ("anthropic/claude-haiku-4-5-20251001", "claude-haiku-4-5"),
            ("o3-mini-2025-01-31", "o3-mini"),
            ("o3-pro-2025-06-10", "o3-pro"),
            ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
            ("gpt-5-chat-latest", "gpt-5"),
            ("gpt-5.1-codex", "gpt-5.1"),
            ("gpt-3.5-turbo-instruct-0914", "gpt-3.5-turbo-instruct"),
            ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ];
        for (model, want) in cases {
            let r = t.lookup(model);
            assert!(r.known, "{model}");
            assert_eq!(r.name, want, "{model}");
        }
        for unknown in ["gpt-4oo", "o", "", "my-model", "gpt-4o-", "openai/", "claude"] {
            let r = t.lookup(unknown);
            if unknown == "gpt-4o-" {
                // "gpt-4o" followed by "-": a prefix match, deliberately.
                assert_eq!(r.name, "gpt-4o");
                continue;
            }
            assert!(!r.known, "{unknown}");
            assert_eq!(r.name, "default");
            assert_eq!(r.price, t.default_price());
        }
    }

    #[test]
    fn cost_is_exact_and_rounds_up_once() {
        let t = PriceTable::builtin();
        let p = t.lookup("gpt-4o-mini").price;
        // 1000 × 0.15 + 500 × 0.60 = 150 + 300 micro-USD... per Mtok: (150_000_000 + 300_000_000)/1e6
        assert_eq!(cost(p, &usage(1000, 500, 0, 0)), Micros(450));
        // cached: 600 uncached × 150_000 + 400 × 75_000 + 0 = 90e6 + 30e6 = 120e6 → 120
        assert_eq!(cost(p, &usage(1000, 0, 400, 0)), Micros(120));
        // reasoning tokens are inside completion tokens: not added again
        assert_eq!(cost(p, &usage(0, 100, 0, 80)), Micros(60));
        // rounding once on the sum: 1 token in (0.15) + 1 token out (0.60) = 0.75 → 1
        assert_eq!(cost(p, &usage(1, 1, 0, 0)), Micros(1));
        assert_eq!(cost(p, &usage(0, 0, 0, 0)), Micros(0));
        // cached > prompt (an inconsistent report): the 10 prompt tokens reported, all cached
        // (10 × 0.075 = 0.75 → 1), not 20 cached (1.5 → 2)
        assert_eq!(cost(p, &usage(10, 0, 20, 0)), Micros(1));
        // huge numbers do not overflow (i128) and saturate on the way out
        let huge = usage(u64::MAX, u64::MAX, 0, 0);
        assert_eq!(cost(p, &huge).0, i64::MAX);
    }

    #[test]
    fn worst_case_and_clamp_agree() {
        let t = PriceTable::builtin();
        for model in ["gpt-4o-mini", "o1", "claude-opus-4", "gemini-2.0-flash", "unknown"] {
            let p = t.lookup(model).price;
            for prompt in [0u64, 1, 7, 1000, 123_457] {
                for budget in [0i64, 1, 999, 1_000_000, 12_345_678] {
                    let n = max_output_that_fits(p, prompt, Micros(budget));
                    let fits = |n: u64| worst_case_cost(p, prompt, n) <= Micros(budget);
                    if n > 0 {
                        assert!(fits(n), "{model} {prompt} {budget} {n}");
                    }
                    assert!(!fits(n + 1), "{model} {prompt} {budget} {n}");
                }
            }
        }
        let p = t.lookup("gpt-4o-mini").price;
        // prompt alone over budget → 0
        assert_eq!(max_output_that_fits(p, 10_000_000, Micros(1)), 0);
        // $1 budget, no prompt: 1e12 / 600_000 = 1_666_666
        assert_eq!(max_output_that_fits(p, 0, Micros(1_000_000)), 1_666_666);
        assert_eq!(max_output_that_fits(p, 0, Micros(-5)), 0);
        let emb = t.lookup("text-embedding-3-small").price;
        assert_eq!(max_output_that_fits(emb, 10, Micros(1)), u64::MAX);
        assert_eq!(worst_case_cost(p, 1000, 1000), Micros(750));
    }

    #[test]
    fn file_parsing_and_validation() {
        let ok = r#"
            [models."m1"]
            provider = "x"
            input_per_mtok = "1"
            cached_input_per_mtok = "0.5"
            output_per_mtok = "2.000001"
            default_max_output_tokens = 10
            max_output_tokens = 10
            [models.default]
            provider = "other"
            input_per_mtok = "3"
            cached_input_per_mtok = "3"
            output_per_mtok = "3"
            default_max_output_tokens = 1
            max_output_tokens = 2
        "#;
        let t = PriceTable::from_toml_str(ok).unwrap();
        assert_eq!(t.lookup("m1").price.output_per_mtok, Micros(2_000_001));
        assert_eq!(t.lookup("zzz").price.input_per_mtok, Micros(3_000_000));
        assert_eq!(t.models().count(), 1);

        let no_default = r#"
            [models."m1"]
            provider = "x"
            input_per_mtok = "1"
            cached_input_per_mtok = "0.5"
            output_per_mtok = "2"
            default_max_output_tokens = 10
            max_output_tokens = 10
        "#;
        assert_eq!(PriceTable::from_toml_str(no_default), Err(PricingError::MissingDefault));

        let err = |text: &str| PriceTable::builtin_with_overrides(text).unwrap_err().to_string();

        let e = err("[models.\"gpt-4o\"]\ninput_per_mtok = \"1\"\ncolour = \"red\"\n");
        assert!(e.contains("unknown field") && e.contains("colour"), "{e}");
        let e = err("[modelz.x]\n");
        assert!(e.contains("unknown field") && e.contains("modelz"), "{e}");
        let e = err("[models.\"gpt-4o\"]\ninput_per_mtok = 2.5\n");
        assert!(e.contains("bare number") && e.contains("\"2.5\""), "{e}");
        let e = err("[models.\"gpt-4o\"]\ninput_per_mtok = \"0.0000001\"\n");
        assert!(e.contains("6 decimal places"), "{e}");
        let e = err("[models.\"gpt-4o\"]\noutput_per_mtok = \"-1\"\n");
        assert!(e.contains("gpt-4o") && e.contains("output_per_mtok") && e.contains(">= 0"), "{e}");
        let e = err("[models.\"gpt-4o\"]\nmax_output_tokens = 100\n");
        assert!(e.contains("gpt-4o") && e.contains("max_output_tokens") && e.contains(">= default"), "{e}");
        let e = err("[models.default]\ndefault_max_output_tokens = 0\n");
        assert!(e.contains("\"default\"") && e.contains("default_max_output_tokens"), "{e}");
        let e = err("[models.\"new-model\"]\nprovider = \"x\"\ninput_per_mtok = \"1\"\n");
        assert!(e.contains("new-model") && e.contains("missing"), "{e}");
        let e = err("[models.\"new-model\"\n");
        assert!(e.contains("not valid"), "{e}");
    }

    #[test]
    fn overrides_replace_fields_and_add_models() {
        let text = r#"
            [models."gpt-4o"]
            output_per_mtok = "11.00"
            [models.default]
            input_per_mtok = "20"
            [models."my-local-llm"]
            provider = "self-hosted"
            input_per_mtok = "0"
            cached_input_per_mtok = "0"
            output_per_mtok = "0.01"
            default_max_output_tokens = 512
            max_output_tokens = 2048
        "#;
        let base = PriceTable::builtin();
        let t = PriceTable::builtin_with_overrides(text).unwrap();
        let g = t.lookup("gpt-4o").price;
        assert_eq!(g.output_per_mtok, m("11"));
        assert_eq!(g.input_per_mtok, base.lookup("gpt-4o").price.input_per_mtok);
        assert_eq!(t.default_price().input_per_mtok, m("20"));
        assert_eq!(t.default_price().output_per_mtok, m("10"));
        let l = t.lookup("my-local-llm-q4");
        assert!(l.known);
        assert_eq!(l.name, "my-local-llm");
        assert_eq!(&*l.price.provider, "self-hosted");
        // untouched entries stay
        assert_eq!(t.lookup("gpt-4o-mini").price, base.lookup("gpt-4o-mini").price);
        // an empty file is the built-in table
        assert_eq!(PriceTable::builtin_with_overrides("").unwrap(), base);
    }
}
