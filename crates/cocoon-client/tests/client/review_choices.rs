//! Review of `n > 1` at the gateway (each choice a request of its own through the network,
//! all under way at once, choice i seeded seed + i): money (API key holds, tickets, bills and
//! receipts of choices that start, finish or fail apart), the streamed interleaving, and the
//! gathered path. Each test names its threat; one that fails shows a finding.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cocoon_client::{AccessConfig, ApiKey};
use cocoon_protocol::{
    FinishReason, GenerateEvent, GenerateRequest, ModelCard, ProtocolError, ToolCall, Usage,
};
use cocoon_testkit::backends::{PROMPT_TOKENS, model_card};
use cocoon_testkit::cocoon_engine::{Backend, EventStream, StatsSnapshot};
use cocoon_testkit::dev::{DevNetwork, DevOptions, test_options};
use cocoon_testkit::http::{chat_body, sse_data};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::scripted::start;

const KEY: &str = "sk-cocoon-review-choices-0123";

fn keyed(tokens_per_day: Option<u64>) -> DevOptions {
    DevOptions {
        gateway_access: AccessConfig {
            keys: vec![ApiKey {
                key: Some(KEY.into()),
                key_file: None,
                name: "review".into(),
                tokens_per_day,
            }],
            ..AccessConfig::default()
        },
        ..test_options()
    }
}

/// The network with `options` and one worker serving `backend`, once it joined.
async fn start_with(options: DevOptions, backend: Arc<dyn Backend>) -> DevNetwork {
    let net = DevNetwork::start(options, vec![backend])
        .await
        .expect("the dev network starts");
    net.wait_ready(1, Duration::from_secs(20))
        .await
        .expect("the worker joins");
    net
}

fn delta() -> GenerateEvent {
    GenerateEvent::Delta {
        text: "t".into(),
        tokens: 1,
        logprobs: Vec::new(),
    }
}

/// Answers by the request's seed, so each choice of an `n` request (seeded seed + i) does a
/// thing of its own: an even seed answers `max_tokens` tokens "t" (`gap` apart) and ends with
/// exact usage ([`PROMPT_TOKENS`] prompt tokens); an odd seed sends one token, waits
/// `fail_after`, and fails.
struct BySeed {
    gap: Duration,
    fail_after: Duration,
    /// Answers generated to their end (their `done` taken by the worker): an answer cancelled
    /// before its end is not counted.
    finished: Arc<AtomicU64>,
}

impl BySeed {
    fn new(gap: Duration, fail_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            gap,
            fail_after,
            finished: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl Backend for BySeed {
    fn models(&self) -> Vec<ModelCard> {
        model_card(2048)
    }

    fn capacity(&self) -> u32 {
        4
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        let seed = request.params.seed.unwrap_or(0);
        if seed % 2 == 1 {
            let fail_after = self.fail_after;
            let error = futures_util::stream::once(async move {
                tokio::time::sleep(fail_after).await;
                GenerateEvent::Error {
                    error: ProtocolError::unavailable("this choice broke off (scripted)"),
                }
            });
            return Box::pin(futures_util::stream::iter([delta()]).chain(error));
        }
        let tokens = request.params.max_tokens.unwrap_or(4);
        let gap = self.gap;
        let deltas = futures_util::stream::iter(0..tokens).then(move |i| async move {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            delta()
        });
        let finished = self.finished.clone();
        let done = futures_util::stream::once(async move {
            finished.fetch_add(1, Ordering::SeqCst);
            GenerateEvent::Done {
                finish_reason: FinishReason::Length,
                usage: Usage::new(PROMPT_TOKENS, tokens),
                billing: None,
            }
        });
        Box::pin(deltas.chain(done))
    }

    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
}

/// REVIEW, fixed (threat 1, money / daily limit): a request with `n > 1` and no `max_tokens` on a key
/// with `tokens_per_day`. Each choice takes its hold in turn, and a hold without `max_tokens`
/// takes *all that is left of the day* (`KeyUse::hold`): choice 0 holds the whole day, choice
/// 1 finds nothing left and is refused, so the request is refused (429) -- every time, on any
/// limited key. Worse, choice 0 was already sent (its worker generated up to the day's worth of
/// tokens, which the proxy bills), and when its `Started` is dropped its `KeyHold` counts in
/// full: the refused request used up the key's whole day. Expected: the request is served (the
/// day split between the choices, or each choice capped so that all fit), and in any case a
/// refused request does not spend the key's day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_n_without_max_tokens_on_a_limited_key_is_refused_and_burns_the_day() {
    let (net, b) = start(keyed(Some(1000))).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat_body("Hi", json!({"n": 2})))
        .send()
        .await
        .unwrap();
    let n2 = r.status().as_u16();
    let n2_body: Value = r.json().await.unwrap();
    let generated = b.served();
    // The prompt's bound (74 for "Hi") and 3 tokens: far within a 1000-token day.
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat_body("Hi", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    let next = r.status().as_u16();
    let next_body: Value = r.json().await.unwrap();
    assert!(
        n2 == 200 && next == 200,
        "n=2 without max_tokens on a 1000-token key: {n2} {n2_body} (after {generated} \
         choice(s) reached the worker); then a 77-token request: {next} {next_body}"
    );
    assert_eq!(n2_body["choices"].as_array().map(Vec::len), Some(2));
}

/// REVIEW, fixed (threat 1, money / daily limit): choice 1 of an `n = 2` request is refused by the
/// key's daily limit after choice 0 took its hold. `join_all` still sends choice 0 to the
/// network (its worker answers, the proxy bills it) and then drops it, and the dropped
/// `KeyHold` counts its whole hold as used: a request answered 429 spends the key's day and
/// the contract's money. Here a 100-token day, two choices of 77 (prompt bound 74 and
/// max_tokens 3): the request is refused, and then a lone 77-token request, which fits the
/// day, is refused too. Expected: what the key allows is checked for all `n` choices before
/// any is sent; a refused request reaches no worker and leaves the day as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_n_refused_by_the_daily_limit_spends_the_choices_already_sent() {
    let (net, b) = start(keyed(Some(100))).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat_body("Hi", json!({"n": 2, "max_tokens": 3})))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(status, 429, "two choices of 77 on a 100-token day: {body}");
    let reached = b.served();
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat_body("Hi", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    let next = r.status().as_u16();
    let next_body = r.text().await.unwrap();
    assert!(
        reached == 0 && next == 200,
        "the refused n=2 request reached the worker {reached} time(s); a 77-token request on \
         the untouched 100-token day then got {next}: {next_body}"
    );
}

