//! A worker relaying to an OpenAI-compatible server that serves a reasoning model with a
//! prompt cache, as vLLM and SGLang do: its thinking (`reasoning_content`) and its usage
//! details (`cached_tokens`, `reasoning_tokens`) pass through the whole network to the app,
//! and the bill weighs each kind of token at the network's multiplier for it.

use std::sync::Arc;

use crate::common::*;
use cocoon_engine::{Backend, UpstreamBackend, UpstreamConfig};
use serde_json::{Value, json};

/// The scripted server's answer: three chunks of thinking, two of content, then the usage of
/// a 40-token prompt (30 of them from its prompt cache) and 5 generated tokens (3 of them
/// thinking).
const REASONING_SSE: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Let\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\" me\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\" think\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"4\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"2\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":5,",
    "\"prompt_tokens_details\":{\"cached_tokens\":30},",
    "\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\n",
    "data: [DONE]\n\n",
);

async fn reasoning_server() -> String {
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async { REASONING_SSE }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// A worker's backend relaying to the server at `url`, which serves model `id`.
fn relay_to(url: String, id: &str) -> Arc<dyn Backend> {
    Arc::new(
        UpstreamBackend::new(UpstreamConfig {
            url,
            ca_file: None,
            api_key: None,
            models: vec![
                serde_json::from_value(json!({"model_hash": cocoon_testkit::backends::scripted_model_hash(), "id": id, "context_length": 4096})).unwrap(),
            ],
            parallel: 4,
            timeout_secs: 10,
            idle_timeout_secs: 10,
            cache_salt: true,
        })
        .unwrap(),
    )
}

/// The usage an app gets, checked to the token, and the bill it comes with: 10 fresh prompt
/// tokens, 30 cached at 0.1, 2 of answer and 3 of thinking weigh 18 at the default
/// multipliers, verified by the gateway against the ledger's.
fn assert_usage_and_bill(usage: &Value) {
    assert_eq!(usage["prompt_tokens"], 40, "{usage}");
    assert_eq!(usage["completion_tokens"], 5, "{usage}");
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 30,
        "{usage}"
    );
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"], 3,
        "{usage}"
    );
    assert_eq!(usage["billing"]["weighted_tokens"], 18, "{usage}");
    assert_eq!(usage["bill_verified"], true, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_models_thinking_and_cached_tokens_pass_through_and_are_billed_by_kind() {
    let relay = relay_to(reasoning_server().await, "thinker");
    let net = network(vec![relay]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let ask = |extra: Value| {
        let mut body = json!({"model": "thinker", "messages": [{"role": "user", "content": "Six times seven?"}], "max_tokens": 16});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };

    let answer: Value = post_json(&http, &url, &ask(json!({}))).await;
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["content"], "42", "{answer}");
    assert_eq!(message["reasoning_content"], "Let me think", "{answer}");
    assert_usage_and_bill(&answer["usage"]);

    let streamed = http
        .post(&url)
        .json(&ask(
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = sse_data(&streamed);
    let delta = |field: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .collect()
    };
    assert_eq!(delta("reasoning_content"), "Let me think", "{streamed}");
    assert_eq!(delta("content"), "42", "{streamed}");
    // The thinking comes first, as the model produced it.
    let first_thought = streamed.find("reasoning_content").unwrap();
    let first_answer = streamed.find("\"content\":\"4\"").unwrap();
    assert!(first_thought < first_answer, "{streamed}");
    let usage = chunks.last().map(|c| &c["usage"]).unwrap();
    assert_usage_and_bill(usage);
}

/// A server's tool call, streamed as vLLM streams one: the id and name first, the arguments
/// in fragments, `finish_reason: tool_calls`, then the usage.
const TOOL_CALL_SSE: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"chatcmpl-tool-7\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \"}}]}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":60,\"completion_tokens\":3}}\n\n",
    "data: [DONE]\n\n",
);

/// Tools through an upstream server: the tools, the choice and an earlier call and its
/// result reach it in OpenAI's shape; its streamed call comes back to the app whole (and as
/// deltas when streamed), ends with `tool_calls`, and is billed as the tokens it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_calls_pass_through_an_upstream_server() {
    let seen: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let router = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(body);
                    TOOL_CALL_SSE
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let relay = relay_to(url, "caller");
    let net = network(vec![relay]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({"model": "caller", "max_tokens": 16, "tools": tools,
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": false,
    "messages": [
        {"role": "user", "content": "Weather in Oslo, then Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5 C"}
    ]});
    let answer: Value = post_json(&http, &url, &body).await;
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    assert_eq!(choice["message"]["content"], Value::Null, "{answer}");
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{"id": "chatcmpl-tool-7", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
        "{answer}"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    assert_eq!(answer["usage"]["bill_verified"], true, "{answer}");

    let sent = seen.lock().unwrap()[0].clone();
    assert_eq!(sent["tools"], tools, "{sent}");
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(sent["parallel_tool_calls"], false);
    assert_eq!(
        sent["messages"][1]["tool_calls"][0]["id"], "call_1",
        "{sent}"
    );
    assert_eq!(sent["messages"][1]["content"], Value::Null, "{sent}");
    assert_eq!(sent["messages"][2]["role"], "tool");
    assert_eq!(sent["messages"][2]["tool_call_id"], "call_1");

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let streamed = http
        .post(&url)
        .json(&streaming)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = sse_data(&streamed);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{streamed}");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Paris\"}");
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, "tool_calls", "{streamed}");
}
