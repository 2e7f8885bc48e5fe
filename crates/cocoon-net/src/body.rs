use bytes::Bytes;
use cocoon_protocol::{FrameDecoder, GenerateEvent, ProtocolError};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Type-erased error carried by a [`Body`]'s frames.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body type of every request and response cocoon sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body that sends `bytes` in one frame.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no content.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body holding `value` serialized as JSON.
pub fn json<T: Serialize>(value: &T) -> Body {
    full(serde_json::to_vec(value).expect("protocol types always serialize"))
}

/// A streamed body fed by a channel of already-encoded frames. When the peer resets the stream
/// the body is dropped, the receiver with it, and the sender sees the channel closed.
pub fn frames_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, BoxError>(Frame::data(b)));
    StreamBody::new(stream).boxed_unsync()
}

/// Reads a whole JSON body of at most `limit` bytes.
pub async fn read_json<T: DeserializeOwned>(
    body: Incoming,
    limit: usize,
) -> Result<T, ProtocolError> {
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProtocolError::invalid(format!("request body exceeds {limit} bytes"))
            } else {
                ProtocolError::unavailable(format!("request body broke off: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ProtocolError::invalid(format!("malformed message: {e}")))
}

/// Reads [`GenerateEvent`]s from a streamed body. Dropping the reader resets the stream, which
/// cancels the generation upstream.
pub struct EventReader {
    body: Incoming,
    decoder: FrameDecoder,
    finished: bool,
    /// How long the peer may send nothing before the stream counts as broken.
    silence_limit: Option<std::time::Duration>,
    /// When the peer last sent something: the silence is measured from here, not from the
    /// call to [`Self::next`], so a caller may give up on a `next` (to send a keep-alive, say)
    /// and call again without resetting it.
    heard: tokio::time::Instant,
    /// Opens a sealed answer's events, when the answer is sealed.
    unseal: Option<Unseal>,
}

/// Turns each event of a sealed answer as received into the event for the reader: a chunk's
/// own event, `None` for one that holds nothing for the reader yet, an error for a chunk that
/// does not open (see `cocoon-seal`).
pub type Unseal =
    Box<dyn FnMut(GenerateEvent) -> Result<Option<GenerateEvent>, ProtocolError> + Send + Sync>;

impl EventReader {
    /// Reads events from `body`, with no silence limit.
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            decoder: FrameDecoder::new(),
            finished: false,
            silence_limit: None,
            heard: tokio::time::Instant::now(),
            unseal: None,
        }
    }

    /// Reads a sealed answer: every event passes through `unseal` first. The frame [`Self::next`]
    /// returns with an opened event is the one received (sealed): nothing relays an opened
    /// answer, so it is not encoded again for each token.
    pub fn with_unseal(mut self, unseal: Unseal) -> Self {
        self.unseal = Some(unseal);
        self
    }

    /// Ends the stream with an error when the peer sends nothing for `limit`: keep-alive pings
    /// catch a peer that vanished, not one that is connected and stalled.
    pub fn with_silence_limit(mut self, limit: std::time::Duration) -> Self {
        self.silence_limit = Some(limit);
        self
    }

    /// The next event with its encoded frame (so a relay can forward it without re-encoding),
    /// or `None` at a clean end of stream. A stream that breaks off, or ends without a final
    /// `Done`/`Error` event, yields an error.
    pub async fn next(&mut self) -> Option<Result<(GenerateEvent, Bytes), ProtocolError>> {
        if self.finished {
            return None;
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    let event: GenerateEvent = match serde_json::from_slice(&frame) {
                        Ok(e) => e,
                        Err(e) => {
                            self.finished = true;
                            return Some(Err(ProtocolError::internal(format!(
                                "peer sent a malformed event: {e}"
                            ))));
                        }
                    };
                    // REVIEW, fixed: only an answer's end ends it (a tool call or an embedding
                    // in clear used to, cutting every unsealed answer that made one).
                    if matches!(
                        event,
                        GenerateEvent::Done { .. } | GenerateEvent::Error { .. }
                    ) {
                        self.finished = true;
                    }
                    let Some(unseal) = &mut self.unseal else {
                        return Some(Ok((event, frame)));
                    };
                    match unseal(event) {
                        Ok(Some(event)) => return Some(Ok((event, frame))),
                        Ok(None) => continue,
                        Err(e) => {
                            self.finished = true;
                            return Some(Err(e));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.finished = true;
                    return Some(Err(ProtocolError::internal(format!(
                        "peer sent a bad frame: {e}"
                    ))));
                }
            }
            let frame = match self.silence_limit {
                Some(limit) => {
                    match tokio::time::timeout_at(self.heard + limit, self.body.frame()).await {
                        Ok(frame) => frame,
                        Err(_) => {
                            self.finished = true;
                            return Some(Err(ProtocolError::unavailable(format!(
                                "the peer sent nothing for {} s and was cut off",
                                limit.as_secs()
                            ))));
                        }
                    }
                }
                None => self.body.frame().await,
            };
            self.heard = tokio::time::Instant::now();
            match frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.decoder.push(data);
                    }
                }
                Some(Err(e)) => {
                    self.finished = true;
                    return Some(Err(ProtocolError::unavailable(format!(
                        "stream broke off: {e}"
                    ))));
                }
                None => {
                    self.finished = true;
                    return Some(Err(ProtocolError::unavailable(
                        "stream ended before the generation finished",
                    )));
                }
            }
        }
    }
}

/// A response with `status` and `body`.
pub fn response(status: http::StatusCode, body: Body) -> http::Response<Body> {
    let mut r = http::Response::new(body);
    *r.status_mut() = status;
    r
}

/// The HTTP status a [`ProtocolError`] travels with.
pub fn status_of(e: &ProtocolError) -> http::StatusCode {
    http::StatusCode::from_u16(e.kind.http_status()).unwrap_or(http::StatusCode::BAD_GATEWAY)
}

/// A refusal: the error's status and the error as JSON.
pub fn error_response(e: &ProtocolError) -> http::Response<Body> {
    let mut r = response(status_of(e), json(e));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = e.retry_after_secs {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    r
}

/// A `200` streaming events from `rx`.
pub fn event_stream_response(rx: mpsc::Receiver<Bytes>) -> http::Response<Body> {
    let mut r = response(http::StatusCode::OK, frames_body(rx));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(cocoon_protocol::CONTENT_TYPE_FRAMES),
    );
    r
}

/// `404` for a path this peer does not serve.
pub fn no_route(method: &http::Method, path: &str) -> http::Response<Body> {
    let mut r = error_response(&ProtocolError::invalid(format!("no route {method} {path}")));
    *r.status_mut() = http::StatusCode::NOT_FOUND;
    r
}
