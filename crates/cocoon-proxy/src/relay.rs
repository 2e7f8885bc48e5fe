//! Routing one generation to a worker and relaying its events back to the client.
//!
//! The [`market`](crate::market) picks the worker. One that refuses, fails or stays silent
//! before its first token is replaced by the next pick (at most `max_attempts`, all within
//! `start_deadline_secs`), so the client sees one answer and pays once. Once a token has been
//! relayed the answer belongs to that worker: if it fails or goes silent mid-stream the
//! stream ends with an error event and the client is charged only for the tokens it was
//! sent. Every attempt's outcome goes into the worker's record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cocoon_net::{Body, EventReader, error_response, event_stream_response};
use cocoon_protocol::{
    ErrorKind, GenerateEvent, GenerateRequest, Payout, ProtocolError, Usage, encode_frame, paths,
};
use http::Response;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::billing::{Billing, Hold};
use crate::limits::RequestPermit;
use crate::market::{Ask, LoadGuard, NoPick, Outcome, affinity};
use crate::server::State;
use crate::workers::{WorkerEntry, WorkerLink};

/// How long a worker has to take a payout message.
const PAYOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens an answer without `max_tokens` is expected to take, for comparing workers.
const EXPECTED_TOKENS: u32 = 256;

/// Hands `payout` to the worker, in the background: payouts are cumulative, so one that is
/// lost is covered by the next.
pub(crate) fn send_payout(worker: &Arc<WorkerEntry>, payout: Payout) {
    let worker = worker.clone();
    tokio::spawn(async move {
        if let Err(e) = worker
            .link
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
    price: u64,
) -> Result<cocoon_protocol::Billing, ProtocolError> {
    let (bill, payout) = billing.settle(hold, worker.key, usage, price).await?;
    send_payout(worker, payout);
    Ok(bill)
}

/// A worker's answer, up to and including its first event.
struct Started {
    events: EventReader,
    first: (GenerateEvent, Bytes),
}

async fn start(worker: &WorkerEntry, request: &GenerateRequest) -> Result<Started, ProtocolError> {
    let mut events = worker.link.channel.generate(request).await?;
    match events.next().await {
        Some(Ok((GenerateEvent::Error { error }, _))) | Some(Err(error)) => Err(error),
        Some(Ok(first)) => Ok(Started { events, first }),
        None => Err(ProtocolError::unavailable(
            "the worker's answer ended before it began",
        )),
    }
}

fn no_pick_error(no: NoPick, request: &GenerateRequest) -> ProtocolError {
    match no {
        NoPick::UnknownModel => ProtocolError::new(
            ErrorKind::ModelNotFound,
            format!(
                "The model '{}' does not exist or no worker serves it",
                request.model
            ),
        ),
        NoPick::TooExpensive { cheapest } => ProtocolError::invalid(format!(
            "no worker serves '{}' at or below max_price {} nanoton per token; the cheapest \
             asks {cheapest}",
            request.model,
            request.max_price.unwrap_or(0)
        )),
        NoPick::NoneAvailable => ProtocolError::unavailable(format!(
            "no worker for model '{}' can take the request now",
            request.model
        )),
    }
}

fn context_of(worker: &WorkerEntry, request: &GenerateRequest) -> Option<u32> {
    worker.offer(&request.model).map(|o| o.context_length)
}

pub(crate) async fn generate(
    state: &Arc<State>,
    client: [u8; 32],
    body: Incoming,
) -> Response<Body> {
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
    let workers = &state.workers;
    // Refused here (before any reservation) when no worker could serve it at any rate.
    if let Err(no) = workers.can_serve(&request.model, request.max_price) {
        return error_response(&no_pick_error(no, &request));
    }
    // The reservation covers the dearest worker the request may end up on.
    let mut hold = match (
        &state.billing,
        workers.context_length(&request.model),
        workers.highest_price(&request.model, request.max_price),
    ) {
        (Some(billing), Some(context), Some(price)) => {
            match billing.reserve(client, &request, context, price).await {
                Ok(h) => Some(h),
                Err(e) => return error_response(&e),
            }
        }
        _ => None,
    };
    let routing = &state.routing;
    let first_token_timeout = Duration::from_secs(routing.first_token_timeout_secs);
    let deadline = Instant::now() + Duration::from_secs(routing.start_deadline_secs);
    let prefix = affinity::prefix_key(&request);
    let tokens = request
        .params
        .max_tokens
        .unwrap_or(EXPECTED_TOKENS)
        .min(EXPECTED_TOKENS * 4);
    let mut tried = Vec::new();
    let mut min_context = 0;
    let mut last_error = None;
    while tried.len() < routing.max_attempts as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let load = match workers.pick(&Ask {
            model: &request.model,
            max_price: request.max_price,
            prefix,
            tokens,
            exclude: &tried,
            min_context,
        }) {
            Ok(load) => load,
            Err(no) => {
                last_error.get_or_insert_with(|| no_pick_error(no, &request));
                break;
            }
        };
        let worker = load.seller().clone();
        tried.push(worker.id);
        let asked = Instant::now();
        let wait = first_token_timeout.min(left);
        match tokio::time::timeout(wait, start(&worker, &request)).await {
            Ok(Ok(started)) => {
                let answer = Answer {
                    state: state.clone(),
                    load,
                    _permit: permit,
                    hold: hold.take(),
                    asked,
                    first_at: Instant::now(),
                };
                let (tx, rx) = mpsc::channel::<Bytes>(32);
                tokio::spawn(answer.relay(started, tx));
                return event_stream_response(rx);
            }
            // Another worker may succeed where this one failed before answering.
            Ok(Err(e)) if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Internal) => {
                tracing::warn!(worker = %worker.name, error = %e, "worker failed before answering, trying another");
                workers.record(&worker, Outcome::Failed);
                last_error = Some(e);
            }
            // Too long for this worker's context, and another offers a longer one; not the
            // worker's fault.
            Ok(Err(e))
                if e.kind == ErrorKind::ContextLengthExceeded
                    && workers.context_length(&request.model) > context_of(&worker, &request) =>
            {
                tracing::debug!(worker = %worker.name, "request too long for this worker's context, trying a longer one");
                let context = context_of(&worker, &request).unwrap_or(0);
                min_context = min_context.max(context.saturating_add(1));
                last_error = Some(e);
            }
            // The worker's verdict on the request itself (too long, bad parameters).
            Ok(Err(e)) => return error_response(&e),
            Err(_) => {
                tracing::warn!(worker = %worker.name, secs = wait.as_secs_f64(), "worker sent no first token in time, trying another");
                workers.record(&worker, Outcome::Stalled);
                last_error = Some(ProtocolError::unavailable(format!(
                    "worker '{}' sent no first token within {:.1} s",
                    worker.name,
                    wait.as_secs_f64()
                )));
            }
        }
    }
    let error = last_error.unwrap_or_else(|| {
        ProtocolError::unavailable(format!(
            "no worker for model '{}' answered within {} s",
            request.model, routing.start_deadline_secs
        ))
    });
    let retry_after_secs = match error.kind {
        // Workers come and go: soon another may take it.
        ErrorKind::Unavailable => error.retry_after_secs.or(Some(1)),
        _ => error.retry_after_secs,
    };
    let error = ProtocolError {
        message: format!("{} (workers tried: {})", error.message, tried.len()),
        retry_after_secs,
        ..error
    };
    error_response(&error)
}

