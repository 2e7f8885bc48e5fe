//! Relays generations to an OpenAI-compatible server that the GPU owner runs next to the
//! worker (vLLM, SGLang, llama.cpp's server, Ollama). Token counts come from the server's own
//! `usage`, i.e. from the serving model's tokenizer; a server that does not report usage is an
//! error, since a worker cannot be paid for tokens nobody counted.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::{
    ErrorKind, FinishReason, GenerateEvent, GenerateRequest, Input, ModelCard, ProtocolError,
    TokenLogprob, ToolCall, ToolChoice, TopLogprob, Usage,
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

/// Settings of the upstream backend: where the OpenAI-compatible server is and which models it
/// serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the OpenAI API, e.g. `http://127.0.0.1:8000/v1` or `https://…`: an
    /// https server's certificate is checked against the public web roots (webpki-roots, built
    /// in) and `ca_file`.
    pub url: String,
    /// A PEM file of CA certificates to trust beside the public roots, for an https upstream
    /// with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Sent as `Authorization: Bearer` when set.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Models offered to the network through this server; at least one.
    pub models: Vec<UpstreamModel>,
    /// Requests sent at once; more wait in a queue.
    #[serde(default = "default_parallel")]
    pub parallel: u32,
    /// Time allowed to connect and to receive the response headers.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Time allowed between two pieces of an answer once it has started. Never a deadline on
    /// the whole answer: a long answer, or a model that thinks for minutes while it streams,
    /// is never cut, only one that goes silent.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Send each request's cache scope as `cache_salt`, so that the server's prefix cache
    /// (vLLM's) is shared only between requests of one client: without it, a client could
    /// tell from its `cached_tokens` how another's prompt began. llama.cpp's server, SGLang
    /// and Ollama ignore the field; turn it off only for a server that refuses unknown fields.
    #[serde(default = "default_cache_salt")]
    pub cache_salt: bool,
}

fn default_cache_salt() -> bool {
    true
}

fn default_idle_timeout() -> u64 {
    120
}

fn default_parallel() -> u32 {
    16
}

fn default_timeout() -> u64 {
    60
}

/// One model served by the upstream server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamModel {
    /// Name announced to the network.
    pub id: String,
    /// Name the upstream server knows the model by, when different.
    #[serde(default)]
    pub upstream_id: Option<String>,
    /// Context window of the model, in tokens, as announced to the network.
    pub context_length: u32,
    /// SHA-256 (hex) of the weights the upstream server runs, as the operator declares it:
    /// announced and measured, but not proven (the worker cannot hash weights another server
    /// loaded). A proxy on a ledger admits the model only if the registry allows the hash.
    #[serde(default)]
    pub model_hash: Option<String>,
}

/// A [`Backend`] that relays generations to an OpenAI-compatible server over its streaming
/// `/chat/completions` and `/completions` endpoints.
pub struct UpstreamBackend {
    config: UpstreamConfig,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    stats: Arc<BackendStats>,
}

