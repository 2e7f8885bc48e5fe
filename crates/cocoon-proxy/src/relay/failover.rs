//! Failover before the first token: until a worker has sent something, nothing has reached
//! the client, so a worker that refuses, fails or stays silent can be replaced by the next
//! pick without the client seeing it. The loop is bounded three ways (`max_attempts`
//! workers, `first_token_timeout_secs` each, `start_deadline_secs` for all) so a request
//! never waits on a failing market for longer than configured.
//!
//! It is generic over the market's link and over how one worker is asked, so that the
//! policy (what counts against a worker, what moves on, what ends the request) can be
//! driven by a fake attempt and paused time instead of a network.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::{ErrorKind, ProtocolError};
use tokio::time::Instant;

use super::Routed;
use super::errors;
use super::reach::Ceiling;
use crate::config::RoutingConfig;
use crate::market::{Ask, LoadGuard, Market, NoPick, Outcome, Seller};

/// Tokens an answer without `max_tokens` is expected to take, for comparing workers.
const EXPECTED_TOKENS: u32 = 256;

/// The attempt that produced a first event.
pub(super) struct Begun<T, S> {
    /// Keeps the request counted against the worker that answered.
    pub load: LoadGuard<T>,
    /// What the attempt returned.
    pub answer: S,
    /// When this worker was asked (not the first one): its time to first token starts here.
    pub asked: Instant,
    pub first_at: Instant,
}

fn context_of<T>(worker: &Seller<T>, request: &Routed) -> Option<u32> {
    worker.offer(&request.model).map(|o| o.context_length)
}

