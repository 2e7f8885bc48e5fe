//! Streaming answers as OpenAI server-sent events, one choice or several (`n`) interleaved as
//! their events come.

use std::convert::Infallible;
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use cocoon_net::EventReader;
use cocoon_protocol::{GenerateEvent, ProtocolError};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{Stream, StreamExt};

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
    /// The first chunk: each choice's role.
    Start,
    Events,
    Usage,
    Done,
    End,
}

/// One choice's part of the stream, and where it stands.
struct Choice {
    parties: Parties,
    logprobs: Option<Logprobs>,
    /// Tool calls it made so far.
    calls: u32,
    /// Its usage and judged bill once its `done` came.
    done: Option<OpenAiUsage>,
}

/// An event of choice `.0`, or `None` once its stream ended.
type Tagged = (u32, Option<Result<(GenerateEvent, Bytes), ProtocolError>>);

struct StreamState {
    /// Every choice's events, as they come.
    events: SelectAll<BoxStream<'static, Tagged>>,
    chunks: ChunkEncoder,
    choices: Vec<Choice>,
    phase: Phase,
    /// After this long without an event, a comment line goes to the app: a model thinking
    /// or a slow upstream must not look like a dead connection to whatever sits between the
    /// app and the gateway (a reverse proxy's read timeout, a load balancer's idle timeout).
    keep_alive: Option<Duration>,
}

/// An SSE comment: apps and SDKs skip it.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// What the proxy's streams gave within the keep-alive interval.
enum Heard {
    /// A choice's event or end; `None` once every stream ended.
    Event(Option<Tagged>),
    /// Nothing yet.
    Quiet,
}

/// What one event shows the app.
enum Shown {
    /// Nothing yet.
    Nothing,
    /// This chunk.
    Chunk(Bytes),
    /// The stream ends here, without `[DONE]`: the answer was cut.
    Cut,
}

/// A reader's events tagged with its choice, then one `None` when it ends.
fn tagged(index: u32, events: EventReader) -> BoxStream<'static, Tagged> {
    futures_util::stream::unfold(Some(events), move |reader| async move {
        let mut reader = reader?;
        match reader.next().await {
            Some(event) => Some(((index, Some(event)), Some(reader))),
            None => Some(((index, None), None)),
        }
    })
    .boxed()
}

