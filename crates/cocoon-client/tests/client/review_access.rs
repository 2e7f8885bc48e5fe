//! Review of the gateway's guard (issue 23), as an attacker: browser requests, DNS rebinding
//! and odd `Host`s, API key bypasses, daily limits and memory. Each test names its threat; one
//! that fails shows a finding, one that passes pins the exact answer of an attack that held.

use std::net::SocketAddr;
use std::time::Duration;

use cocoon_client::{AccessConfig, ApiKey};
use cocoon_testkit::backends::Mode;
use cocoon_testkit::dev::{DevOptions, test_options};

use crate::scripted::start;
use cocoon_testkit::http::chat_body;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "sk-cocoon-review-0123456789";
const ORIGIN: &str = "http://localhost:3000";

fn keyed(tokens_per_day: Option<u64>) -> DevOptions {
    DevOptions {
        gateway_access: AccessConfig {
            keys: vec![ApiKey {
                key: Some(KEY.into()),
                key_file: None,
                name: "review".into(),
                tokens_per_day,
            }],
            ..AccessConfig::default()
        },
        ..test_options()
    }
}

/// A chat body of `max_tokens` (a Scripted answer uses 5 prompt tokens and `max_tokens`).
fn chat(max_tokens: u32) -> String {
    chat_body("Hi", json!({ "max_tokens": max_tokens })).to_string()
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a fresh
/// connection; the status and the whole answer. `Connection: close` is added.
async fn raw(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = String::from(head);
    if !body.is_empty() {
        req.push_str(&format!("\r\nContent-Length: {}", body.len()));
    }
    req.push_str("\r\nConnection: close\r\n\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.unwrap();
    read_answer(&mut tcp).await
}

async fn read_answer(tcp: &mut TcpStream) -> (u16, String) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no end to the answer: {}", String::from_utf8_lossy(&out)),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// DNS rebinding (threat 2): `Host` values a rebinding page (or a lax parser) could produce
/// are refused with 421, and the legitimate spellings of this gateway are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_rebinding_and_odd_hosts_get_exact_answers() {
    let (net, b) = start(test_options()).await;
    let addr = net.gateway_addr;
    let p = addr.port();
    let cases: Vec<(String, u16)> = vec![
        ("evil.example".into(), 421),
        (format!("evil.example:{p}"), 421),
        (format!("127.0.0.1.nip.io:{p}"), 421),
        (format!("localhost.evil.example:{p}"), 421),
        (format!("evil.localhost:{p}"), 421),
        (format!("localhost.:{p}"), 421),
        (format!("0x7f000001:{p}"), 421),
        (format!("2130706433:{p}"), 421),
        (format!("127.1:{p}"), 421),
        (format!("evil@127.0.0.1:{p}"), 421),
        (format!("127.0.0.1:{p}@evil.example"), 421),
        (format!("[fe80::1%25lo]:{p}"), 421),
        (format!("127.0.0.1:{}", p.wrapping_add(1)), 421),
        (format!("127.0.0.1:{p}."), 421),
        (String::new(), 421),
        // This gateway, as apps and browsers on the machine name it.
        (format!("127.0.0.1:{p}"), 200),
        ("127.0.0.1".into(), 200),
        (format!("[::1]:{p}"), 200),
        (format!("LOCALHOST:{p}"), 200),
        (format!("localhost:{p}"), 200),
        ("localhost".into(), 200),
        (format!("[::ffff:127.0.0.1]:{p}"), 200),
    ];
    let mut wrong = Vec::new();
    for (host, want) in &cases {
        let (got, _) = raw(
            addr,
            &format!("GET /v1/models HTTP/1.1\r\nHost: {host}"),
            "",
        )
        .await;
        if got != *want {
            wrong.push(format!("Host {host:?}: {got}, not {want}"));
        }
    }
    // No Host at all, HTTP/1.1 and HTTP/1.0: 400.
    let (no_host_11, _) = raw(addr, "GET /v1/models HTTP/1.1", "").await;
    let (no_host_10, _) = raw(addr, "GET /v1/models HTTP/1.0", "").await;
    assert_eq!((no_host_11, no_host_10), (400, 400));
    // Absolute-form naming a rebinding name, without a Host header: refused.
    let (absolute, _) = raw(
        addr,
        &format!("GET http://evil.example:{p}/v1/models HTTP/1.1"),
        "",
    )
    .await;
    assert_eq!(absolute, 421);
    // Absolute-form naming this gateway, Host naming another: refused (conservative).
    let (absolute, _) = raw(
        addr,
        &format!("GET http://127.0.0.1:{p}/v1/models HTTP/1.1\r\nHost: evil.example:{p}"),
        "",
    )
    .await;
    assert_eq!(absolute, 400, "two hosts named");
    // A rebinding POST spends nothing.
    let (post, _) = raw(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: evil.example:{p}\r\nContent-Type: application/json"
        ),
        &chat(3),
    )
    .await;
    assert_eq!(post, 421);
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(b.served(), 0);
}

