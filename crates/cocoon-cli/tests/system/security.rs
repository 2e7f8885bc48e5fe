//! Who may act on what, end to end: a proxy impostor (a genuine-looking TEE with the right
//! image, but not the proxy's key) gets neither a client's prompt nor a worker, and one client
//! can neither spend, close nor read another client's contract through the proxy.
//!
//! Covered elsewhere and not repeated here: a worker with an image outside the policy
//! (`attestation.rs`), a quote replayed under another key (`cocoon-tls/tests/ratls.rs`), a
//! forged or replayed ledger transaction (`cocoon-ledger/tests/service.rs`).

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use cocoon_client::{ClientConfig, Gateway, ProxyLink};
use cocoon_ledger::{ContractState, Ledger};
use cocoon_proxy::{Proxy, ProxyConfig};
use cocoon_tls::PeerPolicy;
use cocoon_worker::Worker;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A short chat request to a gateway's `chat/completions` URL.
async fn ask(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    content: &str,
) -> reqwest::Response {
    http.post(url)
        .json(&chat_body(content, json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_proxy_gets_no_prompt_and_no_worker() {
    let net = network(vec![llama()]).await;
    let stop = CancellationToken::new();
    // Same attester, same image, its own key: everything but the proxy's identity.
    let impostor = Proxy::bind(
        &ProxyConfig {
            listen: "127.0.0.1:0".into(),
            attester: net.dev_attester(),
            worker_policy: net.dev_policy(),
            ..ProxyConfig::default()
        },
        cocoon_cli::money::LEDGERS,
    )
    .await
    .unwrap();
    let impostor_addr = impostor.local_addr().to_string();
    let impostor_status = impostor.status_handle();
    tokio::spawn(impostor.run(stop.clone()));
    // Pinned to the real proxy's key, as `cocoon dev` writes client.toml and worker.toml.
    let pinned = PeerPolicy {
        fingerprints: vec![net.proxy_fingerprint.to_string()],
        ..net.dev_policy()
    };

    // The dev network's funded client key.
    let key_file = net.dir().join("client.key");
    let gateway_to = |proxy_addr: String| {
        let pinned = pinned.clone();
        let attester = net.dev_attester();
        let key_file = key_file.clone();
        async move {
            let gateway = Gateway::bind(
                &ClientConfig {
                    listen: "127.0.0.1:0".into(),
                    proxy_addr,
                    key_file: Some(key_file),
                    attester,
                    proxy_policy: pinned,
                    ..ClientConfig::default()
                },
                cocoon_cli::money::LEDGERS,
            )
            .await
            .unwrap();
            let url = format!("http://{}/v1/chat/completions", gateway.local_addr());
            tokio::spawn(gateway.run(CancellationToken::new()));
            url
        }
    };
    let http = reqwest::Client::new();
    let fooled = gateway_to(impostor_addr.clone()).await;
    let r = ask(&http, &fooled, "a secret prompt").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("peer certificate refused")
            && message.contains("not among the pinned keys"),
        "{message}"
    );

    // A worker pinned the same way does not join the impostor.
    let identity = Arc::new(
        net.dev_attester()
            .identity(None, "cocoon-worker", "worker", None)
            .unwrap(),
    );
    let worker = Worker::new(
        "pinned-worker",
        impostor_addr,
        llama(),
        identity,
        pinned.build("proxy_policy", "proxy").unwrap(),
        Duration::from_millis(200),
    );
    tokio::spawn(worker.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        impostor_status.status().workers.is_empty(),
        "a pinned worker joined an impostor"
    );

    // The same pinned configuration reaches the real proxy: the key made the difference.
    let genuine = gateway_to(net.proxy_addr.to_string()).await;
    let r = ask(&http, &genuine, "Hi").await;
    assert_eq!(r.status(), 200);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_spend_close_or_read_another_clients_contract() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let proxy = net.proxy_key().unwrap();
    let victim = net.client_key();
    let victim_asks = || {
        ask(
            &http,
            format!("{}/chat/completions", net.gateway_url()),
            "Hi",
        )
    };
    // The victim has been served once, so its contract has a charge to protect.
    let r = victim_asks().await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let counter = answer["usage"]["billing"]["tokens_used"].as_u64().unwrap();
    let ledger = net.ledger().unwrap().clone();
    // Once the proxy's batched commit has landed, nothing should move the contract.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let before = loop {
        let contract = ledger.client(proxy, victim).await.unwrap().unwrap();
        if contract.tokens_used == counter {
            break contract;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "charge never committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Another client: its own key, no contract. It knows the victim's key (keys are public),
    // but a request is always billed to the key that made the TLS handshake.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("other.key");
    let other = Gateway::bind(
        &ClientConfig {
            listen: "127.0.0.1:0".into(),
            proxy_addr: net.proxy_addr.to_string(),
            key_file: Some(key_file.clone()),
            attester: net.dev_attester(),
            proxy_policy: net.dev_policy(),
            ..ClientConfig::default()
        },
        cocoon_cli::money::LEDGERS,
    )
    .await
    .unwrap();
    let other_url = format!("http://{}/v1", other.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(other.run(stop.clone()));
    let r = ask(&http, format!("{other_url}/chat/completions"), "Hi").await;
    assert_eq!(r.status(), 402, "served on someone else's money");

    // Asking the proxy to close "its" contract acts on its own key only.
    let identity = Arc::new(
        net.dev_attester()
            .identity(Some(&key_file), "cocoon-client", "client", None)
            .unwrap(),
    );
    let link = ProxyLink::new(
        net.proxy_addr.to_string(),
        identity,
        net.dev_policy().build("proxy_policy", "proxy").unwrap(),
    );
    let refused = link.close_contract().await.unwrap_err();
    assert!(
        !refused.message.is_empty() && refused.message.to_lowercase().contains("contract"),
        "{refused}"
    );

    // What the proxy shows any client is its own aggregate, never a client's account.
    let status = serde_json::to_value(net.proxy_status()).unwrap();
    let text = status.to_string();
    assert!(!text.contains(&hex::encode(victim)), "{text}");

    // The victim's contract is untouched and still serves it.
    let after = ledger.client(proxy, victim).await.unwrap().unwrap();
    assert_eq!(after.state, ContractState::Normal);
    assert_eq!(after.balance, before.balance);
    assert_eq!(after.tokens_used, before.tokens_used);
    let r = victim_asks().await;
    assert_eq!(r.status(), 200);
    stop.cancel();
}
