//! Who may spend the gateway's wallet (issue 23), through a real proxy and a scripted worker:
//! a web page's cross-origin POST and a DNS-rebinding Host are refused before anything is
//! sent, API keys are required once configured, a key's daily limit stops its spending, an
//! allowed origin gets CORS answers, and a worker cannot fill the gateway's memory with an
//! answer that is not streamed.

use cocoon_client::{AccessConfig, ApiKey};
use cocoon_testkit::dev::{DevOptions, test_options};

use crate::scripted::start;
use cocoon_testkit::http::chat_body;
use serde_json::{Value, json};

const KEY: &str = "sk-cocoon-test-0123456789";

fn chat(max_tokens: u32) -> String {
    chat_body("Hi", json!({ "max_tokens": max_tokens })).to_string()
}

/// The OpenAI error `code`/`type` and message of a refusal with `status`.
async fn refused(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_pages_cross_origin_post_and_a_rebinding_host_are_refused_and_spend_nothing() {
    let (net, b) = start(test_options()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());

    // What any page can send without a preflight: a "simple" POST with a text/plain body.
    let simple = http
        .post(&url)
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(chat(3))
        .send()
        .await
        .unwrap();
    let body = refused(simple, 403).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("origin"),
        "{body}"
    );
    assert!(
        !http
            .post(&url)
            .header("origin", "https://evil.example")
            .header("content-type", "application/json")
            .body(chat(3))
            .send()
            .await
            .unwrap()
            .headers()
            .contains_key("access-control-allow-origin"),
        "no CORS answer for an origin not allowed"
    );
    // The same body without an origin, still text/plain: refused too.
    let plain = http
        .post(&url)
        .header("content-type", "text/plain")
        .body(chat(3))
        .send()
        .await
        .unwrap();
    refused(plain, 415).await;
    // A page on a rebound name reaches 127.0.0.1 with its own name as Host.
    let port = net
        .gateway_url()
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let rebound = http
        .post(&url)
        .header("host", format!("evil.example:{port}"))
        .header("content-type", "application/json")
        .body(chat(3))
        .send()
        .await
        .unwrap();
    refused(rebound, 421).await;
    let read = http
        .get(format!("{}/models", net.gateway_url()))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    refused(read, 421).await;
    assert_eq!(b.served(), 0, "a refused request reached the worker");

    // An app on the machine (no Origin, JSON, Host of the listen address) is served.
    let ok = http
        .post(&url)
        .header("content-type", "application/json")
        .body(chat(3))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(b.served(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_set_a_key_is_required_and_its_daily_limit_stops_spending() {
    let options = DevOptions {
        gateway_access: AccessConfig {
            keys: vec![ApiKey {
                key: Some(KEY.into()),
                key_file: None,
                name: "tests".into(),
                tokens_per_day: Some(231),
            }],
            ..AccessConfig::default()
        },
        ..test_options()
    };
    let (net, b) = start(options).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let post = |key: Option<&str>| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/json")
            .body(chat(3));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let missing = refused(post(None).await.unwrap(), 401).await;
    assert_eq!(missing["error"]["code"], "invalid_api_key", "{missing}");
    let wrong = refused(post(Some("sk-cocoon-test-wrong-key")).await.unwrap(), 401).await;
    assert_eq!(wrong["error"]["code"], "invalid_api_key", "{wrong}");
    let models = http
        .get(format!("{}/models", net.gateway_url()))
        .send()
        .await
        .unwrap();
    refused(models, 401).await;
    assert_eq!(b.served(), 0);
    // The health probe spends nothing and needs no key.
    let health = http
        .get(format!(
            "{}/health",
            net.gateway_url().trim_end_matches("/v1")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // With the key: served while the day has room for what a request may use (its prompt's
    // bound, 74 tokens for "Hi" with the template's overhead, and max_tokens 3), each answer
    // then counting what it used (the scripted 5 prompt and 3 completion tokens): 231 tokens
    // admit 20 such requests, the 21st would not fit.
    let mut served = 0;
    loop {
        let r = post(Some(KEY)).await.unwrap();
        if r.status().as_u16() == 429 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
            break;
        }
        assert_eq!(r.status().as_u16(), 200);
        served += 1;
        assert!(served <= 20, "the daily limit never stopped the key");
    }
    assert_eq!(served, 20);
    assert_eq!(
        b.served(),
        served,
        "a request past the limit reached the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_cors_answers() {
    let origin = "http://localhost:3000";
    let options = DevOptions {
        gateway_access: AccessConfig {
            origins: vec![origin.into()],
            ..AccessConfig::default()
        },
        ..test_options()
    };
    let (net, b) = start(options).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let preflight = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 204);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], origin);
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("content-type")
    );
    let answer = http
        .post(&url)
        .header("origin", origin)
        .header("content-type", "application/json")
        .body(chat(3))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(answer.headers()["access-control-allow-origin"], origin);
    assert_eq!(b.served(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_long_to_gather_ends_in_a_clear_error() {
    let options = DevOptions {
        gateway_max_answer_bytes: 8,
        ..test_options()
    };
    let (net, _b) = start(options).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let long = http
        .post(&url)
        .header("content-type", "application/json")
        .body(chat(20))
        .send()
        .await
        .unwrap();
    let body = refused(long, 502).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_answer_bytes"),
        "{body}"
    );
    // Streamed, the same answer passes: nothing is gathered.
    let streamed = http
        .post(&url)
        .header("content-type", "application/json")
        .body(chat_body("Hi", json!({"max_tokens": 20, "stream": true})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status().as_u16(), 200);
    let text = streamed.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}
