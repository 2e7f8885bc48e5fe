//! Cancellation, worker disconnect and reconnect, proxy restart, upstream backend.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use cocoon_engine::{Backend, UpstreamBackend, UpstreamConfig};
use cocoon_testkit::dev::{DevNetwork, DevOptions};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Starts a long stream, reads a few chunks, disconnects, and checks the worker stopped.
async fn disconnect_mid_stream(gateway_url: &str, model: &str) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let response = reqwest::Client::new()
        .post(format!("{gateway_url}/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut seen = 0;
    while seen < 4 {
        let chunk = stream.next().await.unwrap().unwrap();
        seen += chunk.windows(6).filter(|w| w == b"data: ").count();
    }
    drop(stream);
}

#[tokio::test]
async fn client_disconnect_stops_generation_on_the_worker() {
    let backend = llama();
    let net = network(vec![backend.clone()]).await;
    disconnect_mid_stream(&net.gateway_url(), MODEL).await;
    wait_until("generation to stop", Duration::from_secs(10), || {
        backend.stats().active == 0
    })
    .await;
    let stats = backend.stats();
    assert_eq!(stats.cancelled, 1, "{stats:?}");
    assert!(stats.generated_tokens < 300, "stopped early: {stats:?}");
    // The client pays for the tokens relayed to it before it left, never for more than the
    // worker generated.
    let ledger = net.ledger().unwrap().clone();
    let at = cocoon_ledger::Address::client(&net.proxy_key().unwrap(), &net.client_key());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let billed = loop {
        let state = cocoon_ledger::Ledger::snapshot(&*ledger).await.unwrap();
        let used = state.clients.get(&at).map_or(0, |c| c.tokens_used);
        if used > 0 {
            break used;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled answer was never billed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        billed <= stats.generated_tokens,
        "billed {billed}, generated {stats:?}"
    );
    // The gateway never saw that answer's bill: it asks the proxy for it and claims its range,
    // so the next bill's counter, right after it, is explained by bills alone.
    let http = reqwest::Client::new();
    let gateway = net.gateway_url();
    wait_until_async("the cut-off answer's bill to be asked for", || {
        late_bills_settled(&http, &gateway)
    })
    .await;
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let answer: Value = http
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["bill_verified"], true, "{answer}");
    assert!(late_bills_settled(&http, &gateway).await);
}

#[tokio::test]
async fn dropped_worker_disappears_and_comes_back() {
    let mut net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let models = format!("{}/models", net.gateway_url());
    net.stop_worker(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list: Value = get_json(&http, &models).await;
        if list["data"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker still listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        short_chat_status(&net).await,
        404,
        "no worker serves the model now"
    );

    net.start_worker(0);
    net.wait_ready(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(short_chat_status(&net).await, 200);
}

#[tokio::test]
async fn workers_and_gateway_reconnect_after_proxy_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = DevOptions {
        proxy_key_file: Some(dir.path().join("proxy.key")),
        ..test_options()
    };
    let mut net = DevNetwork::start(options, vec![llama()]).await.unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    net.restart_proxy().await.unwrap();
    // The worker notices, backs off and reconnects; the gateway reconnects on next use.
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    assert_eq!(short_chat_status(&net).await, 200);
}

/// A worker whose backend is an OpenAI-compatible server (here: another cocoon network's
/// gateway, backed by the real model).
#[tokio::test]
async fn upstream_backend_relays_streams_counts_and_cancellation() {
    let model_backend = llama();
    let upstream = network(vec![model_backend.clone()]).await;
    let relay: Arc<dyn Backend> = Arc::new(
        UpstreamBackend::new(UpstreamConfig {
            url: upstream.gateway_url(),
            ca_file: None,
            api_key: Some("unused".into()),
            models: vec![
                serde_json::from_value(
                    json!({"model_hash": cocoon_testkit::backends::scripted_model_hash(), "id": "smol-upstream", "upstream_id": MODEL, "context_length": 4096}),
                )
                .unwrap(),
            ],
            parallel: 4,
            timeout_secs: 30,
            idle_timeout_secs: 120,
            cache_salt: true,
        })
        .unwrap(),
    );
    let net = network(vec![relay.clone()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let body = json!({"model": "smol-upstream", "messages": [{"role": "user", "content": "Tell me the capital of France."}], "max_tokens": 20, "temperature": 0});
    let via_relay: Value = post_json(&http, &url, &body).await;
    let mut direct_body = body.clone();
    direct_body["model"] = json!(MODEL);
    let direct: Value = post_json(
        &http,
        format!("{}/chat/completions", upstream.gateway_url()),
        &direct_body,
    )
    .await;
    assert_eq!(
        via_relay["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
    assert_eq!(
        token_counts(&via_relay["usage"]),
        token_counts(&direct["usage"]),
        "token counts come from the upstream model"
    );
    // Each network bills its own client for its tokens at the same price (the direct request
    // came second, so its prompt was in the upstream worker's cache).
    let price = |v: &Value| v["usage"]["billing"]["price_per_token"].as_u64().unwrap();
    assert_eq!(price(&via_relay), price(&direct));
    for answer in [&via_relay, &direct] {
        assert_eq!(
            answer["usage"]["cost"],
            dev_weighted(&answer["usage"]) * price(answer)
        );
    }
    assert_eq!(via_relay["model"], "smol-upstream");

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let events = sse_events(http.post(&url).json(&streaming).send().await.unwrap()).await;
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        direct["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        token_counts(&events[events.len() - 2]["usage"]),
        token_counts(&direct["usage"])
    );

    // An upstream refusal keeps its status.
    let mut too_long = body.clone();
    too_long["max_tokens"] = json!(5000);
    let r = http.post(&url).json(&too_long).send().await.unwrap();
    assert_eq!(r.status(), 400);

    let cancelled_before = model_backend.stats().cancelled;
    disconnect_mid_stream(&net.gateway_url(), "smol-upstream").await;
    wait_until(
        "upstream generation to stop",
        Duration::from_secs(10),
        || model_backend.stats().cancelled > cancelled_before && model_backend.stats().active == 0,
    )
    .await;
    wait_until(
        "relay to count the cancellation",
        Duration::from_secs(5),
        || relay.stats().cancelled == 1,
    )
    .await;
}

/// A TLS terminator on loopback in front of `to` (plain HTTP), with a certificate for
/// 127.0.0.1 signed by a fresh private CA: an https upstream as a GPU owner runs one (vLLM
/// behind a TLS proxy). Its address and the CA's PEM.
async fn https_in_front_of(listener: tokio::net::TcpListener, to: std::net::SocketAddr) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    ca.pem()
}

/// The production path of an upstream backend: an https server with a private CA is served
/// once its CA is given (`ca_file`), and refused without it (its certificate checks against
/// the public roots only): reqwest was built without TLS, so every https upstream failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_is_served_and_refused_without_it() {
    use cocoon_testkit::backends::{MODEL, Scripted};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = listener.local_addr().unwrap();
    // The upstream: a cocoon gateway of its own, answering to the terminator's address.
    let upstream = DevNetwork::start(
        DevOptions {
            gateway_access: cocoon_client::AccessConfig {
                hosts: vec![tls_addr.to_string()],
                ..Default::default()
            },
            ..cocoon_testkit::dev::test_options()
        },
        vec![Scripted::new(2048)],
    )
    .await
    .unwrap();
    upstream
        .wait_ready(1, Duration::from_secs(20))
        .await
        .unwrap();
    let ca = https_in_front_of(listener, upstream.gateway_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let relay = |ca_file: Option<std::path::PathBuf>| -> Arc<dyn Backend> {
        Arc::new(
            UpstreamBackend::new(UpstreamConfig {
                url: format!("https://{tls_addr}/v1"),
                ca_file,
                api_key: None,
                models: vec![
                    serde_json::from_value(
                        json!({"model_hash": cocoon_testkit::backends::scripted_model_hash(), "id": "tls-upstream", "upstream_id": MODEL, "context_length": 2048}),
                    )
                    .unwrap(),
                ],
                parallel: 4,
                timeout_secs: 10,
                idle_timeout_secs: 120,
                cache_salt: true,
            })
            .unwrap(),
        )
    };
    let http = reqwest::Client::new();
    let body = json!({"model": "tls-upstream", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});

    let trusted = network(vec![relay(Some(ca_file))]).await;
    let answer: Value = post_json(
        &http,
        format!("{}/chat/completions", trusted.gateway_url()),
        &body,
    )
    .await;
    assert_eq!(
        answer["choices"][0]["message"]["content"], "ttt",
        "{answer}"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 3);

    let untrusted = network(vec![relay(None)]).await;
    let refused = http
        .post(format!("{}/chat/completions", untrusted.gateway_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(!refused.status().is_success(), "an unknown CA was trusted");
    let error: Value = refused.json().await.unwrap();
    let message = error["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!message.is_empty(), "{error}");
}
