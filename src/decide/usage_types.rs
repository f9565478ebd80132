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
