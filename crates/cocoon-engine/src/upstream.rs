//! Relays generations to an OpenAI-compatible server that the GPU owner runs next to the
//! worker (vLLM, SGLang, llama.cpp's server, Ollama). Token counts come from the server's own
//! `usage`, i.e. from the serving model's tokenizer; a server that does not report usage is an
//! error, since a worker cannot be paid for tokens nobody counted.

use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::{
    ErrorKind, FinishReason, GenerateEvent, GenerateRequest, Input, ModelCard, ProtocolError, Usage,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::stats::{BackendStats, Outcome};
use crate::{Backend, EventStream, StatsSnapshot, error_stream};

/// Largest SSE line accepted from the upstream server.
const MAX_SSE_LINE: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the OpenAI API, e.g. `http://127.0.0.1:8000/v1`.
    pub url: String,
    /// Sent as `Authorization: Bearer` when set.
    #[serde(default)]
    pub api_key: Option<String>,
    pub models: Vec<UpstreamModel>,
    /// Requests sent at once; more wait in a queue.
    #[serde(default = "default_parallel")]
    pub parallel: u32,
    /// Time allowed to connect and to receive the response headers.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_parallel() -> u32 {
    16
}

fn default_timeout() -> u64 {
    60
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamModel {
    /// Name announced to the network.
    pub id: String,
    /// Name the upstream server knows the model by, when different.
    #[serde(default)]
    pub upstream_id: Option<String>,
    pub context_length: u32,
}

pub struct UpstreamBackend {
    config: UpstreamConfig,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    stats: Arc<BackendStats>,
}

impl UpstreamBackend {
    pub fn new(config: UpstreamConfig) -> Result<Self, ProtocolError> {
        if config.models.is_empty() {
            return Err(ProtocolError::internal(
                "upstream backend needs at least one model",
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.timeout_secs))
            .build()
            .map_err(|e| ProtocolError::internal(format!("http client: {e}")))?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(config.parallel.max(1) as usize)),
            config,
            http,
            stats: Arc::default(),
        })
    }

    fn request_body(&self, upstream_model: &str, request: &GenerateRequest) -> (String, Value) {
        let p = &request.params;
        let mut body = json!({
            "model": upstream_model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": p.temperature,
            "top_p": p.top_p,
        });
        if let Some(m) = p.max_tokens {
            body["max_tokens"] = json!(m);
        }
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        if p.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let base = self.config.url.trim_end_matches('/');
        match &request.input {
            Input::Chat { messages } => {
                body["messages"] = json!(
                    messages
                        .iter()
                        .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                        .collect::<Vec<_>>()
                );
                (format!("{base}/chat/completions"), body)
            }
            Input::Text { prompt } => {
                body["prompt"] = json!(prompt);
                (format!("{base}/completions"), body)
            }
        }
    }
}

impl Backend for UpstreamBackend {
    fn models(&self) -> Vec<ModelCard> {
        self.config
            .models
            .iter()
            .map(|m| ModelCard {
                id: m.id.clone(),
                context_length: m.context_length,
            })
            .collect()
    }

