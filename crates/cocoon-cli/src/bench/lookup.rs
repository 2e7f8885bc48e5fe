//! Prompt-lookup speculative decoding on a workload that copies most of its input (an edit): the embedded
//! engine without and with `lookup_draft_tokens`, and llama-server without and with its own
//! n-gram speculation (`--spec-type ngram-simple`, at its defaults and at our sizes), greedy,
//! each answer ending where the model ends it. Rounds interleave the paths request by request;
//! each path's generation rate is reported as the median of its rounds with their spread,
//! since one-stream figures move by several per cent between runs.

use std::path::Path;
use std::sync::Arc;

use cocoon_engine::{Backend, LlamaConfig};
use cocoon_llama::LlamaBackend;
use serde::Serialize;
use serde_json::json;

use super::client::{Answer, stream_chat};
use super::engine::{EngineOptions, LlamaServer, direct};
use super::stats::{median, ms};

/// The text the model is asked to correct, with four misspelt words: an edit, which copies
/// most of its input.
pub const PASSAGE: &str = "The lighthouse stood on a rock at the end of the harbour wall. Every \
evening at dusk the keeper climbed the one hundred and twelve steps to the lamp room, trimed the \
wick, polished the great lens and lit the flame. Ships far out at sea saw the beam sweep across \
the water once every ten secands and knew where the rocks were. In winter the storms came from \
the west and the waves broke over the wall, and the keeper wrote in the log book the time, the \
wind and the state of the see. In summer the fishing boats came home late, and their crews \
waived to the keeper as they passed the light.";

/// How many tokens a step the embedded engine guesses.
pub const DRAFT_TOKENS: u32 = 8;

/// Settings of the lookup section.
#[derive(Debug, Clone)]
pub struct LookupOptions {
    /// Rounds; each runs every path once.
    pub rounds: usize,
    /// Most tokens an answer may have.
    pub max_tokens: u32,
}

impl Default for LookupOptions {
    fn default() -> Self {
        Self {
            rounds: 7,
            max_tokens: 256,
        }
    }
}

/// One path's figures over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct LookupPath {
    /// Which engine and setting.
    pub path: String,
    /// Tokens of each answer (the same every round under greedy decoding).
    pub completion_tokens: u32,
    /// Generated tokens/s of each round (after the first token).
    pub gen_tokens_per_s_rounds: Vec<f64>,
    /// Their median.
    pub gen_tokens_per_s: f64,
    /// Smallest and largest round.
    pub spread: (f64, f64),
    /// Median time to the first token, ms.
    pub ttft_ms: f64,
    /// Median time from request to last token, ms.
    pub latency_ms: f64,
}

/// The lookup section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct LookupReport {
    /// Tokens guessed a step by the embedded engine.
    pub draft_tokens: u32,
    /// Paths in the order measured.
    pub paths: Vec<LookupPath>,
    /// Whether the embedded engine's answer with lookup equals its answer without.
    pub same_answer: bool,
    /// Of the embedded engine's guesses, the share kept.
    pub acceptance: f64,
    /// Embedded with lookup / embedded without (generation rate medians).
    pub speedup: f64,
    /// Embedded with lookup / the faster llama-server with speculation, when it ran.
    pub vs_llama_server: Option<f64>,
}

/// What one path answers a request with.
enum Engine {
    Direct(Arc<dyn Backend>, String),
    Server(reqwest::Client, LlamaServer),
}

impl Engine {
    async fn once(&self, max_tokens: u32) -> anyhow::Result<(Answer, String)> {
        let prompt =
            format!("Fix the spelling mistakes in this text and write it out again:\n\n{PASSAGE}");
        let answer = match self {
            Engine::Direct(backend, model) => {
                let mut request = super::engine::request(model, &prompt, max_tokens);
                request.params.ignore_eos = false;
                direct(backend, request).await?
            }
            Engine::Server(http, server) => {
                let body = json!({
                    "model": "any",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    "cache_prompt": false,
                });
                stream_chat(http, &format!("{}/chat/completions", server.url), &body).await?
            }
        };
        let text = answer.chunks.iter().map(|c| c.1.as_str()).collect();
        Ok((answer, text))
    }
}

fn figures(path: &str, answers: &[Answer]) -> LookupPath {
    let rates: Vec<f64> = answers.iter().map(Answer::gen_tokens_per_s).collect();
    LookupPath {
        path: path.into(),
        completion_tokens: answers.first().map_or(0, |a| a.completion_tokens),
        spread: super::stats::range(&rates),
        gen_tokens_per_s: median(rates.clone()),
        gen_tokens_per_s_rounds: rates,
        ttft_ms: median(answers.iter().map(|a| ms(a.ttft)).collect()),
        latency_ms: median(answers.iter().map(|a| ms(a.latency)).collect()),
    }
}

