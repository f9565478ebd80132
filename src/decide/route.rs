//! The inspected LLM routes (CONTRACT §3) and what each requires of a request body.
//!
//! Owns: `Route`. Imports: std only.

/// An inspected POST route. `GET /v1/models` is passed through and is not a `Route`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
    /// Anthropic Messages API.
    Messages,
}

impl Route {
    pub const ALL: [Route; 5] =
        [Route::ChatCompletions, Route::Completions, Route::Responses, Route::Embeddings, Route::Messages];

    pub fn from_path(path: &str) -> Option<Route> {
        Some(match path {
            "/v1/chat/completions" => Route::ChatCompletions,
            "/v1/completions" => Route::Completions,
            "/v1/responses" => Route::Responses,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/messages" => Route::Messages,
            _ => return None,
        })
    }

    pub fn path(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Responses => "/v1/responses",
            Route::Embeddings => "/v1/embeddings",
            Route::Messages => "/v1/messages",
        }
    }

    /// Body fields that must be present (CONTRACT §10), besides `model`.
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            Route::ChatCompletions => &["model", "messages"],
            Route::Completions => &["model", "prompt"],
            Route::Responses => &["model", "input"],
            Route::Embeddings => &["model", "input"],
            Route::Messages => &["model", "messages", "max_tokens"],
        }
    }

    /// Routes whose streaming responses only report usage when asked
    /// (`stream_options.include_usage`).
    pub fn wants_include_usage(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Completions)
    }

    /// Routes that produce output tokens (embeddings do not).
    pub fn has_output(self) -> bool {
        !matches!(self, Route::Embeddings)
    }
}

/// Whether `GET path` is the models list or one model (`/v1/models`, `/v1/models/{id}`), passed
/// through after identity. The id is one plain segment: no `/` or `\`, no percent-escapes, not
/// `.` or `..` — a gateway that normalises dot-segments or decodes `%2F` would otherwise see some
/// other path behind `/v1/models/`, with the sidecar's gateway key on it (the sidecar is not an
/// open proxy).
pub fn is_models_path(path: &str) -> bool {
    match path.strip_prefix("/v1/models") {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('/')
            .is_some_and(|id| !id.is_empty() && id != "." && id != ".." && !id.contains(['/', '\\', '%'])),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_models_list_and_one_model_pass_through() {
        for ok in
            ["/v1/models", "/v1/models/gpt-4o-mini", "/v1/models/ft:gpt-4o-mini:acme::abc123", "/v1/models/gpt-4.1"]
        {
            assert!(is_models_path(ok), "{ok}");
        }
        for bad in [
            "/v1/models/",
            "/v1/models/../../admin/keys",
            "/v1/models/..",
            "/v1/models/.",
            "/v1/models/..%2F..%2Fkey%2Flist",
            "/v1/models/%2e%2e",
            "/v1/models/a/b",
            "/v1/models\\..\\x",
            "/v1/modelsx",
            "/v1/models..",
        ] {
            assert!(!is_models_path(bad), "{bad}");
        }
    }
}