    fn capacity(&self) -> u32 {
        self.config.parallel.max(1)
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        if let Err(e) = request.validate() {
            return error_stream(e);
        }
        let Some(model) = self.config.models.iter().find(|m| m.id == request.model) else {
            return error_stream(ProtocolError::new(
                ErrorKind::ModelNotFound,
                format!("this worker does not serve model '{}'", request.model),
            ));
        };
        let upstream_model = model.upstream_id.as_deref().unwrap_or(&model.id);
        let (url, body) = self.request_body(upstream_model, &request);
        let mut builder = self
            .http
            .post(url)
            .json(&body)
            .timeout(Duration::from_secs(self.config.timeout_secs));
        if let Some(key) = &self.config.api_key {
            builder = builder.bearer_auth(key);
        }
        let (tx, rx) = mpsc::channel(64);
        let permits = self.permits.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let _permit = tokio::select! {
                p = permits.acquire_owned() => p.expect("semaphore is never closed"),
                _ = tx.closed() => return,
            };
            let mut guard = stats.start();
            tokio::select! {
                result = relay(builder, &tx, &stats) => match result {
                    Ok(()) => guard.set_outcome(Outcome::Completed),
                    Err(error) => { let _ = tx.send(GenerateEvent::Error { error }).await; }
                },
                // Dropping the response closes the upstream stream, which stops generation there.
                _ = tx.closed() => guard.set_outcome(Outcome::Cancelled),
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}

async fn relay(
    builder: reqwest::RequestBuilder,
    tx: &mpsc::Sender<GenerateEvent>,
    stats: &BackendStats,
) -> Result<(), ProtocolError> {
    let response = builder
        .send()
        .await
        .map_err(|e| ProtocolError::unavailable(format!("upstream server unreachable: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(upstream_error(status.as_u16(), &text));
    }
    let mut body = response.bytes_stream();
    let mut line = Vec::new();
    let mut finish = None;
    let mut usage = None;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ProtocolError::internal(format!("upstream stream broke: {e}")))?;
        for &b in chunk.iter() {
            if b != b'\n' {
                if line.len() >= MAX_SSE_LINE {
                    return Err(ProtocolError::internal("upstream sent an oversize event"));
                }
                line.push(b);
                continue;
            }
            let Some(data) = line.strip_prefix(b"data:") else {
                line.clear();
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                line.clear();
                continue;
            }
            let event: Value = serde_json::from_slice(data)
                .map_err(|e| ProtocolError::internal(format!("upstream sent invalid JSON: {e}")))?;
            line.clear();
            if let Some(err) = event.get("error") {
                return Err(ProtocolError::internal(format!("upstream error: {err}")));
            }
            if let Some(u) = event.get("usage").filter(|u| !u.is_null()) {
                usage = Some(parse_usage(u)?);
            }
            let Some(choice) = event["choices"].get(0) else {
                continue;
            };
            let text = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str());
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                // Upstream servers do not say how many tokens a chunk holds; the total comes in
                // `usage` at the end.
                let delta = GenerateEvent::Delta {
                    text: text.to_owned(),
                    tokens: 0,
                };
                if tx.send(delta).await.is_err() {
                    return Ok(());
                }
            }
            match choice["finish_reason"].as_str() {
                Some("length") => finish = Some(FinishReason::Length),
                Some(_) => finish = Some(FinishReason::Stop),
                None => {}
            }
        }
    }
    let usage = usage.ok_or_else(|| {
        ProtocolError::internal(
            "upstream server did not report token usage (it must support stream_options.include_usage)",
        )
    })?;
    stats.add_prompt_tokens(u64::from(usage.prompt_tokens));
    stats.add_generated_tokens(u64::from(usage.completion_tokens));
    let done = GenerateEvent::Done {
        finish_reason: finish.unwrap_or(FinishReason::Stop),
        usage,
        billing: None,
    };
    let _ = tx.send(done).await;
    Ok(())
}

fn parse_usage(u: &Value) -> Result<Usage, ProtocolError> {
    let field = |name: &str| {
        u[name]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ProtocolError::internal(format!("upstream usage lacks {name}")))
    };
    Ok(Usage {
        prompt_tokens: field("prompt_tokens")?,
        completion_tokens: field("completion_tokens")?,
    })
}

/// Keeps the upstream server's verdict (a 400 stays a 400 for the app) without trusting its
/// body to be well-formed.
fn upstream_error(status: u16, body: &str) -> ProtocolError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or_else(|| v["error"].as_str())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| body.chars().take(500).collect());
    let code = parsed
        .as_ref()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    let kind = match status {
        400 if code.as_deref() == Some("context_length_exceeded") => {
            ErrorKind::ContextLengthExceeded
        }
        400 | 422 => ErrorKind::InvalidRequest,
        404 => ErrorKind::ModelNotFound,
        429 | 503 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    ProtocolError::new(
        kind,
        format!("upstream server answered {status}: {message}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_keep_their_meaning() {
        let e = upstream_error(
            400,
            r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::ContextLengthExceeded);
        assert!(e.message.contains("too long"));
        assert_eq!(upstream_error(404, "nope").kind, ErrorKind::ModelNotFound);
        assert_eq!(upstream_error(500, "<html>").kind, ErrorKind::Internal);
    }
}