/// DNS rebinding / request smuggling (threat 2): two `Host` headers, the first this gateway's
/// and the second another name. Whoever sits in front (a proxy, a cache) may act on the other
/// one; RFC 9112 §3.2 says a server MUST answer 400 to more than one Host. (The guard read
/// the first only and served it.) Now 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_second_host_header_is_refused() {
    let (net, _b) = start(test_options()).await;
    let p = net.gateway_addr.port();
    let (status, answer) = raw(
        net.gateway_addr,
        &format!("GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nHost: evil.example:{p}"),
        "",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
}

/// DNS rebinding (threat 2): an absolute-form request URI names the target; RFC 9112 §3.2.2
/// says the server MUST ignore Host then. (The guard checked Host and never the URI's authority
/// when both were there, so `GET http://evil.example:PORT/...` with `Host: 127.0.0.1` was
/// served.) Now the authority is checked, and two names that differ are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_an_absolute_form_uri_names_the_host_the_guard_checks() {
    let (net, _b) = start(test_options()).await;
    let p = net.gateway_addr.port();
    let (status, answer) = raw(
        net.gateway_addr,
        &format!("GET http://evil.example:{p}/v1/models HTTP/1.1\r\nHost: 127.0.0.1:{p}"),
        "",
    )
    .await;
    // Two hosts named: refused (400) whichever a server would read.
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("two hosts"), "{answer}");
}