/// Runs the section on `model`; llama-server's rows need `llama_server`.
pub async fn run(
    model: &Path,
    llama_server: Option<&Path>,
    engine: &EngineOptions,
    options: &LookupOptions,
    work_dir: &Path,
) -> anyhow::Result<LookupReport> {
    let load = |lookup_draft_tokens| -> anyhow::Result<Arc<LlamaBackend>> {
        Ok(Arc::new(LlamaBackend::load(&LlamaConfig {
            model_path: model.to_owned(),
            threads: engine.threads,
            parallel: engine.parallel,
            kv_cache_tokens: engine.kv_cache_tokens,
            // Every request reads its prompt afresh, as llama-server's do here.
            prompt_cache: false,
            lookup_draft_tokens,
            ..Default::default()
        })?))
    };
    let plain = load(0)?;
    let lookup = load(DRAFT_TOKENS)?;
    let id = plain.models()[0].id.clone();
    let mut engines: Vec<(String, Engine)> = vec![
        (
            "embedded engine".into(),
            Engine::Direct(plain.clone(), id.clone()),
        ),
        (
            format!("embedded engine, lookup_draft_tokens = {DRAFT_TOKENS}"),
            Engine::Direct(lookup.clone(), id),
        ),
    ];
    if let Some(binary) = llama_server {
        let draft = DRAFT_TOKENS.to_string();
        let settings: [(&str, Vec<&str>); 3] = [
            ("llama-server", vec![]),
            (
                "llama-server --spec-type ngram-simple (its defaults: n 12, m 48)",
                vec!["--spec-type", "ngram-simple"],
            ),
            (
                "llama-server --spec-type ngram-simple, n 3, m 8 (our sizes)",
                vec![
                    "--spec-type",
                    "ngram-simple",
                    "--spec-ngram-simple-size-n",
                    "3",
                    "--spec-ngram-simple-size-m",
                    &draft,
                ],
            ),
        ];
        let http = reqwest::Client::new();
        for (i, (name, args)) in settings.into_iter().enumerate() {
            let log = work_dir.join(format!("llama-server-lookup-{i}.log"));
            let server = LlamaServer::start_with(binary, model, engine, log, &args).await?;
            engines.push((name.into(), Engine::Server(http.clone(), server)));
        }
    }
    // Warm every path once.
    for (_, e) in &engines {
        e.once(options.max_tokens).await?;
    }
    let mut answers: Vec<Vec<Answer>> = vec![Vec::new(); engines.len()];
    let mut texts: Vec<String> = vec![String::new(); engines.len()];
    let before = lookup.speculation();
    // Each round starts one path further on, so that every path follows every other as
    // often (a llama-server's threads keep spinning a moment after its answer).
    for round in 0..options.rounds {
        for k in 0..engines.len() {
            let i = (round + k) % engines.len();
            let (answer, text) = engines[i].1.once(options.max_tokens).await?;
            answers[i].push(answer);
            texts[i] = text;
        }
    }
    let after = lookup.speculation();
    let paths: Vec<LookupPath> = engines
        .iter()
        .zip(&answers)
        .map(|((name, _), a)| figures(name, a))
        .collect();
    for (_, e) in engines {
        if let Engine::Server(_, server) = e {
            server.stop().await;
        }
    }
    let best_server = paths
        .iter()
        .skip(3)
        .map(|p| p.gen_tokens_per_s)
        .fold(None, |best: Option<f64>, r| {
            Some(best.map_or(r, |b| b.max(r)))
        });
    Ok(LookupReport {
        draft_tokens: DRAFT_TOKENS,
        same_answer: texts[0] == texts[1],
        acceptance: (after.accepted - before.accepted) as f64
            / (after.drafted - before.drafted).max(1) as f64,
        speedup: paths[1].gen_tokens_per_s / paths[0].gen_tokens_per_s,
        vs_llama_server: best_server.map(|b| paths[1].gen_tokens_per_s / b),
        paths,
    })
}

/// The lookup report as a Markdown table.
pub fn table(r: &LookupReport) -> String {
    let mut out = String::from(
        "### Prompt lookup on an edit (correct four words of a 140-word passage, greedy)\n\n\
         | engine | tokens | gen tok/s median | spread | TTFT ms | latency ms |\n\
         |---|---:|---:|---|---:|---:|\n",
    );
    for p in &r.paths {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1}–{:.1} | {:.0} | {:.0} |\n",
            p.path,
            p.completion_tokens,
            p.gen_tokens_per_s,
            p.spread.0,
            p.spread.1,
            p.ttft_ms,
            p.latency_ms
        ));
    }
    out.push_str(&format!(
        "\nlookup / no lookup: ×{:.2}; guesses kept: {:.0} %; same answer: {}",
        r.speedup,
        r.acceptance * 100.0,
        r.same_answer
    ));
    if let Some(v) = r.vs_llama_server {
        out.push_str(&format!(
            "; against llama-server's best speculation: ×{v:.2}"
        ));
    }
    out.push('\n');
    out
}
