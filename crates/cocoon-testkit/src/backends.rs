//! Backends whose behaviour a test scripts, so what a test measures is the network's routing,
//! billing and failover, not a model's timing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use cocoon_engine::{Backend, EventStream, StatsSnapshot};
use cocoon_protocol::{
    ErrorKind, FinishReason, GenerateEvent, GenerateRequest, ModelCard, ProtocolError, Usage,
};
use futures_util::StreamExt;

/// The model id the doubles serve (the same id as the default real model, so requests written
/// for one serve the other).
pub const MODEL: &str = "SmolLM2-135M-Instruct";

/// Every prompt costs this many tokens on a [`Scripted`] backend.
pub const PROMPT_TOKENS: u32 = 5;

/// The hash the doubles announce for their model (they have no weights): SHA-256 of a label,
/// which dev networks allow in their registry like a real model's.
pub fn scripted_model_hash() -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        b"cocoon scripted test model",
    ))
}

/// The one model the doubles serve, with a context of `context_length`.
pub fn model_card(context_length: u32) -> Vec<ModelCard> {
    vec![ModelCard {
        id: MODEL.into(),
        context_length,
        min_price: 0,
        model_hash: Some(scripted_model_hash()),
    }]
}

/// What a [`Scripted`] backend does with its next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Answers `max_tokens` (4 by default) tokens "t" with exact usage.
    Serve = 0,
    /// Refuses at once, as an overloaded or broken worker does.
    Refuse = 1,
    /// Accepts and never sends a first token.
    Stall = 2,
    /// Sends two tokens, then its stream breaks off with no final event.
    DieAfterTwo = 3,
    /// Serves as [`Mode::Serve`] but lies about the counts, as a worker out to drain its
    /// clients would: each one-byte delta claims [`INFLATED_TOKENS`] tokens, and the usage
    /// claims that many prompt and completion tokens.
    Overreport = 4,
}

/// The token count an [`Mode::Overreport`] worker claims (about 4·10⁹).
pub const INFLATED_TOKENS: u32 = 4_000_000_000;

impl Mode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Mode::Refuse,
            2 => Mode::Stall,
            3 => Mode::DieAfterTwo,
            4 => Mode::Overreport,
            _ => Mode::Serve,
        }
    }
}

/// Answers `max_tokens` tokens "t" with exact usage (a [`PROMPT_TOKENS`]-token prompt), or
/// misbehaves as its [`Mode`] says; refuses what does not fit its context, as a real backend
/// does.
pub struct Scripted {
    mode: AtomicU8,
    served: AtomicU64,
    context: u32,
    /// Milliseconds between the events of an answer after its first (0: all at once).
    pace_ms: AtomicU64,
    /// The hash its model announces: [`scripted_model_hash`] unless told otherwise.
    model_hash: String,
}

impl Scripted {
    /// A backend serving [`MODEL`] with a context of `context` tokens, in [`Mode::Serve`].
    pub fn new(context: u32) -> Arc<Self> {
        Arc::new(Self {
            mode: AtomicU8::new(Mode::Serve as u8),
            served: AtomicU64::new(0),
            context,
            pace_ms: AtomicU64::new(0),
            model_hash: scripted_model_hash(),
        })
    }