/// DNS rebinding over HTTP/2 (threat 2): the gateway speaks h2c with prior knowledge; there
/// the name is `:authority` (no Host header), which the guard checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_http2_authority_is_checked() {
    let (net, b) = start(test_options()).await;
    let p = net.gateway_addr.port();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("evil.example", net.gateway_addr)
        .build()
        .unwrap();
    let own = h2
        .get(format!("http://127.0.0.1:{p}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.version(), reqwest::Version::HTTP_2);
    assert_eq!(own.status().as_u16(), 200);
    let rebound = h2
        .get(format!("http://evil.example:{p}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status().as_u16(), 421);
    let post = h2
        .post(format!("http://evil.example:{p}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat(3))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 421);
    assert_eq!(b.served(), 0);
}

/// Browser CSRF (threat 1): every request a page can make without a preflight, and the
/// content-type tricks, get an exact refusal and nothing reaches the worker; a JSON POST
/// without an origin (what apps send) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_browser_simple_requests_are_refused() {
    let (net, b) = start(test_options()).await;
    let addr = net.gateway_addr;
    let p = addr.port();
    let host = format!("Host: 127.0.0.1:{p}");
    let body = chat(3);
    // (method and path, extra headers, body, status)
    let cases: Vec<(&str, String, &str, u16)> = vec![
        (
            "POST /v1/chat/completions",
            "Origin: https://evil.example\r\nContent-Type: text/plain".into(),
            &body,
            403,
        ),
        (
            "POST /v1/chat/completions",
            "Origin: null\r\nContent-Type: text/plain".into(),
            &body,
            403,
        ),
        (
            "POST /v1/chat/completions",
            "Origin: null\r\nContent-Type: application/json".into(),
            &body,
            403,
        ),
        (
            "POST /v1/chat/completions",
            "Origin: https://evil.example\r\nContent-Type: application/json".into(),
            &body,
            403,
        ),
        (
            "POST /v1/completions",
            "Origin: https://evil.example\r\nContent-Type: multipart/form-data; boundary=x".into(),
            &body,
            403,
        ),
        (
            "POST /v1/chat/completions",
            "Referer: https://evil.example/\r\nContent-Type: text/plain".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: text/plain;charset=UTF-8".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: multipart/form-data; boundary=x".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: application/x-www-form-urlencoded".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: application/json, text/plain".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: text/plain, application/json".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: text/plain; application/json".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: application/jsonx".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "Content-Type: application/json5".into(),
            &body,
            415,
        ),
        (
            "POST /v1/chat/completions",
            "X-Nothing: 1".into(),
            &body,
            415,
        ),
        (
            "OPTIONS /v1/chat/completions",
            "Origin: https://evil.example\r\nAccess-Control-Request-Method: POST".into(),
            "",
            403,
        ),
        (
            "OPTIONS /v1/chat/completions",
            "Access-Control-Request-Method: POST".into(),
            "",
            405,
        ),
        (
            "GET /v1/models",
            "Origin: https://evil.example".into(),
            "",
            403,
        ),
        (
            "HEAD /v1/models",
            "Origin: https://evil.example".into(),
            "",
            403,
        ),
        ("GET /v1/network", "Origin: null".into(), "", 403),
        (
            "GET /v1/chat/completions",
            "Referer: https://evil.example/".into(),
            "",
            405,
        ),
        (
            "PUT /v1/chat/completions",
            "Content-Type: text/plain".into(),
            &body,
            405,
        ),
    ];
    let mut wrong = Vec::new();
    for (line, extra, body, want) in &cases {
        let head = format!("{line} HTTP/1.1\r\n{host}\r\n{extra}");
        let (got, _) = raw(addr, &head, body).await;
        if got != *want {
            wrong.push(format!("{line} [{extra}]: {got}, not {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(b.served(), 0, "a refused request reached the worker");
    // Apps: JSON, any case, with parameters, and a Referer changes nothing.
    let (ok, answer) = raw(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nReferer: https://evil.example/\r\nContent-Type: APPLICATION/JSON; charset=utf-8"
        ),
        &body,
    )
    .await;
    assert_eq!(ok, 200, "{answer}");
    assert_eq!(b.served(), 1);
}

/// API key bypass (threat 3): paths that might skip the key check or reach a route another
/// way, and header spellings; all 401 without the key (405 for `/health`, which needs none
/// and spends nothing), and nothing reaches the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_key_bypass_paths_and_spellings_are_refused() {
    let (net, b) = start(keyed(None)).await;
    let addr = net.gateway_addr;
    let p = addr.port();
    let host = format!("Host: 127.0.0.1:{p}");
    let body = chat(3);
    let json = "Content-Type: application/json";
    let cases: Vec<(String, String, &str, u16)> = vec![
        (
            "POST /health/../v1/chat/completions".into(),
            json.into(),
            &body,
            401,
        ),
        (
            "POST /health/%2e%2e/v1/chat/completions".into(),
            json.into(),
            &body,
            401,
        ),
        ("POST //v1/chat/completions".into(), json.into(), &body, 401),
        ("POST /HEALTH".into(), json.into(), &body, 401),
        ("POST /health/".into(), json.into(), &body, 401),
        ("POST /v1/chat/completions/".into(), json.into(), &body, 401),
        (
            "POST /v1/chat/completions?/health".into(),
            json.into(),
            &body,
            401,
        ),
        ("POST /health".into(), json.into(), &body, 405),
        ("POST /health?x=1".into(), json.into(), &body, 405),
        (
            format!("POST http://127.0.0.1:{p}/health"),
            json.into(),
            &body,
            405,
        ),
        (
            "POST /health#/v1/chat/completions".into(),
            json.into(),
            &body,
            405,
        ),
        ("GET /health?x".into(), String::new(), "", 200),
        ("GET /v1/files".into(), String::new(), "", 401),
        ("GET /v1/network".into(), String::new(), "", 401),
        ("DELETE /v1/models/x".into(), String::new(), "", 401),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nAuthorization: {KEY}"),
            &body,
            401,
        ),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nAuthorization: Basic {KEY}"),
            &body,
            401,
        ),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nAuthorization: Bearer"),
            &body,
            401,
        ),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nAuthorization: Bearer "),
            &body,
            401,
        ),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nAuthorization: Bearer {KEY}x"),
            &body,
            401,
        ),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nAuthorization: Bearer {}", &KEY[..KEY.len() - 1]),
            &body,
            401,
        ),
        (
            "POST /v1/chat/completions".into(),
            format!("{json}\r\nX-Api-Key: {KEY}"),
            &body,
            401,
        ),
        // A wrong key first, the right one second: the first is read.
        (
            "POST /v1/chat/completions".into(),
            format!(
                "{json}\r\nAuthorization: Bearer sk-wrong-wrong-wrong\r\nAuthorization: Bearer {KEY}"
            ),
            &body,
            401,
        ),
    ];
    let mut wrong = Vec::new();
    for (line, extra, body, want) in &cases {
        let head = if extra.is_empty() {
            format!("{line} HTTP/1.1\r\n{host}")
        } else {
            format!("{line} HTTP/1.1\r\n{host}\r\n{extra}")
        };
        let (got, _) = raw(addr, &head, body).await;
        if got != *want {
            wrong.push(format!("{line} [{extra}]: {got}, not {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(
        b.served(),
        0,
        "a request without the key reached the worker"
    );
    // The key with spaces around it is the key.
    let (ok, answer) = raw(
        addr,
        &format!("POST /v1/chat/completions HTTP/1.1\r\n{host}\r\n{json}\r\nAuthorization: Bearer   {KEY}  "),
        &body,
    )
    .await;
    assert_eq!(ok, 200, "{answer}");
    assert_eq!(b.served(), 1);
}

/// Daily limit by concurrency (threat 4): the limit is checked when a request's headers
/// arrive and counted when its answer ends, so requests admitted together all pass. Here the
/// race is made certain: four requests send their headers (all admitted at 0 used), then
/// finish their bodies one at a time. Each may use 81 tokens (the prompt's bound, 74, and
/// max_tokens 7) of a 100-token day and uses 12: two are served and the others get 429 (all
/// four were, when the limit was checked on `used` alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_requests_in_flight_together_spend_past_the_daily_limit() {
    let (net, b) = start(keyed(Some(100))).await;
    let addr = net.gateway_addr;
    let body = chat(7); // 5 prompt + 7 completion = 12 tokens
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        addr.port(),
        body.len()
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&body.as_bytes()[..body.len() - 1])
            .await
            .unwrap();
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut statuses = Vec::new();
    for mut tcp in held {
        tcp.write_all(&body.as_bytes()[body.len() - 1..])
            .await
            .unwrap();
        statuses.push(read_answer(&mut tcp).await.0);
    }
    // Each is held at 81 while in flight and counts its 12 once answered: the first two are
    // served (24 used), the third finds 76 left, less than it may use.
    assert_eq!(
        statuses,
        [200, 200, 429, 429],
        "a 100-token day (worker served {})",
        b.served()
    );
    assert_eq!(b.served(), 2);
}

/// Daily limit by one large request (threat 4): only `used < limit` was checked, so the first
/// request of the day could ask for any number of tokens (a 12-token day served 2005). Now a
/// request whose prompt bound and max_tokens exceed what is left of the day gets 429
/// `insufficient_quota` and reaches no worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_one_request_spends_far_past_the_daily_limit() {
    let (net, b) = start(keyed(Some(100))).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/chat/completions", net.gateway_url()))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(chat(2000))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 429, "a 100-token day answered {status}: {body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert_eq!(b.served(), 0, "the request reached the worker");
}

/// Daily limit by errors (threat 4): an answer the gateway cuts at `max_answer_bytes` was
/// generated, relayed and billed by the proxy (for the tokens delivered), yet the key's use
/// was counted only from a finished answer's usage, so it never grew: a 12-token key got
/// request after request of 100 tokens generated. Now an answer that ends without its usage
/// counts all it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_answers_cut_at_max_answer_bytes_are_not_counted() {
    let (net, b) = start(DevOptions {
        gateway_max_answer_bytes: 8,
        // Each request holds 174 (prompt bound 74, max_tokens 100): two fit in the day.
        ..keyed(Some(400))
    })
    .await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = http
            .post(format!("{}/chat/completions", net.gateway_url()))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(chat(100))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status().as_u16() == 429 {
            break;
        }
    }
    assert!(
        statuses.contains(&429),
        "a 400-token key got {statuses:?} ({} answers of 100 tokens generated)",
        b.served()
    );
}

