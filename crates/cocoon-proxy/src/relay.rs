//! Routing one generation to a worker and relaying its events back to the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cocoon_net::{Body, error_response, event_stream_response};
use cocoon_protocol::{
    ErrorKind, GenerateEvent, GenerateRequest, Payout, ProtocolError, Usage, encode_frame, paths,
};
use http::Response;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::billing::{Billing, Hold};
use crate::server::State;
use crate::workers::WorkerEntry;

/// Workers tried for one request when a worker is unreachable before it starts.
const MAX_ATTEMPTS: usize = 3;

/// How long a worker has to take a payout message.
const PAYOUT_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands `payout` to the worker, in the background: payouts are cumulative, so one that is
/// lost is covered by the next.
pub(crate) fn send_payout(worker: &Arc<WorkerEntry>, payout: Payout) {
    let worker = worker.clone();
    tokio::spawn(async move {
        if let Err(e) = worker
            .channel
            .post_json::<_, serde::de::IgnoredAny>(paths::PAYOUT, &payout, PAYOUT_TIMEOUT)
            .await
        {
            tracing::debug!(worker = %worker.name, error = %e, "payout not delivered");
        }
    });
}

/// Settles a request with the proxy's book and hands the worker its payout.
async fn settle(
    billing: &Arc<Billing>,
    hold: Hold,
    worker: &Arc<WorkerEntry>,
    usage: Usage,
) -> Result<cocoon_protocol::Billing, ProtocolError> {
    let (bill, payout) = billing.settle(hold, worker.public_key, usage).await?;
    send_payout(worker, payout);
    Ok(bill)
}

pub(crate) async fn generate(state: &State, client: [u8; 32], body: Incoming) -> Response<Body> {
    let limits = state.limiter.config();
    let read = cocoon_net::read_json(body, state.max_request_bytes);
    let request: GenerateRequest = match tokio::time::timeout(limits.body_timeout(), read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error_response(&e),
        Err(_) => {
            return error_response(&ProtocolError::invalid(format!(
                "the request body did not arrive within {} s",
                limits.body_timeout_secs
            )));
        }
    };
    let permit = match state.limiter.admit(client, &request) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    if let Err(e) = request.validate() {
        return error_response(&e);
    }
    let worker_timeout = limits.worker_timeout();
    // No reservation for a model nobody serves: that request ends in a 404 below.
    let mut hold = match (&state.billing, state.workers.context_length(&request.model)) {
        (Some(billing), Some(context)) => match billing.reserve(client, &request, context).await {
            Ok(h) => Some(h),
            Err(e) => return error_response(&e),
        },
        _ => None,
    };
    let mut tried = Vec::new();
    let mut last_error = None;
    while tried.len() < MAX_ATTEMPTS {
        let Some(load) = state.workers.pick(&request.model, &tried) else {
            break;
        };
        let worker = load.worker().clone();
        tried.push(worker.id);
        let started = tokio::time::timeout(worker_timeout, worker.channel.generate(&request))
            .await
            .unwrap_or_else(|_| {
                Err(ProtocolError::unavailable(format!(
                    "worker did not start the answer within {} s",
                    worker_timeout.as_secs()
                )))
            });
        match started {
            Ok(events) => {
                // A worker silent mid-answer is cut off; the answer is not charged (no bill
                // is settled for it).
                let mut events = events.with_silence_limit(worker_timeout);
                let (tx, rx) = mpsc::channel::<Bytes>(32);
                let billing = state.billing.clone();
                let mut hold = hold.take();
                tokio::spawn(async move {
                    // Holding `load` here counts the request against the worker until the stream
                    // ends or the client goes away.
                    let _load = load;
                    let _permit = permit;
                    // Generated tokens relayed so far, billed if the client leaves early.
                    let mut relayed = 0u32;
                    let client_left = loop {
                        tokio::select! {
                            next = events.next() => match next {
                                Some(Ok((GenerateEvent::Done { finish_reason, usage, .. }, frame))) => {
                                    let frame = match (&billing, hold.take()) {
                                        // The answer is acknowledged only once its bill is on disk.
                                        (Some(b), Some(h)) => match settle(b, h, &worker, usage).await {
                                            Ok(bill) => encode_frame(&GenerateEvent::Done { finish_reason, usage, billing: Some(bill) }),
                                            Err(error) => {
                                                tracing::error!(%error, "settlement failed");
                                                encode_frame(&GenerateEvent::Error { error })
                                            }
                                        },
                                        _ => frame,
                                    };
                                    break tx.send(frame).await.is_err();
                                }
                                Some(Ok((event, frame))) => {
                                    if let GenerateEvent::Delta { tokens, .. } = event {
                                        relayed = relayed.saturating_add(tokens);
                                    }
                                    if tx.send(frame).await.is_err() {
                                        break true;
                                    }
                                }
                                Some(Err(error)) => {
                                    tracing::warn!(worker = %worker.name, %error, "worker stream failed");
                                    let _ = tx.send(encode_frame(&GenerateEvent::Error { error })).await;
                                    break false;
                                }
                                None => break false,
                            },
                            // The client reset its stream: dropping `events` resets the worker's.
                            _ = tx.closed() => break true,
                        }
                    };
                    // A client that leaves mid-answer pays for the tokens it was sent (the
                    // prompt's count comes only with the end of the answer).
                    if client_left
                        && relayed > 0
                        && let (Some(b), Some(h)) = (&billing, hold.take())
                    {
                        drop(events);
                        let usage = Usage {
                            prompt_tokens: 0,
                            completion_tokens: relayed,
                        };
                        if let Err(error) = settle(b, h, &worker, usage).await {
                            tracing::error!(%error, "settlement of a cancelled answer failed");
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
