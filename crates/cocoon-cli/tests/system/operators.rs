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

/// Sends SIGHUP to `child`.
fn hang_up(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// `cocoon proxy` reloads its configuration file on SIGHUP: a change it may take is put in
/// force (the log says which sections), one that takes a restart is refused with the reason
/// and the proxy goes on as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_proxy_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let admin = cocoon_testkit::http::free_port();
    let mut config = cocoon_proxy::ProxyConfig {
        listen: cocoon_testkit::http::free_port(),
        worker_policy: cocoon_tls::PeerPolicy {
            insecure_accept_any_peer: true,
            ..Default::default()
        },
        admin: cocoon_proxy::AdminConfig {
            listen: Some(admin.clone()),
            token_file: None,
        },
        ..Default::default()
    };
    let path = dir.path().join("proxy.toml");
    let write = |c: &cocoon_proxy::ProxyConfig| {
        std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
    };
    write(&config);
    let log = dir.path().join("proxy.log");
    let mut proxy = spawn_cocoon(&["proxy"], &path, log.clone());
    let healthy = || async {
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !healthy().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hangup = || hang_up(&proxy);
    let logged = |what: &str| {
        let what = what.to_owned();
        let log = log.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains(&what) {
                    return text;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never logged {what:?}: {text}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    config.limits.burst += 1;
    write(&config);
    hangup();
    let text = logged("SIGHUP: configuration reloaded").await;
    assert!(text.contains("[\"limits\"]"), "{text}");
    let mut moved = config.clone();
    moved.listen = "127.0.0.1:1".into();
    write(&moved);
    hangup();
    let text = logged("SIGHUP: reload refused").await;
    assert!(
        text.contains("listen changed, which takes a restart"),
        "{text}"
    );
    assert!(healthy().await, "the proxy stopped after a bad reload");
    stop_gracefully(&mut proxy).await;
}

/// A worker serving two proxies at once (the network's, and a `cocoon proxy` process of its
/// own) answers through both, sharing its backend; its operator's controls reach both: a new
/// price is followed at each proxy's next health check, and a disabled worker gets nothing new
/// from either until enabled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_two_proxies_and_its_operator_steers_it_on_both() {
    use cocoon_testkit::backends::scripted_model_hash;
    use cocoon_testkit::dev::ledger::key_wallet;
    let net = DevNetwork::start(
        DevOptions {
            routing: cocoon_proxy::RoutingConfig {
                health_interval_secs: 1,
                ..Default::default()
            },
            ..test_options()
        },
        vec![],
    )
    .await
    .unwrap();
    let dir = net.dir().to_owned();
    let dev = net.dev_ledger().unwrap();
    dev.allow_model(&scripted_model_hash()).await.unwrap();
    let own = own_proxy(&net, "second").await;
    let mut config: cocoon_proxy::ProxyConfig =
        toml::from_str(&std::fs::read_to_string(&own.config).unwrap()).unwrap();
    config.routing.health_interval_secs = 1;
    let own_admin = free_port();
    config.admin.listen = Some(own_admin.clone());
    std::fs::write(&own.config, toml::to_string(&config).unwrap()).unwrap();
    let client_key_file = dir.join("second-client.key");
    let client = key_wallet(&client_key_file).unwrap().public_key();
    dev.fund_client(client, own.key).await.unwrap();
    let _second = spawn_cocoon(&["proxy"], &own.config, dir.join("second-proxy.log"));
    wait_listening(&own.addr).await;

    let backend = Scripted::new(2048);
    let (identity, sealing) = cocoon_worker::with_sealing_key(
        net.dev_attester()
            .identity(Some(&dir.join("both.key")), "w", "worker", None)
            .unwrap(),
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = cocoon_worker::Worker::new(
        "both",
        net.proxy_addr.to_string(),
        backend.clone() as Arc<dyn cocoon_engine::Backend>,
        Arc::new(identity),
        net.dev_policy().build("proxy_policy", "proxy").unwrap(),
        Duration::from_millis(200),
    )
    .with_more_proxies(vec![own.addr.clone()])
    .with_sealing(sealing.map(Arc::new));
    let listener = cocoon_proxy::AdminConfig {
        listen: Some("127.0.0.1:0".into()),
        token_file: None,
    }
    .bind()
    .await
    .unwrap()
    .unwrap();
    let admin = format!("http://{}", listener.local_addr());
    tokio::spawn(worker.admin(listener, None, stop.clone()));
    tokio::spawn(worker.run(stop.clone()));
    let second_gateway = own_gateway(
        &net,
        std::slice::from_ref(&own.addr),
        client_key_file,
        &stop,
    )
    .await;
    let http = reqwest::Client::new();
    let status = |url: String| {
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    wait_until_async("the worker is on both proxies", || async {
        let s = status(format!("{admin}/status")).await;
        s["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["connected"] == true)
    })
    .await;
    let ask = |gateway: String| {
        let http = http.clone();
        async move {
            http.post(format!("{gateway}/chat/completions"))
                .json(&chat_body("hi", json!({"max_tokens": 1})))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let gateways = [net.gateway_url(), second_gateway.clone()];
    for g in &gateways {
        wait_until_async("answered", || async { ask(g.clone()).await == 200 }).await;
    }
    assert_eq!(
        backend.served(),
        2,
        "one answer through each proxy, same backend"
    );

    // Both proxies follow a new price at their next health check.
    let priced = http
        .post(format!("{admin}/prices"))
        .json(&json!({"price": 77}))
        .send()
        .await
        .unwrap();
    assert_eq!(priced.status(), 200);
    let prices_seen = || async {
        let own_status = status(format!("http://{own_admin}/status")).await;
        let theirs = own_status["workers"][0]["offers"][0]["price"].as_u64();
        let ours = net.proxy_status().workers[0].offers[0].price;
        (ours, theirs)
    };
    wait_until_async("both proxies follow the new price", || async {
        prices_seen().await == (77, Some(77))
    })
    .await;

    // Disabled: nothing new from either proxy (there is no other worker), until enabled.
    let control = |what: &'static str| {
        let (http, admin) = (http.clone(), admin.clone());
        async move {
            http.post(format!("{admin}/{what}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(control("disable").await, 200);
    for g in &gateways {
        wait_until_async("refused while disabled", || async {
            ask(g.clone()).await == 503
        })
        .await;
    }
    let served = backend.served();
    assert_eq!(control("enable").await, 200);
    for g in &gateways {
        wait_until_async("served again", || async { ask(g.clone()).await == 200 }).await;
    }
    assert_eq!(backend.served(), served + 2);
    stop.cancel();
}

/// A gateway told to stop takes no new request and says it is not ready, while the answer it
/// is streaming finishes in full; then it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_finishes_the_streams_in_flight() {
    let backend = Scripted::new(2048);
    let net = DevNetwork::start(
        test_options(),
        vec![backend.clone() as Arc<dyn cocoon_engine::Backend>],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    let mut config: cocoon_client::ClientConfig =
        toml::from_str(&std::fs::read_to_string(net.write_client_config().unwrap()).unwrap())
            .unwrap();
    config.listen = "127.0.0.1:0".into();
    config.drain_secs = 20;
    config.payments.bill_file = net.dir().join("draining-gateway-bills.json");
    config.admin = cocoon_proxy::AdminConfig {
        listen: Some("127.0.0.1:0".into()),
        token_file: None,
    };
    let gateway = cocoon_client::Gateway::bind(&config, cocoon_cli::money::LEDGERS)
        .await
        .unwrap();
    let (api, admin) = (
        format!("http://{}/v1/chat/completions", gateway.local_addr()),
        format!("http://{}/readyz", gateway.admin_addr().unwrap()),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(gateway.run(stop.clone()));
    let http = reqwest::Client::new();
    wait_until_async("ready", || async {
        http.get(&admin)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    backend.pace(Duration::from_millis(100));
    let answer = http
        .post(&api)
        .json(&chat_body("hi", json!({"max_tokens": 15, "stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    stop.cancel();
    // The listener closes as the stop reaches it (a request racing the signal may still get
    // in): from then on a new request finds no one listening.
    wait_until_async("a stopping gateway refuses new connections", || async {
        reqwest::Client::new()
            .post(&api)
            .json(&chat_body("hi", json!({"max_tokens": 1})))
            .send()
            .await
            .is_err()
    })
    .await;
    let readyz = http.get(&admin).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    assert!(readyz.text().await.unwrap().contains("shutting down"));
    let text = answer.text().await.unwrap();
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the gateway exits once its answers are done")
        .unwrap()
        .unwrap();
}

/// `cocoon worker` reloads its `[prices]` on SIGHUP, and its proxy follows at its next health
/// check; a file that changes anything else is refused, and the prices in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_workers_prices_and_nothing_else() {
    let net = DevNetwork::start(
        DevOptions {
            routing: cocoon_proxy::RoutingConfig {
                health_interval_secs: 1,
                ..Default::default()
            },
            ..test_options()
        },
        vec![],
    )
    .await
    .unwrap();
    allow_the_model(net.dev_ledger().unwrap()).await;
    let dir = net.dir().to_owned();
    let mut config = cocoon_worker::WorkerConfig {
        name: "priced".into(),
        proxy_addr: net.proxy_addr.to_string(),
        key_file: Some(dir.join("priced.key")),
        max_reconnect_secs: 1,
        attester: net.dev_attester(),
        proxy_policy: net.dev_policy(),
        drain_secs: 0,
        backends: vec![cocoon_worker::BackendConfig::Llama(
            cocoon_engine::LlamaConfig {
                model_path: model_path(),
                threads: 1,
                parallel: 1,
                ..Default::default()
            },
        )],
        ..Default::default()
    };
    let path = dir.join("priced.toml");
    let write = |c: &cocoon_worker::WorkerConfig| {
        std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
    };
    write(&config);
    let log = dir.join("priced.log");
    let mut worker = spawn_cocoon(&["worker"], &path, log.clone());
    let price = || {
        net.proxy_status()
            .workers
            .first()
            .map(|w| (w.name.clone(), w.offers[0].price))
    };
    wait_until("the worker joins", Duration::from_secs(30), || {
        price().is_some()
    })
    .await;
    let hangup = || hang_up(&worker);
    config.prices.default = 33;
    write(&config);
    hangup();
    wait_until(
        "the proxy follows the new price",
        Duration::from_secs(20),
        || price() == Some(("priced".into(), 33)),
    )
    .await;
    let mut renamed = config.clone();
    renamed.name = "renamed".into();
    renamed.prices.default = 44;
    write(&renamed);
    hangup();
    wait_until("the refusal is logged", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SIGHUP: reload refused")
    })
    .await;
    // Two health checks later, still the prices in force.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(price(), Some(("priced".into(), 33)));
    stop_gracefully(&mut worker).await;
}
