//! `cocoon status` against a running network's operator listeners: ready or why not, the
//! role's status, its request counts.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::{DevNetwork, DevOptions};
use serde_json::json;

fn status(admin: std::net::SocketAddr) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(["status", &admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cocoon_status_shows_readiness_status_and_counts() {
    let mut net = DevNetwork::start(
        DevOptions {
            admin: true,
            ..test_options()
        },
        vec![Scripted::new(2048) as Arc<dyn cocoon_engine::Backend>],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let answer = http
            .post(format!("{}/chat/completions", net.gateway_url()))
            .json(&chat_body("hi", json!({"max_tokens": 1})))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let proxy = net.proxy_admin().unwrap();
    let shown = status(proxy);
    assert!(shown.contains(&format!("{proxy}: ready")), "{shown}");
    assert!(shown.contains("\"fingerprint\""), "{shown}");
    assert!(
        shown.contains(
            "cocoon_proxy_requests_total{model=\"SmolLM2-135M-Instruct\",outcome=\"served\"} 2"
        ),
        "{shown}"
    );
    let worker = status(net.worker_admin(0).unwrap());
    assert!(
        worker.contains("ready") && worker.contains("\"connected\": true"),
        "{worker}"
    );
    net.stop_worker_until_gone(0).await;
    let shown = status(proxy);
    assert!(
        shown.contains("NOT READY: no healthy worker is connected"),
        "{shown}"
    );
}
