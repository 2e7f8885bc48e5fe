//! Streaming answers as OpenAI server-sent events.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cocoon_net::EventReader;
use cocoon_protocol::{Billing, GenerateEvent, Usage};
use serde_json::{Value, json};

use super::Endpoint;
use crate::bill::Parties;
use crate::openai::{OpenAiUsage, error_body};

pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
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
    meta: Meta,
    include_usage: bool,
    parties: Parties,
    phase: Phase,
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl StreamState {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let object = match self.meta.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.meta.id, "object": object, "created": self.meta.created,
            "model": self.meta.model, "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        event(&v)
    }

    fn choice(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        match self.meta.endpoint {
            Endpoint::Chat => {
                let delta = text.map_or_else(|| json!({}), |t| json!({"content": t}));
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
            }
            Endpoint::Completion => {
                json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}])
            }
        }
    }

    /// The next SSE event to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::End) {
                Phase::Start => {
                    self.phase = Phase::Events;
                    if self.meta.endpoint == Endpoint::Chat {
                        let choices = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                        return Some(self.chunk(choices, None));
                    }
                }
                Phase::Events => match self.events.next().await {
                    Some(Ok((GenerateEvent::Delta { text, .. }, _))) => {
                        self.phase = Phase::Events;
                        if !text.is_empty() {
                            return Some(self.chunk(self.choice(Some(&text), None), None));
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
                        self.phase = if self.include_usage {
                            Phase::Usage(usage, billing)
                        } else {
                            // Not shown to the app, but a bad bill is still logged.
                            if let Some(b) = &billing {
                                self.parties.verified(b);
                            }
                            Phase::Done
                        };
                        return Some(
                            self.chunk(self.choice(None, Some(finish_reason.as_str())), None),
                        );
                    }
                    // The SDKs raise an APIError on an `error` event; there is no [DONE] after it.
                    Some(Ok((GenerateEvent::Error { error }, _))) | Some(Err(error)) => {
                        tracing::warn!(%error, "stream ended with an error");
                        return Some(event(&error_body(&error)));
                    }
                    None => return None,
                },
                Phase::Usage(usage, billing) => {
                    self.phase = Phase::Done;
                    let verified = billing.as_ref().map(|b| self.parties.verified(b));
                    let usage = serde_json::to_value(OpenAiUsage::new(usage, billing, verified))
                        .expect("serializable");
                    return Some(self.chunk(json!([]), Some(usage)));
                }
                Phase::Done => return Some(Bytes::from_static(b"data: [DONE]\n\n")),
                Phase::End => return None,
            }
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
) -> Response {
    let state = StreamState {
        events,
        meta,
        include_usage,
        parties,
        phase: Phase::Start,
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
