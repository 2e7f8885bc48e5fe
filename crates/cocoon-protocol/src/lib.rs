//! The cocoon wire protocol: what clients, proxies and workers say to each other.
//!
//! This crate owns the message types, their validation, protocol versioning (ALPN names and
//! request paths), the frame codec used for streamed answers, and the bounds an answer's token
//! counts must keep (which the proxy and the gateway both hold bills to). It does no I/O, so every
//! other crate can depend on it. The full specification is `docs/protocol.md`.

mod bounds;
mod error;
mod frame;
mod messages;
mod sealed;

pub use bounds::{Bounded, Relayed, UsageBounds};
pub use error::{ErrorKind, ProtocolError};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_BYTES, encode_frame};
pub use messages::{
    BillQuery, Billing, ChatMessage, FinishReason, Function, GenerateEvent, GenerateRequest, Input,
    LateBill, ListedModel, MAX_CACHE_SCOPE_BYTES, MAX_EMBED_INPUTS, MAX_LOGIT_BIASES,
    MAX_SCHEMA_BYTES, MAX_TOOLS, MAX_TOOLS_BYTES, MAX_TOP_LOGPROBS, MIN_PREFIX_BYTES, ModelCard,
    ModelList, Payout, PricedTokens, Refund, RequestId, ResponseFormat, Role, SamplingParams,
    TokenLogprob, ToolCall, ToolChoice, Tools, TopLogprob, Usage, WorkerHello, is_model_hash,
};
pub use sealed::{
    Candidate, CandidateQuery, Candidates, MAX_CANDIDATES, Receipt, Recipient, SEAL_TAG_BYTES,
    SealedHeader, SealedRequest,
};

/// Version of the protocol spoken by this build. Bumped on any incompatible change.
/// 3: requests carry `logit_bias` and `response_format`, which an older worker would ignore.
/// 4: sealed requests and answers ([`paths::SEALED`], [`paths::CANDIDATES`]).
/// 5: requests may ask for `logprobs`, which an older worker would ignore; deltas carry them.
/// 6: chats may offer tools and hold tool calls and results; answers may hold `tool_call`
/// events and end with `tool_calls`; requests may ask for embeddings (`Input::Embed`, answered
/// with `embedding` events).
pub const PROTOCOL_VERSION: u32 = 6;

/// What a stopping worker answers a new request with (an `unavailable` error): the proxy then
/// routes around it without holding it against the worker.
pub const WORKER_DRAINING: &str = "this worker is shutting down: it takes no new request";

/// What a worker answers a sealed request it cannot open (an `unavailable` error): the
/// request names it but was sealed to another of its keys (it restarted since the gateway's
/// list of candidates) or altered on the way. Never the worker's fault: the proxy tries another
/// recipient without holding it against the worker.
pub const NOT_SEALED_FOR_THIS_WORKER: &str =
    "the request was not sealed to this worker's current key, or was altered on the way";

/// ALPN name a client gateway offers when it connects to a proxy.
pub const ALPN_CLIENT: &[u8] = b"cocoon/1/client";
/// ALPN name a worker offers when it connects to a proxy.
pub const ALPN_WORKER: &[u8] = b"cocoon/1/worker";

/// Request paths. The same paths are served by a proxy (to clients) and by a worker (to its proxy).
pub mod paths {
    /// `POST`: a [`GenerateRequest`](crate::GenerateRequest) body, answered by a stream of
    /// [`GenerateEvent`](crate::GenerateEvent) frames.
    pub const GENERATE: &str = "/cocoon/v1/generate";
    /// `GET`: the [`ModelList`](crate::ModelList) served behind a proxy.
    pub const MODELS: &str = "/cocoon/v1/models";
    /// `GET` (proxy to worker): the worker's [`WorkerHello`](crate::WorkerHello).
    pub const HELLO: &str = "/cocoon/v1/hello";
    /// Proxy → client: the proxy's status (workers, models, prices, load, reputation).
    pub const STATUS: &str = "/cocoon/v1/status";
    /// `POST` (client to proxy, empty body): close the client's contract with the proxy's
    /// cooperation, refunding everything at once; answered by a [`Refund`](crate::Refund).
    pub const CLOSE: &str = "/cocoon/v1/close";
    /// `POST` (proxy to worker): the latest [`Payout`](crate::Payout) for this worker.
    pub const PAYOUT: &str = "/cocoon/v1/payout";
    /// `POST` (client to proxy): a [`BillQuery`](crate::BillQuery) for the bill of one of the
    /// client's requests whose answer ended without one; answered by a
    /// [`LateBill`](crate::LateBill).
    pub const BILL: &str = "/cocoon/v1/bill";
    /// `POST` (client to proxy): a [`CandidateQuery`](crate::CandidateQuery), answered by the
    /// [`Candidates`](crate::Candidates) a sealed request may be encrypted to.
    pub const CANDIDATES: &str = "/cocoon/v1/candidates";
    /// `POST`: a [`SealedRequest`](crate::SealedRequest) body (client to proxy, proxy to
    /// worker), answered like [`GENERATE`] with the answer's events sealed.
    pub const SEALED: &str = "/cocoon/v1/sealed";
}

/// Header of a client's [`paths::GENERATE`] request: the client's id for the request (32 hex
/// digits), under which the proxy keeps the request's bill for [`paths::BILL`]. The proxy
/// does not pass it on to the worker.
pub const REQUEST_ID_HEADER: &str = "cocoon-request-id";

/// How long a proxy keeps a request's bill for [`paths::BILL`], in seconds; a client asks
/// within this (its asks are answered `not_billed` after it).
pub const BILL_RETENTION_SECS: u64 = 3600;

/// Content type of a streamed answer: newline-delimited JSON frames.
pub const CONTENT_TYPE_FRAMES: &str = "application/x-ndjson";
