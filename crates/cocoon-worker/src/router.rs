use std::collections::HashMap;
use std::sync::Arc;

use cocoon_engine::{Backend, EventStream, StatsSnapshot, error_stream};
use cocoon_protocol::{ErrorKind, GenerateRequest, ModelCard, ProtocolError};

/// Serves several backends as one, sending each request to the backend that has its model.
pub struct ModelRouter {
    backends: Vec<Arc<dyn Backend>>,
    /// Model name -> index in `backends`; models are fixed once a backend is built.
    routes: HashMap<String, usize>,
}

impl ModelRouter {
    /// Fails if two backends announce the same model name.
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Result<Self, ProtocolError> {
        let mut routes = HashMap::new();
        for (i, b) in backends.iter().enumerate() {
            for m in b.models() {
                if routes.insert(m.id.clone(), i).is_some() {
                    return Err(ProtocolError::internal(format!(
                        "model '{}' is configured twice",
                        m.id
                    )));
                }
            }
        }
        Ok(Self { backends, routes })
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
        match self.routes.get(&request.model) {
            Some(&i) => self.backends[i].generate(request),
            None => error_stream(ProtocolError::new(
                ErrorKind::ModelNotFound,
                format!("this worker does not serve model '{}'", request.model),
            )),
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
