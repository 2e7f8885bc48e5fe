//! The market end to end through the gateway: prices (the worker's ask, the client's cap,
//! the bill at the serving worker's price), failover before the first token (a worker that
//! refuses or stalls is replaced without the client noticing), a clean end and a charge for
//! delivered tokens only when a worker dies mid-stream, and `GET /v1/network`
//! (the gateway's failover between proxies is `cocoon-client`'s test), and a worker that
//! overstates its token counts: billed at the bound, then barred.
//!
//! The backends are test doubles whose behaviour the test switches, so what is measured is
//! the proxy's routing, not a model's timing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_engine::Backend;
use cocoon_proxy::RoutingConfig;
use cocoon_testkit::backends::{Mode, Scripted};
use cocoon_testkit::dev::{DevNetwork, DevOptions, test_options};
use cocoon_testkit::http::*;
use cocoon_worker::PriceConfig;
use serde_json::{Value, json};

async fn start(prices: &[u64], routing: RoutingConfig) -> (DevNetwork, Vec<Arc<Scripted>>) {
    let backends = prices.iter().map(|_| Scripted::new(2048)).collect();
    start_with(backends, prices, routing).await
}

async fn start_with(
    backends: Vec<Arc<Scripted>>,
    prices: &[u64],
    routing: RoutingConfig,
) -> (DevNetwork, Vec<Arc<Scripted>>) {
    let net = DevNetwork::start(
        DevOptions {
            routing,
            worker_prices: prices
                .iter()
                .map(|p| PriceConfig {
                    default: *p,
                    ..PriceConfig::default()
                })
                .collect(),
            ..test_options()
        },
        backends
            .iter()
            .map(|b| b.clone() as Arc<dyn Backend>)
            .collect(),
    )
    .await
    .unwrap();
    net.wait_ready(prices.len() as u32, Duration::from_secs(20))
        .await
        .unwrap();
    (net, backends)
}

