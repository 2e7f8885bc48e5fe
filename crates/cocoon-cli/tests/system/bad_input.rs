//! Malformed and out-of-range requests get OpenAI-shaped 4xx errors and the network keeps serving.

use crate::common::*;
use serde_json::{Value, json};

async fn expect_error(response: reqwest::Response, status: u16, needle: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("OpenAI error body: {body}"));
    assert!(
        message.contains(needle),
        "expected {needle:?} in {message:?}"
    );
    assert!(body["error"]["type"].is_string());
    body
}

#[tokio::test]
async fn bad_requests_are_refused_clearly_and_serving_continues() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let chat = format!("{}/chat/completions", net.gateway_url());
    let raw = |body: &'static str| {
        http.post(&chat)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    expect_error(
        raw("{not json").await.unwrap(),
        400,
        "could not parse the JSON",
    )
    .await;
    expect_error(
        raw(r#"{"model":"SmolLM2-135M-Instruct","messages":"hi"}"#)
            .await
            .unwrap(),
        400,
        "invalid type",
    )
    .await;
    expect_error(raw(r#"{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#).await.unwrap(), 400, "invalid type").await;
    expect_error(
        raw(r#"{"messages":[{"role":"user","content":"x"}]}"#)
            .await
            .unwrap(),
        400,
        "model",
    )
    .await;
    expect_error(raw(r#"{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#).await.unwrap(), 400, "invalid value").await;

    let unknown = http
        .post(&chat)
        .json(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    let body = expect_error(unknown, 404, "gpt-9").await;
    assert_eq!(body["error"]["code"], "model_not_found");

    for stream in [false, true] {
        let too_long = http
            .post(&chat)
            .json(&chat_body(
                "x",
                json!({"max_tokens": 5000, "stream": stream}),
            ))
            .send()
            .await
            .unwrap();
        let body = expect_error(too_long, 400, "maximum context length is 4096").await;
        assert_eq!(body["error"]["code"], "context_length_exceeded");
    }
    let long_prompt = "word ".repeat(5000);
    let too_long = http
        .post(&chat)
        .json(&chat_body(&long_prompt, json!({"max_tokens": 10})))
        .send()
        .await
        .unwrap();
    expect_error(too_long, 400, "maximum context length").await;

    let huge = "x".repeat(5 << 20);
    let oversize = http
        .post(&chat)
        .json(&chat_body(&huge, json!({})))
        .send()
        .await
        .unwrap();
    expect_error(oversize, 413, "too large").await;

    expect_error(
        http.post(&chat)
            .json(&chat_body("x", json!({"n": 9})))
            .send()
            .await
            .unwrap(),
        400,
        "n must be between 1 and 8",
    )
    .await;
    expect_error(
        http.post(&chat)
            .json(&chat_body("x", json!({"top_p": 0})))
            .send()
            .await
            .unwrap(),
        400,
        "top_p",
    )
    .await;
    expect_error(http.get(&chat).send().await.unwrap(), 405, "not allowed").await;
    expect_error(
        http.get(format!("{}/nowhere", net.gateway_url()))
            .send()
            .await
            .unwrap(),
        404,
        "Unknown request URL",
    )
    .await;
    let completions = format!("{}/completions", net.gateway_url());
    expect_error(
        http.post(&completions)
            .json(&json!({"model": MODEL, "prompt": ["a", "b"]}))
            .send()
            .await
            .unwrap(),
        400,
        "single string",
    )
    .await;

    // Still serving.
    let ok = http
        .post(&chat)
        .json(&chat_body("Hi", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}
