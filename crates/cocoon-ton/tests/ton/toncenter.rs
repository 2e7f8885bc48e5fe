//! The toncenter client against a flaky server: rate limits, server errors, a hung call and a
//! refused connection are retried with backoff, a Retry-After is waited for, and every call
//! carries the API key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cocoon_ton::toncenter::{Client, Retry};
use parking_lot::Mutex;
use serde_json::json;
use tonlib_core::TonAddress;

/// What the server does on each call, in order; `Ok` after the list runs out.
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    RetryAfter(u64),
    Hang,
}

#[derive(Clone, Default)]
struct Flaky {
    script: Arc<Vec<Answer>>,
    calls: Arc<AtomicU32>,
    keys: Arc<Mutex<Vec<Option<String>>>>,
}

async fn wallet_information(State(f): State<Flaky>, headers: HeaderMap) -> Response {
    let n = f.calls.fetch_add(1, Ordering::SeqCst) as usize;
    let key = headers
        .get("x-api-key")
        .map(|k| k.to_str().unwrap().to_owned());
    f.keys.lock().push(key);
    match f.script.get(n) {
        Some(Answer::Status(code)) => (
            StatusCode::from_u16(*code).unwrap(),
            axum::Json(json!({ "ok": false, "error": "busy", "code": code })),
        )
            .into_response(),
        Some(Answer::RetryAfter(secs)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        Some(Answer::Hang) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        None => axum::Json(json!({ "ok": true, "result": { "wallet": true, "seqno": 7 } }))
            .into_response(),
    }
}

fn router(f: &Flaky) -> Router {
    Router::new()
        .route("/api/v2/getWalletInformation", get(wallet_information))
        .with_state(f.clone())
}

async fn serve(script: Vec<Answer>) -> (String, Flaky) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let f = Flaky {
        script: Arc::new(script),
        ..Flaky::default()
    };
    let app = router(&f);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), f)
}

fn quick(attempts: u32) -> Retry {
    Retry {
        attempts,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(5),
    }
}

fn anywhere() -> TonAddress {
    TonAddress::new(0, [7u8; 32].into())
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_with_the_api_key_on_every_call() {
    let script = vec![
        Answer::Status(429),
        Answer::Status(503),
        Answer::Status(502),
    ];
    let (base, f) = serve(script).await;
    let client = Client::new(&base)
        .with_api_key("s3cret")
        .unwrap()
        .with_retry(quick(5));
    assert_eq!(client.seqno(&anywhere()).await.unwrap(), Some(7));
    assert_eq!(f.calls.load(Ordering::SeqCst), 4);
    assert_eq!(*f.keys.lock(), vec![Some("s3cret".to_owned()); 4]);
}

#[tokio::test]
async fn retries_are_bounded_and_other_errors_are_not_retried() {
    let (base, f) = serve(vec![Answer::Status(503); 10]).await;
    let client = Client::new(&base).with_retry(quick(3));
    let err = client.seqno(&anywhere()).await.unwrap_err().to_string();
    assert!(err.contains("503") && err.contains("3 attempts"), "{err}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 3);
    assert_eq!(*f.keys.lock(), vec![None; 3], "no key set, none sent");

    let (base, f) = serve(vec![Answer::Status(400)]).await;
    let client = Client::new(&base).with_retry(quick(5));
    let err = client.seqno(&anywhere()).await.unwrap_err().to_string();
    assert!(err.contains("busy"), "{err}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_retry_after_is_waited_for() {
    let (base, f) = serve(vec![Answer::RetryAfter(1)]).await;
    let client = Client::new(&base).with_retry(quick(3));
    let started = Instant::now();
    assert_eq!(client.seqno(&anywhere()).await.unwrap(), Some(7));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_hung_call_times_out_and_is_retried() {
    let (base, f) = serve(vec![Answer::Hang]).await;
    let client = Client::new(&base)
        .with_timeout(Duration::from_millis(200))
        .with_retry(quick(3));
    let started = Instant::now();
    assert_eq!(client.seqno(&anywhere()).await.unwrap(), Some(7));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_connection_is_retried_until_the_server_is_up() {
    // A port nothing listens on until the server starts a little later.
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let f = Flaky::default();
    let app = router(&f);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(listener, app).await.unwrap()
    });
    let client = Client::new(&format!("http://{addr}")).with_retry(Retry {
        attempts: 10,
        base: Duration::from_millis(20),
        cap: Duration::from_millis(100),
    });
    assert_eq!(client.seqno(&anywhere()).await.unwrap(), Some(7));
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}
