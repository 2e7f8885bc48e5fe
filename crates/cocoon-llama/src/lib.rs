//! The embedded engine: a GGUF model run in-process by llama.cpp, with continuous batching.
//!
//! This crate owns everything that links llama.cpp: [`LlamaBackend`], its scheduler and its
//! sequences. It is its own crate so that only what runs the model (the `cocoon` binary and
//! its tests) builds and links llama.cpp; the worker role and everything else see the engine
//! only through `cocoon_engine::Backend`, and its configuration (`cocoon_engine::LlamaConfig`)
//! is plain data there.
//!
//! One scheduler thread owns one llama.cpp context whose KV cache is shared by up to
//! `parallel` sequences. Every step it decodes a single batch holding the next token of each
//! generating sequence and a slice of any prompt still being read, so concurrent requests cost
//! one forward pass per step instead of one each: that is what makes aggregate tokens/s grow
//! with concurrency (see docs/performance.md). Requests never see each other's state: each has
//! its own sequence id, positions and sampler. With `prompt_cache`, a finished request's cells
//! stay (on a free sequence id) until the room is needed, and a request whose prompt starts
//! with the same tokens continues from them: the cells hold exactly what decoding those tokens
//! would have produced, so the answer is the same, only sooner.

mod embed;
mod scheduler;
mod sequence;

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock, mpsc as std_mpsc};

use cocoon_engine::{
    Backend, BackendStats, ChatTemplate, EventStream, LlamaConfig, StatsSnapshot, ToolStyle,
    error_stream,
};
use cocoon_protocol::{GenerateRequest, Input, ModelCard, ProtocolError, Role};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend as LlamaRuntime;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Tokens evaluated per `decode` call, prompt slices and generating sequences together.
const BATCH_TOKENS: usize = 512;

/// Most tokens prompt lookup guesses for one sequence a step.
const MAX_DRAFT_TOKENS: u32 = 32;

/// llama.cpp's process-wide state; it may be initialized only once per process, so whatever
/// else in the process loads a model through llama-cpp-2 (a test reading a model's
/// vocabulary, say) takes it from here.
pub fn runtime() -> Result<&'static LlamaRuntime, ProtocolError> {
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
    shared: Arc<Shared>,
    /// Hands requests to the scheduler thread; dropping it lets the thread finish what runs
    /// and exit.
    submit: std_mpsc::Sender<scheduler::Job>,
    /// Hands texts to the embedding thread, with `embeddings` on.
    embed: Option<std_mpsc::Sender<embed::EmbedJob>>,
}

/// What the scheduler thread and the API share.
struct Shared {
    model: LlamaModel,
    template: Option<Template>,
    card: ModelCard,
    threads: i32,
    parallel: u32,
    kv_cache_tokens: u32,
    prompt_cache: bool,
    /// Most tokens guessed a step by prompt lookup (0: off).
    lookup_draft_tokens: usize,
    speculation: Speculation,
    stats: BackendStats,
}

/// What prompt lookup guessed and how much of it the model kept.
#[derive(Debug, Default)]
struct Speculation {
    drafted: std::sync::atomic::AtomicU64,
    accepted: std::sync::atomic::AtomicU64,
}

/// Prompt-lookup counts since the model loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculationStats {
    /// Tokens guessed and checked.
    pub drafted: u64,
    /// Of those, tokens the model would have chosen itself, kept without a pass of their own.
    pub accepted: u64,
}