/// One answer being relayed from the worker that started it.
struct Answer {
    state: Arc<State>,
    /// Counts the request against the worker until the stream ends or the client leaves.
    load: LoadGuard<WorkerLink>,
    _permit: RequestPermit,
    hold: Option<Hold>,
    asked: Instant,
    first_at: Instant,
}

/// How a relayed stream ended.
enum End {
    /// Done, billed and sent.
    Done,
    /// The client went away.
    ClientLeft,
    /// The worker failed or went silent; `stalled` when silent.
    WorkerFailed { error: ProtocolError, stalled: bool },
}

impl Answer {
    async fn relay(mut self, started: Started, tx: mpsc::Sender<Bytes>) {
        let worker = self.load.seller().clone();
        let silence = self.state.limiter.config().worker_timeout();
        // A worker silent mid-answer is cut off.
        let mut events = started.events.with_silence_limit(silence);
        // Generated tokens relayed so far: what a cut-off answer is billed for.
        let mut relayed = 0u32;
        let mut next = Some(Ok(started.first));
        let mut last_event = Instant::now();
        let end = loop {
            let item = match next.take() {
                Some(item) => Some(item),
                None => tokio::select! {
                    item = events.next() => item,
                    // The client reset its stream: dropping `events` resets the worker's.
                    _ = tx.closed() => break End::ClientLeft,
                },
            };
            if matches!(item, Some(Ok(_))) {
                last_event = Instant::now();
            }
            match item {
                Some(Ok((
                    GenerateEvent::Done {
                        finish_reason,
                        usage,
                        ..
                    },
                    frame,
                ))) => {
                    self.record_served(usage);
                    let frame = match (self.state.billing.clone(), self.hold.take()) {
                        // The answer is acknowledged only once its bill is on disk.
                        (Some(b), Some(h)) => {
                            match settle(&b, h, &worker, usage, self.load.price).await {
                                Ok(bill) => encode_frame(&GenerateEvent::Done {
                                    finish_reason,
                                    usage,
                                    billing: Some(bill),
                                }),
                                Err(error) => {
                                    tracing::error!(%error, "settlement failed");
                                    encode_frame(&GenerateEvent::Error { error })
                                }
                            }
                        }
                        _ => frame,
                    };
                    break if tx.send(frame).await.is_err() {
                        End::ClientLeft
                    } else {
                        End::Done
                    };
                }
                Some(Ok((GenerateEvent::Delta { tokens, .. }, frame))) => {
                    relayed = relayed.saturating_add(tokens);
                    if tx.send(frame).await.is_err() {
                        break End::ClientLeft;
                    }
                }
                Some(Ok((GenerateEvent::Error { error }, _))) => {
                    break End::WorkerFailed {
                        error,
                        stalled: false,
                    };
                }
                Some(Err(error)) => {
                    break End::WorkerFailed {
                        stalled: last_event.elapsed() >= silence,
                        error,
                    };
                }
                None => {
                    break End::WorkerFailed {
                        error: ProtocolError::unavailable("the worker's stream ended early"),
                        stalled: false,
                    };
                }
            }
        };
        drop(events);
        let charged = match &end {
            End::Done => return,
            End::ClientLeft => self.charge_delivered(&worker, relayed).await,
            End::WorkerFailed { error, stalled } => {
                tracing::warn!(worker = %worker.name, %error, relayed, "worker failed mid-answer");
                let outcome = if *stalled {
                    Outcome::Stalled
                } else {
                    Outcome::Failed
                };
                self.state.workers.record(&worker, outcome);
                let bill = self.charge_delivered(&worker, relayed).await;
                let billed = match &bill {
                    Some(b) => format!(
                        "the {relayed} tokens delivered were billed ({} units of {} nanoton), \
                         nothing more",
                        b.billed_tokens, b.unit_price
                    ),
                    None => "nothing was billed".into(),
                };
                let error = ProtocolError::unavailable(format!(
                    "the worker serving this answer failed after {relayed} tokens ({}); {billed}",
                    error.message
                ));
                let _ = tx.send(encode_frame(&GenerateEvent::Error { error })).await;
                bill
            }
        };
        let charged = charged.map_or(0, |b| b.billed_tokens);
        tracing::debug!(worker = %worker.name, charged, "answer ended before it was done");
    }

