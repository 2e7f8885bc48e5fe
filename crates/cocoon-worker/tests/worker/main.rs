//! The worker's own end-to-end tests, on the testkit's in-process network with a scripted
//! backend (no model, no llama.cpp): it joins over mutual RA-TLS, keeps the payouts it is
//! handed, leaves when stopped and comes back, and rejoins a proxy that restarted.

use std::time::Duration;

use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::{DevNetwork, network};
use cocoon_testkit::http::*;
use serde_json::json;

async fn ask(net: &DevNetwork, tokens: u32) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"max_tokens": tokens})))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_and_keeps_a_payout_for_what_it_served() {
    let b = Scripted::new(2048);
    let net = network(vec![b.clone()]).await;
    let (status, answer) = ask(&net, 3).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "ttt");
    assert_eq!(b.served(), 1);
    // The proxy hands the worker its signed payout with the answer; the worker keeps it.
    let payouts = net.worker_payouts(0).expect("payments are on").clone();
    wait_until(
        "the worker to hold a payout",
        Duration::from_secs(10),
        || payouts.owed().values().any(|&units| units > 0),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_leaves_and_a_restarted_one_serves_again() {
    let b = Scripted::new(2048);
    let mut net = network(vec![b.clone()]).await;
    net.stop_worker(0);
    wait_until("the worker to leave", Duration::from_secs(10), || {
        net.proxy_status().workers.is_empty()
    })
    .await;
    // No worker serves the model now: the gateway says so rather than waiting.
    let (status, answer) = ask(&net, 2).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_found", "{answer}");
    assert_eq!(b.served(), 0);

    net.start_worker(0);
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    let (status, answer) = ask(&net, 2).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(b.served(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rejoins_a_proxy_that_restarted() {
    let b = Scripted::new(2048);
    let mut net = network(vec![b.clone()]).await;
    assert_eq!(ask(&net, 1).await.0, 200);
    net.restart_proxy().await.unwrap();
    // The worker dials again on its own (backoff 500 ms in the dev network).
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    let (status, answer) = ask(&net, 2).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(b.served(), 2);
}