    /// [`Self::new`], announcing other weights: SHA-256 of `label` as its model hash (a second
    /// version of the model, say, that a registry may allow or revoke apart).
    pub fn weights(context: u32, label: &str) -> Arc<Self> {
        let mut this = Arc::into_inner(Self::new(context)).expect("just made");
        this.model_hash = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            label.as_bytes(),
        ));
        Arc::new(this)
    }

    /// The hash its model announces.
    pub fn model_hash(&self) -> &str {
        &self.model_hash
    }

    /// Switches what the next requests get.
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Spaces an answer's events after the first by `gap` (a slow model, or one that pauses
    /// to think); zero sends them all at once.
    pub fn pace(&self, gap: std::time::Duration) {
        let ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
        self.pace_ms.store(ms, Ordering::SeqCst);
    }

    /// How many requests it answered in full.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Backend for Scripted {
    fn models(&self) -> Vec<ModelCard> {
        let mut cards = model_card(self.context);
        cards[0].model_hash = Some(self.model_hash.clone());
        cards
    }

    fn capacity(&self) -> u32 {
        4
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        let tokens = request.params.max_tokens.unwrap_or(4);
        if tokens.saturating_add(PROMPT_TOKENS) > self.context {
            return cocoon_engine::error_stream(ProtocolError::new(
                ErrorKind::ContextLengthExceeded,
                format!(
                    "{PROMPT_TOKENS} + {tokens} tokens do not fit a context of {}",
                    self.context
                ),
            ));
        }
        let mode = Mode::from_u8(self.mode.load(Ordering::SeqCst));
        if matches!(mode, Mode::Serve | Mode::Overreport) {
            self.served.fetch_add(1, Ordering::SeqCst);
        }
        let claimed = if mode == Mode::Overreport {
            INFLATED_TOKENS
        } else {
            1
        };
        let delta = || GenerateEvent::Delta {
            text: "t".into(),
            tokens: claimed,
            logprobs: Vec::new(),
        };
        match mode {
            Mode::Refuse => cocoon_engine::error_stream(ProtocolError::new(
                ErrorKind::Unavailable,
                "this worker is overloaded",
            )),
            Mode::Stall => Box::pin(futures_util::stream::pending()),
            Mode::DieAfterTwo => Box::pin(futures_util::stream::iter([delta(), delta()])),
            Mode::Serve | Mode::Overreport => {
                let mut events: Vec<GenerateEvent> = (0..tokens).map(|_| delta()).collect();
                let (prompt_tokens, completion_tokens) = if mode == Mode::Overreport {
                    (INFLATED_TOKENS, INFLATED_TOKENS)
                } else {
                    (PROMPT_TOKENS, tokens)
                };
                events.push(GenerateEvent::Done {
                    finish_reason: FinishReason::Length,
                    usage: Usage::new(prompt_tokens, completion_tokens),
                    billing: None,
                });
                let gap = std::time::Duration::from_millis(self.pace_ms.load(Ordering::SeqCst));
                if gap.is_zero() {
                    return Box::pin(futures_util::stream::iter(events));
                }
                Box::pin(
                    futures_util::stream::iter(events.into_iter().enumerate()).then(
                        move |(i, event)| async move {
                            if i > 0 {
                                tokio::time::sleep(gap).await;
                            }
                            event
                        },
                    ),
                )
            }
        }
    }

    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
}

/// Answers with the prompt's last message (or text) in capitals, in one delta of a token per
/// four bytes: a test puts a string in the answer that is not in the prompt by writing it in
/// small letters. Its prompt costs [`PROMPT_TOKENS`].
pub struct Echo;

impl Backend for Echo {
    fn models(&self) -> Vec<ModelCard> {
        model_card(4096)
    }

    fn capacity(&self) -> u32 {
        4
    }

    fn generate(&self, request: GenerateRequest) -> EventStream {
        let text = match &request.input {
            cocoon_protocol::Input::Chat { messages, .. } => messages
                .last()
                .map(|m| m.content.to_uppercase())
                .unwrap_or_default(),
            cocoon_protocol::Input::Text { prompt } => prompt.to_uppercase(),
            cocoon_protocol::Input::Embed { texts } => texts.join(" ").to_uppercase(),
        };
        let tokens = u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX);
        let events = vec![
            GenerateEvent::Delta {
                text,
                tokens,
                logprobs: Vec::new(),
            },
            GenerateEvent::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::new(PROMPT_TOKENS, tokens),
                billing: None,
            },
        ];
        Box::pin(futures_util::stream::iter(events))
    }

    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
}
