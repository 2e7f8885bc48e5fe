//! Routing one generation to a worker and relaying its events back to the client.

use bytes::Bytes;
use cocoon_net::{Body, error_response, event_stream_response};
use cocoon_protocol::{ErrorKind, GenerateRequest, ProtocolError};
use http::Response;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::server::State;

/// Workers tried for one request when a worker is unreachable before it starts.
const MAX_ATTEMPTS: usize = 3;

pub(crate) async fn generate(state: &State, body: Incoming) -> Response<Body> {
    let request: GenerateRequest = match cocoon_net::read_json(body, state.max_request_bytes).await
    {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    if let Err(e) = request.validate() {
        return error_response(&e);
    }
    let mut tried = Vec::new();
    let mut last_error = None;
    while tried.len() < MAX_ATTEMPTS {
        let Some(load) = state.workers.pick(&request.model, &tried) else {
            break;
        };
        let worker = load.worker().clone();
        tried.push(worker.id);
        match worker.channel.generate(&request).await {
            Ok(mut events) => {
                let (tx, rx) = mpsc::channel::<Bytes>(32);
                tokio::spawn(async move {
                    // Holding `load` here counts the request against the worker until the stream
                    // ends or the client goes away.
                    let _load = load;
                    loop {
                        tokio::select! {
                            next = events.next() => match next {
                                Some(Ok((_event, frame))) => {
                                    if tx.send(frame).await.is_err() {
                                        break;
                                    }
                                }
                                Some(Err(error)) => {
                                    tracing::warn!(worker = %worker.name, %error, "worker stream failed");
                                    let frame = cocoon_protocol::encode_frame(&cocoon_protocol::GenerateEvent::Error { error });
                                    let _ = tx.send(frame).await;
                                    break;
                                }
                                None => break,
                            },
                            // The client reset its stream: dropping `events` resets the worker's.
                            _ = tx.closed() => break,
                        }
                    }
                });
                return event_stream_response(rx);
            }
            // The worker could not take it; another one may.
            Err(e) if e.kind == ErrorKind::Unavailable => {
                tracing::warn!(worker = %worker.name, error = %e, "worker unavailable, trying another");
                last_error = Some(e);
            }
            Err(e) => return error_response(&e),
        }
    }
    let error = last_error.unwrap_or_else(|| {
        if state.workers.knows(&request.model) {
            ProtocolError::unavailable(format!(
                "no worker for model '{}' can take the request now",
                request.model
            ))
        } else {
            ProtocolError::new(
                ErrorKind::ModelNotFound,
                format!(
                    "The model '{}' does not exist or no worker serves it",
                    request.model
                ),
            )
        }
    });
    error_response(&error)
}