/// Asks the market's picks for `request` in turn through `attempt` until one produces its
/// first event. Refusals and silences are recorded in the worker's reputation (a request
/// too long for one worker's context is not: that says nothing about the worker). The
/// error is either a worker's verdict on the request itself, returned as the worker gave
/// it since any other would say the same, or, once the bounds are spent, the last reason
/// with the count of workers tried. Only workers under the `ceiling` are asked: the ones the
/// request's reservation covers.
pub(super) async fn run<T, S, F, Fut>(
    market: &Market<T>,
    routing: &RoutingConfig,
    request: &Routed,
    ceiling: Ceiling,
    mut attempt: F,
) -> Result<Begun<T, S>, ProtocolError>
where
    F: FnMut(Arc<Seller<T>>) -> Fut,
    Fut: Future<Output = Result<S, ProtocolError>>,
{
    let first_token_timeout = Duration::from_secs(routing.first_token_timeout_secs);
    let deadline = Instant::now() + Duration::from_secs(routing.start_deadline_secs);
    let prefix = request.prefix;
    let tokens = request
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
        let load = match market.pick(&Ask {
            model: &request.model,
            max_price: ceiling.max_price,
            prefix,
            tokens,
            exclude: &tried,
            min_context,
            max_context: ceiling.max_context,
            only: request.only.as_deref(),
        }) {
            Ok(load) => load,
            Err(no) => {
                last_error.get_or_insert_with(|| match (no, &request.only) {
                    (NoPick::NoneAvailable, Some(_)) => errors::none_sealed_for(&request.model),
                    _ => errors::no_pick(no, &request.model, request.max_price),
                });
                break;
            }
        };
        let worker = load.seller().clone();
        tried.push(worker.id);
        let asked = Instant::now();
        let wait = first_token_timeout.min(left);
        match tokio::time::timeout(wait, attempt(worker.clone())).await {
            Ok(Ok(answer)) => {
                return Ok(Begun {
                    load,
                    answer,
                    asked,
                    first_at: Instant::now(),
                });
            }
            // A worker that is stopping: routed around from now on, held against nobody.
            Ok(Err(e))
                if e.kind == ErrorKind::Unavailable
                    && e.message == cocoon_protocol::WORKER_DRAINING =>
            {
                tracing::info!(worker = %worker.name, "worker is shutting down; no more requests go to it");
                worker.set_healthy(false);
                last_error = Some(e);
            }
            // Sealed to another key of this worker, or altered: the sender's doing, not the
            // worker's; another recipient may open it.
            Ok(Err(e))
                if e.kind == ErrorKind::Unavailable
                    && e.message == cocoon_protocol::NOT_SEALED_FOR_THIS_WORKER =>
            {
                tracing::debug!(worker = %worker.name, "a sealed request does not open for this worker; trying another recipient");
                last_error = Some(e);
            }
            // Another worker may succeed where this one failed before answering.
            Ok(Err(e)) if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Internal) => {
                tracing::warn!(worker = %worker.name, error = %e, "worker failed before answering, trying another");
                market.record(&worker, Outcome::Failed);
                last_error = Some(e);
            }
            // Too long for this worker's context, and another offers a longer one; not the
            // worker's fault.
            Ok(Err(e))
                if e.kind == ErrorKind::ContextLengthExceeded
                    && market
                        .context_length(&request.model)
                        .min(ceiling.max_context.or(Some(u32::MAX)))
                        > context_of(&worker, request) =>
            {
                tracing::debug!(worker = %worker.name, "request too long for this worker's context, trying a longer one");
                let context = context_of(&worker, request).unwrap_or(0);
                min_context = min_context.max(context.saturating_add(1));
                last_error = Some(e);
            }
            // The worker's verdict on the request itself (too long, bad parameters).
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::warn!(worker = %worker.name, secs = wait.as_secs_f64(), "worker sent no first token in time, trying another");
                market.record(&worker, Outcome::Stalled);
                last_error = Some(ProtocolError::unavailable(format!(
                    // Which worker is the operator's to know (the log names it), not the
                    // client's.
                    "a worker sent no first token within {:.1} s",
                    wait.as_secs_f64()
                )));
            }
        }
    }
    Err(errors::exhausted(
        last_error,
        tried.len(),
        &request.model,
        routing.start_deadline_secs,
    ))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use cocoon_protocol::{Input, SamplingParams};

    use super::*;
    use crate::market::Offer;

    /// How a fake worker answers.
    #[derive(Clone)]
    enum Reply {
        /// Its first event at once.
        Answers,
        /// Its first event after this long.
        AnswersAfter(Duration),
        Refuses(ProtocolError),
        /// Nothing, ever.
        Silent,
    }

    /// A market of fake workers (by name, context and price: with nothing measured, the
    /// cheapest is picked first) and the attempt function that plays their replies.
    struct Fake {
        market: Market<()>,
        replies: HashMap<String, Reply>,
        asked: RefCell<Vec<String>>,
    }

    impl Fake {
        fn new(workers: &[(&str, u32, u64, Reply)]) -> Self {
            let market = Market::new();
            let mut replies = HashMap::new();
            for (i, (name, context_length, price, reply)) in workers.iter().enumerate() {
                let offers = vec![Offer {
                    model: "m".into(),
                    context_length: *context_length,
                    price: *price,
                }];
                market.add([i as u8; 32], (*name).into(), 4, offers, ());
                replies.insert((*name).to_string(), reply.clone());
            }
            Self {
                market,
                replies,
                asked: RefCell::default(),
            }
        }

        fn worker(&self, name: &str) -> Arc<Seller<()>> {
            self.market
                .snapshot()
                .into_iter()
                .find(|s| s.name == name)
                .unwrap()
        }

        /// How much the worker's record holds: 0 untouched, 1 per failure, 3 per stall.
        fn samples(&self, name: &str) -> f64 {
            self.market.reputation(&self.worker(name)).samples
        }

        fn asked(&self) -> Vec<String> {
            self.asked.borrow().clone()
        }

        async fn run(&self, routing: &RoutingConfig) -> Result<Begun<(), String>, ProtocolError> {
            run(
                &self.market,
                routing,
                &request(),
                Ceiling::of(&request()),
                |worker: Arc<Seller<()>>| {
                    self.asked.borrow_mut().push(worker.name.clone());
                    let reply = self.replies[&worker.name].clone();
                    async move {
                        match reply {
                            Reply::Answers => Ok(worker.name.clone()),
                            Reply::AnswersAfter(after) => {
                                tokio::time::sleep(after).await;
                                Ok(worker.name.clone())
                            }
                            Reply::Refuses(e) => Err(e),
                            Reply::Silent => std::future::pending().await,
                        }
                    }
                },
            )
            .await
        }
    }

    fn request() -> Routed {
        Routed::clear(&cocoon_protocol::GenerateRequest {
            model: "m".into(),
            input: Input::Text {
                prompt: "hi".into(),
            },
            params: SamplingParams::default(),
            max_price: None,
            cache_scope: None,
        })
    }

    fn routing(
        max_attempts: u32,
        first_token_timeout_secs: u64,
        start_deadline_secs: u64,
    ) -> RoutingConfig {
        RoutingConfig {
            max_attempts,
            first_token_timeout_secs,
            start_deadline_secs,
            ..RoutingConfig::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_or_failing_worker_is_replaced_by_the_next_pick() {
        let fake = Fake::new(&[
            (
                "a",
                2048,
                10,
                Reply::Refuses(ProtocolError::unavailable("a is full")),
            ),
            (
                "b",
                2048,
                20,
                Reply::Refuses(ProtocolError::internal("b broke")),
            ),
            ("c", 2048, 30, Reply::Answers),
            ("d", 2048, 40, Reply::Answers),
        ]);
        let begun = fake.run(&routing(3, 30, 60)).await.unwrap();
        assert_eq!(begun.answer, "c");
        assert_eq!(begun.load.seller().name, "c");
        assert_eq!(fake.asked(), ["a", "b", "c"]);
        // Each refusal is one failure on the refuser's record; the winner's is for the relay.
        assert!(close(fake.samples("a"), 1.0));
        assert!(close(fake.samples("b"), 1.0));
        assert!(fake.market.reputation(&fake.worker("a")).success_rate < 1.0);
        assert!(close(fake.samples("c"), 0.0));
        // Only the winner still counts the request as its load.
        assert_eq!(fake.worker("a").in_flight(), 0);
        assert_eq!(fake.worker("c").in_flight(), 1);
        drop(begun);
        assert_eq!(fake.worker("c").in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_silent_past_the_first_token_timeout_is_passed_over() {
        let fake = Fake::new(&[
            ("a", 2048, 10, Reply::Silent),
            ("b", 2048, 20, Reply::AnswersAfter(Duration::from_secs(2))),
        ]);
        let start = Instant::now();
        let begun = fake.run(&routing(3, 30, 60)).await.unwrap();
        assert_eq!(begun.answer, "b");
        assert_eq!(fake.asked(), ["a", "b"]);
        // `a` had its full 30 s; `b`'s time to first token is counted from when it was asked.
        assert_eq!(begun.asked - start, Duration::from_secs(30));
        assert_eq!(begun.first_at - begun.asked, Duration::from_secs(2));
        // A stall weighs three failures.
        assert!(close(fake.samples("a"), 3.0));
        assert!(close(fake.samples("b"), 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_answering_just_within_the_timeout_is_kept() {
        let fake = Fake::new(&[
            (
                "a",
                2048,
                10,
                Reply::AnswersAfter(Duration::from_millis(29_999)),
            ),
            ("b", 2048, 20, Reply::Answers),
        ]);
        let begun = fake.run(&routing(3, 30, 60)).await.unwrap();
        assert_eq!(begun.answer, "a");
        assert_eq!(fake.asked(), ["a"]);
        assert!(close(fake.samples("a"), 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_max_attempts_and_the_error_says_how_many() {
        let refuse = |n: &str| Reply::Refuses(ProtocolError::unavailable(format!("{n} is full")));
        let fake = Fake::new(&[
            ("a", 2048, 10, refuse("a")),
            ("b", 2048, 20, refuse("b")),
            ("c", 2048, 30, refuse("c")),
            ("d", 2048, 40, Reply::Answers),
        ]);
        let error = fake.run(&routing(3, 30, 60)).await.err().unwrap();
        assert_eq!(fake.asked(), ["a", "b", "c"]);
        assert_eq!(error.kind, ErrorKind::Unavailable);
        assert_eq!(error.message, "c is full (workers tried: 3)");
        assert_eq!(error.retry_after_secs, Some(1));
        assert!(close(fake.samples("d"), 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_starts_after_the_start_deadline() {
        let fake = Fake::new(&[
            ("a", 2048, 10, Reply::Silent),
            ("b", 2048, 20, Reply::Silent),
            ("c", 2048, 30, Reply::Answers),
        ]);
        let start = Instant::now();
        let error = fake.run(&routing(5, 30, 45)).await.err().unwrap();
        // `a` gets 30 s, `b` only the 15 s left, and `c` is never asked.
        assert_eq!(Instant::now() - start, Duration::from_secs(45));
        assert_eq!(fake.asked(), ["a", "b"]);
        assert_eq!(error.kind, ErrorKind::Unavailable);
        assert_eq!(
            error.message,
            "a worker sent no first token within 15.0 s (workers tried: 2)"
        );
        assert_eq!(error.retry_after_secs, Some(1));
        assert!(close(fake.samples("b"), 3.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_deadline_asks_no_one() {
        let fake = Fake::new(&[("a", 2048, 10, Reply::Answers)]);
        let error = fake.run(&routing(3, 30, 0)).await.err().unwrap();
        assert!(fake.asked().is_empty());
        assert_eq!(
            error.message,
            "no worker for model 'm' answered within 0 s (workers tried: 0)"
        );
        assert_eq!(error.retry_after_secs, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_context_too_short_moves_to_a_longer_one_without_counting_against_the_worker() {
        let too_long = || {
            Reply::Refuses(ProtocolError::new(
                ErrorKind::ContextLengthExceeded,
                "the prompt needs 3000 tokens",
            ))
        };
        let fake = Fake::new(&[
            ("short", 1024, 10, too_long()),
            // As short as the first: passed over unasked.
            ("also-short", 1024, 20, Reply::Answers),
            ("long", 4096, 30, Reply::Answers),
        ]);
        let begun = fake.run(&routing(3, 30, 60)).await.unwrap();
        assert_eq!(begun.answer, "long");
        assert_eq!(fake.asked(), ["short", "long"]);
        assert!(close(fake.samples("short"), 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn when_no_context_is_long_enough_the_longest_ones_refusal_is_the_answer() {
        let too_long = |n: &str| {
            Reply::Refuses(ProtocolError::new(
                ErrorKind::ContextLengthExceeded,
                format!("too long for {n}"),
            ))
        };
        let fake = Fake::new(&[
            ("short", 1024, 10, too_long("short")),
            ("long", 4096, 20, too_long("long")),
            ("other", 1024, 30, Reply::Answers),
        ]);
        let error = fake.run(&routing(3, 30, 60)).await.err().unwrap();
        assert_eq!(fake.asked(), ["short", "long"]);
        // The verdict as the worker gave it: a 400 with no retry and no count of workers.
        assert_eq!(error.kind, ErrorKind::ContextLengthExceeded);
        assert_eq!(error.message, "too long for long");
        assert_eq!(error.retry_after_secs, None);
        assert!(close(fake.samples("short"), 0.0));
        assert!(close(fake.samples("long"), 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_verdict_on_the_request_itself_is_returned_at_once() {
        let fake = Fake::new(&[
            (
                "a",
                2048,
                10,
                Reply::Refuses(ProtocolError::invalid("bad grammar")),
            ),
            ("b", 2048, 20, Reply::Answers),
        ]);
        let error = fake.run(&routing(3, 30, 60)).await.err().unwrap();
        assert_eq!(fake.asked(), ["a"]);
        assert_eq!(error.kind, ErrorKind::InvalidRequest);
        assert_eq!(error.message, "bad grammar");
        assert_eq!(error.retry_after_secs, None);
        assert!(close(fake.samples("a"), 0.0));
        assert_eq!(fake.worker("a").in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_picks_run_out_the_last_failure_is_the_reason() {
        let fake = Fake::new(&[
            (
                "a",
                2048,
                10,
                Reply::Refuses(ProtocolError::unavailable("a is full")),
            ),
            ("b", 2048, 20, Reply::Silent),
        ]);
        let error = fake.run(&routing(3, 30, 60)).await.err().unwrap();
        assert_eq!(fake.asked(), ["a", "b"]);
        assert_eq!(
            error.message,
            "a worker sent no first token within 30.0 s (workers tried: 2)"
        );
        assert_eq!(error.retry_after_secs, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_worker_to_pick_the_market_says_why() {
        let fake = Fake::new(&[("a", 2048, 10, Reply::Answers)]);
        fake.worker("a").set_healthy(false);
        let error = fake.run(&routing(3, 30, 60)).await.err().unwrap();
        assert!(fake.asked().is_empty());
        assert_eq!(error.kind, ErrorKind::Unavailable);
        assert_eq!(
            error.message,
            "no worker for model 'm' can take the request now (workers tried: 0)"
        );
        assert_eq!(error.retry_after_secs, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_workers_own_retry_time_is_passed_on() {
        let mut busy = ProtocolError::unavailable("queue full");
        busy.retry_after_secs = Some(9);
        let fake = Fake::new(&[("a", 2048, 10, Reply::Refuses(busy))]);
        let error = fake.run(&routing(3, 30, 60)).await.err().unwrap();
        assert_eq!(error.message, "queue full (workers tried: 1)");
        assert_eq!(error.retry_after_secs, Some(9));
    }

    /// REVIEW, fixed: a worker that cannot open a sealed request (`DoesNotOpen`, `NotARecipient`:
    /// unavailable, so that the proxy tries another recipient) is held to have failed, though
    /// an honest worker never fails to open what was sealed to its current key: the fault is
    /// the sender's. Any client with a contract can seal garbage to up to four honest workers
    /// (their fingerprints are public) at no cost (the request is never served, so never
    /// billed) and drive their success rate, by which the market divides their score and which
    /// is kept on disk, towards zero, steering traffic away from them; and every gateway whose
    /// candidate list predates a worker's restart (fresh key, same identity) does the same by
    /// accident until its list expires. Fix: the worker answers a request it cannot open with a
    /// marked refusal (as `WORKER_DRAINING` is) that failover routes around without recording
    /// an outcome.
    #[tokio::test(start_paused = true)]
    async fn review_a_sealed_request_a_worker_cannot_open_is_not_held_against_it() {
        for cannot_open in [
            cocoon_seal::SealError::DoesNotOpen("the request's key"),
            cocoon_seal::SealError::NotARecipient,
        ] {
            // What the worker answers (its `Sealing::open` error, as it crosses the wire).
            let refusal = ProtocolError::from(cannot_open.clone());
            let fake = Fake::new(&[
                ("a", 2048, 10, Reply::Refuses(refusal)),
                ("b", 2048, 20, Reply::Answers),
            ]);
            let begun = fake.run(&routing(3, 30, 60)).await.unwrap();
            assert_eq!(begun.answer, "b");
            assert_eq!(fake.asked(), ["a", "b"]);
            assert!(
                close(fake.samples("a"), 0.0),
                "worker a's record holds a failure for a request it could not open \
                 ({cannot_open}): anyone can seal garbage to it"
            );
        }
    }
}
