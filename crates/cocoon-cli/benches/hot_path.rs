//! What every streamed token costs at each hop of the path, function by function:
//! the worker reading an upstream server's SSE chunk, the worker encoding the protocol frame,
//! the proxy and the gateway decoding it, and the gateway encoding the app's SSE chunk.
//!
//! `cargo bench -p cocoon-cli --bench hot_path`; figures in docs/performance.md.

use std::hint::black_box;

use bytes::Bytes;
use cocoon_client::chunks::ChunkEncoder;
use cocoon_protocol::{FrameDecoder, GenerateEvent, encode_frame};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

/// A token as vLLM streams it.
const UPSTREAM: &[u8] = br#"{"id":"chatcmpl-5f2c","object":"chat.completion.chunk","created":1764612345,"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null}],"usage":null}"#;

fn delta() -> GenerateEvent {
    GenerateEvent::Delta {
        text: " world".into(),
        tokens: 1,
        logprobs: Vec::new(),
    }
}

/// The reference: how the worker read a chunk before, through a `serde_json::Value` tree.
fn parse_via_value(data: &[u8]) -> Option<String> {
    let event: Value = serde_json::from_slice(data).unwrap();
    let choice = event["choices"].get(0)?;
    let text = choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str());
    text.filter(|t| !t.is_empty()).map(str::to_owned)
}

/// The reference: how the gateway wrote a chunk before, building a `serde_json::Value` tree.
fn chunk_via_value(id: &str, created: u64, model: &str, text: &str) -> Bytes {
    let choices =
        json!([{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]);
    let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": choices});
    v["usage"] = Value::Null;
    Bytes::from(format!("data: {v}\n\n"))
}

fn hot_path(c: &mut Criterion) {
    c.bench_function("worker: parse an upstream SSE chunk", |b| {
        b.iter(|| cocoon_engine::parse_sse_chunk(black_box(UPSTREAM)).unwrap())
    });
    c.bench_function(
        "worker: parse an upstream SSE chunk via Value (before)",
        |b| b.iter(|| parse_via_value(black_box(UPSTREAM))),
    );
    c.bench_function("worker: encode a delta frame", |b| {
        let event = delta();
        b.iter(|| encode_frame(black_box(&event)))
    });
    let frame: Bytes = encode_frame(&delta());
    c.bench_function("proxy/gateway: decode a delta frame", |b| {
        let mut decoder = FrameDecoder::new();
        b.iter(|| {
            decoder.push(black_box(&frame));
            let f = decoder.next_frame().unwrap().unwrap();
            serde_json::from_slice::<GenerateEvent>(&f).unwrap()
        })
    });
    c.bench_function("gateway: encode an SSE delta chunk", |b| {
        let chunks = ChunkEncoder {
            id: "chatcmpl-0123456789abcdef".into(),
            created: 1_764_612_345,
            model: "SmolLM2-135M-Instruct".into(),
            chat: true,
            include_usage: true,
        };
        b.iter(|| chunks.delta(0, black_box(" world"), None))
    });
    c.bench_function(
        "gateway: encode an SSE delta chunk via Value (before)",
        |b| {
            b.iter(|| {
                chunk_via_value(
                    black_box("chatcmpl-0123456789abcdef"),
                    1_764_612_345,
                    "SmolLM2-135M-Instruct",
                    black_box(" world"),
                )
            })
        },
    );
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
