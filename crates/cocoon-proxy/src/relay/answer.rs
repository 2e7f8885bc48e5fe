//! Relaying an answer from the worker that began it. From its first token on the answer
//! belongs to that worker: it is not failed over, a worker that fails or goes silent ends the
//! stream with an error event, and the client pays only for the tokens it was sent. The
//! worker's token counts are held to the request's [`UsageBounds`]: a report beyond them is
//! billed at the bound, costs the worker reputation, and repeated, its connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cocoon_net::{Body, EventReader, event_stream_response};
use cocoon_protocol::{
    GenerateEvent, GenerateRequest, Payout, ProtocolError, RequestId, SealedRequest, Usage,
    encode_frame, paths,
};
use http::Response;
use tokio::sync::mpsc;

use super::failover::Begun;
use crate::billing::{Billing, Bounded, Hold, Opened, Relayed, UsageBounds};
use crate::limits::RequestPermit;
use crate::market::{LoadGuard, Outcome};
use crate::metrics::Ended;
use crate::server::State;
use crate::workers::{WorkerEntry, WorkerLink};

/// How long a worker has to take a payout message.
const PAYOUT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What a request is billed through: its reservation, and the client's id for it, under
/// which its bill is kept for the client's late ask (open until the answer ends).
pub(super) struct BillTo {
    pub hold: Option<Hold>,
    pub id: Option<RequestId>,
    pub opened: Option<Opened>,
    /// The model asked for: its bill names the weights that served it.
    pub model: String,
}

/// Settles a request with the proxy's book and hands the worker its payout.
async fn settle(
    billing: &Arc<Billing>,
    (hold, id, model): (Hold, Option<RequestId>, &str),
    worker: &Arc<WorkerEntry>,
    usage: Usage,
    price: u64,
) -> Result<cocoon_protocol::Billing, ProtocolError> {
    let weights = worker.link.model_hash(model);
    let (bill, payout) = billing
        .settle(hold, id, worker.key, usage, (price, weights))
        .await?;
    send_payout(worker, payout);
    Ok(bill)
}

/// A worker's answer, up to and including its first event.
pub(super) struct Started {
    events: EventReader,
    first: (GenerateEvent, Bytes),
}

/// What is sent to the worker.
pub(super) enum Payload {
    /// A request the proxy can read.
    Clear(GenerateRequest),
    /// A request sealed for some workers, which the proxy relays unread.
    Sealed(SealedRequest),
}

/// Asks `worker` for `request` and waits for its first event: one attempt of failover. An
/// error event as the first one is a refusal, not the start of an answer.
pub(super) async fn start(
    worker: Arc<WorkerEntry>,
    request: &Payload,
) -> Result<Started, ProtocolError> {
    let channel = &worker.link.channel;
    let mut events = match request {
        Payload::Clear(request) => channel.generate(request, None).await?,
        Payload::Sealed(request) => channel.generate_sealed(request, None).await?,
    };
    match events.next().await {
        Some(Ok((GenerateEvent::Error { error }, _))) | Some(Err(error)) => Err(error),
        Some(Ok(first)) => Ok(Started { events, first }),
        None => Err(ProtocolError::unavailable(
            "the worker's answer ended before it began",
        )),
    }
}