    /// A worker that delivered the answer: its time to first token and generation speed.
    fn record_served(&self, usage: Usage) {
        let generating = self.first_at.elapsed().as_secs_f64();
        let tokens_per_sec = (usage.completion_tokens > 1 && generating > 0.0)
            .then(|| f64::from(usage.completion_tokens - 1) / generating);
        self.state.workers.record(
            self.load.seller(),
            Outcome::Served {
                ttft: self.first_at - self.asked,
                tokens_per_sec,
            },
        );
    }

    /// Bills the completion tokens the client was sent of an answer that did not finish (the
    /// prompt's count comes only with the end of an answer); the bill, if there was one.
    async fn charge_delivered(
        &mut self,
        worker: &Arc<WorkerEntry>,
        relayed: u32,
    ) -> Option<cocoon_protocol::Billing> {
        if relayed == 0 {
            return None;
        }
        let (billing, hold) = (self.state.billing.clone()?, self.hold.take()?);
        let usage = Usage {
            prompt_tokens: 0,
            completion_tokens: relayed,
        };
        match settle(&billing, hold, worker, usage, self.load.price).await {
            Ok(bill) => Some(bill),
            Err(error) => {
                tracing::error!(%error, "settlement of a cut-off answer failed");
                None
            }
        }
    }
}
