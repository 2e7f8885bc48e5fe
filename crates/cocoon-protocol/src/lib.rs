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

pub use bounds::{Bounded, Relayed, UsageBounds};
pub use error::{ErrorKind, ProtocolError};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_BYTES, encode_frame};
pub use messages::{
    Billing, ChatMessage, FinishReason, GenerateEvent, GenerateRequest, Input, ListedModel,
    ModelCard, ModelList, Payout, PricedTokens, Refund, Role, SamplingParams, Usage, WorkerHello,
};

/// Version of the protocol spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;

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
}

/// Content type of a streamed answer: newline-delimited JSON frames.
pub const CONTENT_TYPE_FRAMES: &str = "application/x-ndjson";
