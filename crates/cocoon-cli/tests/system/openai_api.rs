//! The OpenAI-compatible API through the whole network: gateway -> proxy -> worker, real model.

use std::sync::Arc;

use crate::common::*;
use cocoon_engine::Backend;
use cocoon_protocol::{ChatMessage, Input, Role};
use serde_json::{Value, json};

#[tokio::test]
async fn models_are_listed_and_retrievable() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let list: Value = get_json(&http, format!("{}/models", net.gateway_url())).await;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(list["data"][0]["context_length"], 4096);
    let one = http
        .get(format!("{}/models/{MODEL}", net.gateway_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let missing = http
        .get(format!("{}/models/gpt-9", net.gateway_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn chat_completion_streaming_and_not_agree_and_count_real_tokens() {
    let backend = llama();
    let net = network(vec![backend.clone()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let question = "Tell me the capital of France.";
    let plain: Value = post_json(
        &http,
        &url,
        &chat_body(question, json!({"max_tokens": 20, "temperature": 0})),
    )
    .await;
    assert_eq!(plain["object"], "chat.completion");
    let answer = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    let usage = &plain["usage"];
    let rendered = backend
        .render_prompt(&Input::Chat {
            messages: vec![ChatMessage::new(Role::User, question)],
            tools: None,
        })
        .unwrap();
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap() as usize,
        backend.count_tokens(&rendered)
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let response = http
        .post(&url)
        .json(&chat_body(question, json!({"max_tokens": 20, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_events(response).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, answer,
        "greedy stream equals greedy non-stream answer"
    );
    let usage_chunk = &events[events.len() - 2];
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        token_counts(&usage_chunk["usage"]),
        token_counts(&plain["usage"])
    );
    // Both were billed at the network's price, one after the other on the contract; the
    // second, the same prompt again, was read from the worker's prompt cache, whose tokens
    // weigh less.
    let (bill, streamed_bill) = (&plain["usage"]["billing"], &usage_chunk["usage"]["billing"]);
    let price = bill["price_per_token"].as_u64().unwrap();
    let weighted = dev_weighted(usage);
    assert_eq!(bill["billed_tokens"], weighted);
    assert_eq!(usage["cost"], weighted * price);
    let streamed_usage = &usage_chunk["usage"];
    assert!(
        streamed_usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{streamed_usage}"
    );
    let streamed_weighted = dev_weighted(streamed_usage);
    assert!(streamed_weighted < weighted);
    assert_eq!(streamed_usage["cost"], streamed_weighted * price);
    // The gateway checked each bill against the proxy's key and this client's contract.
    assert_eq!(usage["bill_verified"], true);
    assert_eq!(usage_chunk["usage"]["bill_verified"], true);
    assert_eq!(
        streamed_bill["tokens_used"].as_u64().unwrap(),
        bill["tokens_used"].as_u64().unwrap() + streamed_weighted
    );
    let finish = &events[events.len() - 3];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        plain["choices"][0]["finish_reason"]
    );
}

#[tokio::test]
async fn streaming_without_usage_option_sends_no_usage() {
    let net = network(vec![llama()]).await;
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"max_tokens": 4, "stream": true})))
        .send()
        .await
        .unwrap();
    let events = sse_events(response).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().all(|e| e.get("usage").is_none()));
}

#[tokio::test]
async fn legacy_completions_work_streaming_and_not() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/completions", net.gateway_url());
    let plain: Value = post_json(&http, &url, &json!({"model": MODEL, "prompt": "The first three letters of the alphabet are", "max_tokens": 8, "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(plain["object"], "text_completion");
    assert_eq!(plain["usage"]["completion_tokens"], 8);
    assert_eq!(plain["choices"][0]["finish_reason"], "length");
    let text = plain["choices"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    let response = http
        .post(&url)
        .json(&json!({"model": MODEL, "prompt": "The first three letters of the alphabet are", "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let events = sse_events(response).await;
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(events[events.len() - 2]["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn stop_sequences_apply_through_the_network() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let ask = |extra: Value| chat_body("Write one sentence about the sea.", extra);
    let full: Value = post_json(
        &http,
        &url,
        &ask(json!({"max_tokens": 30, "temperature": 0})),
    )
    .await;
    let full = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    // Stop at the greedy answer's third word: the cut answer must be exactly what came before.
    let stop = full
        .split_whitespace()
        .nth(2)
        .expect("answer has three words")
        .to_owned();
    let cut: Value = post_json(
        &http,
        &url,
        &ask(json!({"max_tokens": 30, "temperature": 0, "stop": [stop]})),
    )
    .await;
    assert_eq!(
        cut["choices"][0]["message"]["content"].as_str().unwrap(),
        &full[..full.find(stop.as_str()).unwrap()]
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn concurrent_requests_are_served_together() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let body = chat_body(
                    &format!("Say {i}"),
                    json!({"max_tokens": 6, "ignore_eos": true}),
                );
                let r: Value = post_json(&http, url, &body).await;
                r["usage"]["completion_tokens"].as_u64().unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 6);
    }
}

#[tokio::test]
async fn load_spreads_over_two_workers() {
    let (a, b) = (llama(), llama());
    let net = network(vec![a.clone() as Arc<dyn Backend>, b.clone()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    // One after the other: the second goes to the worker not yet measured.
    for i in 0..2 {
        let body = chat_body(&format!("Say {i}"), json!({"max_tokens": 2}));
        assert_eq!(
            http.post(&url).json(&body).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        (a.stats().completed, b.stats().completed),
        (1, 1),
        "an unmeasured worker is tried first"
    );
    // At once: the load term spreads them.
    let answers: Vec<_> = (0..8)
        .map(|i| {
            let body = chat_body(&format!("Say {i}"), json!({"max_tokens": 2}));
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.post(url).json(&body).send().await.unwrap().status() })
        })
        .collect();
    for answer in answers {
        assert_eq!(answer.await.unwrap(), 200);
    }
    let (ca, cb) = (a.stats().completed, b.stats().completed);
    assert_eq!(ca + cb, 10);
    assert!(ca >= 3 && cb >= 3, "8 at once are spread: {ca} and {cb}");
    let status = net.proxy_status();
    assert_eq!(status.fingerprint, net.proxy_fingerprint.to_string());
    assert_eq!(status.workers.len(), 2);
    for w in &status.workers {
        assert_eq!((w.in_flight, w.capacity), (0, 4));
        assert_eq!(w.models, vec![MODEL.to_string()]);
        assert!(w.healthy && w.reputation.samples > 0.9, "{w:?}");
    }
    assert_eq!(status.workers.iter().map(|w| w.served).sum::<u64>(), 10);
    let mut seen: Vec<String> = status
        .workers
        .iter()
        .map(|w| w.fingerprint.clone())
        .collect();
    let mut expected = vec![
        net.worker_fingerprint(0).to_string(),
        net.worker_fingerprint(1).to_string(),
    ];
    seen.sort();
    expected.sort();
    assert_eq!(
        seen, expected,
        "the proxy knows each worker by its pinned key"
    );
}

/// `n`: each choice is a request of its own through the network, billed on its own. The usage
/// sums them and keeps each choice's bill beside, each verified by the gateway.
#[tokio::test]
async fn several_choices_are_several_billed_requests() {
    let net = network(vec![llama()]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    let body = chat_body(
        "Write a word.",
        json!({"max_tokens": 5, "temperature": 1.2, "seed": 3, "n": 3}),
    );
    let answer: Value = post_json(&http, &url, &body).await;
    let indices: Vec<u64> = answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2], "{answer}");
    let usage = &answer["usage"];
    let each = usage["choices"].as_array().unwrap();
    assert_eq!(each.len(), 3, "{usage}");
    let mut counters = Vec::new();
    for u in each {
        assert_eq!(u["bill_verified"], true, "{u}");
        counters.push(u["billing"]["tokens_used"].as_u64().unwrap());
    }
    counters.sort_unstable();
    counters.dedup();
    assert_eq!(
        counters.len(),
        3,
        "three bills, each a move of the contract's counter"
    );
    let sum = |field: &str| each.iter().map(|u| u[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!(usage["cost"].as_u64().unwrap(), sum("cost"));
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap(),
        sum("completion_tokens")
    );
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap(),
        sum("prompt_tokens")
    );
    assert_eq!(usage["bill_verified"], true);
    assert!(usage.get("billing").is_none(), "{usage}");
}

/// Embeddings through the whole network, sealed to the worker: billed by the texts' tokens at
/// the network's price, nothing generated, the bill verified by the gateway, the worker's
/// receipt named in the answer's header.
#[tokio::test]
async fn embeddings_are_billed_by_their_tokens() {
    let backend = llama_with_embeddings();
    let net = network(vec![backend.clone()]).await;
    let http = reqwest::Client::new();
    let texts = [
        "The cat sat on the mat.",
        "Stock markets fell sharply today.",
    ];
    let response = http
        .post(format!("{}/embeddings", net.gateway_url()))
        .json(&json!({"model": MODEL, "input": texts}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("cocoon-request-id"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["data"].as_array().unwrap().len(), 2, "{answer}");
    assert_eq!(answer["data"][1]["object"], "embedding");
    assert_eq!(
        answer["data"][1]["embedding"].as_array().unwrap().len(),
        576
    );
    let usage = &answer["usage"];
    let counted: usize = texts.iter().map(|t| backend.count_tokens(t)).sum();
    assert_eq!(usage["prompt_tokens"], counted as u64, "{usage}");
    assert_eq!(usage["completion_tokens"], 0, "{usage}");
    assert_eq!(usage["bill_verified"], true, "{usage}");
    let price = usage["billing"]["price_per_token"].as_u64().unwrap();
    assert_eq!(usage["cost"], dev_weighted(usage) * price, "{usage}");
}
