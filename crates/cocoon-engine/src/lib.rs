//! Inference backends: the part of a worker that turns a [`GenerateRequest`] into tokens.
//!
//! [`Backend`] is the seam, with what every implementation shares: [`EventStream`],
//! [`error_stream`], the counters ([`BackendStats`]) and the text helpers. One implementation
//! lives here: [`UpstreamBackend`] relays to an OpenAI-compatible server (vLLM, SGLang,
//! llama.cpp's server, Ollama) that a GPU owner already runs. The embedded llama.cpp engine is
//! the `cocoon-llama` crate, so that a crate which only needs the trait (the worker role) does
//! not build or link llama.cpp; its configuration, [`LlamaConfig`], is plain data and stays
//! here so worker configurations parse without it.

mod chat_template;
mod json_grammar;
mod llama_config;
mod model_hash;
mod stats;
mod text;
mod tool_calls;
mod upstream;

use std::pin::Pin;

use cocoon_protocol::{GenerateEvent, GenerateRequest, ModelCard};
use futures_util::Stream;

pub use chat_template::ChatTemplate;
pub use json_grammar::{json_object_gbnf, schema_to_gbnf};
pub use llama_config::LlamaConfig;
pub use model_hash::{is_model_hash, model_file_hash};
pub use stats::{ActiveGuard, BackendStats, Outcome, StatsSnapshot};
pub use text::{StopMatcher, Utf8Accumulator};
pub use tool_calls::{Piece, ToolCallReader, ToolStyle, generic_instructions, tools_grammar};
pub use upstream::{SseChunk, UpstreamBackend, UpstreamConfig, UpstreamModel, parse_sse_chunk};

/// The events of one generation. Dropping the stream cancels the generation.
pub type EventStream = Pin<Box<dyn Stream<Item = GenerateEvent> + Send + 'static>>;

/// Something that serves models.
pub trait Backend: Send + Sync + 'static {
    /// Models this backend serves.
    fn models(&self) -> Vec<ModelCard>;

    /// How many requests it runs at once; further requests wait their turn.
    fn capacity(&self) -> u32;

    /// Starts a generation. Every failure, including validation, arrives as an
    /// [`GenerateEvent::Error`] in the stream, so callers have one path to handle.
    fn generate(&self, request: GenerateRequest) -> EventStream;

    /// Counters for status pages and tests.
    fn stats(&self) -> StatsSnapshot;
}

/// A stream holding a single error event.
pub fn error_stream(error: cocoon_protocol::ProtocolError) -> EventStream {
    Box::pin(futures_util::stream::iter([GenerateEvent::Error { error }]))
}
