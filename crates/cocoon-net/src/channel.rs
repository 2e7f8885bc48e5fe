use std::time::Duration;

use cocoon_protocol::{
    ErrorKind, GenerateRequest, ProtocolError, REQUEST_ID_HEADER, RequestId, paths,
};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::{Body, EventReader, empty, json};
use crate::conn::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Largest non-streamed answer accepted from a peer.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// The requesting side of an HTTP/2 connection: cheap to clone, all clones share the connection.
#[derive(Clone, Debug)]
pub struct Channel {
    sender: SendRequest<Body>,
}

impl Channel {
    /// Starts HTTP/2 as client on `io`. The returned future drives the connection and ends when
    /// it closes; run it in a task.
    pub async fn handshake<IO>(
        io: IO,
    ) -> Result<(Self, impl Future<Output = ()> + Send), hyper::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await?;
        let driver = async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
        };
        Ok((Self { sender }, driver))
    }

    /// Whether the HTTP/2 connection has closed, so this channel can no longer send requests.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Starts a generation on the peer and returns its event stream once the peer has accepted
    /// the request. A refusal arrives as an error with the peer's verdict. With `id`, the
    /// request carries it ([`REQUEST_ID_HEADER`]): a proxy keeps its bill under it.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        self.open_stream(paths::GENERATE, request, id).await
    }

    /// [`Self::generate`] for a sealed request ([`paths::SEALED`]): the answer's events come
    /// sealed, for the reader to open.
    pub async fn generate_sealed(
        &self,
        request: &cocoon_protocol::SealedRequest,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        self.open_stream(paths::SEALED, request, id).await
    }

    async fn open_stream<B: serde::Serialize>(
        &self,
        path: &'static str,
        request: &B,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(id) = id {
            req = req.header(REQUEST_ID_HEADER, id.to_string());
        }
        let req = req
            .body(json(request))
            .expect("static request parts are valid");
        let response = self.send(req).await?;
        if response.status() != StatusCode::OK {
            return Err(read_error(response).await);
        }
        Ok(EventReader::new(response.into_body()))
    }

    /// `GET path`, expecting a JSON answer, within `timeout`.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ProtocolError> {
        let req = Request::builder()
            .uri(path)
            .body(empty())
            .expect("static request parts are valid");
        self.json_exchange(req, timeout).await
    }

    /// `POST path` with a JSON body, expecting 200 and a JSON answer, within `timeout`.
    pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ProtocolError> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(json(body))
            .expect("static request parts are valid");
        self.json_exchange(req, timeout).await
    }

    /// Sends `req` and reads a 200 JSON answer, within `timeout`.
    async fn json_exchange<T: DeserializeOwned>(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<T, ProtocolError> {
        let path = req.uri().path().to_owned();
        let exchange = async {
            let response = self.send(req).await?;
            if response.status() != StatusCode::OK {
                return Err(read_error(response).await);
            }
            read_json_answer(response).await
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ProtocolError::unavailable(format!("{path} timed out")))?
    }

    async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, ProtocolError> {
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .map_err(|e| ProtocolError::unavailable(format!("connection lost: {e}")))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ProtocolError::unavailable(format!("request failed: {e}")))
    }
}

async fn read_json_answer<T: DeserializeOwned>(
    response: http::Response<hyper::body::Incoming>,
) -> Result<T, ProtocolError> {
    let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| ProtocolError::unavailable(format!("answer broke off: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ProtocolError::internal(format!("peer sent malformed JSON: {e}")))
}

/// A non-200 answer carries a [`ProtocolError`] as JSON; anything else is the peer's fault.
async fn read_error(response: http::Response<hyper::body::Incoming>) -> ProtocolError {
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await;
    match body
        .ok()
        .and_then(|b| serde_json::from_slice::<ProtocolError>(&b.to_bytes()).ok())
    {
        Some(e) => e,
        None => ProtocolError::new(ErrorKind::Internal, format!("peer answered {status}")),
    }
}
