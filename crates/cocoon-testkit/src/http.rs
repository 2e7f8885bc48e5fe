//! The HTTP, polling and port helpers that end-to-end tests share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::backends::MODEL;

/// A chat request for [`MODEL`] with one user message and `extra` fields on top.
pub fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    if let Some(extra) = extra.as_object() {
        for (k, v) in extra {
            body[k] = v.clone();
        }
    }
    body
}

/// Parsed SSE `data:` payloads of a streamed answer, `[DONE]` kept as a string.
pub async fn sse_events(response: reqwest::Response) -> Vec<Value> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).unwrap()
            }
        })
        .collect()
}

/// Polls `f` until it holds; fails the test with `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the asynchronous `f` until it holds; fails the test with `what` after 60 s.
pub async fn wait_until_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the gateway at `gateway` (its `/v1` URL) has settled every request whose answer
/// ended without its bill, with its first proxy; fails the test if one of that proxy's bills
/// did not check out.
pub async fn late_bills_settled(http: &reqwest::Client, gateway: &str) -> bool {
    let network: Value = get_json(http, format!("{gateway}/network")).await;
    let proxy = &network["proxies"][0];
    assert_eq!(proxy["bad_bills"], 0, "{network}");
    proxy["unsettled_bills"] == 0
}

/// POSTs `body` as JSON and parses the JSON answer, whatever its status.
pub async fn post_json(http: &reqwest::Client, url: impl reqwest::IntoUrl, body: &Value) -> Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The JSON of each `data:` line of a server-sent-events body, `[DONE]` left out (comments
/// and blank lines too).
pub fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// GETs `url` and parses the JSON answer.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The token counts of an OpenAI `usage` object, without the bill (whose counter and signed
/// message differ from one request to the next).
pub fn token_counts(usage: &Value) -> (u64, u64, u64) {
    let n = |k: &str| {
        usage[k]
            .as_u64()
            .unwrap_or_else(|| panic!("usage lacks {k}: {usage}"))
    };
    (
        n("prompt_tokens"),
        n("completion_tokens"),
        n("total_tokens"),
    )
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lowest port the kernel hands out by itself (to `bind(0)` and outgoing connections).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A loopback address for a server that a test starts as its own process, so it cannot bind
/// port 0 and report back.
///
/// A port taken with `bind(0)` and dropped is in the kernel's ephemeral range, where any
/// other test's `bind(0)` or outgoing connection may get it before the server binds it. These
/// come from below that range, which the kernel never hands out by itself, at an offset of
/// this test process's own (its pid) and then in sequence, each checked free. Two test
/// processes collide only if their sequences meet.
pub fn free_port() -> String {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let low: u16 = 10_000;
    let span = ephemeral_low().saturating_sub(low).max(1_000);
    let offset = (std::process::id() % u32::from(span / 64)) as u16 * 64;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = low + (offset + step) % span;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr.to_string();
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// A loopback port held bound but never listened on: connecting to it is refused at once, and
/// nothing else can take it while this lives. For "a peer that is down".
pub struct DeadPort {
    /// The address, `127.0.0.1:PORT`.
    pub addr: String,
    _socket: tokio::net::TcpSocket,
}

impl DeadPort {
    /// Binds one.
    pub fn bind() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = socket.local_addr().unwrap().to_string();
        Self {
            addr,
            _socket: socket,
        }
    }
}
