//! The operator's listener (`[admin]`): the whole status behind a bearer token, refused
//! beyond loopback without one, and a liveness probe.

use std::time::Duration;

use cocoon_proxy::{AdminConfig, LimitsConfig, Proxy, ProxyConfig};
use cocoon_testkit::dev::keys::LEDGERS;
use cocoon_tls::PeerPolicy;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn config(admin: AdminConfig) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".into(),
        admin,
        worker_policy: PeerPolicy {
            insecure_accept_any_peer: true,
            ..PeerPolicy::default()
        },
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

/// REVIEW ATTACK: the admin listener was `axum::serve` with hyper's defaults and no timer, so a
/// connection that never sent a request was never closed (hyper's 30 s header timeout needs a
/// timer and is dropped without one), and nothing capped how many were open. The token is only
/// checked once a request arrives: anyone who can reach the listener (beyond loopback it is
/// meant to be reachable, token-guarded) opens silent connections until the proxy runs out of
/// file descriptors, and then the public port's `accept` fails too: the whole proxy is down,
/// which none of the public port's limits (per-address caps, handshake share, timeouts) stop.
///
/// Now: a connection must send its headers within 5 s (and be done within 10 s), and at most
/// 16 are served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_silent_connection_to_the_admin_listener_is_closed() {
    use tokio::io::AsyncReadExt;
    let proxy = Proxy::bind(
        &ProxyConfig {
            limits: LimitsConfig {
                handshake_timeout_secs: 2,
                ..LimitsConfig::default()
            },
            ..config(AdminConfig {
                listen: Some("127.0.0.1:0".into()),
                token_file: None,
            })
        },
        LEDGERS,
    )
    .await
    .unwrap();
    let admin = proxy.admin_addr().expect("listening");
    let stop = CancellationToken::new();
    let task = tokio::spawn(proxy.run(stop.clone()));
    let mut silent = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a connection that sent nothing was still open on the admin listener after 10 s: \
         {read:?}"
    );
    stop.cancel();
    task.await.unwrap();
}