/// Daily limit by streams that fail (threat 4): a stream whose worker breaks off after two
/// tokens ends in an error event, and the proxy bills the tokens delivered; the key's use was
/// counted only from a `Done`, so a 12-token key kept getting tokens. Now such a stream
/// counts all it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_streams_ending_in_an_error_are_not_counted() {
    // Each stream holds 174 (prompt bound 74, max_tokens 100), all of which counts when it
    // ends without its usage: two fit in the day.
    let (net, b) = start(keyed(Some(400))).await;
    b.set(Mode::DieAfterTwo);
    let http = reqwest::Client::new();
    let mut delivered = 0;
    let mut refused = false;
    for _ in 0..12 {
        let r = http
            .post(format!("{}/chat/completions", net.gateway_url()))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(chat_body("Hi", json!({"max_tokens": 100, "stream": true})).to_string())
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 429 {
            refused = true;
            break;
        }
        let text = r.text().await.unwrap();
        delivered += text.matches("\"content\":\"t\"").count();
    }
    assert!(
        refused,
        "a 400-token key was delivered {delivered} tokens and never refused"
    );
}

/// Daily limit by streams without usage (threat 4): a stream without `include_usage` still
/// counts its usage against the key; the next request is refused with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_streams_without_usage_are_counted() {
    // The stream holds 81 (prompt bound 74, max_tokens 7) and uses 12; the next request holds
    // 75, which fits in 85 only if the stream's 12 were not counted.
    let (net, b) = start(keyed(Some(85))).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(chat_body("Hi", json!({"max_tokens": 7, "stream": true})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let next = http
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(chat(1))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status().as_u16(), 429);
    assert_eq!(b.served(), 1);
}