impl LlamaBackend {
    /// Loads the model and starts its scheduler. Fails with a clear message if the file is
    /// missing or not a GGUF model, or if llama.cpp cannot make the shared context.
    pub fn load(config: &LlamaConfig) -> Result<Self, ProtocolError> {
        let path = &config.model_path;
        if !path.is_file() {
            return Err(ProtocolError::internal(format!(
                "model file {} not found (run scripts/fetch-model.sh to download the default model)",
                path.display()
            )));
        }
        let model_hash = cocoon_engine::model_file_hash(path).map_err(|e| {
            ProtocolError::internal(format!("cannot hash model {}: {e}", path.display()))
        })?;
        let runtime = runtime()?;
        let model = LlamaModel::load_from_file(runtime, path, &LlamaModelParams::default())
            .map_err(|e| {
                ProtocolError::internal(format!("cannot load model {}: {e}", path.display()))
            })?;
        let template = match &config.chat_template_file {
            None => Template::of(&model),
            Some(file) => Some(Template::from_file(&model, file)?),
        };
        match &template {
            None => {
                tracing::warn!(path = %path.display(), "model has no chat template; only /v1/completions will work")
            }
            Some(Template::Builtin(_, why)) => {
                tracing::warn!(path = %path.display(), %why, "the model's chat template does not compile here: chats are rendered by llama.cpp's built-in formats, without tools")
            }
            Some(Template::Jinja(t)) => {
                tracing::debug!(style = ?t.tool_style(), "chat template compiled")
            }
        }
        let trained = model.n_ctx_train();
        let context_length = match config.context_length {
            0 => trained.min(4096),
            n => n.min(trained),
        };
        let id = config.served_model_id();
        let threads = match config.threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| i32::try_from(n.get()).unwrap_or(i32::MAX)),
            n => i32::try_from(n).unwrap_or(i32::MAX),
        };
        let parallel = config.parallel.max(1);
        let kv_cache_tokens = match config.kv_cache_tokens {
            0 => context_length.saturating_mul(parallel),
            // Smaller than one context would refuse requests the model card admits.
            n => n.max(context_length),
        };
        let prompt_cache = config.prompt_cache && prompt_cache_fits(&model);
        if config.prompt_cache && !prompt_cache {
            tracing::info!(model = %id, "prompt cache off: this model's state cannot be cut back to a shared prefix (recurrent, hybrid or sliding-window attention)");
        }
        // A rejected guess's cells are cut off again: only a model whose state allows that.
        let lookup_draft_tokens = match config.lookup_draft_tokens.min(MAX_DRAFT_TOKENS) {
            n if n > 0 && !prompt_cache_fits(&model) => {
                tracing::info!(model = %id, "prompt lookup off: this model's state cannot be cut back to drop rejected guesses (recurrent, hybrid or sliding-window attention)");
                0
            }
            n => n as usize,
        };
        tracing::info!(model = %id, context_length, threads, parallel, kv_cache_tokens, prompt_cache, lookup_draft_tokens, "loaded model {}", path.display());
        let shared = Arc::new(Shared {
            model,
            template,
            card: ModelCard {
                id,
                context_length,
                min_price: 0,
                model_hash: Some(model_hash),
            },
            threads,
            parallel,
            kv_cache_tokens,
            prompt_cache,
            lookup_draft_tokens,
            speculation: Speculation::default(),
            stats: BackendStats::default(),
        });
        let submit = scheduler::start(shared.clone())?;
        let embed = match config.embeddings {
            true => Some(embed::start(shared.clone())?),
            false => None,
        };
        Ok(Self {
            shared,
            submit,
            embed,
        })
    }

    /// The prompt text the model sees for `input` (the chat template applied).
    pub fn render_prompt(&self, input: &Input) -> Result<String, ProtocolError> {
        self.shared.render(input)
    }

    /// Number of tokens of `text` under this model's tokenizer, as a prompt is counted.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.shared.tokenize(text).len()
    }

    /// What prompt lookup guessed and kept so far (see `lookup_draft_tokens`).
    pub fn speculation(&self) -> SpeculationStats {
        use std::sync::atomic::Ordering::Relaxed;
        SpeculationStats {
            drafted: self.shared.speculation.drafted.load(Relaxed),
            accepted: self.shared.speculation.accepted.load(Relaxed),
        }
    }

    /// The text of the model's begin-of-sequence token, which chat templates may print.
    pub fn bos_text(&self) -> String {
        self.shared.bos_text()
    }
}

impl Backend for LlamaBackend {
    fn models(&self) -> Vec<ModelCard> {
        vec![self.shared.card.clone()]
    }

    fn capacity(&self) -> u32 {
        self.shared.parallel
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        if let Err(e) = request.validate() {
            return error_stream(e);
        }
        if request.model != self.shared.card.id {
            return error_stream(ProtocolError::new(
                cocoon_protocol::ErrorKind::ModelNotFound,
                format!("this worker does not serve model '{}'", request.model),
            ));
        }
        // Unbounded: the scheduler must never block on one slow reader while it decodes for
        // everyone; a generation's events are bounded by its max_tokens anyway.
        let (tx, rx) = mpsc::unbounded_channel();
        if let Input::Embed { texts } = request.input {
            let Some(embed) = &self.embed else {
                return error_stream(ProtocolError::invalid(format!(
                    "this worker does not serve embeddings of model '{}' (its [llama] section \
                     sets no `embeddings = true`)",
                    self.shared.card.id
                )));
            };
            if embed.send(embed::EmbedJob { texts, tx }).is_err() {
                return error_stream(ProtocolError::internal("the embedding thread has stopped"));
            }
            return Box::pin(UnboundedReceiverStream::new(rx));
        }
        if self.submit.send(scheduler::Job { request, tx }).is_err() {
            return error_stream(ProtocolError::internal(
                "the llama.cpp scheduler has stopped",
            ));
        }
        Box::pin(UnboundedReceiverStream::new(rx))
    }

    fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

/// How chats become prompts: the model's own template, rendered by minijinja, or, for a
/// template minijinja cannot compile, llama.cpp's built-in formats (which have no tools).
enum Template {
    Jinja(Box<ChatTemplate>),
    Builtin(LlamaChatTemplate, String),
}

impl Template {
    fn of(model: &LlamaModel) -> Option<Self> {
        let builtin = model.chat_template(None).ok()?;
        let source = builtin.to_str().ok()?.to_owned();
        Some(match jinja(model, &source) {
            Ok(t) => Self::Jinja(Box::new(t)),
            Err(why) => Self::Builtin(builtin, why),
        })
    }

    /// The operator's template in place of the model's; one that does not compile is a
    /// configuration error.
    fn from_file(model: &LlamaModel, file: &std::path::Path) -> Result<Self, ProtocolError> {
        let source = std::fs::read_to_string(file).map_err(|e| {
            ProtocolError::internal(format!("chat template {}: {e}", file.display()))
        })?;
        jinja(model, &source)
            .map(|t| Self::Jinja(Box::new(t)))
            .map_err(|why| {
                ProtocolError::internal(format!("chat template {}: {why}", file.display()))
            })
    }
}

/// `source` compiled for `model`, with its special tokens' text.
fn jinja(model: &LlamaModel, source: &str) -> Result<ChatTemplate, String> {
    let vocab = model.vocab();
    let text = |t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    ChatTemplate::new(source, &text(vocab.bos()), &text(vocab.eos()))
}

impl Shared {
    fn render(&self, input: &Input) -> Result<String, ProtocolError> {
        match input {
            Input::Text { prompt } => Ok(prompt.clone()),
            Input::Embed { .. } => Err(ProtocolError::internal("texts to embed are not a prompt")),
            Input::Chat { messages, tools } => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ProtocolError::invalid(format!(
                        "model '{}' has no chat template; use /v1/completions",
                        self.card.id
                    ))
                })?;
                let (builtin, why) = match template {
                    Template::Jinja(t) => return t.render(messages, tools.as_ref()),
                    Template::Builtin(builtin, why) => (builtin, why),
                };
                if tools.is_some() || messages.iter().any(|m| m.role == Role::Tool) {
                    return Err(ProtocolError::invalid(format!(
                        "model '{}' cannot be given tools here: its chat template does not compile ({why})",
                        self.card.id
                    )));
                }
                let messages = messages
                    .iter()
                    .map(|m| LlamaChatMessage::new(m.role.as_str().to_owned(), m.content.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        ProtocolError::invalid("message content must not contain NUL characters")
                    })?;
                self.model
                    .apply_chat_template(builtin, &messages, true)
                    .map_err(|e| ProtocolError::internal(format!("chat template failed: {e}")))
            }
        }
    }

    /// How this model writes tool calls (the generic JSON where its template has no place
    /// for them).
    fn tool_style(&self) -> ToolStyle {
        match &self.template {
            Some(Template::Jinja(t)) => t.tool_style(),
            _ => ToolStyle::Generic,
        }
    }

    fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        // Same choices as llama.cpp's server: add BOS if the model wants it, parse special tokens
        // (the chat template's markers are special tokens).
        let vocab = self.model.vocab();
        let mut tokens = vocab.tokenize(text.as_bytes(), true, true);
        // A template that prints `bos_token` itself (Llama 3's) would get a second one.
        if vocab.should_add_bos()
            && tokens.len() > 1
            && tokens[0] == vocab.bos()
            && tokens[1] == vocab.bos()
        {
            tokens.remove(0);
        }
        tokens
    }

    /// The text of the model's begin-of-sequence token.
    fn bos_text(&self) -> String {
        let vocab = self.model.vocab();
        String::from_utf8_lossy(&vocab.token_to_piece(vocab.bos(), true, None)).into_owned()
    }

    /// The one context all sequences share.
    fn new_context(&self) -> Result<LlamaContext<'_>, ProtocolError> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.kv_cache_tokens))
            .with_n_batch(BATCH_TOKENS as u32)
            .with_n_ubatch(BATCH_TOKENS as u32)
            .with_n_seq_max(self.parallel)
            // One pool of cells for all sequences: a short request leaves room for a long one.
            .with_kv_unified(true)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        self.model
            .new_context(runtime()?, params)
            .map_err(|e| ProtocolError::internal(format!("cannot create llama.cpp context: {e}")))
    }
}

/// Whether reusing a prefix of a sequence's cells gives what decoding it afresh would: not for
/// recurrent or hybrid models (their state is one summary, not cells per token), nor for
/// sliding-window attention (cells before the window are gone).
fn prompt_cache_fits(model: &LlamaModel) -> bool {
    let sliding = model
        .meta_val_str("general.architecture")
        .ok()
        .and_then(|arch| {
            model
                .meta_val_str(&format!("{arch}.attention.sliding_window"))
                .ok()
        })
        .is_some_and(|w| w.trim() != "0");
    !model.is_recurrent() && !model.is_hybrid() && !sliding
}