/// REVIEW, fixed (threat 1, money): the proxy admits at most `[limits] concurrent_requests` (16 by
/// default) requests of this gateway at once, and the `n` choices all go at once. Past it,
/// the proxy refuses some choices (429, not retried), and "one refused choice refuses the
/// request" -- after the choices it admitted were sent: their workers generate, the proxy
/// bills what it relayed, and the gateway throws the answers away. With the default limit, an
/// `n = 16` request fails so whenever any other request of the gateway is in flight. Here the
/// limit is 2 and `n` is 3. Expected: either the request is served (choices past the proxy's
/// limit wait for a slot, or `n` is held to what the proxy admits), or it is refused before any
/// choice reaches a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_n_past_the_proxys_concurrency_limit_pays_for_choices_thrown_away() {
    let mut options = test_options();
    options.limits.concurrent_requests = 2;
    let (net, b) = start(options).await;
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"n": 3, "max_tokens": 3})))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    let reached = b.served();
    assert!(
        status == 200 || reached == 0,
        "n=3 through a proxy that admits 2 at once: {status} {body}, after {reached} \
         choice(s) reached the worker and were thrown away"
    );
}

/// REVIEW, fixed (threat 2, streamed path with `include_usage`): choice 0 of a streamed `n = 2`
/// answer ends (its `done` with the proxy's bill comes), then choice 1 fails. With
/// `include_usage` the bills are judged only once *every* choice is done (`Phase::Usage`), so
/// choice 0's bill, in hand, is never judged: `Parties::verdict` never runs for it, so its
/// API key hold counts in full instead of the 8 tokens it used, the worker's receipt is never
/// kept (`GET /v1/receipts/{id}` answers 404 for an id the answer's `cocoon-request-id` named),
/// and the bill itself is left to a late ask of the proxy. The same happens when the app
/// disconnects after some choices are done. Expected: a choice's bill is judged when its
/// `done` comes (or at the latest when the stream ends), whatever becomes of the others.
///
/// Here a 300-token day: two choices hold 77 each (prompt bound 74, max_tokens 3); choice 0
/// uses 8, choice 1 ends without usage (its 77 count): 85 used, 215 left, so a request of 174
/// (max_tokens 100) fits -- unless choice 0's hold counted whole (154 used, 146 left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_finished_choice_of_a_stream_another_choice_cut_is_never_judged() {
    let backend = BySeed::new(Duration::ZERO, Duration::from_millis(1500));
    let net = start_with(keyed(Some(300)), backend).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat_body(
            "Hi",
            json!({"n": 2, "seed": 0, "max_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ids: Vec<String> = r
        .headers()
        .get(cocoon_protocol::REQUEST_ID_HEADER)
        .expect("a sealed answer names its receipts")
        .to_str()
        .unwrap()
        .split(',')
        .map(|id| id.trim().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let text = r.text().await.unwrap();
    let events = sse_data(&text);
    let finished_0 = events.iter().any(|e| {
        e["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["index"] == 0 && c["finish_reason"].is_string())
    });
    assert!(finished_0, "choice 0 did not finish first: {text}");
    assert!(
        events.iter().any(|e| e["error"].is_object()),
        "choice 1 did not fail: {text}"
    );
    let receipt = http
        .get(format!("{}/receipts/{}", net.gateway_url(), ids[0]))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat_body("Hi", json!({"max_tokens": 100})))
        .send()
        .await
        .unwrap();
    let next = r.status().as_u16();
    let next_body = r.text().await.unwrap();
    assert!(
        receipt == 200 && next == 200,
        "choice 0 finished, yet its receipt is {receipt} and the key's day counted its whole \
         hold (a 174-token request on 215 left got {next}: {next_body})"
    );
}

/// REVIEW, fixed (threat 1, money, gathered path): one choice of a gathered `n = 2` answer fails
/// while the other is still generating. The choices are gathered with `join_all`, which waits
/// for every one of them: the other choice generates to its end, is billed, and is thrown
/// away with the request's error (the app pays for an answer it never sees, and waits for
/// it). Expected: the first failure ends the request at once and cancels the choices still
/// under way (as the streamed path does by dropping their readers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_failed_gathered_choice_lets_the_others_generate_to_their_end() {
    // Choice 0 (seed 0): 40 tokens, 100 ms apart (about 4 s); choice 1 (seed 1): fails at once.
    let backend = BySeed::new(Duration::from_millis(100), Duration::ZERO);
    let net = start_with(test_options(), backend.clone()).await;
    let http = reqwest::Client::new();
    let began = Instant::now();
    let r = http
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body(
            "Hi",
            json!({"n": 2, "seed": 0, "max_tokens": 40}),
        ))
        .send()
        .await
        .unwrap();
    let took = began.elapsed();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_ne!(status, 200, "{body}");
    // Long enough for choice 0 to have ended had it not been cancelled.
    tokio::time::sleep(Duration::from_millis(5500).saturating_sub(began.elapsed())).await;
    let finished = backend.finished.load(Ordering::SeqCst);
    assert!(
        took < Duration::from_millis(2000) && finished == 0,
        "the failed request answered {status} after {took:?}, and {finished} other choice(s) \
         generated to the end (billed, thrown away): {body}"
    );
}

/// Calls a function: a request seeded 1 gets a tool call and ends with `tool_calls`; any other
/// gets one token "t".
struct Caller;

impl Backend for Caller {
    fn models(&self) -> Vec<ModelCard> {
        model_card(2048)
    }

    fn capacity(&self) -> u32 {
        4
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        let (first, finish_reason) = match request.params.seed {
            Some(1) => (
                GenerateEvent::ToolCall {
                    call: ToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: r#"{"city":"Paris"}"#.into(),
                    },
                    tokens: 3,
                },
                FinishReason::ToolCalls,
            ),
            _ => (delta(), FinishReason::Stop),
        };
        let tokens = match &first {
            GenerateEvent::ToolCall { tokens, .. } => *tokens,
            _ => 1,
        };
        Box::pin(futures_util::stream::iter([
            first,
            GenerateEvent::Done {
                finish_reason,
                usage: Usage::new(PROMPT_TOKENS, tokens),
                billing: None,
            },
        ]))
    }

    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
}

