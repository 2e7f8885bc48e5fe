//! The operator's listener (`[admin]`): the whole status behind a bearer token, refused
//! beyond loopback without one, and a liveness probe.

use cocoon_proxy::{AdminConfig, Proxy, ProxyConfig};
use cocoon_testkit::dev::keys::LEDGERS;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn config(admin: AdminConfig) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".into(),
        admin,
        ..ProxyConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_status_needs_its_token_and_never_listens_openly_without_one() {
    let dir = tempfile::tempdir().unwrap();
    // Beyond loopback without a token: refused at start, with the reason.
    let open = Proxy::bind(
        &config(AdminConfig {
            listen: Some("0.0.0.0:0".into()),
            token_file: None,
        }),
        LEDGERS,
    )
    .await;
    let error = open
        .err()
        .expect("an open admin listener started")
        .to_string();
    assert!(error.contains("beyond loopback"), "{error}");
    // An empty token file is no token.
    let empty = dir.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let error = Proxy::bind(
        &config(AdminConfig {
            listen: Some("127.0.0.1:0".into()),
            token_file: Some(empty),
        }),
        LEDGERS,
    )
    .await
    .err()
    .expect("an empty token was taken")
    .to_string();
    assert!(error.contains("holds no token"), "{error}");

    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-operator\n").unwrap();
    let proxy = Proxy::bind(
        &config(AdminConfig {
            listen: Some("127.0.0.1:0".into()),
            token_file: Some(token),
        }),
        LEDGERS,
    )
    .await
    .unwrap();
    let admin = format!("http://{}", proxy.admin_addr().expect("listening"));
    let fingerprint = proxy.fingerprint().to_string();
    let stop = CancellationToken::new();
    let task = tokio::spawn(proxy.run(stop.clone()));
    let http = reqwest::Client::new();
    for (token, expected) in [
        (None, 401),
        (Some("wrong"), 401),
        (Some("s3cret-operator-and-more"), 401),
        (Some("s3cret-operator"), 200),
    ] {
        let mut request = http.get(format!("{admin}/status"));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), expected, "token {token:?}");
        if expected == 200 {
            let status: Value = answer.json().await.unwrap();
            assert_eq!(status["fingerprint"], fingerprint.as_str());
            assert!(status["workers"].is_array(), "{status}");
            assert!(status["recent_refusals"].is_array(), "{status}");
        }
    }
    let alive = http.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(alive.status().as_u16(), 200);
    stop.cancel();
    task.await.unwrap();
}
