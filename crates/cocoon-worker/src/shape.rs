//! What a backend's answer may hold, given its request: a check between every backend and
//! what the worker relays, so that a backend's (or its upstream server's) answer of the wrong
//! shape ends in an error rather than being relayed and billed.

use cocoon_engine::EventStream;
use cocoon_protocol::{GenerateEvent, GenerateRequest, ProtocolError};

/// What an answer to a request may hold beside text: calls of the functions it offered, or
/// embeddings of its texts.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    Text { functions: Vec<String> },
    Embeddings,
}

impl Shape {
    pub(crate) fn of(request: &GenerateRequest) -> Self {
        match &request.input {
            cocoon_protocol::Input::Embed { .. } => Self::Embeddings,
            cocoon_protocol::Input::Chat {
                tools: Some(tools), ..
            } => Self::Text {
                functions: tools.functions.iter().map(|f| f.name.clone()).collect(),
            },
            _ => Self::Text {
                functions: Vec::new(),
            },
        }
    }

    /// Why `event` has no place in this answer, if it has none.
    fn misfit(&self, event: &GenerateEvent) -> Option<String> {
        match (self, event) {
            (_, GenerateEvent::Done { .. } | GenerateEvent::Error { .. }) => None,
            (Self::Embeddings, GenerateEvent::Embedding { .. }) => None,
            (Self::Embeddings, _) => Some("text in an answer of embeddings".into()),
            (Self::Text { .. }, GenerateEvent::Embedding { .. }) => {
                Some("an embedding in an answer of text".into())
            }
            (Self::Text { functions }, GenerateEvent::ToolCall { call, .. })
                if !functions.contains(&call.name) =>
            {
                Some(format!(
                    "a call of '{}', which the request did not offer",
                    call.name
                ))
            }
            (_, GenerateEvent::Sealed { .. }) => Some("a sealed chunk from a backend".into()),
            _ => None,
        }
    }
}

/// REVIEW, fixed: a backend's answer held to its request's shape. What does not fit (a tool
/// call on a request that offered no tools, an upstream server's text in an answer of
/// embeddings) ends the answer with an error there, before it is relayed and billed.
pub(crate) fn held_to(shape: Shape, events: EventStream) -> EventStream {
    use futures_util::StreamExt as _;
    Box::pin(events.scan(false, move |ended, event| {
        if *ended {
            return futures_util::future::ready(None);
        }
        let event = match shape.misfit(&event) {
            Some(why) => {
                *ended = true;
                GenerateEvent::Error {
                    error: ProtocolError::internal(format!("the backend sent {why}")),
                }
            }
            None => event,
        };
        futures_util::future::ready(Some(event))
    }))
}