/// REVIEW, fixed (outside `n`, found on the way: the tool-call change, 8368262): a `tool_call` event
/// in clear ends the event stream. `EventReader::next` (cocoon-net `body.rs`) marks a stream
/// finished after any event but `Delta`, `Reasoning` and `Sealed`, so after a clear
/// `ToolCall` it returns `None`: the proxy's relay reads that as the worker failing
/// (`End::WorkerFailed`) and the gateway's as an answer cut early. Every answer that calls a
/// tool through a gateway without `[worker_policy]` (unsealed) fails; sealed answers carry the
/// call inside a `Sealed` chunk and pass, which is why the tests (all sealed) miss it.
/// Expected: a tool call in clear is answered like a sealed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_tool_call_in_clear_ends_the_answer() {
    let options = DevOptions {
        sealed: false,
        ..test_options()
    };
    let net = start_with(options, Arc::new(Caller)).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    // The unsealed path itself works: a plain answer.
    let plain: Value = http
        .post(&url)
        .json(&chat_body("Hi", json!({"seed": 0, "max_tokens": 4})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(plain["choices"][0]["message"]["content"], "t", "{plain}");
    let r = http
        .post(&url)
        .json(&chat_body(
            "Hi",
            json!({"seed": 1, "max_tokens": 4,
                   "tools": [{"type": "function", "function": {"name": "get_weather"}}]}),
        ))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let called: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{called}");
    assert_eq!(
        called["choices"][0]["finish_reason"], "tool_calls",
        "{called}"
    );
    assert_eq!(
        called["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather",
        "{called}"
    );
}
