//! A conversation growing turn by turn, the workload a prompt cache is for: each turn sends
//! the whole history (system prompt, every question and answer so far) and a new question.
//! Measured on the embedded engine with its prompt cache and without it, and on llama-server
//! with `cache_prompt: true`, all on the same GGUF and threads, in one run.

use std::sync::Arc;
use std::time::Instant;

use cocoon_engine::Backend;
use cocoon_protocol::{ChatMessage, GenerateRequest, Input, Role, SamplingParams};
use serde::Serialize;
use serde_json::json;

use super::client::{Answer, stream_chat};
use super::engine::{LlamaServer, direct};
use super::stats::{Summary, ms};

const SYSTEM: &str = "You are the keeper's logbook assistant. You answer questions about the \
    lighthouse, its keeper and the ships that pass, in two or three plain sentences, and you \
    never invent a date or a name that the conversation has not given.";

/// The questions asked, one per turn.
const QUESTIONS: &[&str] = &[
    "How many steps lead up to the lamp?",
    "What does the keeper do every evening?",
    "Why could the supply boat not come some winters?",
    "What did the keeper write in his book?",
    "Describe the ship that anchored off the point.",
    "Who rowed towards the landing in the morning?",
    "What should the keeper say to them first?",
    "Summarise the conversation so far in one sentence.",
];

/// One path through the conversation.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationPath {
    /// What was measured.
    pub path: String,
    /// Turns answered.
    pub turns: usize,
    /// Prompt tokens of the last turn (the whole history).
    pub last_prompt_tokens: u32,
    /// Prompt tokens the engine reported as cached, over all turns (the embedded engine only).
    pub cached_tokens: u32,
    /// Time to first token of the turns after the first, when there is history to reuse.
    pub ttft_ms: Summary,
    /// The whole conversation, end to end, in seconds.
    pub total_s: f64,
}

/// The multi-turn section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct MultiTurnReport {
    /// Tokens generated per turn.
    pub max_tokens: u32,
    /// Embedded with its cache, embedded without, then llama-server if it ran.
    pub paths: Vec<ConversationPath>,
    /// TTFT p50 with the cache / without (below 1: the cache answers sooner).
    pub ttft_cached_over_uncached: f64,
    /// TTFT p50, embedded with its cache / llama-server with its own (below 1: ours sooner).
    pub ttft_over_llama_server: Option<f64>,
}

fn messages(history: &[(String, String)], question: &str) -> Vec<ChatMessage> {
    let mut out = vec![ChatMessage::new(Role::System, SYSTEM)];
    for (q, a) in history {
        out.push(ChatMessage::new(Role::User, q.clone()));
        out.push(ChatMessage::new(Role::Assistant, a.clone()));
    }
    out.push(ChatMessage::new(Role::User, question));
    out
}

/// Where the conversation is held.
enum Path<'a> {
    Embedded(&'a Arc<dyn Backend>, &'a str),
    LlamaServer(&'a reqwest::Client, String, &'a str),
}

impl Path<'_> {
    async fn turn(
        &self,
        history: &[(String, String)],
        question: &str,
        max_tokens: u32,
    ) -> anyhow::Result<(Answer, u32)> {
        let messages = messages(history, question);
        match self {
            Path::Embedded(backend, model) => {
                let request = GenerateRequest {
                    max_price: None,
                    // One user's conversation, as the proxy scopes it.
                    cache_scope: Some("bench".into()),
                    model: (*model).into(),
                    input: Input::Chat {
                        messages,
                        tools: None,
                    },
                    params: SamplingParams {
                        max_tokens: Some(max_tokens),
                        temperature: 0.0,
                        ignore_eos: true,
                        ..Default::default()
                    },
                };
                let answer = direct(backend, request).await?;
                let cached = answer.cached_tokens;
                Ok((answer, cached))
            }
            Path::LlamaServer(http, url, model) => {
                let body = json!({
                    "model": model,
                    "messages": messages
                        .iter()
                        .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                        .collect::<Vec<_>>(),
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    "cache_prompt": true,
                });
                let answer = stream_chat(http, url, &body).await?;
                let cached = answer.cached_tokens;
                Ok((answer, cached))
            }
        }
    }
}

