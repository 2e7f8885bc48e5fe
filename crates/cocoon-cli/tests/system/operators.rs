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
    let hangup = || {
        let pid = proxy.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    };
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
