//! Steering a running proxy: a reload of its configuration file (what `cocoon proxy` does on
//! SIGHUP, and `POST /reload` on the operator's listener) admits a newly pinned worker while a
//! stream goes on, keeps the old configuration when the new one is bad, and lets go of a
//! worker no longer pinned once its answer ends; the operator disables and enables a worker.

use std::sync::Arc;
use std::time::Duration;

use cocoon_client::{ClientConfig, Gateway};
use cocoon_proxy::{AdminConfig, Proxy, ProxyConfig};
use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::keys::LEDGERS;
use cocoon_tls::{Identity, PeerPolicy};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A worker pinned by key (no attestation on this network), serving `backend` for the proxy
/// at `addr` whose key is `proxy`.
fn worker(
    identity: &Arc<Identity>,
    backend: &Arc<Scripted>,
    addr: &str,
    proxy: &str,
) -> cocoon_worker::Worker {
    let pinned = PeerPolicy {
        fingerprints: vec![proxy.to_owned()],
        ..PeerPolicy::default()
    }
    .build("proxy_policy", "proxy")
    .unwrap();
    cocoon_worker::Worker::new(
        "w",
        addr,
        backend.clone() as Arc<dyn cocoon_engine::Backend>,
        identity.clone(),
        pinned,
        Duration::from_millis(100),
    )
}

fn proxy_config(dir: &std::path::Path, pins: &[String]) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".into(),
        key_file: Some(dir.join("proxy.key")),
        worker_policy: PeerPolicy {
            fingerprints: pins.to_vec(),
            ..PeerPolicy::default()
        },
        client_policy: PeerPolicy {
            insecure_accept_any_peer: true,
            ..PeerPolicy::default()
        },
        admin: AdminConfig {
            listen: Some("127.0.0.1:0".into()),
            token_file: None,
        },
        ..ProxyConfig::default()
    }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reload admits a newly pinned worker with no restart while a stream to the first goes on;
