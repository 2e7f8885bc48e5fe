//! What a worker answers on the streams its proxy opens.

use std::sync::Arc;

use bytes::Bytes;
use cocoon_engine::Backend;
use cocoon_net::{Body, frames_body, json};
use cocoon_protocol::{
    CONTENT_TYPE_FRAMES, GenerateEvent, GenerateRequest, PROTOCOL_VERSION, ProtocolError,
    WorkerHello, encode_frame, paths,
};
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::mpsc;

/// Largest generation request accepted from the proxy.
const MAX_REQUEST_BYTES: usize = 8 << 20;

#[derive(Clone)]
pub(crate) struct WorkerService {
    name: Arc<str>,
    backend: Arc<dyn Backend>,
}

impl WorkerService {
    pub(crate) fn new(name: String, backend: Arc<dyn Backend>) -> Self {
        Self {
            name: name.into(),
            backend,
        }
    }

    pub(crate) async fn handle(self, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, paths::HELLO) => {
                let hello = WorkerHello {
                    protocol_version: PROTOCOL_VERSION,
                    name: self.name.to_string(),
                    models: self.backend.models(),
                    capacity: self.backend.capacity(),
                };
                respond(StatusCode::OK, json(&hello))
            }
            (&Method::POST, paths::GENERATE) => self.generate(req.into_body()).await,
            _ => error_response(
                &ProtocolError::invalid(format!("no route {} {}", req.method(), req.uri().path())),
                StatusCode::NOT_FOUND,
            ),
        }
    }

    /// Answers with an error status if the generation fails before its first event (so the
    /// proxy can try elsewhere), else with 200 and the stream of events.
    async fn generate(&self, body: Incoming) -> Response<Body> {
        let request: GenerateRequest = match cocoon_net::read_json(body, MAX_REQUEST_BYTES).await {
            Ok(r) => r,
            Err(e) => return error_response(&e, status_of(&e)),
        };
        let mut events = self.backend.generate(request);
        let first = match events.next().await {
            Some(GenerateEvent::Error { error }) => {
                return error_response(&error, status_of(&error));
            }
            Some(event) => event,
            None => {
                let e = ProtocolError::internal("backend ended without answering");
                return error_response(&e, status_of(&e));
            }
        };
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        tokio::spawn(async move {
            let mut next = Some(first);
            while let Some(event) = next {
                // A send fails when the proxy reset the stream; dropping `events` then stops the
                // generation.
                if tx.send(encode_frame(&event)).await.is_err() {
                    return;
                }
                next = events.next().await;
            }
        });
        let mut response = respond(StatusCode::OK, frames_body(rx));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(CONTENT_TYPE_FRAMES),
        );
        response
    }
}

fn status_of(e: &ProtocolError) -> StatusCode {
    StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn respond(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

pub(crate) fn error_response(e: &ProtocolError, status: StatusCode) -> Response<Body> {
    let mut r = respond(status, json(e));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