/// An allowed origin wrongly refused (threat 1, the other side): the guard's own refusals
/// (401, 415, 429) to a browser app on an allowed origin carried no CORS headers, so the app
/// saw an opaque network error instead of OpenAI's `invalid_api_key` or `insufficient_quota`.
/// Now they carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_refusals_to_an_allowed_origin_carry_cors_headers() {
    let mut options = keyed(Some(12));
    options.gateway_access.origins = vec![ORIGIN.into()];
    let (net, _b) = start(options).await;
    let addr = net.gateway_addr;
    let host = format!("Host: 127.0.0.1:{}", addr.port());
    let body = chat(3);
    let mut missing = Vec::new();
    for (extra, want) in [
        ("Content-Type: application/json".to_string(), 401),
        (
            format!("Content-Type: text/plain\r\nAuthorization: Bearer {KEY}"),
            415,
        ),
    ] {
        let (got, answer) = raw(
            addr,
            &format!("POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nOrigin: {ORIGIN}\r\n{extra}"),
            &body,
        )
        .await;
        assert_eq!(got, want, "{answer}");
        if header(&answer, "access-control-allow-origin") != Some(ORIGIN) {
            missing.push(want);
        }
    }
    assert!(
        missing.is_empty(),
        "no CORS headers on the guard's {missing:?}"
    );
}

/// An allowed origin wrongly refused (threat 1, the other side): the OpenAI JS SDK in a
/// browser sends `x-stainless-*` headers, so its preflight asks for them; the guard allowed
/// only `authorization, content-type`, and the browser blocked every request from that origin.
/// Now the preflight allows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_preflight_allows_the_headers_the_openai_sdk_sends() {
    let (net, _b) = start(DevOptions {
        gateway_access: AccessConfig {
            origins: vec![ORIGIN.into()],
            ..AccessConfig::default()
        },
        ..test_options()
    })
    .await;
    let requested = "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version";
    let (status, answer) = raw(
        net.gateway_addr,
        &format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: {ORIGIN}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: {requested}",
            net.gateway_addr.port()
        ),
        "",
    )
    .await;
    assert_eq!(status, 204, "{answer}");
    let allowed = header(&answer, "access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let allowed: Vec<&str> = allowed.split(',').map(str::trim).collect();
    let refused: Vec<&str> = requested
        .split(',')
        .filter(|h| !allowed.contains(h))
        .collect();
    assert!(refused.is_empty(), "the preflight refuses {refused:?}");
}

/// Memory (threat 5): huge headers and bodies are refused before anything is held: 431 for
/// a 1 MiB header, 413 for a body past `max_body_bytes` (4 MiB), nothing reaching the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_oversized_headers_and_bodies_are_refused() {
    let (net, b) = start(test_options()).await;
    let addr = net.gateway_addr;
    let host = format!("Host: 127.0.0.1:{}", addr.port());
    let big = "a".repeat(1 << 20);
    let (status, _) = raw(
        addr,
        &format!("GET /v1/models HTTP/1.1\r\n{host}\r\nX-Big: {big}"),
        "",
    )
    .await;
    assert_eq!(status, 431);
    // 5 MiB of body: refused once past 4 MiB, before the rest is held.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = tcp.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        5 << 20
    );
    let writer = tokio::spawn(async move {
        let _ = tx.write_all(head.as_bytes()).await;
        let _ = tx.write_all(&vec![b' '; 5 << 20]).await;
        tx
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), rx.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    drop(writer);
    assert_eq!(status, 413, "{answer}");
    assert_eq!(b.served(), 0);
}

/// DNS rebinding over HTTP/2 (threat 2, low): `:authority` names another host than the Host
/// header; RFC 9113 §8.3.1 says a server SHOULD treat that as malformed. (The guard checked the
/// Host header only, so `:authority: evil.example` with `Host: 127.0.0.1` was served.) Now
/// 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_http2_authority_and_host_that_differ_are_refused() {
    let (net, _b) = start(test_options()).await;
    let p = net.gateway_addr.port();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("evil.example", net.gateway_addr)
        .build()
        .unwrap();
    let r = h2
        .get(format!("http://evil.example:{p}/v1/models"))
        .header("host", format!("127.0.0.1:{p}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    // `:authority` and Host differ: refused (400) whichever a server would read.
    assert_eq!(r.status().as_u16(), 400);
}