impl StreamState {
    /// The next SSE event to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::End) {
                Phase::Start => {
                    self.phase = Phase::Events;
                    if self.chunks.chat {
                        return Some(self.chunks.roles(self.choices.len() as u32));
                    }
                }
                Phase::Events => match self.listen().await {
                    Heard::Quiet => {
                        self.phase = Phase::Events;
                        return Some(Bytes::from_static(KEEP_ALIVE));
                    }
                    // Every stream ended, and some choice without its `done`: cut.
                    Heard::Event(None) => return None,
                    Heard::Event(Some((index, event))) => {
                        self.phase = Phase::Events;
                        match self.on_event(index, event).await {
                            Shown::Nothing => {}
                            Shown::Chunk(chunk) => return Some(chunk),
                            Shown::Cut => {
                                self.phase = Phase::End;
                                return None;
                            }
                        }
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let usages = self
                        .choices
                        .iter_mut()
                        .map(|c| c.done.take().expect("every choice is done"))
                        .collect();
                    let usage = serde_json::to_value(OpenAiUsage::of_choices(usages))
                        .expect("serializable");
                    return Some(self.chunks.usage(usage));
                }
                Phase::Done => return Some(Bytes::from_static(b"data: [DONE]\n\n")),
                Phase::End => return None,
            }
        }
    }

    /// What choice `index`'s event shows the app.
    async fn on_event(
        &mut self,
        index: u32,
        event: Option<Result<(GenerateEvent, Bytes), ProtocolError>>,
    ) -> Shown {
        let choice = &mut self.choices[index as usize];
        match event {
            Some(Ok((GenerateEvent::Delta { text, logprobs, .. }, _))) => {
                let logprobs = match &mut choice.logprobs {
                    Some(l) if !logprobs.is_empty() => Some(l.render(&logprobs)),
                    _ => None,
                };
                if text.is_empty() && logprobs.is_none() {
                    return Shown::Nothing;
                }
                Shown::Chunk(self.chunks.delta(index, &text, logprobs.as_ref()))
            }
            Some(Ok((GenerateEvent::ToolCall { call, .. }, _))) => {
                let number = choice.calls;
                choice.calls += 1;
                match self.chunks.tool_call(index, number, &call) {
                    Some(chunk) => Shown::Chunk(chunk),
                    None => Shown::Nothing,
                }
            }
            Some(Ok((GenerateEvent::Reasoning { text, .. }, _))) => {
                match self.chunks.reasoning(index, &text) {
                    Some(chunk) => Shown::Chunk(chunk),
                    None => Shown::Nothing,
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
                // REVIEW, fixed: judged as it comes (the key's day settled, the receipt kept),
                // whatever becomes of the other choices; shown in the usage chunk if asked.
                let verified = choice.parties.verdict(billing.as_ref(), usage).await;
                choice.done = Some(OpenAiUsage::new(usage, billing, verified));
                if self.choices.iter().all(|c| c.done.is_some()) {
                    self.phase = match self.chunks.include_usage {
                        true => Phase::Usage,
                        false => Phase::Done,
                    };
                }
                Shown::Chunk(self.chunks.finish(index, finish_reason.as_str()))
            }
            // The SDKs raise an APIError on an `error` event; there is no [DONE] after it, and
            // the other choices' streams go with this one.
            Some(Ok((GenerateEvent::Error { error }, _))) | Some(Err(error)) => {
                tracing::warn!(%error, "stream ended with an error");
                self.phase = Phase::End;
                Shown::Chunk(error_event(&error_body(&error)))
            }
            Some(Ok((GenerateEvent::Sealed { .. }, _))) => {
                self.phase = Phase::End;
                let error = ProtocolError::internal(super::UNOPENED);
                Shown::Chunk(error_event(&error_body(&error)))
            }
            Some(Ok((GenerateEvent::Embedding { .. }, _))) => {
                self.phase = Phase::End;
                let error = ProtocolError::internal(super::EMBEDDING_IN_TEXT);
                Shown::Chunk(error_event(&error_body(&error)))
            }
            None if choice.done.is_none() => Shown::Cut,
            None => Shown::Nothing,
        }
    }

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

/// The most ready SSE events sent in one write.
const MAX_JOINED_EVENTS: usize = 64;

/// `events` with those already waiting joined into one piece: the first as it is when it is
/// alone (no copy, no allocation, the common case of a paced stream), else copied together.
fn join_ready(
    events: impl Stream<Item = Bytes> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let mut events = Box::pin(events);
    let mut ended = false;
    futures_util::stream::poll_fn(move |cx| {
        if ended {
            return Poll::Ready(None);
        }
        let Some(first) = std::task::ready!(events.as_mut().poll_next(cx)) else {
            ended = true;
            return Poll::Ready(None);
        };
        let mut joined: Option<BytesMut> = None;
        for _ in 1..MAX_JOINED_EVENTS {
            match events.as_mut().poll_next(cx) {
                Poll::Ready(Some(more)) => joined
                    .get_or_insert_with(|| BytesMut::from(&first[..]))
                    .extend_from_slice(&more),
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(joined.map_or(first, BytesMut::freeze))))
    })
}

/// The streaming response. If the app disconnects, the body is dropped with the proxy streams
/// inside it, which cancels the generations all the way to the workers.
pub(crate) fn response(
    choices: Vec<(EventReader, Parties)>,
    meta: Meta,
    include_usage: bool,
    keep_alive: Option<Duration>,
) -> Response {
    let chat = meta.endpoint == Endpoint::Chat;
    let mut events = SelectAll::new();
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, (reader, parties))| {
            events.push(tagged(index as u32, reader));
            Choice {
                parties,
                logprobs: Logprobs::new(chat, meta.logprobs),
                calls: 0,
                done: None,
            }
        })
        .collect();
    let state = StreamState {
        events,
        chunks: ChunkEncoder {
            id: meta.id,
            created: meta.created,
            model: meta.model,
            chat,
            include_usage,
        },
        choices,
        phase: Phase::Start,
        keep_alive,
    };
    let stream =
        futures_util::stream::unfold(
            state,
            |mut st| async move { st.next().await.map(|b| (b, st)) },
        );
    // Events that are already here go out in one write, each still its own SSE event (as a
    // relay like nginx passes on what one read brought): one syscall, not one per token, when
    // the app reads slower than tokens come. Nothing waits to be joined.
    let stream = join_ready(stream);
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
