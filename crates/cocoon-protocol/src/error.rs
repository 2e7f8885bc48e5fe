use serde::{Deserialize, Serialize};

/// Category of a protocol-level failure. Each kind maps to one HTTP status at the OpenAI edge,
/// so a worker's verdict (say, a prompt that does not fit the context) reaches the app intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or has out-of-range parameters.
    InvalidRequest,
    /// Prompt plus requested completion do not fit the model's context window.
    ContextLengthExceeded,
    /// No worker serves the requested model.
    ModelNotFound,
    /// The model exists but no worker can take the request now.
    Unavailable,
    /// The client's contract with the proxy cannot pay for the request.
    PaymentRequired,
    /// The client exceeded a rate or concurrency limit; it may retry after a while.
    RateLimited,
    /// The request was cancelled by the requester.
    Cancelled,
    /// The serving side failed.
    Internal,
}

impl ErrorKind {
    /// HTTP status used for this kind of error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::ContextLengthExceeded => 400,
            ErrorKind::PaymentRequired => 402,
            ErrorKind::RateLimited => 429,
            ErrorKind::ModelNotFound => 404,
            ErrorKind::Cancelled => 499,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 502,
        }
    }

    /// OpenAI error `type` string for this kind.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::ContextLengthExceeded => "invalid_request_error",
            ErrorKind::ModelNotFound => "invalid_request_error",
            ErrorKind::PaymentRequired => "insufficient_quota",
            // What OpenAI itself answers for a request-rate limit.
            ErrorKind::RateLimited => "requests",
            ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "server_error",
        }
    }

    /// OpenAI error `code` string for this kind, where OpenAI defines one.
    pub fn openai_code(self) -> Option<&'static str> {
        match self {
            ErrorKind::ContextLengthExceeded => Some("context_length_exceeded"),
            ErrorKind::ModelNotFound => Some("model_not_found"),
            ErrorKind::PaymentRequired => Some("insufficient_quota"),
            ErrorKind::RateLimited => Some("rate_limit_exceeded"),
            _ => None,
        }
    }
}

/// An error that crosses the wire: a kind plus a message meant for the app developer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ProtocolError {
    /// What category of failure this is; decides the HTTP status and OpenAI error type.
    pub kind: ErrorKind,
    /// Human-readable detail, meant for the app developer.
    pub message: String,
    /// Seconds after which a retry may succeed; sent on as HTTP `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
    /// For a sealed request: the worker's own words, sealed for the client's gateway (a
    /// `sealed` chunk holding the error); `message` then has them withheld
    /// ([`Self::withheld`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_words: Option<Box<crate::GenerateEvent>>,
}

impl ProtocolError {
    /// An error of `kind` with `message` and no retry hint.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after_secs: None,
            sealed_words: None,
        }
    }

    /// The words a worker gives the proxy for an error of `kind` on a sealed request: a
    /// backend's own may quote the prompt (an upstream server's 422 echoes its input).
    pub fn withheld_words(kind: ErrorKind) -> String {
        let words = match kind {
            ErrorKind::ContextLengthExceeded => {
                "the request does not fit the model's context on this worker"
            }
            ErrorKind::InvalidRequest => "the worker's backend refused the request as invalid",
            ErrorKind::Unavailable | ErrorKind::RateLimited => "the worker cannot take it now",
            _ => "the worker's backend failed",
        };
        format!("{words} (its own words are sealed for the client's gateway)")
    }

    /// This error as the proxy may read it for a sealed request: its kind, in the fixed
    /// [`Self::withheld_words`].
    pub fn withheld(&self) -> Self {
        Self {
            message: Self::withheld_words(self.kind),
            sealed_words: None,
            ..self.clone()
        }
    }

    /// `message` (the proxy's, which may quote the withheld words) with the worker's `own`
    /// words in place of the withheld ones: what the gateway tells the app.
    pub fn with_own_words(mut self, own: &ProtocolError) -> Self {
        let withheld = Self::withheld_words(own.kind);
        self.message = if self.message.contains(&withheld) {
            self.message.replacen(&withheld, &own.message, 1)
        } else {
            format!("{}; the worker's own words: {}", self.message, own.message)
        };
        self.sealed_words = None;
        self
    }

    /// A refusal for exceeding a limit, to be retried after `secs` seconds.
    pub fn rate_limited(message: impl Into<String>, secs: u32) -> Self {
        Self {
            retry_after_secs: Some(secs.max(1)),
            ..Self::new(ErrorKind::RateLimited, message)
        }
    }

    /// An [`ErrorKind::InvalidRequest`] error: the request is malformed or out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// An [`ErrorKind::Internal`] error: the serving side failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An [`ErrorKind::Unavailable`] error: no one can take the request now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
}