/// a bad file (one that does not parse, one that changes the listener) is refused with the
/// reason and the configuration in force stays; unpinning the first lets it go once its
/// answer ends, and the operator can disable and enable a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_admits_a_new_pin_while_streams_go_on_and_a_bad_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<Arc<Identity>> = ["a", "b"]
        .iter()
        .map(|n| {
            Arc::new(
                Identity::load_or_create(&dir.path().join(format!("{n}.key")), "cocoon-worker")
                    .unwrap(),
            )
        })
        .collect();
    let fp = |i: usize| ids[i].fingerprint().to_string();
    let file = dir.path().join("proxy.toml");
    let write = |config: &ProxyConfig| {
        std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    };
    let config = proxy_config(dir.path(), &[fp(0)]);
    write(&config);
    let proxy = Proxy::bind(&config, LEDGERS)
        .await
        .unwrap()
        .with_config_file(file.clone());
    let (addr, admin) = (
        proxy.local_addr().to_string(),
        format!("http://{}", proxy.admin_addr().unwrap()),
    );
    let proxy_fp = proxy.fingerprint().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(stop.clone()));
    let (first, second) = (Scripted::new(2048), Scripted::new(2048));
    for (i, backend) in [&first, &second].into_iter().enumerate() {
        tokio::spawn(worker(&ids[i], backend, &addr, &proxy_fp).run(stop.clone()));
    }
    let gateway = Gateway::bind(
        &ClientConfig {
            listen: "127.0.0.1:0".into(),
            proxy_addr: addr.clone(),
            proxy_policy: PeerPolicy {
                fingerprints: vec![proxy_fp.clone()],
                ..PeerPolicy::default()
            },
            ..ClientConfig::default()
        },
        LEDGERS,
    )
    .await
    .unwrap();
    let chat = format!("http://{}/v1/chat/completions", gateway.local_addr());
    tokio::spawn(gateway.run(stop.clone()));
    let http = reqwest::Client::new();
    let status = || async {
        reqwest::get(format!("{admin}/status"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let connected = |s: &Value, i: usize| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["fingerprint"] == fp(i))
    };
    wait_for("the pinned worker joins", async || {
        connected(&status().await, 0)
    })
    .await;
    let s = status().await;
    assert!(!connected(&s, 1), "an unpinned worker joined");
    assert!(
        s["recent_refusals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["fingerprint"] == fp(1)),
        "{s}"
    );

    // A stream to the first worker, 20 tokens 100 ms apart.
    first.pace(Duration::from_millis(100));
    let stream = {
        let (http, chat) = (http.clone(), chat.clone());
        tokio::spawn(async move {
            let body =
                cocoon_testkit::http::chat_body("hi", json!({"max_tokens": 20, "stream": true}));
            let answer = http.post(&chat).json(&body).send().await.unwrap();
            assert_eq!(answer.status(), 200);
            answer.text().await.unwrap()
        })
    };
    wait_for("the stream started", async || {
        status().await["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["fingerprint"] == fp(0) && w["in_flight"] == 1)
    })
    .await;

    // Pin the second: it joins with no restart while the stream goes on.
    write(&proxy_config(dir.path(), &[fp(0), fp(1)]));
    let reload = |http: reqwest::Client| {
        let url = format!("{admin}/reload");
        async move {
            let answer = http.post(url).send().await.unwrap();
            (
                answer.status().as_u16(),
                answer.json::<Value>().await.unwrap(),
            )
        }
    };
    let (code, body) = reload(http.clone()).await;
    assert_eq!(
        (code, &body["reloaded"]),
        (200, &json!(["worker_policy"])),
        "{body}"
    );
    wait_for("the newly pinned worker joins", async || {
        connected(&status().await, 1)
    })
    .await;
    assert!(
        !stream.is_finished(),
        "the stream ended before the reload was done"
    );

    // Bad files change nothing: one that does not parse, one that moves the listener.
    std::fs::write(&file, "listen = [").unwrap();
    let (code, body) = reload(http.clone()).await;
    assert_eq!(code, 400, "{body}");
    let mut moved = proxy_config(dir.path(), &[fp(1)]);
    moved.listen = "127.0.0.1:1".into();
    write(&moved);
    let (code, body) = reload(http.clone()).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("listen changed"),
        "{body}"
    );
    let s = status().await;
    assert!(connected(&s, 0) && connected(&s, 1), "{s}");

    // Unpin the first: it gets nothing new, its answer ends in full, then it is let go.
    write(&proxy_config(dir.path(), &[fp(1)]));
    assert_eq!(reload(http.clone()).await.0, 200);
    let answered = stream.await.unwrap();
    assert!(
        answered.contains("\"finish_reason\":\"length\""),
        "{answered}"
    );
    assert!(answered.trim_end().ends_with("data: [DONE]"), "{answered}");
    wait_for("the unpinned worker is let go", async || {
        !connected(&status().await, 0)
    })
    .await;
    first.pace(Duration::ZERO);
    let before = second.served();
    let ask = || async {
        http.post(&chat)
            .json(&cocoon_testkit::http::chat_body(
                "hi",
                json!({"max_tokens": 1}),
            ))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ask().await, 200);
    assert_eq!(second.served(), before + 1);

    // The operator disables the second: nothing is routed to it (and it stays disabled),
    // until enabled again.
    let control = |action: &'static str| {
        let (http, admin, worker) = (http.clone(), admin.clone(), fp(1));
        async move {
            http.post(format!("{admin}/workers/{worker}/{action}"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(control("disable").await["connected"], 1);
    let s = status().await;
    assert_eq!(s["workers"][0]["disabled"], true, "{s}");
    assert_eq!(ask().await, 503);
    assert_eq!(second.served(), before + 1);
    control("enable").await;
    assert_eq!(ask().await, 200);
    assert_eq!(second.served(), before + 2);
    // A page elsewhere cannot steer the proxy through the operator's browser.
    let forged = http
        .post(format!("{admin}/workers/{}/disable", fp(1)))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let rebound = http
        .get(format!("{admin}/status"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    assert_eq!(status().await["workers"][0]["disabled"], false);
    stop.cancel();
}
