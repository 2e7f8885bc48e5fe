//! A fast, deterministic OpenAI-compatible server: the backend for measuring the network
//! path alone. It answers every request with exactly `max_tokens` one-token chunks, as fast
//! as it can or one every `interval`, and reports exact `usage`.
//!
//! Each chunk's text is the moment it was sent (`t<nanoseconds> `, on a clock shared with
//! the bench in this process), so the bench reads each token's transit time off the token
//! itself. This is a measuring instrument (and a test fixture for routing and failover, where
//! what matters is when tokens flow, not what they say), never a worker's backend in
//! service: it generates nothing.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The model id the synthetic server lists and answers as.
pub const MODEL: &str = "synthetic";

/// Nanoseconds since the first call in this process.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The moment a synthetic chunk's text says it was sent, as an [`Instant`].
pub fn sent_at(text: &str) -> Option<Instant> {
    let ns: u64 = text.trim().strip_prefix('t')?.parse().ok()?;
    let now = now_ns();
    Instant::now().checked_sub(Duration::from_nanos(now.checked_sub(ns)?))
}

/// A running synthetic server.
pub struct Synthetic {
    /// The loopback address it listens on.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Synthetic {
    /// Serves on a free loopback port; `interval` zero means as fast as possible.
    pub async fn start(interval: Duration) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", interval).await
    }

    /// Serves on `listen` (`host:port`, port 0 for a free one).
    pub async fn start_on(listen: &str, interval: Duration) -> anyhow::Result<Self> {
        now_ns();
        let router = Router::new()
            .route("/v1/chat/completions", post(generate))
            .route("/v1/completions", post(generate))
            .route(
                "/v1/models",
                get(|| async {
                    axum::Json(
                        json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}),
                    )
                }),
            )
            .with_state(interval);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        // As real inference servers do (uvicorn, llama-server): no Nagle delay on chunks.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(Self { addr, stop })
    }

    /// The OpenAI API base URL (`http://<addr>/v1`) to point a client or worker at.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for Synthetic {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn chunk(chat: bool, text: Option<&str>, finish: Option<&str>) -> Bytes {
    let choice = if chat {
        json!({"index": 0, "delta": {"content": text.unwrap_or("")}, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish})
    };
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let v = json!({"id": "synthetic", "object": object, "model": MODEL, "choices": [choice]});
    Bytes::from(format!("data: {v}\n\n"))
}

async fn generate(State(interval): State<Duration>, body: axum::Json<Value>) -> Response {
    let body = body.0;
    let chat = body.get("messages").is_some();
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(16) as u32;
    // A deterministic stand-in for a tokenizer: one token per word.
    let prompt_tokens = match &body["messages"] {
        Value::Array(messages) => messages
            .iter()
            .map(|m| {
                m["content"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .count()
            })
            .sum::<usize>(),
        _ => body["prompt"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .count(),
    } as u32;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                       "total_tokens": prompt_tokens + max_tokens});
    if body["stream"].as_bool() != Some(true) {
        let text: String = (0..max_tokens).map(|_| format!("t{} ", now_ns())).collect();
        return axum::Json(json!({
            "id": "synthetic", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": usage,
        }))
        .into_response();
    }
    let start = tokio::time::Instant::now();
    let stream = futures_util::stream::unfold(0u32, move |i| {
        let usage = usage.clone();
        async move {
            let bytes = match i {
                i if i < max_tokens => {
                    if !interval.is_zero() {
                        tokio::time::sleep_until(start + interval * i).await;
                    }
                    chunk(chat, Some(&format!("t{} ", now_ns())), None)
                }
                i if i == max_tokens => chunk(chat, None, Some("length")),
                i if i == max_tokens + 1 => {
                    let v = json!({"id": "synthetic", "object": "chat.completion.chunk",
                                   "model": MODEL, "choices": [], "usage": usage});
                    Bytes::from(format!("data: {v}\n\n"))
                }
                i if i == max_tokens + 2 => Bytes::from_static(b"data: [DONE]\n\n"),
                _ => return None,
            };
            Some((Ok::<_, std::convert::Infallible>(bytes), i + 1))
        }
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::client::stream_chat;

    #[tokio::test]
    async fn streams_exactly_max_tokens_stamped_chunks_with_usage() {
        let server = Synthetic::start(Duration::from_millis(2)).await.unwrap();
        let http = reqwest::Client::new();
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "one two three"}],
                          "max_tokens": 5, "stream": true});
        let answer = stream_chat(&http, &format!("{}/chat/completions", server.url()), &body)
            .await
            .unwrap();
        assert_eq!((answer.prompt_tokens, answer.completion_tokens), (3, 5));
        assert_eq!(answer.chunks.len(), 5);
        let mut last = None;
        for (arrived, text) in &answer.chunks {
            let sent = sent_at(text).expect("every chunk is stamped");
            assert!(sent <= *arrived, "sent after it arrived");
            assert!(last.is_none_or(|l| l <= sent), "stamps go forward");
            last = Some(sent);
        }
        // Paced: five chunks take at least four intervals.
        assert!(answer.latency >= Duration::from_millis(8));
        assert_eq!(sent_at("hello"), None);
    }
}