async fn conversation(
    path: &Path<'_>,
    name: &str,
    max_tokens: u32,
) -> anyhow::Result<ConversationPath> {
    let start = Instant::now();
    let mut history: Vec<(String, String)> = Vec::new();
    let mut ttfts = Vec::new();
    let mut cached_tokens = 0;
    let mut last_prompt_tokens = 0;
    for (i, question) in QUESTIONS.iter().enumerate() {
        let (answer, cached) = path.turn(&history, question, max_tokens).await?;
        if i > 0 {
            ttfts.push(ms(answer.ttft));
        }
        cached_tokens += cached;
        last_prompt_tokens = answer.prompt_tokens;
        let text: String = answer.chunks.iter().map(|(_, t)| t.as_str()).collect();
        history.push(((*question).to_owned(), text));
    }
    Ok(ConversationPath {
        path: name.into(),
        turns: QUESTIONS.len(),
        last_prompt_tokens,
        cached_tokens,
        ttft_ms: Summary::of(ttfts),
        total_s: start.elapsed().as_secs_f64(),
    })
}

/// The conversation on the embedded engine with its prompt cache (`cached`), without it
/// (`uncached`, the same model loaded with `prompt_cache = false`), and on llama-server when it
/// runs; `max_tokens` generated per turn.
pub async fn run(
    cached: &Arc<dyn Backend>,
    uncached: &Arc<dyn Backend>,
    llama_server: Option<&LlamaServer>,
    max_tokens: u32,
) -> anyhow::Result<MultiTurnReport> {
    let model = cached
        .models()
        .first()
        .map(|m| m.id.clone())
        .ok_or_else(|| anyhow::anyhow!("backend serves no model"))?;
    let mut paths = vec![
        conversation(
            &Path::Embedded(cached, &model),
            "embedded engine, prompt cache",
            max_tokens,
        )
        .await?,
        conversation(
            &Path::Embedded(uncached, &model),
            "embedded engine, no cache",
            max_tokens,
        )
        .await?,
    ];
    let http = reqwest::Client::new();
    if let Some(server) = llama_server {
        let url = format!("{}/chat/completions", server.url);
        paths.push(
            conversation(
                &Path::LlamaServer(&http, url, &model),
                "llama-server, cache_prompt",
                max_tokens,
            )
            .await?,
        );
    }
    let p50 = |i: usize| paths.get(i).map(|p| p.ttft_ms.p50);
    Ok(MultiTurnReport {
        max_tokens,
        ttft_cached_over_uncached: p50(0).unwrap_or(0.0) / p50(1).unwrap_or(f64::NAN),
        ttft_over_llama_server: p50(2).map(|l| p50(0).unwrap_or(0.0) / l),
        paths,
    })
}

/// The report as Markdown.
pub fn table(r: &MultiTurnReport) -> String {
    let mut out = format!(
        "### Multi-turn conversation: {} turns, {} generated tokens each\n\n\
         | path | last prompt tokens | cached tokens (all turns) | TTFT p50 ms (turns 2+) | TTFT p90 ms | conversation s |\n|---|---|---|---|---|---|\n",
        QUESTIONS.len(),
        r.max_tokens
    );
    for p in &r.paths {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} |\n",
            p.path, p.last_prompt_tokens, p.cached_tokens, p.ttft_ms.p50, p.ttft_ms.p90, p.total_s
        ));
    }
    out.push_str(&format!(
        "\nTTFT p50, prompt cache / no cache: x{:.3}",
        r.ttft_cached_over_uncached
    ));
    match r.ttft_over_llama_server {
        Some(x) => out.push_str(&format!(
            "; embedded (cache) / llama-server (cache_prompt): x{x:.3}\n"
        )),
        None => out.push_str("; llama-server not run (see --llama-server)\n"),
    }
    out
}
