//! The embedded engine: a GGUF model run in-process by llama.cpp.
//!
//! Each request gets its own llama.cpp context (its own KV cache), so requests never see each
//! other's state. All `decode` calls go through one fair lock: llama.cpp already uses every
//! core for one batch, and running two batches at once on the same cores makes both slower
//! (its threads spin at barriers). Taking turns token by token keeps every stream moving.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cocoon_protocol::{
    FinishReason, GenerateEvent, GenerateRequest, Input, ModelCard, ProtocolError, Usage,
};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend as LlamaRuntime;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::stats::{BackendStats, Outcome};
use crate::text::{StopMatcher, Utf8Accumulator};
use crate::{Backend, EventStream, StatsSnapshot, error_stream};

/// Prompt tokens evaluated per `decode` call.
const BATCH_TOKENS: usize = 512;

/// Configuration of the embedded engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlamaConfig {
    /// Path of the GGUF file.
    pub model_path: PathBuf,
    /// Model name announced to the network; defaults to the file name without extensions.
    pub model_id: Option<String>,
    /// Context window per request in tokens; 0 means the smaller of the model's training
    /// context and 4096.
    pub context_length: u32,
    /// CPU threads per decode; 0 means all available cores.
    pub threads: u32,
    /// Requests generated at once (they take turns token by token); more wait in a queue.
    pub parallel: u32,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_id: None,
            context_length: 0,
            threads: 0,
            parallel: 4,
        }
    }
}

/// llama.cpp's process-wide state; it may be initialized only once per process.
fn runtime() -> Result<&'static LlamaRuntime, ProtocolError> {
    static RUNTIME: OnceLock<Result<LlamaRuntime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaRuntime::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ProtocolError::internal(format!("llama.cpp failed to initialize: {e}")))
}

/// A model served in-process by llama.cpp.
pub struct LlamaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    model: LlamaModel,
    template: Option<LlamaChatTemplate>,
    card: ModelCard,
    threads: i32,
    capacity: u32,
    permits: Arc<Semaphore>,
    /// Serializes context creation (unsound in parallel in llama.cpp) and decode steps.
    decode_lock: Mutex<()>,
    stats: BackendStats,
}