/// Relays the answer `begun` to the client in the background, as the response's event
/// stream. The permit and the hold go with it: the client's slot and reservation last as long
/// as the answer.
pub(super) fn stream(
    state: Arc<State>,
    begun: Begun<WorkerLink, Started>,
    (permit, in_flight): (RequestPermit, crate::server::InFlight),
    bill: BillTo,
    bounds: UsageBounds,
) -> Response<Body> {
    let Begun {
        load,
        answer: started,
        asked,
        first_at,
    } = begun;
    state
        .metrics
        .first_token(&bill.model, (first_at - asked).as_secs_f64());
    let answer = Answer {
        state,
        load,
        _permit: permit,
        _in_flight: in_flight,
        hold: bill.hold,
        id: bill.id,
        _opened: bill.opened,
        model: bill.model,
        bounds,
        asked,
        first_at,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(answer.relay(started, tx));
    event_stream_response(rx)
}

/// One answer being relayed from the worker that started it.
struct Answer {
    state: Arc<State>,
    /// Counts the request against the worker until the stream ends or the client leaves.
    load: LoadGuard<WorkerLink>,
    _permit: RequestPermit,
    /// Counts the request until its relay has ended and its bill is settled.
    _in_flight: crate::server::InFlight,
    hold: Option<Hold>,
    /// The client's id for the request, which its bill is kept under.
    id: Option<RequestId>,
    /// Dropped last (after the bill is written): until then an ask for the bill is pending.
    _opened: Option<Opened>,
    /// The model asked for.
    model: String,
    /// The most the worker's counts may say.
    bounds: UsageBounds,
    /// On tokio's clock, as failover measures them.
    asked: tokio::time::Instant,
    first_at: tokio::time::Instant,
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
        // What was relayed so far: what bounds the bill, and what a cut-off answer is billed
        // for.
        let mut relayed = Relayed::default();
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
                    _,
                ))) => {
                    let bounded = self.bounds.apply(usage, relayed);
                    // Made-up counts never feed the speed record: an overreport is recorded as
                    // one, and only an honest answer as served.
                    let honest = bounded.breach.is_none();
                    let usage = self.bounded(&worker, bounded);
                    if honest {
                        self.record_served(usage);
                    }
                    self.ended(&worker, Ended::Served, Some(usage));
                    let metrics = &self.state.metrics;
                    // The client is shown the counts it is billed for, not the worker's claim.
                    let frame = match (self.state.billing.clone(), self.hold.take()) {
                        // The answer is acknowledged only once its bill is on disk.
                        (Some(b), Some(h)) => {
                            let price = self.load.price;
                            let to = (h, self.id, self.model.as_str());
                            match settle(&b, to, &worker, usage, price).await {
                                Ok(bill) => {
                                    metrics.billed(&self.model, bill.cost, b.commission_of(&bill));
                                    encode_frame(&GenerateEvent::Done {
                                        finish_reason,
                                        usage,
                                        billing: Some(bill),
                                    })
                                }
                                Err(error) => {
                                    tracing::error!(%error, "settlement failed");
                                    encode_frame(&GenerateEvent::Error { error })
                                }
                            }
                        }
                        _ => encode_frame(&GenerateEvent::Done {
                            finish_reason,
                            usage,
                            billing: None,
                        }),
                    };
                    break if tx.send(frame).await.is_err() {
                        End::ClientLeft
                    } else {
                        End::Done
                    };
                }
                Some(Ok((GenerateEvent::Delta { tokens, text, .. }, frame))) => {
                    relayed.add(tokens, &text);
                    if tx.send(frame).await.is_err() {
                        break End::ClientLeft;
                    }
                }
                // A sealed event: what it holds is unknown here, what it claims (in clear,
                // authenticated for the gateway) is billed as a delta's, within its size.
                Some(Ok((
                    GenerateEvent::Sealed {
                        tokens,
                        reasoning,
                        data,
                        ..
                    },
                    frame,
                ))) => {
                    relayed.add_sealed(tokens, reasoning, data.len());
                    if tx.send(frame).await.is_err() {
                        break End::ClientLeft;
                    }
                }
                // An embedding carries no generated token: relayed, billed by the prompt.
                Some(Ok((GenerateEvent::Embedding { .. }, frame))) => {
                    if tx.send(frame).await.is_err() {
                        break End::ClientLeft;
                    }
                }
                Some(Ok((GenerateEvent::ToolCall { tokens, call }, frame))) => {
                    relayed.add_tool_call(tokens, &call);
                    if tx.send(frame).await.is_err() {
                        break End::ClientLeft;
                    }
                }
                // Thinking is part of the answer: relayed, and counted (apart, for its price)
                // towards what a cut-off answer is billed.
                Some(Ok((GenerateEvent::Reasoning { tokens, text }, frame))) => {
                    relayed.add_reasoning(tokens, &text);
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
            End::ClientLeft => {
                self.ended(&worker, Ended::ClientLeft, None);
                self.charge_delivered(&worker, relayed).await
            }
            End::WorkerFailed { error, stalled } => {
                self.ended(&worker, Ended::WorkerFailed, None);
                tracing::warn!(worker = %worker.name, %error, relayed = relayed.tokens, "worker failed mid-answer");
                let outcome = if *stalled {
                    Outcome::Stalled
                } else {
                    Outcome::Failed
                };
                self.state.workers.record(&worker, outcome);
                let bill = self.charge_delivered(&worker, relayed).await;
                let billed = match &bill {
                    Some((b, delivered)) => format!(
                        "the {delivered} tokens delivered were billed ({} units of {} nanoton), \
                         nothing more",
                        b.billed_tokens, b.unit_price
                    ),
                    None => "nothing was billed".into(),
                };
                let error = ProtocolError::unavailable(format!(
                    "the worker serving this answer failed after {} tokens ({}); {billed}",
                    relayed.tokens.min(self.bounds.completion()),
                    error.message
                ));
                let _ = tx.send(encode_frame(&GenerateEvent::Error { error })).await;
                bill
            }
        };
        let charged = charged.map_or(0, |(b, _)| b.billed_tokens);
        tracing::debug!(worker = %worker.name, charged, "answer ended before it was done");
    }

    /// The answer ended `how`: counted for `/metrics`, and its access-log line (no prompt
    /// text: the request's id, model, worker, counts and duration).
    fn ended(&self, worker: &WorkerEntry, how: Ended, usage: Option<Usage>) {
        self.state.metrics.ended(&self.model, how, usage);
        let ms = self.asked.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: "cocoon::access",
            request = self.id.map(|id| id.to_string()),
            model = %self.model,
            worker = %worker.name,
            outcome = ?how,
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            ms = (ms * 10.0).round() / 10.0,
            "answer"
        );
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

    /// The worker's counts as they may be billed; a report that broke a bound costs the worker
    /// reputation, and after `evict_after_overreports` of them its connection.
    fn bounded(&self, worker: &Arc<WorkerEntry>, bounded: Bounded) -> Usage {
        if let Some(breach) = bounded.breach {
            let overreports = worker.link.overreports.fetch_add(1, Ordering::SeqCst) + 1;
            tracing::warn!(worker = %worker.name, %breach, overreports, "the worker reported more tokens than it can have used; billed at the bound");
            self.state.workers.record(worker, Outcome::Overreported);
            if overreports >= self.state.routing.read().evict_after_overreports {
                tracing::warn!(worker = %worker.name, overreports, "disconnecting and barring a worker that keeps overstating its token counts");
                self.state.admission.bar(
                    worker.link.fingerprint,
                    format!("{overreports} answers overstated their token counts"),
                );
                worker.link.evict.cancel();
            }
        }
        bounded.usage
    }

    /// Bills the completion tokens the client was sent of an answer that did not finish (the
    /// prompt's count comes only with the end of an answer); the bill and the tokens it is
    /// for, if there was one.
    async fn charge_delivered(
        &mut self,
        worker: &Arc<WorkerEntry>,
        relayed: Relayed,
    ) -> Option<(cocoon_protocol::Billing, u32)> {
        if relayed.tokens == 0 {
            return None;
        }
        let usage = self.bounded(worker, self.bounds.cut_off(relayed));
        let (billing, hold) = (self.state.billing.clone()?, self.hold.take()?);
        let to = (hold, self.id, self.model.as_str());
        match settle(&billing, to, worker, usage, self.load.price).await {
            Ok(bill) => {
                // Charged like a finished answer, and counted the same.
                let commission = billing.commission_of(&bill);
                self.state
                    .metrics
                    .billed(&self.model, bill.cost, commission);
                Some((bill, usage.completion_tokens))
            }
            Err(error) => {
                tracing::error!(%error, "settlement of a cut-off answer failed");
                None
            }
        }
    }
}