impl UpstreamBackend {
    /// Builds the backend; fails if `config` names no model or the HTTP client cannot be built.
    pub fn new(config: UpstreamConfig) -> Result<Self, ProtocolError> {
        if config.models.is_empty() {
            return Err(ProtocolError::internal(
                "upstream backend needs at least one model",
            ));
        }
        if let Some(m) = config.models.iter().find(|m| {
            m.model_hash
                .as_deref()
                .is_some_and(|h| !crate::is_model_hash(h))
        }) {
            return Err(ProtocolError::internal(format!(
                "upstream model {}: model_hash must be 64 lowercase hex digits (SHA-256)",
                m.id
            )));
        }
        let mut http =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(config.timeout_secs));
        if let Some(file) = &config.ca_file {
            let bad = |e: &dyn std::fmt::Display| {
                ProtocolError::internal(format!("upstream ca_file {}: {e}", file.display()))
            };
            let pem = std::fs::read(file).map_err(|e| bad(&e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))?;
            if certs.is_empty() {
                return Err(bad(&"holds no certificate"));
            }
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
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
        // OpenAI's penalties, and the extensions vLLM, SGLang and llama.cpp's server share:
        // passed on only when set, so a server without the extensions is not sent them.
        if p.frequency_penalty != 0.0 {
            body["frequency_penalty"] = json!(p.frequency_penalty);
        }
        if p.presence_penalty != 0.0 {
            body["presence_penalty"] = json!(p.presence_penalty);
        }
        if p.repetition_penalty != 1.0 {
            // vLLM's and SGLang's name, and llama.cpp's server's: each ignores the other's.
            body["repetition_penalty"] = json!(p.repetition_penalty);
            body["repeat_penalty"] = json!(p.repetition_penalty);
        }
        if p.top_k > 0 {
            body["top_k"] = json!(p.top_k);
        }
        if p.min_p > 0.0 {
            body["min_p"] = json!(p.min_p);
        }
        if !p.logit_bias.is_empty() {
            // OpenAI's shape: token ids as strings.
            body["logit_bias"] = json!(
                p.logit_bias
                    .iter()
                    .map(|(token, bias)| (token.to_string(), json!(bias)))
                    .collect::<serde_json::Map<_, _>>()
            );
        }
        if let Some(format) = &p.response_format {
            body["response_format"] = json!(format);
        }
        if let Some(scope) = request
            .cache_scope
            .as_ref()
            .filter(|_| self.config.cache_salt)
        {
            // vLLM's name for it: its prefix cache is shared only between requests with the
            // same salt, so one client cannot probe another's prompts through it.
            body["cache_salt"] = json!(scope);
        }
        let base = self.config.url.trim_end_matches('/');
        match &request.input {
            Input::Embed { texts } => {
                // Asked as base64: what the protocol carries, and a quarter of floats' text.
                let body =
                    json!({"model": upstream_model, "input": texts, "encoding_format": "base64"});
                (format!("{base}/embeddings"), body)
            }
            Input::Chat { messages, tools } => {
                body["messages"] = json!(messages.iter().map(openai_message).collect::<Vec<_>>());
                if let Some(tools) = tools {
                    body["tools"] = json!(
                        tools
                            .functions
                            .iter()
                            .map(|f| {
                                let mut function =
                                    json!({"name": f.name, "parameters": f.parameters});
                                if let Some(d) = &f.description {
                                    function["description"] = json!(d);
                                }
                                json!({"type": "function", "function": function})
                            })
                            .collect::<Vec<_>>()
                    );
                    body["tool_choice"] = match &tools.choice {
                        ToolChoice::Auto => json!("auto"),
                        ToolChoice::Required => json!("required"),
                        ToolChoice::Function(name) => {
                            json!({"type": "function", "function": {"name": name}})
                        }
                    };
                    body["parallel_tool_calls"] = json!(tools.parallel);
                }
                if let Some(top) = p.logprobs {
                    body["logprobs"] = json!(true);
                    body["top_logprobs"] = json!(top);
                }
                (format!("{base}/chat/completions"), body)
            }
            Input::Text { prompt } => {
                body["prompt"] = json!(prompt);
                if let Some(top) = p.logprobs {
                    body["logprobs"] = json!(top);
                }
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
                min_price: 0,
                model_hash: m.model_hash.clone(),
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
        let mut builder = self.http.post(url).json(&body);
        if let Some(key) = &self.config.api_key {
            builder = builder.bearer_auth(key);
        }
        let (tx, rx) = mpsc::channel(64);
        let timeouts = Timeouts {
            headers: Duration::from_secs(self.config.timeout_secs),
            idle: Duration::from_secs(self.config.idle_timeout_secs),
        };
        let permits = self.permits.clone();
        let stats = self.stats.clone();
        let texts = match &request.input {
            Input::Embed { texts } => Some(texts.len()),
            _ => None,
        };
        tokio::spawn(async move {
            let _permit = tokio::select! {
                p = permits.acquire_owned() => p.expect("semaphore is never closed"),
                _ = tx.closed() => return,
            };
            let mut guard = stats.start();
            let answer = async {
                match texts {
                    Some(texts) => embed(builder, texts, &tx, &stats, timeouts).await,
                    None => relay(builder, &tx, &stats, timeouts).await,
                }
            };
            tokio::select! {
                result = answer => match result {
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

/// A chat message in OpenAI's shape: an assistant's calls, a tool's result with its call's id.
fn openai_message(m: &cocoon_protocol::ChatMessage) -> Value {
    let mut out = json!({"role": m.role.as_str(), "content": m.content});
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = json!(
            m.tool_calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments
                }}))
                .collect::<Vec<_>>()
        );
        if m.content.is_empty() {
            out["content"] = Value::Null;
        }
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    out
}

/// Most bytes an upstream server's embeddings answer may take.
const MAX_EMBEDDINGS_BYTES: usize = 256 << 20;

/// Relays an upstream server's embeddings of `texts` texts: one event per text, in order,
/// then the usage (prompt tokens only).
async fn embed(
    builder: reqwest::RequestBuilder,
    texts: usize,
    tx: &mpsc::Sender<GenerateEvent>,
    stats: &BackendStats,
    timeouts: Timeouts,
) -> Result<(), ProtocolError> {
    let response = timeouts.send(builder).await?;
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    loop {
        let piece = timeouts.next(&mut stream).await?;
        let Some(piece) = piece else { break };
        let piece =
            piece.map_err(|e| ProtocolError::internal(format!("upstream answer broke: {e}")))?;
        if body.len() + piece.len() > MAX_EMBEDDINGS_BYTES {
            return Err(ProtocolError::internal(
                "upstream sent an oversize embeddings answer",
            ));
        }
        body.extend_from_slice(&piece);
    }
    let (vectors, usage) = parse_embeddings(&body, texts)?;
    for (index, embedding) in vectors.into_iter().enumerate() {
        let event = GenerateEvent::Embedding {
            index: index as u32,
            embedding,
        };
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
    stats.add_prompt_tokens(u64::from(usage.prompt_tokens));
    let done = GenerateEvent::Done {
        finish_reason: FinishReason::Stop,
        usage,
        billing: None,
    };
    let _ = tx.send(done).await;
    Ok(())
}

/// An OpenAI embeddings answer: each of the `texts` vectors (base64 of little-endian `f32`s,
/// from either encoding), in the order of the texts, and the prompt tokens.
fn parse_embeddings(body: &[u8], texts: usize) -> Result<(Vec<String>, Usage), ProtocolError> {
    use base64::Engine as _;
    let bad = |why: &str| ProtocolError::internal(format!("upstream embeddings answer {why}"));
    let value: Value =
        serde_json::from_slice(body).map_err(|e| bad(&format!("is not JSON: {e}")))?;
    let data = value["data"].as_array().ok_or_else(|| bad("has no data"))?;
    if data.len() != texts {
        return Err(bad(&format!(
            "holds {} vectors for {texts} texts",
            data.len()
        )));
    }
    let mut vectors: Vec<Option<String>> = vec![None; texts];
    for item in data {
        let index = item["index"]
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < texts)
            .ok_or_else(|| bad("names a text it was not asked for"))?;
        let encoded = match &item["embedding"] {
            Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| bad("holds a vector that is not base64"))?;
                if bytes.is_empty() || bytes.len() % 4 != 0 {
                    return Err(bad("holds a vector that is not of floats"));
                }
                b64.clone()
            }
            Value::Array(floats) => {
                let mut bytes = Vec::with_capacity(floats.len() * 4);
                for f in floats {
                    let f = f
                        .as_f64()
                        .ok_or_else(|| bad("holds a vector that is not of numbers"))?;
                    bytes.extend_from_slice(&(f as f32).to_le_bytes());
                }
                if bytes.is_empty() {
                    return Err(bad("holds an empty vector"));
                }
                base64::engine::general_purpose::STANDARD.encode(bytes)
            }
            _ => return Err(bad("holds a vector of no known encoding")),
        };
        if vectors[index].replace(encoded).is_some() {
            return Err(bad("names a text twice"));
        }
    }
    let prompt_tokens = value["usage"]["prompt_tokens"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad("lacks usage.prompt_tokens"))?;
    let vectors = vectors
        .into_iter()
        .map(|v| v.expect("every index seen once"))
        .collect();
    Ok((vectors, Usage::new(prompt_tokens, 0)))
}

/// How long the upstream server may take: to answer with its headers, and between two
/// pieces of the answer after that.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    headers: Duration,
    idle: Duration,
}

impl Timeouts {
    /// Sends the request and waits for the headers of a successful answer; a server's refusal
    /// keeps its verdict (a 400 stays a 400).
    async fn send(
        self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProtocolError> {
        let response = tokio::time::timeout(self.headers, builder.send())
            .await
            .map_err(|_| {
                ProtocolError::unavailable(format!(
                    "upstream server sent no answer within {} s (timeout_secs)",
                    self.headers.as_secs()
                ))
            })?
            .map_err(|e| ProtocolError::unavailable(format!("upstream server unreachable: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(upstream_error(status.as_u16(), &text));
        }
        Ok(response)
    }

    /// The answer's next piece, within the idle timeout.
    async fn next<S: futures_util::Stream + Unpin>(
        self,
        body: &mut S,
    ) -> Result<Option<S::Item>, ProtocolError> {
        tokio::time::timeout(self.idle, body.next())
            .await
            .map_err(|_| {
                ProtocolError::unavailable(format!(
                    "upstream server went silent for {} s mid-answer (idle_timeout_secs)",
                    self.idle.as_secs()
                ))
            })
    }
}

async fn relay(
    builder: reqwest::RequestBuilder,
    tx: &mpsc::Sender<GenerateEvent>,
    stats: &BackendStats,
    timeouts: Timeouts,
) -> Result<(), ProtocolError> {
    let response = timeouts.send(builder).await?;
    let mut body = response.bytes_stream();
    let mut line = Vec::new();
    let mut finish = None;
    let mut usage = None;
    // Chunks of thinking relayed: the reasoning count where the server gives none.
    let mut reasoning_chunks: u32 = 0;
    // Tool calls as their pieces come (servers stream a call's arguments in fragments), each
    // with the chunks that carried it; relayed whole at the end.
    let mut calls: Vec<(ToolCall, u32)> = Vec::new();
    // When the worker last showed it is at work while a call is held back.
    let mut last_sign = tokio::time::Instant::now();
    loop {
        let chunk = timeouts.next(&mut body).await?;
        let Some(chunk) = chunk else { break };
        let chunk =
            chunk.map_err(|e| ProtocolError::internal(format!("upstream stream broke: {e}")))?;
        let mut rest = &chunk[..];
        // Whole lines straight from the chunk; only a line split across chunks is copied.
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let whole = if line.is_empty() {
                &rest[..end]
            } else {
                line.extend_from_slice(&rest[..end]);
                &line[..]
            };
            if whole.len() > MAX_SSE_LINE {
                return Err(ProtocolError::internal("upstream sent an oversize event"));
            }
            rest = &rest[end + 1..];
            let parsed = match whole.strip_prefix(b"data:").map(<[u8]>::trim_ascii) {
                Some(data) if data != b"[DONE]" => Some(parse_sse_chunk(data)?),
                _ => None,
            };
            line.clear();
            let Some(parsed) = parsed else { continue };
            if parsed.usage.is_some() {
                usage = parsed.usage;
            }
            if let Some(text) = parsed.reasoning {
                // Thinking is part of the answer: relayed as it comes (it is also what keeps
                // a thinking model from looking silent), counted a token a chunk as text is.
                let tokens = u32::from(!text.is_empty());
                reasoning_chunks = reasoning_chunks.saturating_add(tokens);
                if tx
                    .send(GenerateEvent::Reasoning { text, tokens })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            if parsed.text.is_some() || !parsed.logprobs.is_empty() {
                let text = parsed.text.unwrap_or_default();
                // Upstream servers do not say how many tokens a chunk holds; vLLM, SGLang and
                // llama.cpp's server stream one token a chunk, so a chunk counts as one (what a
                // cut-off answer is billed for). The exact total comes in `usage` at the end.
                let tokens = u32::from(!text.is_empty());
                let delta = GenerateEvent::Delta {
                    text,
                    tokens,
                    logprobs: parsed.logprobs,
                };
                if tx.send(delta).await.is_err() {
                    return Ok(());
                }
            }
            if !parsed.tool_calls.is_empty() {
                let started = calls.len();
                for piece in parsed.tool_calls {
                    add_call_piece(&mut calls, piece)?;
                }
                // REVIEW, fixed: a call is relayed whole at the end; meanwhile an empty delta
                // for each call begun, and at most one a second, says the worker is not
                // silent (the proxy cuts off a worker that is).
                if calls.len() > started || last_sign.elapsed() >= Duration::from_secs(1) {
                    last_sign = tokio::time::Instant::now();
                    let sign = GenerateEvent::Delta {
                        text: String::new(),
                        tokens: 0,
                        logprobs: Vec::new(),
                    };
                    if tx.send(sign).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if parsed.finish.is_some() {
                finish = parsed.finish;
            }
        }
        if line.len() + rest.len() > MAX_SSE_LINE {
            return Err(ProtocolError::internal("upstream sent an oversize event"));
        }
        line.extend_from_slice(rest);
    }
    let mut usage: Usage = usage.ok_or_else(|| {
        ProtocolError::internal(
            "upstream server did not report token usage (it must support stream_options.include_usage)",
        )
    })?;
    // vLLM and llama.cpp's server stream the thinking but do not count it apart: counted by
    // its chunks, a token a chunk as every delta is, within the completion's count.
    if usage.reasoning_tokens == 0 {
        usage.reasoning_tokens = reasoning_chunks.min(usage.completion_tokens);
    }
    stats.add_prompt_tokens(u64::from(usage.prompt_tokens));
    stats.add_generated_tokens(u64::from(usage.completion_tokens));
    for (call, tokens) in calls {
        if tx
            .send(GenerateEvent::ToolCall { call, tokens })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    let done = GenerateEvent::Done {
        finish_reason: finish.unwrap_or(FinishReason::Stop),
        usage,
        billing: None,
    };
    let _ = tx.send(done).await;
    Ok(())
}

/// Most tool calls one upstream answer may make.
const MAX_UPSTREAM_CALLS: usize = 128;
/// Most bytes a call's name and arguments may take: one event of it, escaped again and sealed,
/// must fit in a frame (`MAX_FRAME_BYTES`).
const MAX_CALL_BYTES: usize = 256 << 10;

/// Adds a piece of a streamed tool call: a new call (its index first seen, with its id and
/// name) or more of a call's arguments.
fn add_call_piece(calls: &mut Vec<(ToolCall, u32)>, piece: CallPiece) -> Result<(), ProtocolError> {
    let index = piece.index as usize;
    if index == calls.len() {
        if calls.len() == MAX_UPSTREAM_CALLS {
            return Err(ProtocolError::internal(format!(
                "upstream server made more than {MAX_UPSTREAM_CALLS} tool calls"
            )));
        }
        calls.push((
            ToolCall {
                id: piece
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("call_{:024x}", rand::random::<u128>() >> 32)),
                name: String::new(),
                arguments: String::new(),
            },
            0,
        ));
    }
    let known = calls.len();
    let (call, tokens) = calls.get_mut(index).ok_or_else(|| {
        ProtocolError::internal(format!(
            "upstream server sent a piece of tool call {index} before call {known}"
        ))
    })?;
    call.name.push_str(&piece.name);
    call.arguments.push_str(&piece.arguments);
    if call.name.len() + call.arguments.len() > MAX_CALL_BYTES {
        return Err(ProtocolError::internal(
            "upstream server sent an oversize tool call",
        ));
    }
    *tokens = tokens.saturating_add(1);
    Ok(())
}

/// A piece of a streamed tool call (OpenAI's `delta.tool_calls[]`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CallPiece {
    /// Which call of the answer, from 0.
    pub index: u32,
    /// The call's id, in its first piece.
    pub id: Option<String>,
    /// Its function's name, or more of it.
    pub name: String,
    /// More of its arguments' JSON text.
    pub arguments: String,
}

/// What one `data:` line of an OpenAI stream says.
#[derive(Debug, Default, PartialEq)]
pub struct SseChunk {
    /// Non-empty text of the first choice.
    pub text: Option<String>,
    /// Non-empty reasoning text of the first choice (`reasoning_content` or `reasoning`).
    pub reasoning: Option<String>,
    /// The first choice's `finish_reason`, when the server sent one.
    pub finish: Option<FinishReason>,
    /// Token counts, present in the final chunk when `stream_options.include_usage` is honoured.
    pub usage: Option<Usage>,
    /// The first choice's log-probabilities, in the chat's shape or the legacy one.
    pub logprobs: Vec<TokenLogprob>,
    /// Pieces of the first choice's tool calls.
    pub tool_calls: Vec<CallPiece>,
}

/// One chunk as the wire has it; strings borrowed from the input unless they hold escapes.
#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<WireChoice<'a>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    /// Read only when present: most answers carry none.
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    /// vLLM's, SGLang's, DeepSeek's and llama.cpp's name for the thinking text.
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    /// Newer vLLM's and OpenRouter's name for it.
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<WireCallPiece>>,
}

#[derive(Deserialize)]
struct WireCallPiece {
    /// Some servers leave it out when an answer makes one call.
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionPiece>,
}

#[derive(Deserialize, Default)]
struct WireFunctionPiece {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
    #[serde(default)]
    completion_tokens_details: Option<WireDetails>,
}

/// OpenAI's `prompt_tokens_details` / `completion_tokens_details` (servers send `null` or
/// leave fields out when they do not count them).
#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// Reads the JSON of one `data:` line (without the prefix). This runs once per token of
/// every upstream answer (criterion: `cargo bench -p cocoon-cli --bench hot_path`), so it
/// reads into borrowed typed fields rather than a `serde_json::Value` tree.
pub fn parse_sse_chunk(data: &[u8]) -> Result<SseChunk, ProtocolError> {
    let event: WireChunk<'_> = serde_json::from_slice(data)
        .map_err(|e| ProtocolError::internal(format!("upstream sent invalid JSON: {e}")))?;
    if let Some(err) = event.error {
        return Err(ProtocolError::internal(format!("upstream error: {err}")));
    }
    let mut chunk = SseChunk::default();
    if let Some(u) = event.usage {
        chunk.usage = Some(parse_usage(&u)?);
    }
    let Some(choice) = event.choices.into_iter().next() else {
        return Ok(chunk);
    };
    let (content, reasoning) = match choice.delta {
        Some(d) => {
            chunk.tool_calls = d
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    let f = p.function.unwrap_or_default();
                    CallPiece {
                        index: p.index,
                        id: p.id,
                        name: f.name.unwrap_or_default(),
                        arguments: f.arguments.unwrap_or_default(),
                    }
                })
                .collect();
            (d.content, d.reasoning_content.or(d.reasoning))
        }
        None => (None, None),
    };
    chunk.text = content
        .or(choice.text)
        .filter(|t| !t.is_empty())
        .map(Cow::into_owned);
    chunk.reasoning = reasoning.filter(|t| !t.is_empty()).map(Cow::into_owned);
    if let Some(logprobs) = choice.logprobs.filter(|l| !l.is_null()) {
        chunk.logprobs = parse_logprobs(&logprobs).ok_or_else(|| {
            ProtocolError::internal(format!(
                "upstream sent log-probabilities of no known shape: {logprobs}"
            ))
        })?;
    }
    chunk.finish = match choice.finish_reason.as_deref() {
        Some("length") => Some(FinishReason::Length),
        Some("tool_calls") => Some(FinishReason::ToolCalls),
        Some(_) => Some(FinishReason::Stop),
        None => None,
    };
    Ok(chunk)
}

/// A choice's `logprobs`: the chat's `{"content": [{"token", "logprob", "top_logprobs"}]}`,
/// or the legacy completions' parallel `tokens`, `token_logprobs` and `top_logprobs` lists.
fn parse_logprobs(value: &Value) -> Option<Vec<TokenLogprob>> {
    let logprob = |v: &Value| v.as_f64().map(|l| l as f32);
    if let Some(content) = value.get("content") {
        if content.is_null() {
            return Some(Vec::new());
        }
        return content
            .as_array()?
            .iter()
            .map(|e| {
                let top = match e.get("top_logprobs") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(top) => top
                        .as_array()?
                        .iter()
                        .map(|t| {
                            Some(TopLogprob {
                                token: t["token"].as_str()?.to_owned(),
                                logprob: logprob(&t["logprob"])?,
                            })
                        })
                        .collect::<Option<_>>()?,
                };
                Some(TokenLogprob {
                    token: e["token"].as_str()?.to_owned(),
                    logprob: logprob(&e["logprob"])?,
                    top,
                })
            })
            .collect();
    }
    let tokens = value.get("tokens")?.as_array()?;
    let logprobs = value.get("token_logprobs")?.as_array()?;
    let tops = value.get("top_logprobs").and_then(Value::as_array);
    if logprobs.len() != tokens.len() {
        return None;
    }
    tokens
        .iter()
        .zip(logprobs)
        .enumerate()
        .map(|(i, (token, lp))| {
            let mut top: Vec<TopLogprob> = match tops.and_then(|t| t.get(i)) {
                None | Some(Value::Null) => Vec::new(),
                Some(t) => t
                    .as_object()?
                    .iter()
                    .map(|(token, lp)| {
                        Some(TopLogprob {
                            token: token.clone(),
                            logprob: logprob(lp)?,
                        })
                    })
                    .collect::<Option<_>>()?,
            };
            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
            Some(TokenLogprob {
                token: token.as_str()?.to_owned(),
                // The first token of some servers' answers has none.
                logprob: if lp.is_null() { 0.0 } else { logprob(lp)? },
                top,
            })
        })
        .collect()
}

fn parse_usage(u: &WireUsage) -> Result<Usage, ProtocolError> {
    let field = |name: &str, v: Option<u64>| {
        v.and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ProtocolError::internal(format!("upstream usage lacks {name}")))
    };
    // A detail the server does not count is 0; one that does not fit is the whole count.
    let detail = |details: &Option<WireDetails>, pick: fn(&WireDetails) -> Option<u64>| {
        details
            .as_ref()
            .and_then(pick)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    Ok(Usage {
        prompt_tokens: field("prompt_tokens", u.prompt_tokens)?,
        completion_tokens: field("completion_tokens", u.completion_tokens)?,
        cached_tokens: detail(&u.prompt_tokens_details, |d| d.cached_tokens),
        reasoning_tokens: detail(&u.completion_tokens_details, |d| d.reasoning_tokens),
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

    /// Serves `router` on a loopback port; the OpenAI API's base URL there.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    /// An upstream server whose stream arrives in `piece`-byte bits, splitting lines anywhere.
    async fn split_server(piece: usize) -> String {
        let mut sse = String::new();
        for word in ["Hel", "lo, ", "w\\u00f6rld", "!"] {
            sse.push_str(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"
            ));
        }
        sse.push_str("data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n");
        sse.push_str(": a comment line\n\n");
        sse.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n");
        let pieces: Vec<Vec<u8>> = sse.into_bytes().chunks(piece).map(<[u8]>::to_vec).collect();
        // A text prompt goes to the legacy completions endpoint.
        let router = axum::Router::new().route(
            "/v1/completions",
            axum::routing::post(move || {
                let pieces = pieces.clone().into_iter().map(Ok::<_, std::io::Error>);
                async move { axum::body::Body::from_stream(futures_util::stream::iter(pieces)) }
            }),
        );
        serve(router).await
    }

    /// An upstream server that streams one token after each of `gaps`, then its usage.
    async fn paced_server(gaps: Vec<Duration>) -> String {
        let router = axum::Router::new().route(
            "/v1/completions",
            axum::routing::post(move || {
                let gaps = gaps.clone();
                async move {
                    let n = gaps.len();
                    let tokens = futures_util::stream::iter(gaps).then(|gap| async move {
                        tokio::time::sleep(gap).await;
                        Ok::<_, std::io::Error>(
                            "data: {\"choices\":[{\"text\":\"t\",\"finish_reason\":null}]}\n\n"
                                .to_owned(),
                        )
                    });
                    let end = format!(
                        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{n}}}}}\n\ndata: [DONE]\n\n"
                    );
                    axum::body::Body::from_stream(
                        tokens.chain(futures_util::stream::once(async move { Ok(end) })),
                    )
                }
            }),
        );
        serve(router).await
    }

    /// The backend of model `m` on the server at `url`, with timeouts of 1 s.
    fn backend(url: String) -> UpstreamBackend {
        patient_backend(url, 1)
    }

    /// The backend of model `m` on the server at `url`, with timeouts of `secs`.
    fn patient_backend(url: String, secs: u64) -> UpstreamBackend {
        UpstreamBackend::new(UpstreamConfig {
            url,
            ca_file: None,
            api_key: None,
            models: vec![UpstreamModel {
                id: "m".into(),
                upstream_id: None,
                context_length: 100,
                model_hash: None,
            }],
            parallel: 1,
            timeout_secs: secs,
            idle_timeout_secs: secs,
            cache_salt: true,
        })
        .unwrap()
    }

    fn text_request() -> GenerateRequest {
        GenerateRequest {
            max_price: None,
            cache_scope: None,
            model: "m".into(),
            input: Input::Text {
                prompt: "hi".into(),
            },
            params: Default::default(),
        }
    }

    /// The timeouts are between bytes, never on the whole answer: an answer that streams for
    /// 3 s, a token every 0.5 s, passes timeouts of 1 s (the request's total deadline cut
    /// every answer longer than `timeout_secs`); a silence of 2.5 s mid-answer is cut with an
    /// error that says so.
    #[tokio::test]
    async fn a_long_paced_answer_passes_and_only_a_silence_is_cut() {
        let paced = backend(paced_server(vec![Duration::from_millis(500); 6]).await);
        let events: Vec<_> = paced.generate(text_request()).collect().await;
        assert!(
            matches!(events.last(), Some(GenerateEvent::Done { usage, .. }) if usage.completion_tokens == 6),
            "{events:?}"
        );
        let gaps = vec![Duration::ZERO, Duration::from_millis(2500), Duration::ZERO];
        let stalled = backend(paced_server(gaps).await);
        let events: Vec<_> = stalled.generate(text_request()).collect().await;
        assert!(
            matches!(&events[0], GenerateEvent::Delta { text, .. } if text == "t"),
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(GenerateEvent::Error { error }) if error.message.contains("went silent for 1 s")),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn lines_split_across_reads_relay_whole() {
        for piece in [1, 7, 64, 4096] {
            let backend = backend(split_server(piece).await);
            let request = text_request();
            let events: Vec<_> = backend.generate(request).collect().await;
            let text: String = events
                .iter()
                .filter_map(|e| match e {
                    GenerateEvent::Delta { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(text, "Hello, w\u{f6}rld!", "pieces of {piece}");
            assert!(
                matches!(
                    events.last(),
                    Some(GenerateEvent::Done { finish_reason: FinishReason::Length, usage, .. })
                        if *usage == Usage::new(2, 4)
                ),
                "{:?}",
                events.last()
            );
        }
    }

    /// An embeddings answer in either encoding, its vectors put in the texts' order; one that
    /// misses a text, names one twice or one not asked, or lacks its usage, is an error.
    #[test]
    fn embeddings_answers_are_read_in_either_encoding() {
        use base64::Engine as _;
        let b64 = |v: &[f32]| {
            base64::engine::general_purpose::STANDARD
                .encode(v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>())
        };
        let body = json!({"data": [
            {"index": 1, "embedding": b64(&[0.5, -0.25])},
            {"index": 0, "embedding": [1.0, 0.0]}
        ], "usage": {"prompt_tokens": 7, "total_tokens": 7}});
        let (vectors, usage) = parse_embeddings(body.to_string().as_bytes(), 2).unwrap();
        assert_eq!(vectors, [b64(&[1.0, 0.0]), b64(&[0.5, -0.25])]);
        assert_eq!(usage, Usage::new(7, 0));
        for (bad, why) in [
            (
                json!({"data": [{"index": 0, "embedding": [1.0]}], "usage": {"prompt_tokens": 1}}),
                "holds 1 vectors for 2 texts",
            ),
            (
                json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}], "usage": {"prompt_tokens": 1}}),
                "names a text twice",
            ),
            (
                json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 5, "embedding": [1.0]}], "usage": {"prompt_tokens": 1}}),
                "names a text it was not asked for",
            ),
            (
                json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}]}),
                "lacks usage.prompt_tokens",
            ),
            (
                json!({"data": [{"index": 0, "embedding": "%%"}, {"index": 1, "embedding": [1.0]}], "usage": {"prompt_tokens": 1}}),
                "not base64",
            ),
        ] {
            let e = parse_embeddings(bad.to_string().as_bytes(), 2).unwrap_err();
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
    }

    /// Log-probabilities come in the chat's shape (vLLM, llama.cpp's server) or the legacy
    /// completions' one, alternatives most likely first; a shape of neither is an error, not
    /// an answer without them.
    #[test]
    fn logprobs_are_read_in_both_shapes() {
        let chat = parse_sse_chunk(br#"{"choices":[{"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.5,"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-0.5},{"token":"Yo","logprob":-1.25}]}]}}]}"#).unwrap();
        assert_eq!(chat.text.as_deref(), Some("Hi"));
        assert_eq!(
            chat.logprobs,
            vec![TokenLogprob {
                token: "Hi".into(),
                logprob: -0.5,
                top: vec![
                    TopLogprob {
                        token: "Hi".into(),
                        logprob: -0.5
                    },
                    TopLogprob {
                        token: "Yo".into(),
                        logprob: -1.25
                    },
                ],
            }]
        );
        let legacy = parse_sse_chunk(br#"{"choices":[{"text":" a","logprobs":{"tokens":[" a"],"token_logprobs":[-2.0],"top_logprobs":[{" b":-3.0," a":-2.0}],"text_offset":[5]}}]}"#).unwrap();
        assert_eq!(legacy.logprobs[0].token, " a");
        assert_eq!(legacy.logprobs[0].logprob, -2.0);
        assert_eq!(
            legacy.logprobs[0]
                .top
                .iter()
                .map(|t| t.token.as_str())
                .collect::<Vec<_>>(),
            [" a", " b"]
        );
        let none =
            parse_sse_chunk(br#"{"choices":[{"delta":{"content":"x"},"logprobs":null}]}"#).unwrap();
        assert!(none.logprobs.is_empty());
        let bad = parse_sse_chunk(
            br#"{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[{"token":1}]}}]}"#,
        );
        assert!(
            bad.unwrap_err()
                .message
                .contains("log-probabilities of no known shape")
        );
    }

    /// Asked for, log-probabilities go upstream in the shape of the endpoint used.
    #[test]
    fn logprobs_go_upstream_in_each_endpoints_shape() {
        let backend = backend("http://127.0.0.1:9/v1".into());
        let mut request = text_request();
        request.input = Input::Chat {
            messages: vec![cocoon_protocol::ChatMessage::new(
                cocoon_protocol::Role::User,
                "x",
            )],
            tools: None,
        };
        request.params.logprobs = Some(3);
        let (_, body) = backend.request_body("m", &request);
        assert_eq!(
            (body["logprobs"].clone(), body["top_logprobs"].clone()),
            (json!(true), json!(3))
        );
        request.input = Input::Text { prompt: "x".into() };
        let (_, body) = backend.request_body("m", &request);
        assert_eq!(body["logprobs"], json!(3));
        assert!(body.get("top_logprobs").is_none());
        request.params.logprobs = None;
        let (_, body) = backend.request_body("m", &request);
        assert!(body.get("logprobs").is_none());
    }

    #[test]
    fn chunks_read_as_before_for_every_shape() {
        let c = parse_sse_chunk(br#"{"choices":[{"index":0,"delta":{"content":" a\"b"},"finish_reason":null}],"usage":null}"#).unwrap();
        assert_eq!(
            c,
            SseChunk {
                text: Some(" a\"b".into()),
                reasoning: None,
                finish: None,
                usage: None,
                logprobs: Vec::new(),
                tool_calls: Vec::new(),
            }
        );
        let c = parse_sse_chunk(br#"{"choices":[{"text":"x","finish_reason":"length"}]}"#).unwrap();
        assert_eq!(
            (c.text.as_deref(), c.finish),
            (Some("x"), Some(FinishReason::Length))
        );
        let c =
            parse_sse_chunk(br#"{"choices":[{"delta":{"content":""},"finish_reason":"stop"}]}"#)
                .unwrap();
        assert_eq!((c.text, c.finish), (None, Some(FinishReason::Stop)));
        let c =
            parse_sse_chunk(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#)
                .unwrap();
        assert_eq!(c.usage, Some(Usage::new(3, 5)));
        assert!(
            parse_sse_chunk(br#"{"usage":{"prompt_tokens":3}}"#)
                .unwrap_err()
                .message
                .contains("completion_tokens")
        );
        assert!(
            parse_sse_chunk(br#"{"error":{"message":"boom"}}"#)
                .unwrap_err()
                .message
                .contains("boom")
        );
        assert!(parse_sse_chunk(b"{not json").is_err());
        // A reasoning model's thinking, under either name servers use, and the usage's
        // details (null where a server does not count them).
        for name in ["reasoning_content", "reasoning"] {
            let line = format!(r#"{{"choices":[{{"delta":{{"{name}":"hmm"}}}}]}}"#);
            let c = parse_sse_chunk(line.as_bytes()).unwrap();
            assert_eq!((c.reasoning.as_deref(), c.text), (Some("hmm"), None));
        }
        let c = parse_sse_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":20},"completion_tokens_details":{"reasoning_tokens":6}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.usage,
            Some(Usage {
                cached_tokens: 20,
                reasoning_tokens: 6,
                ..Usage::new(30, 9)
            })
        );
        let c = parse_sse_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}}"#,
        )
        .unwrap();
        assert_eq!(c.usage, Some(Usage::new(3, 5)));
    }

    /// A reasoning model's answer as vLLM streams it: its `UsageInfo` has no
    /// `completion_tokens_details` at all (only `prompt_tokens_details`), so the thinking's
    /// count never comes in the usage.
    const VLLM_REASONING_SSE: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Let\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\" me\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\" think\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"4\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"2\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"total_tokens\":45,\"completion_tokens\":5,\"prompt_tokens_details\":null}}\n\n",
        "data: [DONE]\n\n",
    );

    /// Billing gap: vLLM (and llama.cpp's server) stream the thinking as `reasoning_content`
    /// but never report `completion_tokens_details.reasoning_tokens`, so a finished answer's
    /// thinking was billed at the completion multiplier, while the same thinking in an answer
    /// cut off mid-way is billed at the reasoning multiplier (the proxy's `cut_off` counts the
    /// reasoning deltas). Where the two multipliers differ, the client pays (or the worker
    /// earns) a price the network never set for those tokens, and which one depends on
    /// whether the answer finished. Now: when the server does not count reasoning, the
    /// worker counts the reasoning chunks it relayed (a token a chunk, as it counts every
    /// delta), held to `completion_tokens`.
    #[tokio::test]
    async fn review_thinking_counted_by_chunks_when_the_server_reports_no_details() {
        let router = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(|| async { VLLM_REASONING_SSE }),
        );
        let url = serve(router).await;
        let request = GenerateRequest {
            input: Input::Chat {
                messages: vec![cocoon_protocol::ChatMessage::new(
                    cocoon_protocol::Role::User,
                    "Six times seven?",
                )],
                tools: None,
            },
            ..text_request()
        };
        let events: Vec<_> = backend(url).generate(request).collect().await;
        let thought: String = events
            .iter()
            .filter_map(|e| match e {
                GenerateEvent::Reasoning { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(thought, "Let me think", "{events:?}");
        assert!(
            matches!(
                events.last(),
                Some(GenerateEvent::Done { usage, .. })
                    if usage.completion_tokens == 5 && usage.reasoning_tokens == 3
            ),
            "three chunks of thinking relayed, none of them counted as reasoning: {:?}",
            events.last()
        );
    }

    /// Silently ignored: `repetition_penalty` was taken by the gateway and passed upstream
    /// under vLLM's name only, but llama.cpp's server, one of the servers this backend names,
    /// reads only `repeat_penalty` (tools/server/server-task.cpp, `params_from_json_cmpl`), so
    /// the app's penalty did nothing there and nobody said so. Now: the penalty goes out under both names (vLLM's and SGLang's
    /// `repetition_penalty`, llama.cpp's `repeat_penalty`), as servers ignore keys they do
    /// not know.
    #[test]
    fn review_repetition_penalty_reaches_llama_cpp_server_too() {
        let backend = backend("http://127.0.0.1:9/v1".into());
        let mut request = text_request();
        request.params.repetition_penalty = 1.3;
        let (_, body) = backend.request_body("m", &request);
        assert_eq!(body["repetition_penalty"], json!(1.3f32), "{body}");
        assert_eq!(body["repeat_penalty"], json!(1.3f32), "{body}");
    }

    /// `response_format` and `logit_bias` go upstream in OpenAI's shape, the schema as the
    /// app sent it.
    #[test]
    fn response_format_and_logit_bias_pass_through() {
        let backend = backend("http://127.0.0.1:9/v1".into());
        let mut request = text_request();
        let schema = json!({"name": "p", "strict": true, "schema": {"type": "object"}});
        request.params.response_format = Some(cocoon_protocol::ResponseFormat::JsonSchema {
            json_schema: schema.clone(),
        });
        request.params.logit_bias = [(42, -100.0), (7, 2.5)].into_iter().collect();
        let (_, body) = backend.request_body("m", &request);
        assert_eq!(
            body["response_format"],
            json!({"type": "json_schema", "json_schema": schema}),
            "{body}"
        );
        assert_eq!(
            body["logit_bias"],
            json!({"42": -100.0, "7": 2.5}),
            "{body}"
        );
        assert_eq!(body.get("cache_salt"), None);
        request.params.response_format = Some(cocoon_protocol::ResponseFormat::JsonObject);
        request.cache_scope = Some("0123abcd".into());
        let (_, body) = backend.request_body("m", &request);
        assert_eq!(body["response_format"], json!({"type": "json_object"}));
        assert_eq!(body["cache_salt"], "0123abcd");
    }

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

    /// REVIEW, fixed: a tool call this backend accepts can never reach the proxy. `add_call_piece`
    /// lets a call's name and arguments grow to `MAX_CALL_BYTES` (1 MiB), and the call is then
    /// sent as one `tool_call` event, one frame; but a frame is at most `MAX_FRAME_BYTES`
    /// (1 MiB, the proxy's `FrameDecoder` refuses more), and the arguments are JSON text that
    /// the event's JSON escapes again (each `\"` and `\n` of them one byte longer), so a call
    /// of well under 1 MiB (a coding agent's `write_file` with a few hundred KB of code; less
    /// still sealed, where the frame is base64 of the event) makes a frame the proxy refuses:
    /// the answer fails as the worker's fault ("frame exceeds"), the call is lost and not
    /// billed. Before tool calls, every event was one upstream chunk. Expected: whatever call
    /// the backend accepts is sent in frames the proxy reads (a lower limit, or the call in
    /// pieces).
    #[test]
    fn review_a_tool_call_the_upstream_backend_accepts_fits_in_one_frame() {
        let piece = |id: Option<&str>, name: &str, arguments: String| CallPiece {
            index: 0,
            id: id.map(str::to_owned),
            name: name.to_owned(),
            arguments,
        };
        let mut calls = Vec::new();
        let opening = r#"{"path": "hi.py", "content": ""#.to_owned();
        add_call_piece(&mut calls, piece(Some("call_1"), "write_file", opening)).unwrap();
        // The file's lines as the server streams them: JSON text, quotes and newlines escaped.
        let line = r#"print(\"hi\")\n"#;
        let fragment = line.repeat(4096 / line.len());
        loop {
            let held = calls[0].0.name.len() + calls[0].0.arguments.len();
            if held + fragment.len() + 2 > MAX_CALL_BYTES {
                break;
            }
            add_call_piece(&mut calls, piece(None, "", fragment.clone())).unwrap();
        }
        add_call_piece(&mut calls, piece(None, "", "\"}".to_owned())).unwrap();
        let (call, tokens) = calls.pop().unwrap();
        assert!(
            serde_json::from_str::<Value>(&call.arguments).is_ok(),
            "the arguments are JSON"
        );
        let size = call.arguments.len();
        let frame = cocoon_protocol::encode_frame(&GenerateEvent::ToolCall { call, tokens });
        assert!(
            frame.len() <= cocoon_protocol::MAX_FRAME_BYTES,
            "a call of {size} bytes of arguments, accepted, makes a frame of {} bytes, over the \
             {} a proxy reads",
            frame.len(),
            cocoon_protocol::MAX_FRAME_BYTES
        );
    }

    /// A tool call's first pieces as vLLM streams them: its id and name, then the start of
    /// its arguments.
    const TOOL_CALL_HEAD: [&str; 2] = [
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"write_file\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"content\\\": \\\"\"}}]}}]}\n\n",
    ];

    /// The rest of that call, its end and the usage.
    const TOOL_CALL_TAIL: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"x\\\"}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    /// REVIEW, fixed: an upstream tool call is silence to the proxy for as long as it streams. The
    /// backend joins a call's fragments and sends nothing until the server's stream has ended
    /// (no text, no event at all for a call's chunks), while the proxy cuts off a worker that
    /// sends no event for `worker_timeout_secs` (120 s; the same limit for the first event,
    /// after which it fails over to another worker). A call whose arguments take longer than
    /// that to generate (a few thousand tokens of a file at 20 tokens a second) has the
    /// honest worker cut off as stalled (reputation lost), its tokens unpaid, and the app an
    /// error (the embedded engine holds a generic-style answer, and a Hermes call, the same
    /// way). Expected: while a call streams upstream, the backend sends something (a
    /// zero-token event, or the call in pieces), so it is not silent.
    #[tokio::test]
    async fn review_a_tool_call_still_streaming_upstream_is_not_silence_downstream() {
        let (release, held) = tokio::sync::watch::channel(false);
        let router = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let mut held = held.clone();
                async move {
                    let first = futures_util::stream::iter(
                        TOOL_CALL_HEAD.map(|s| Ok::<_, std::io::Error>(s.to_owned())),
                    );
                    // The rest of the call once the test has looked for an event.
                    let rest = futures_util::stream::once(async move {
                        let _ = held.wait_for(|released| *released).await;
                        Ok::<_, std::io::Error>(TOOL_CALL_TAIL.to_owned())
                    });
                    axum::body::Body::from_stream(first.chain(rest))
                }
            }),
        );
        let url = serve(router).await;
        // Patient enough that only the event, not the backend's own idle limit, is in question.
        let backend = patient_backend(url, 30);
        let request = GenerateRequest {
            input: Input::Chat {
                messages: vec![cocoon_protocol::ChatMessage::new(
                    cocoon_protocol::Role::User,
                    "Write hi.py",
                )],
                tools: Some(cocoon_protocol::Tools {
                    functions: vec![cocoon_protocol::Function {
                        name: "write_file".into(),
                        description: None,
                        parameters: json!({"type": "object", "properties": {}}),
                    }],
                    choice: ToolChoice::Auto,
                    parallel: true,
                }),
            },
            ..text_request()
        };
        let mut events = backend.generate(request);
        let during = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .ok()
            .flatten();
        let _ = release.send(true);
        let rest: Vec<_> = events.collect().await;
        assert!(
            matches!(&during, Some(e) if !matches!(e, GenerateEvent::Error { .. })),
            "nothing was sent for 5 s while the call was still streaming upstream ({during:?}); \
             after it: {rest:?}"
        );
    }
}
