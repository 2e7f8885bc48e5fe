//! The gateway's OpenAI API on a scripted worker, end to end through a real proxy: what apps
//! see of models, answers, streams, usage and bills, and the OpenAI-shaped errors for what it
//! refuses. Exact token counts come from the double, so every figure is checked to the token.

use cocoon_testkit::backends::{MODEL, PROMPT_TOKENS, Scripted};
use cocoon_testkit::dev::{DevNetwork, network};
use cocoon_testkit::http::*;
use serde_json::{Value, json};

async fn start() -> (DevNetwork, std::sync::Arc<Scripted>) {
    let b = Scripted::new(2048);
    let net = network(vec![b.clone()]).await;
    (net, b)
}

/// Checks an error in OpenAI's shape with `status` and `needle` in its message.
async fn expect_error(response: reqwest::Response, status: u16, needle: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OpenAI error body: {body}"));
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert!(body["error"]["type"].is_string(), "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_answers_and_streams_carry_the_workers_exact_counts_and_a_verified_bill() {
    let (net, b) = start().await;
    let http = reqwest::Client::new();

    let models = get_json(&http, format!("{}/models", net.gateway_url())).await;
    let listed = models["data"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{models}");
    assert_eq!(listed[0]["id"], MODEL);
    assert_eq!(listed[0]["context_length"], 2048);
    assert_eq!(listed[0]["workers"], 1);

    let answer = post_json(
        &http,
        format!("{}/chat/completions", net.gateway_url()),
        &chat_body("Hi", json!({"max_tokens": 3})),
    )
    .await;
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "ttt");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let prompt = u64::from(PROMPT_TOKENS);
    assert_eq!(token_counts(&answer["usage"]), (prompt, 3, prompt + 3));
    assert_eq!(answer["usage"]["bill_verified"], true, "{answer}");
    assert!(answer["usage"]["cost"].as_u64().unwrap() > 0, "{answer}");

    let streamed = http
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body(
            "Hi",
            json!({"max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert!(
        streamed.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "tttt");
    let usage = events
        .iter()
        .rev()
        .find(|e| e["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(token_counts(&usage["usage"]), (prompt, 4, prompt + 4));
    assert_eq!(usage["usage"]["bill_verified"], true);
    assert_eq!(b.served(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_gateway_refuses_gets_an_openai_error_and_never_reaches_a_worker() {
    let (net, b) = start().await;
    let http = reqwest::Client::new();
    let chat = format!("{}/chat/completions", net.gateway_url());
    let raw = |body: String| {
        http.post(&chat)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        raw("{not json".into()).await.unwrap(),
        400,
        "could not parse the JSON",
    )
    .await;
    let n9 = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 9});
    expect_error(
        raw(n9.to_string()).await.unwrap(),
        400,
        "n must be between 1 and 8",
    )
    .await;
    let tools = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"});
    expect_error(
        raw(tools.to_string()).await.unwrap(),
        400,
        "tool_choice must be none, auto, required",
    )
    .await;
    let unknown = json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]});
    let body = expect_error(raw(unknown.to_string()).await.unwrap(), 404, "gpt-9").await;
    assert_eq!(body["error"]["code"], "model_not_found");
    for stream in [false, true] {
        let long = chat_body("x", json!({"max_tokens": 4000, "stream": stream}));
        let body = expect_error(raw(long.to_string()).await.unwrap(), 400, "context").await;
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    }
    // Over the gateway's body limit (4 MiB by default).
    let huge = chat_body(&"x".repeat(5 << 20), json!({}));
    let response = raw(huge.to_string()).await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["connection"],
        "close",
        "the unread body leaves the connection unusable"
    );

    assert_eq!(b.served(), 0, "a refused request reached the worker");
    // And the gateway still serves.
    let answer = post_json(&http, &chat, &chat_body("Hi", json!({"max_tokens": 1}))).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "t", "{answer}");
}

/// A streamed answer that pauses between tokens (a model thinking, a slow upstream) keeps the
/// app's connection visibly alive: SSE comments, which apps and SDKs skip, come while no token
/// does, and the answer's chunks are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pausing_stream_sends_keep_alive_comments_between_tokens() {
    let (net, b) = crate::scripted::start(cocoon_testkit::dev::DevOptions {
        gateway_keep_alive_secs: 1,
        ..cocoon_testkit::dev::test_options()
    })
    .await;
    b.pace(std::time::Duration::from_millis(1400));
    let body = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"max_tokens": 3, "stream": true})))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Three pauses of 1.4 s (before the second and third token, and the end): a comment in
    // each.
    let comments = body.lines().filter(|l| *l == ": keep-alive").count();
    assert!(comments >= 3, "{comments} keep-alives in {body}");
    let text: String = sse_data(&body)
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "ttt", "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}
