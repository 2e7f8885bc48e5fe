use std::sync::Arc;

use cocoon_engine::{Backend, EventStream, StatsSnapshot};
use cocoon_protocol::{ErrorKind, GenerateEvent, GenerateRequest, ModelCard, ProtocolError};

/// Serves several backends as one, sending each request to the backend that has its model.
pub struct ModelRouter {
    backends: Vec<Arc<dyn Backend>>,
}

impl ModelRouter {
    /// Fails if two backends announce the same model name.
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Result<Self, ProtocolError> {
        let mut seen = std::collections::HashSet::new();
        for b in &backends {
            for m in b.models() {
                if !seen.insert(m.id.clone()) {
                    return Err(ProtocolError::internal(format!(
                        "model '{}' is configured twice",
                        m.id
                    )));
                }
            }
        }
        Ok(Self { backends })
    }
}

impl Backend for ModelRouter {
    fn models(&self) -> Vec<ModelCard> {
        self.backends.iter().flat_map(|b| b.models()).collect()
    }

    fn capacity(&self) -> u32 {
        self.backends.iter().map(|b| b.capacity()).sum()
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        match self
            .backends
            .iter()
            .find(|b| b.models().iter().any(|m| m.id == request.model))
        {
            Some(b) => b.generate(request),
            None => {
                let error = ProtocolError::new(
                    ErrorKind::ModelNotFound,
                    format!("this worker does not serve model '{}'", request.model),
                );
                Box::pin(futures_util::stream::iter([GenerateEvent::Error { error }]))
            }
        }
    }

    fn stats(&self) -> StatsSnapshot {
        self.backends
            .iter()
            .map(|b| b.stats())
            .fold(StatsSnapshot::default(), |a, s| StatsSnapshot {
                active: a.active + s.active,
                completed: a.completed + s.completed,
                cancelled: a.cancelled + s.cancelled,
                failed: a.failed + s.failed,
                prompt_tokens: a.prompt_tokens + s.prompt_tokens,
                generated_tokens: a.generated_tokens + s.generated_tokens,
            })
    }
}
