//! Builds a worker's backends from its `[[backend]]` tables.
//!
//! The worker crate takes its backends built, as `Arc<dyn Backend>`, and knows none of the
//! engines: the concrete types are chosen here, in the binary that starts it, so that only the
//! binary links llama.cpp and a new kind of backend changes this match, not the worker.

use std::sync::Arc;

use cocoon_engine::{Backend, UpstreamBackend};
use cocoon_llama::LlamaBackend;
use cocoon_worker::BackendConfig;

/// Loads the model or opens the upstream server that one `[[backend]]` table describes.
pub fn build_backend(config: &BackendConfig) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match config {
        BackendConfig::Llama(c) => Arc::new(LlamaBackend::load(c)?),
        BackendConfig::Upstream(c) => Arc::new(UpstreamBackend::new(c.clone())?),
    })
}
