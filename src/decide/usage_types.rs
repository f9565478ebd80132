//! Token usage as reported by a provider, normalised across API shapes.
//!
//! Owns: `Usage`. Imports: std only.

/// Token counts for one call, normalised:
/// - `prompt_tokens` = all input tokens, *including* cached ones (OpenAI semantics). For Anthropic,
///   where `input_tokens` excludes cache reads/writes, the scanner adds them in.
/// - `cached_tokens` = the part of `prompt_tokens` read from the provider cache.
/// - `completion_tokens` = all output tokens, *including* reasoning tokens.
/// - `reasoning_tokens` = the part of `completion_tokens` spent on reasoning (informational:
///   reasoning is billed at the output rate, so it is already in `completion_tokens`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
}

impl Usage {
    /// More tokens than any model reads or writes in one call (context windows are a few
    /// million): a count above it is a broken or hostile report, not usage.
    pub const MAX_PLAUSIBLE_TOKENS: u64 = 1_000_000_000;

    /// Every count within [`Usage::MAX_PLAUSIBLE_TOKENS`] (a gateway reporting 2^64 − 1 tokens
    /// would otherwise charge the tenant its whole month, and more).
    pub fn plausible(&self) -> bool {
        [self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.reasoning_tokens]
            .iter()
            .all(|n| *n <= Self::MAX_PLAUSIBLE_TOKENS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_counts_are_not_plausible() {
        let u = Usage { prompt_tokens: 2_000_000, completion_tokens: 100_000, cached_tokens: 0, reasoning_tokens: 0 };
        assert!(u.plausible());
        assert!(!Usage { prompt_tokens: u64::MAX, ..u }.plausible());
        assert!(!Usage { reasoning_tokens: 1_000_000_001, ..u }.plausible());
    }
}