impl LlamaBackend {
    /// Loads the model. Fails with a clear message if the file is missing or not a GGUF model.
    pub fn load(config: &LlamaConfig) -> Result<Self, ProtocolError> {
        let path = &config.model_path;
        if !path.is_file() {
            return Err(ProtocolError::internal(format!(
                "model file {} not found (run scripts/fetch-model.sh to download the default model)",
                path.display()
            )));
        }
        let runtime = runtime()?;
        let model = LlamaModel::load_from_file(runtime, path, &LlamaModelParams::default())
            .map_err(|e| {
                ProtocolError::internal(format!("cannot load model {}: {e}", path.display()))
            })?;
        let template = model.chat_template(None).ok();
        if template.is_none() {
            tracing::warn!(path = %path.display(), "model has no chat template; only /v1/completions will work");
        }
        let trained = model.n_ctx_train();
        let context_length = match config.context_length {
            0 => trained.min(4096),
            n => n.min(trained),
        };
        let id = config
            .model_id
            .clone()
            .unwrap_or_else(|| default_model_id(path));
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
            n => n as i32,
        };
        let capacity = config.parallel.max(1);
        tracing::info!(model = %id, context_length, threads, capacity, "loaded model {}", path.display());
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                template,
                card: ModelCard { id, context_length },
                threads,
                capacity,
                permits: Arc::new(Semaphore::new(capacity as usize)),
                decode_lock: Mutex::new(()),
                stats: BackendStats::default(),
            }),
        })
    }

    /// The prompt text the model sees for `input` (the chat template applied).
    pub fn render_prompt(&self, input: &Input) -> Result<String, ProtocolError> {
        self.inner.render(input)
    }

    /// Number of tokens of `text` under this model's tokenizer, as a prompt is counted.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.inner.tokenize(text).len()
    }
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`.
fn default_model_id(path: &std::path::Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let name = name.strip_suffix(".gguf").unwrap_or(name);
    match name.rsplit_once('.') {
        Some((stem, quant)) if quant.starts_with(['Q', 'q', 'F', 'f', 'I', 'B']) => stem.to_owned(),
        _ => name.to_owned(),
    }
}

impl Backend for LlamaBackend {
    fn models(&self) -> Vec<ModelCard> {
        vec![self.inner.card.clone()]
    }

    fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        if let Err(e) = request.validate() {
            return error_stream(e);
        }
        if request.model != self.inner.card.id {
            return error_stream(ProtocolError::new(
                cocoon_protocol::ErrorKind::ModelNotFound,
                format!("this worker does not serve model '{}'", request.model),
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let permit = tokio::select! {
                permit = inner.permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
                // The requester left while the request was queued.
                _ = tx.closed() => return,
            };
            let _ = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                inner.run(&request, &tx);
            })
            .await;
        });
        Box::pin(ReceiverStream::new(rx))
    }

    fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }
}

impl Inner {
    fn render(&self, input: &Input) -> Result<String, ProtocolError> {
        match input {
            Input::Text { prompt } => Ok(prompt.clone()),
            Input::Chat { messages } => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ProtocolError::invalid(format!(
                        "model '{}' has no chat template; use /v1/completions",
                        self.card.id
                    ))
                })?;
                let messages = messages
                    .iter()
                    .map(|m| LlamaChatMessage::new(m.role.as_str().to_owned(), m.content.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        ProtocolError::invalid("message content must not contain NUL characters")
                    })?;
                self.model
                    .apply_chat_template(template, &messages, true)
                    .map_err(|e| ProtocolError::internal(format!("chat template failed: {e}")))
            }
        }
    }

    fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        // Same choices as llama.cpp's server: add BOS if the model wants it, parse special tokens
        // (the chat template's markers are special tokens).
        self.model.vocab().tokenize(text.as_bytes(), true, true)
    }

    fn run(&self, request: &GenerateRequest, tx: &mpsc::Sender<GenerateEvent>) {
        let mut guard = self.stats.start();
        match self.generate_blocking(request, tx) {
            Ok(outcome) => guard.set_outcome(outcome),
            Err(error) => {
                tracing::debug!(%error, "generation failed");
                let _ = tx.blocking_send(GenerateEvent::Error { error });
            }
        }
    }

    fn new_context(&self, n_ctx: u32) -> Result<LlamaContext<'_>, ProtocolError> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(BATCH_TOKENS as u32)
            .with_n_ubatch(BATCH_TOKENS as u32)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let _lock = self.decode_lock.lock();
        self.model
            .new_context(runtime()?, params)
            .map_err(|e| ProtocolError::internal(format!("cannot create llama.cpp context: {e}")))
    }

    fn decode(
        &self,
        ctx: &mut LlamaContext<'_>,
        batch: &mut LlamaBatch,
    ) -> Result<(), ProtocolError> {
        let lock = self.decode_lock.lock();
        let result = ctx.decode(batch);
        MutexGuard::unlock_fair(lock);
        result.map_err(|e| ProtocolError::internal(format!("llama.cpp decode failed: {e}")))
    }

    fn generate_blocking(
        &self,
        request: &GenerateRequest,
        tx: &mpsc::Sender<GenerateEvent>,
    ) -> Result<Outcome, ProtocolError> {
        let params = &request.params;
        let prompt = self.render(&request.input)?;
        let tokens = self.tokenize(&prompt);
        if tokens.is_empty() {
            return Err(ProtocolError::invalid("the prompt is empty"));
        }
        let n_ctx = self.card.context_length as usize;
        let n_prompt = tokens.len();
        let max_tokens = match params.max_tokens {
            Some(m) => m as usize,
            None => n_ctx.saturating_sub(n_prompt),
        };
        if n_prompt + max_tokens > n_ctx || max_tokens == 0 {
            return Err(ProtocolError::new(
                cocoon_protocol::ErrorKind::ContextLengthExceeded,
                format!(
                    "This model's maximum context length is {n_ctx} tokens. However, you requested \
                     {} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). \
                     Please reduce the length of the prompt or max_tokens.",
                    n_prompt + max_tokens
                ),
            ));
        }
        self.stats.add_prompt_tokens(n_prompt as u64);

        // Only as much KV cache as this request can use.
        let needed = (n_prompt + max_tokens).next_multiple_of(256).min(n_ctx) as u32;
        let mut ctx = self.new_context(needed)?;
        let mut batch = LlamaBatch::new(BATCH_TOKENS, 1);
        for (chunk_index, chunk) in tokens.chunks(BATCH_TOKENS).enumerate() {
            if tx.is_closed() {
                return Ok(Outcome::Cancelled);
            }
            batch.clear();
            let base = chunk_index * BATCH_TOKENS;
            for (i, &token) in chunk.iter().enumerate() {
                let pos = base + i;
                batch
                    .add(token, pos as i32, &[0], pos + 1 == n_prompt)
                    .map_err(|e| ProtocolError::internal(e.to_string()))?;
            }
            self.decode(&mut ctx, &mut batch)?;
        }

        let mut sampler = if params.temperature == 0.0 {
            LlamaSampler::greedy()
        } else {
            // OpenAI takes a 64-bit seed, llama.cpp a 32-bit one: use its low bits.
            let seed = params.seed.map_or_else(rand::random::<u32>, |s| s as u32);
            LlamaSampler::chain_simple([
                LlamaSampler::top_p(params.top_p, 1),
                LlamaSampler::temp(params.temperature),
                LlamaSampler::dist(seed),
            ])
        };
        let vocab = self.model.vocab();
        let mut utf8 = Utf8Accumulator::default();
        let mut stops = StopMatcher::new(params.stop.clone());
        let mut completion_tokens = 0u32;
        let mut unsent_tokens = 0u32;
        let mut finish = FinishReason::Length;
        let mut matched_stop = false;
        let mut piece = Vec::with_capacity(16);
        let mut pos = n_prompt;

        while (completion_tokens as usize) < max_tokens {
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
            if vocab.is_eog(token) && !params.ignore_eos {
                finish = FinishReason::Stop;
                break;
            }
            completion_tokens += 1;
            unsent_tokens += 1;
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            let scan = stops.push(&utf8.push(&piece));
            if !scan.emit.is_empty() {
                let event = GenerateEvent::Delta {
                    text: scan.emit,
                    tokens: unsent_tokens,
                };
                if tx.blocking_send(event).is_err() {
                    self.stats
                        .add_generated_tokens(u64::from(completion_tokens));
                    return Ok(Outcome::Cancelled);
                }
                unsent_tokens = 0;
            }
            if scan.stopped {
                finish = FinishReason::Stop;
                matched_stop = true;
                break;
            }
            if tx.is_closed() {
                self.stats
                    .add_generated_tokens(u64::from(completion_tokens));
                return Ok(Outcome::Cancelled);
            }
            if (completion_tokens as usize) < max_tokens {
                batch.clear();
                batch
                    .add(token, pos as i32, &[0], true)
                    .map_err(|e| ProtocolError::internal(e.to_string()))?;
                pos += 1;
                self.decode(&mut ctx, &mut batch)?;
            }
        }
        self.stats
            .add_generated_tokens(u64::from(completion_tokens));

        if !matched_stop {
            // Flush what was held back: an incomplete character, or text that looked like the
            // start of a stop sequence.
            let scan = stops.push(&utf8.finish());
            let mut rest = scan.emit;
            if !scan.stopped {
                rest.push_str(&stops.finish());
            }
            if !rest.is_empty() {
                let event = GenerateEvent::Delta {
                    text: rest,
                    tokens: unsent_tokens,
                };
                if tx.blocking_send(event).is_err() {
                    return Ok(Outcome::Cancelled);
                }
            }
        }
        let usage = Usage {
            prompt_tokens: n_prompt as u32,
            completion_tokens,
        };
        if tx
            .blocking_send(GenerateEvent::Done {
                finish_reason: finish,
                usage,
                billing: None,
            })
            .is_err()
        {
            return Ok(Outcome::Cancelled);
        }
        Ok(Outcome::Completed)
    }
}

#[cfg(test)]
mod tests {
    use super::default_model_id;
    use std::path::Path;

    #[test]
    fn model_id_drops_quantization_and_extension() {
        assert_eq!(
            default_model_id(Path::new("m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(
            default_model_id(Path::new("llama-3.2-1b.gguf")),
            "llama-3.2-1b"
        );
        assert_eq!(default_model_id(Path::new("x.F16.gguf")), "x");
    }
}
