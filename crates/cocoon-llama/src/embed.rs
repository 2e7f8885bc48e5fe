//! Embeddings: a thread of their own, with a context made for them (pooled outputs, one
//! text's tokens in one batch), so that embedding never waits on the generation scheduler's
//! batch nor stalls it.

use std::num::NonZeroU32;
use std::sync::{Arc, mpsc as std_mpsc};

use base64::Engine as _;
use cocoon_protocol::{FinishReason, GenerateEvent, ProtocolError, Usage};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use tokio::sync::mpsc;

use crate::Shared;

/// Texts to embed, and where their events go.
pub(crate) struct EmbedJob {
    pub texts: Vec<String>,
    pub tx: mpsc::UnboundedSender<GenerateEvent>,
}

/// Starts the embedding thread; its context is made first, so a model that cannot embed fails
/// at load.
pub(crate) fn start(shared: Arc<Shared>) -> Result<std_mpsc::Sender<EmbedJob>, ProtocolError> {
    let (submit, jobs) = std_mpsc::channel::<EmbedJob>();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name("llama-embed".into())
        .spawn(move || {
            let mut ctx = match context(&shared) {
                Ok(ctx) => {
                    let _ = ready_tx.send(Ok(()));
                    ctx
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for job in jobs {
                let mut guard = shared.stats.start();
                let event = match embed_all(&shared, &mut ctx, &job) {
                    Ok(Some(usage)) => {
                        shared
                            .stats
                            .add_prompt_tokens(u64::from(usage.prompt_tokens));
                        guard.set_outcome(cocoon_engine::Outcome::Completed);
                        GenerateEvent::Done {
                            finish_reason: FinishReason::Stop,
                            usage,
                            billing: None,
                        }
                    }
                    // The requester left.
                    Ok(None) => {
                        guard.set_outcome(cocoon_engine::Outcome::Cancelled);
                        continue;
                    }
                    Err(error) => GenerateEvent::Error { error },
                };
                let _ = job.tx.send(event);
            }
        })
        .map_err(|e| ProtocolError::internal(format!("cannot start the embedding thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| ProtocolError::internal("the embedding thread stopped"))??;
    Ok(submit)
}

fn context(shared: &Shared) -> Result<LlamaContext<'_>, ProtocolError> {
    let n = shared.card.context_length;
    // The model's own pooling when it has one (an embedding model's), else the mean of its
    // hidden states.
    let pooling = match shared
        .model
        .meta_val_str("general.architecture")
        .ok()
        .and_then(|arch| {
            shared
                .model
                .meta_val_str(&format!("{arch}.pooling_type"))
                .ok()
        }) {
        Some(kind) => LlamaPoolingType::from(kind.trim().parse::<i32>().unwrap_or(1)),
        None => LlamaPoolingType::Mean,
    };
    let pooling = match pooling {
        LlamaPoolingType::None | LlamaPoolingType::Unspecified | LlamaPoolingType::Rank => {
            LlamaPoolingType::Mean
        }
        other => other,
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n))
        // A text's tokens go in one batch: pooling needs them together.
        .with_n_batch(n)
        .with_n_ubatch(n)
        .with_n_seq_max(1)
        .with_embeddings(true)
        .with_pooling_type(pooling)
        .with_n_threads(shared.threads)
        .with_n_threads_batch(shared.threads);
    shared
        .model
        .new_context(crate::runtime()?, params)
        .map_err(|e| ProtocolError::internal(format!("cannot create the embedding context: {e}")))
}

/// Embeds each text of `job` in turn and sends its vector; the usage of all, or `None` when
/// the requester left.
fn embed_all(
    shared: &Shared,
    ctx: &mut LlamaContext<'_>,
    job: &EmbedJob,
) -> Result<Option<Usage>, ProtocolError> {
    let n_ctx = shared.card.context_length as usize;
    let mut prompt_tokens: u32 = 0;
    for (index, text) in job.texts.iter().enumerate() {
        if job.tx.is_closed() {
            return Ok(None);
        }
        let tokens = shared.tokenize(text);
        if tokens.len() > n_ctx {
            return Err(ProtocolError::new(
                cocoon_protocol::ErrorKind::ContextLengthExceeded,
                format!(
                    "input[{index}] is {} tokens, more than this model's context of {n_ctx}",
                    tokens.len()
                ),
            ));
        }
        ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (pos, token) in tokens.iter().enumerate() {
            batch
                .add(*token, i32::try_from(pos).unwrap_or(i32::MAX), &[0], true)
                .map_err(|e| ProtocolError::internal(format!("embedding batch: {e}")))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| ProtocolError::internal(format!("embedding failed: {e}")))?;
        let vector = ctx
            .embeddings_seq_ith(0)
            .map_err(|e| ProtocolError::internal(format!("no pooled embedding: {e}")))?;
        // Length 1, as OpenAI's and llama.cpp's server's embeddings are.
        let norm = vector
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let bytes: Vec<u8> = vector
            .iter()
            .flat_map(|v| (v / norm).to_le_bytes())
            .collect();
        let event = GenerateEvent::Embedding {
            index: index as u32,
            embedding: base64::engine::general_purpose::STANDARD.encode(bytes),
        };
        if job.tx.send(event).is_err() {
            return Ok(None);
        }
        prompt_tokens = prompt_tokens.saturating_add(tokens.len() as u32);
    }
    Ok(Some(Usage::new(prompt_tokens, 0)))
}
