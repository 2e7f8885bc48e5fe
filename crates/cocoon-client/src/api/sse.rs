//! Streaming answers as OpenAI server-sent events.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cocoon_net::EventReader;
use cocoon_protocol::{Billing, GenerateEvent, ProtocolError, Usage};

use super::Endpoint;
use crate::bill::Parties;
use crate::chunks::{ChunkEncoder, error_event};
use crate::logprobs::Logprobs;
use crate::openai::{OpenAiUsage, error_body};

pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    /// The alternatives per token the app asked log-probabilities with, if it did.
    pub logprobs: Option<u32>,
}

enum Phase {
    Start,
    Events,
    Usage(Usage, Option<Billing>),
    Done,
    End,
}

struct StreamState {
    events: EventReader,
    chunks: ChunkEncoder,
    logprobs: Option<Logprobs>,
    parties: Parties,
    phase: Phase,
    /// After this long without an event, a comment line goes to the app: a model thinking
    /// or a slow upstream must not look like a dead connection to whatever sits between the
    /// app and the gateway (a reverse proxy's read timeout, a load balancer's idle timeout).
    keep_alive: Option<Duration>,
}

/// An SSE comment: apps and SDKs skip it.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// What the proxy's stream gave within the keep-alive interval.
enum Heard {
    /// An event, or the end of the stream.
    Event(Option<Result<(GenerateEvent, Bytes), ProtocolError>>),
    /// Nothing yet.
    Quiet,
}

impl StreamState {
    /// The next SSE event to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::End) {
                Phase::Start => {
                    self.phase = Phase::Events;
                    if self.chunks.chat {
                        return Some(self.chunks.role());
                    }
                }
                Phase::Events => match self.listen().await {
                    Heard::Quiet => {
                        self.phase = Phase::Events;
                        return Some(Bytes::from_static(KEEP_ALIVE));
                    }
                    Heard::Event(event) => match event {
                        Some(Ok((GenerateEvent::Delta { text, logprobs, .. }, _))) => {
                            self.phase = Phase::Events;
                            let logprobs = match &mut self.logprobs {
                                Some(l) if !logprobs.is_empty() => Some(l.render(&logprobs)),
                                _ => None,
                            };
                            if !text.is_empty() || logprobs.is_some() {
                                return Some(self.chunks.delta(&text, logprobs.as_ref()));
                            }
                        }
                        Some(Ok((GenerateEvent::Reasoning { text, .. }, _))) => {
                            self.phase = Phase::Events;
                            if let Some(chunk) = self.chunks.reasoning(&text) {
                                return Some(chunk);
                            }
                        }
                        Some(Ok((
                            GenerateEvent::Done {
                                finish_reason,
                                usage,
                                billing,
                            },
                            _,
                        ))) => {
                            self.phase = if self.chunks.include_usage {
                                Phase::Usage(usage, billing)
                            } else {
                                // Not shown to the app, but a bad bill is still logged.
                                let _ = self.parties.verdict(billing.as_ref(), usage).await;
                                Phase::Done
                            };
                            return Some(self.chunks.finish(finish_reason.as_str()));
                        }
                        // The SDKs raise an APIError on an `error` event; there is no [DONE] after it.
                        Some(Ok((GenerateEvent::Error { error }, _))) | Some(Err(error)) => {
                            tracing::warn!(%error, "stream ended with an error");
                            return Some(error_event(&error_body(&error)));
                        }
                        Some(Ok((GenerateEvent::Sealed { .. }, _))) => {
                            let error = ProtocolError::internal(super::UNOPENED);
                            return Some(error_event(&error_body(&error)));
                        }
                        None => return None,
                    },
                },
                Phase::Usage(usage, billing) => {
                    self.phase = Phase::Done;
                    let verified = self.parties.verdict(billing.as_ref(), usage).await;
                    let usage = serde_json::to_value(OpenAiUsage::new(usage, billing, verified))
                        .expect("serializable");
                    return Some(self.chunks.usage(usage));
                }
                Phase::Done => return Some(Bytes::from_static(b"data: [DONE]\n\n")),
                Phase::End => return None,
            }
        }
    }
}

impl StreamState {
    /// The proxy's next event, or [`Heard::Quiet`] when none came within the keep-alive
    /// interval (the reader's silence limit runs from the last frame it got, so giving up on
    /// a read here does not reset it).
    async fn listen(&mut self) -> Heard {
        match self.keep_alive {
            None => Heard::Event(self.events.next().await),
            Some(every) => match tokio::time::timeout(every, self.events.next()).await {
                Ok(event) => Heard::Event(event),
                Err(_) => Heard::Quiet,
            },
        }
    }
}

/// The streaming response. If the app disconnects, the body is dropped with the proxy stream
/// inside it, which cancels the generation all the way to the worker.
pub(crate) fn response(
    events: EventReader,
    meta: Meta,
    include_usage: bool,
    parties: Parties,
    keep_alive: Option<Duration>,
) -> Response {
    let state = StreamState {
        events,
        chunks: ChunkEncoder {
            id: meta.id,
            created: meta.created,
            model: meta.model,
            chat: meta.endpoint == Endpoint::Chat,
            include_usage,
        },
        logprobs: Logprobs::new(meta.endpoint == Endpoint::Chat, meta.logprobs),
        parties,
        phase: Phase::Start,
        keep_alive,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        st.next().await.map(|b| (Ok::<_, Infallible>(b), st))
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