async fn ask(net: &DevNetwork, extra: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", extra))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_price_cap_routes_the_bill_follows_the_worker_and_the_network_shows_it() {
    // The network's floor is 20 nanoton a token; one worker asks 30, the other the floor.
    let (net, b) = start(&[30, 0], RoutingConfig::default()).await;
    let models = get_json(
        &reqwest::Client::new(),
        format!("{}/models", net.gateway_url()),
    )
    .await;
    assert_eq!(models["data"][0]["min_price"], 20, "{models}");
    assert_eq!(models["data"][0]["max_price"], 30);

    // Capped at 25: only the worker at the floor qualifies.
    let (status, answer) = ask(&net, json!({"max_tokens": 4, "max_price": 25})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((b[0].served(), b[1].served()), (0, 1));
    let bill = &answer["usage"]["billing"];
    assert_eq!(bill["price_per_token"], 20, "{answer}");
    assert_eq!(bill["weighted_tokens"], 9);
    assert_eq!(bill["billed_tokens"], 9);
    assert_eq!(answer["usage"]["bill_verified"], true);

    // That worker refuses now: under the cap nobody else can serve, so the client is told.
    b[1].set(Mode::Refuse);
    let (status, answer) = ask(&net, json!({"max_tokens": 4, "max_price": 25})).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("overloaded"),
        "{answer}"
    );
    // Uncapped, the dearer worker serves it, and the bill is at its price: 9 tokens at 30 are
    // 13 units of 20 (13.5, rounded in the client's favour).
    let (status, answer) = ask(&net, json!({"max_tokens": 4})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(b[0].served(), 1);
    let bill = &answer["usage"]["billing"];
    assert_eq!(
        (
            &bill["price_per_token"],
            &bill["billed_tokens"],
            &bill["cost"]
        ),
        (&json!(30), &json!(13), &json!(260)),
        "{answer}"
    );
    assert_eq!(answer["usage"]["bill_verified"], true);

    // Under the floor nothing can serve, whatever the workers ask.
    let (status, answer) = ask(&net, json!({"max_tokens": 4, "max_price": 10})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at or below max_price 10 nanoton per token; the cheapest asks 20"),
        "{answer}"
    );

    // The network as the gateway sees it: its proxy, the models, their prices and the load in
    // aggregate; no other peer's name, key, record or refusal, and not the ledger.
    let view = get_json(
        &reqwest::Client::new(),
        format!("{}/network", net.gateway_url()),
    )
    .await;
    assert_eq!(view["proxies"][0]["state"], "up", "{view}");
    let network = &view["network"];
    assert_eq!(network["price_floor"], 20, "{view}");
    assert_eq!(network["models"][0]["min_price"], 20);
    assert_eq!(network["models"][0]["max_price"], 30);
    assert_eq!(network["load"]["workers"], 2, "{view}");
    assert_eq!(network["load"]["healthy_workers"], 2, "{view}");
    assert_eq!(network["load"]["in_flight"], 0, "{view}");
    for hidden in [
        "workers",
        "recent_refusals",
        "payments",
        "worker_quote_cache",
    ] {
        assert!(
            network.get(hidden).is_none(),
            "{hidden} shown to a client: {view}"
        );
    }
    let full = serde_json::to_string(&net.proxy_status()).unwrap();
    let shown = view.to_string();
    for w in net.proxy_status().workers {
        assert!(full.contains(&w.fingerprint));
        assert!(
            !shown.contains(&w.fingerprint),
            "a worker's key shown: {view}"
        );
    }
    // The operator's status has the workers, their prices and records.
    let workers = net.proxy_status().workers;
    assert_eq!(workers.len(), 2);
    let by_price = |p: u64| {
        workers
            .iter()
            .find(|w| w.offers[0].price == p)
            .unwrap_or_else(|| panic!("no worker asking {p}: {workers:?}"))
    };
    let (dear, cheap) = (by_price(30), by_price(0));
    assert_eq!(dear.served, 1);
    assert_eq!(dear.reputation.success_rate, 1.0);
    // One refusal against one success (and the prior a fresh worker starts with).
    assert!(cheap.reputation.success_rate < 0.7, "{cheap:?}");
    assert_eq!(cheap.in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_before_the_first_token_fail_over_unseen_and_deaths_mid_stream_end_cleanly() {
    let routing = RoutingConfig {
        first_token_timeout_secs: 1,
        start_deadline_secs: 10,
        ..RoutingConfig::default()
    };
    // The cheap worker is everyone's first choice.
    let (net, b) = start(&[20, 40], routing).await;
    b[0].set(Mode::Stall);
    let started = Instant::now();
    let (status, answer) = ask(&net, json!({"max_tokens": 3})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "ttt");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(b[1].served(), 1);
    assert_eq!(answer["usage"]["billing"]["price_per_token"], 40);
    // The stall cost the cheap worker its standing: the next request goes straight to the
    // other one.
    let status_of = |net: &DevNetwork, price: u64| {
        net.proxy_status()
            .workers
            .into_iter()
            .find(|w| w.offers[0].price == price)
            .unwrap()
    };
    assert!(status_of(&net, 20).reputation.success_rate < 0.5);
    let started = Instant::now();
    assert_eq!(ask(&net, json!({"max_tokens": 3})).await.0, 200);
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(b[1].served(), 2);

    // Both refuse: the client gets one clean 503 that says how many were tried.
    b[0].set(Mode::Refuse);
    b[1].set(Mode::Refuse);
    let (status, answer) = ask(&net, json!({"max_tokens": 3})).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workers tried: 2"),
        "{answer}"
    );

    // A worker that breaks off after two tokens: the stream ends with an error event, and
    // only the two tokens it delivered are billed.
    b[0].set(Mode::DieAfterTwo);
    b[1].set(Mode::DieAfterTwo);
    let before = net.proxy_status().payments.unwrap().uncommitted_tokens;
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"max_tokens": 6, "stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "tt", "{events:?}");
    let error = events
        .last()
        .filter(|e| e.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event at the end: {events:?}"));
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed after 2 tokens"), "{message}");
    // 2 tokens at the serving worker's price (20 or 40): 2 or 4 units.
    let units: u64 = message
        .split("were billed (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no units in {message}"));
    assert!(units == 2 || units == 4, "{message}");
    let after = net.proxy_status().payments.unwrap().uncommitted_tokens;
    // A commit may have landed in between; the book's count is what matters then.
    assert!(
        after == before + units || after < before,
        "{before} → {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_long_for_one_worker_goes_to_one_with_a_longer_context() {
    // The cheap worker, everyone's first choice, has the short context.
    let backends = vec![Scripted::new(512), Scripted::new(512), Scripted::new(4096)];
    let (net, b) = start_with(backends, &[20, 20, 40], RoutingConfig::default()).await;
    let (status, answer) = ask(&net, json!({"max_tokens": 1000})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(b[2].served(), 1);
    assert_eq!(answer["usage"]["completion_tokens"], 1000);
    // Not held against the short ones: refusing what does not fit is no failure.
    for w in net.proxy_status().workers {
        assert_eq!(w.reputation.success_rate, 1.0, "{w:?}");
    }
    // Too long for every worker: the client gets the verdict of the longest context (the
    // other short worker is not asked in between).
    let (status, answer) = ask(&net, json!({"max_tokens": 5000})).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "context_length_exceeded");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("do not fit a context of 4096"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_overstates_its_counts_is_billed_at_the_bound_then_barred() {
    // The worker at the floor (the only one a cap of 25 admits) claims about 4·10⁹ tokens for
    // every prompt, every one-byte delta and every completion; the other is honest, at 30.
    let liar = Scripted::new(2048);
    liar.set(Mode::Overreport);
    let (net, _) = start_with(
        vec![liar.clone(), Scripted::new(2048)],
        &[0, 30],
        RoutingConfig::default(),
    )
    .await;
    // The liar asks the floor (its price shows as 0 or 20), the honest one 30.
    let liar_fingerprint = net
        .proxy_status()
        .workers
        .iter()
        .find(|w| w.offers.iter().all(|o| o.price < 30))
        .expect("the worker at the floor joined")
        .fingerprint
        .clone();
    let breaches = RoutingConfig::default().evict_after_overreports;
    let mut billed = 0;
    for i in 0..breaches {
        let (status, answer) = ask(&net, json!({"max_tokens": 4, "max_price": 25})).await;
        assert_eq!(status, 200, "{answer}");
        let usage = &answer["usage"];
        // "Hi" is 2 bytes in one message: at most 2 + 8 template tokens, + 64 for the
        // conversation; 4 one-byte deltas are at most 4 tokens (max_tokens).
        assert_eq!(usage["prompt_tokens"], 74, "{answer}");
        assert_eq!(usage["completion_tokens"], 4, "{answer}");
        // Billed at the floor for those 78 tokens: the reservation, and the gateway's check
        // agrees.
        let bill = &usage["billing"];
        assert_eq!(bill["weighted_tokens"], 78, "{answer}");
        assert_eq!(bill["billed_tokens"], 78, "{answer}");
        assert_eq!(usage["cost"], 78 * 20, "{answer}");
        assert_eq!(usage["bill_verified"], true, "{answer}");
        billed += 78;
        if i == 0 {
            let status = net.proxy_status();
            let worker = status
                .workers
                .iter()
                .find(|w| w.fingerprint == liar_fingerprint)
                .unwrap();
            assert!(worker.reputation.success_rate < 0.5, "{worker:?}");
            // Its inflated counts bought it no speed: its time to first token and speed are
            // still the priors a worker starts with, as the honest one's (not yet asked) are.
            let honest = status
                .workers
                .iter()
                .find(|w| w.fingerprint != liar_fingerprint)
                .unwrap();
            assert_eq!(
                (
                    worker.reputation.ttft_secs,
                    worker.reputation.tokens_per_sec
                ),
                (
                    honest.reputation.ttft_secs,
                    honest.reputation.tokens_per_sec
                ),
                "{worker:?} {honest:?}"
            );
        }
    }
    // Every charge signed is one of those bounded bills, nothing more.
    let payments = net.proxy_status().payments.unwrap();
    assert_eq!(payments.uncommitted_tokens, billed, "{payments:?}");
    // After the last breach it is disconnected, and refused when it comes back.
    wait_until("the worker to be barred", Duration::from_secs(20), || {
        let status = net.proxy_status();
        status
            .workers
            .iter()
            .all(|w| w.fingerprint != liar_fingerprint)
            && status
                .recent_refusals
                .iter()
                .any(|r| r.fingerprint == liar_fingerprint && r.reason.contains("barred"))
    })
    .await;
    let (status, answer) = ask(&net, json!({"max_tokens": 4, "max_price": 25})).await;
    assert_ne!(status, 200, "{answer}");
    // The honest worker serves on, with exact counts.
    let (status, answer) = ask(&net, json!({"max_tokens": 4})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], 5, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
}

/// REVIEW LEAK: worker names are the operator's (the client's status shows none), but a worker
/// that sent no first token in time was named to the client in the refusal ("worker
/// 'dev-worker-0' sent no first token within 1.0 s").
///
/// Now: the client is told that a worker sent no first token in time, not which one; the name
/// stays in the proxy's log and the operator's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_stalled_worker_is_not_named_to_the_client() {
    let routing = RoutingConfig {
        first_token_timeout_secs: 1,
        start_deadline_secs: 3,
        ..RoutingConfig::default()
    };
    let (net, b) = start(&[20], routing).await;
    let name = net.proxy_status().workers[0].name.clone();
    b[0].set(Mode::Stall);
    let (status, answer) = ask(&net, json!({"max_tokens": 3})).await;
    assert_ne!(status, 200, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no first token"), "{answer}");
    assert!(
        !message.contains(&name),
        "the client was told the worker's name '{name}': {message}"
    );
}

/// A streamed request of `max_tokens` (usage included) in the background, once `backend` (the
/// only one serving now) has begun it: its body, or `None` if it broke off.
async fn streaming(
    net: &DevNetwork,
    backend: &Scripted,
    max_tokens: u32,
) -> tokio::task::JoinHandle<Option<String>> {
    let served = backend.served();
    let url = format!("{}/chat/completions", net.gateway_url());
    let stream = tokio::spawn(async move {
        let body = chat_body(
            "hi",
            json!({"max_tokens": max_tokens, "stream": true,
                   "stream_options": {"include_usage": true}}),
        );
        match reqwest::Client::new().post(&url).json(&body).send().await {
            Ok(answer) => answer.text().await.ok(),
            Err(_) => None,
        }
    });
    wait_until("the stream begins", Duration::from_secs(10), || {
        backend.served() == served + 1
    })
    .await;
    stream
}

/// A worker told to stop finishes the answer it is streaming (its drain), while the requests
/// that arrive meanwhile are refused there and served by another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_finishes_its_stream_and_new_requests_go_elsewhere() {
    let (a, b) = (Scripted::new(2048), Scripted::new(2048));
    a.pace(Duration::from_millis(100));
    let mut net = DevNetwork::start(
        DevOptions {
            drain_secs: 10,
            ..test_options()
        },
        vec![a.clone() as Arc<dyn Backend>, b.clone()],
    )
    .await
    .unwrap();
    net.wait_ready(2, Duration::from_secs(20)).await.unwrap();
    // The stream goes to a: b refuses until it has begun.
    b.set(Mode::Refuse);
    let stream = streaming(&net, &a, 10).await;
    b.set(Mode::Serve);
    net.stop_worker(0);
    // A new request: a refuses it (it is stopping), b serves it.
    let (status, answer) = ask(&net, json!({"max_tokens": 2})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((a.served(), b.served()), (1, 1));
    // a's stream was not cut.
    let events = sse_data(&stream.await.unwrap().expect("the stream was answered"));
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "{events:?}"
    );
    let usage = events
        .iter()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
        .unwrap_or_else(|| panic!("no usage: {events:?}"));
    assert_eq!(usage["completion_tokens"], 10, "{usage}");
}

/// REVIEW, fixed: a worker that drains is punished for it. While it stops, the worker refuses new
/// requests with a plain `Unavailable` ("this worker is shutting down"), and the proxy, which
/// does not know it is draining, keeps picking it (it stays healthy, with free capacity) and
/// records each refusal as a failure (`Outcome::Failed` in failover), exactly as it would a
/// broken worker. A rolling restart under load thus costs every worker standing in proportion
/// to the traffic during its `drain_secs`, kept in the reputation file it finds on its return,
/// and spends one of each request's `max_attempts` on a worker that cannot serve it. Fix: the
/// worker says it is draining in a way the proxy recognises (a distinct error kind or header,
/// or a message on the connection); the proxy then stops routing to it and records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_draining_worker_loses_no_standing_for_the_requests_it_turns_away() {
    let a = Scripted::new(2048);
    a.pace(Duration::from_millis(250));
    let mut net = DevNetwork::start(
        DevOptions {
            drain_secs: 20,
            ..test_options()
        },
        vec![a.clone() as Arc<dyn Backend>],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    // An answer of about 10 s keeps the worker draining (and connected) meanwhile.
    let _stream = streaming(&net, &a, 40).await;
    let before = net.proxy_status().workers[0].clone();
    net.stop_worker(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The only worker is draining: the request is refused, as it should be.
    let (status, answer) = ask(&net, json!({"max_tokens": 2})).await;
    assert_ne!(status, 200, "{answer}");
    let after = net
        .proxy_status()
        .workers
        .into_iter()
        .find(|w| w.fingerprint == before.fingerprint)
        .expect("the worker stays connected while it drains");
    assert!(
        after.reputation.success_rate >= before.reputation.success_rate,
        "turning a request away while draining was recorded as a failure: {:?} -> {:?}",
        before.reputation,
        after.reputation
    );
}

/// REVIEW, fixed: an answer cut at the drain deadline is billed after the last commit, or not at all.
/// When `drain_secs` runs out, `Proxy::run` cancels `stop`, which at the same moment cuts the
/// connections and wakes the commit loop for its last commit and `Billing::close`. The cut
/// answer's relay task (spawned apart from the connection, and no longer counted by anything
/// the drain waits for) only then sees its client or worker gone and settles the tokens it
/// delivered: that charge lands after the last commit's snapshot (uncommitted at exit), or
/// after `close` (the settlement fails: the client got the tokens free and the worker is
/// never paid for them). Fix: after cutting, wait (briefly, bounded) for the relay tasks to
/// settle (e.g. a `TaskTracker` the answers run on, or a global in-flight count they hold
/// until `relay` returns), then cancel the commit loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_an_answer_cut_at_the_drain_deadline_is_billed_and_committed() {
    let a = Scripted::new(2048);
    a.pace(Duration::from_millis(200));
    let mut net = DevNetwork::start(
        DevOptions {
            drain_secs: 1,
            // No periodic commit: only the proxy's last commit can carry the charge.
            commit_interval_secs: 3600,
            ..test_options()
        },
        vec![a.clone() as Arc<dyn Backend>],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    // About 8 s of answer: the 1 s drain cuts it after a few tokens.
    let _stream = streaming(&net, &a, 40).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    net.stop_proxy().await;
    // Whatever the proxy left running has time to finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let book = cocoon_proxy::Book::open(&net.book_path(), net.proxy_key().unwrap()).unwrap();
    let record = book.client(&net.client_key());
    assert!(
        record.charged > 0,
        "the tokens delivered before the cut were never billed: {record:?}"
    );
    assert_eq!(
        record.committed, record.charged,
        "the cut answer's charge was written after the proxy's last commit: {record:?}"
    );
}
