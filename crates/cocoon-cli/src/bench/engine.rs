//! The embedded engine against llama.cpp's own OpenAI server (`llama-server`) on the same
//! GGUF, threads, context and prompt: prompt and generation tokens/s of one stream, then
//! aggregate tokens/s at several concurrent streams, for the engine called in-process, the
//! engine behind the whole network, and llama-server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_engine::Backend;
use cocoon_protocol::{ChatMessage, GenerateEvent, GenerateRequest, Input, Role, SamplingParams};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use super::client::{Answer, stream_chat};
use super::stats::{Summary, median, ms};

/// The single-stream test's prompt: a passage long enough that the prompt rate is measured.
pub const PROMPT: &str = "Read this passage and then continue it. The lighthouse keeper had \
    kept the lamp burning for forty years, through storms that tore slates from the roof and \
    winters when the supply boat could not come for weeks. Every evening he climbed the one \
    hundred and twelve steps, trimmed the wick, wound the clockwork that turned the lens, and \
    wrote the weather in a book that nobody read. One night a ship he did not recognise \
    anchored off the point, and in the morning a small boat rowed towards the landing.";

/// The concurrency test's prompt: short, so that decoding, which batching shares, is most of
/// the work (a long prompt is read in batches of its own either way).
pub const SHORT_PROMPT: &str = "Write a short story about a lighthouse keeper.";

/// Settings of the engine section, shared by the embedded engine and llama-server.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Single-stream requests per path.
    pub requests: usize,
    /// Tokens generated per request (EOS ignored, so every request generates exactly this many).
    pub max_tokens: u32,
    /// CPU threads for prompt and generation, the same for both engines.
    pub threads: u32,
    /// Concurrent streams to measure aggregate tokens/s at.
    pub levels: Vec<usize>,
    /// Requests per concurrent stream at each level.
    pub requests_per_stream: usize,
    /// Sequences and shared KV cells, the same for both engines.
    pub parallel: u32,
    /// KV cache size in tokens, shared by all sequences (llama-server's `--ctx-size`).
    pub kv_cache_tokens: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            requests: 10,
            max_tokens: 64,
            threads: 2,
            levels: vec![1, 4, 16],
            requests_per_stream: 2,
            parallel: 16,
            kv_cache_tokens: 4096,
        }
    }
}

/// One path's single-stream figures on the long prompt.
#[derive(Debug, Clone, Serialize)]
pub struct SingleStream {
    /// Which path was measured, e.g. "embedded engine (in-process)" or "llama-server".
    pub path: String,
    /// Number of timed requests (after one warm-up).
    pub requests: usize,
    /// Prompt length in tokens, as the server counted it.
    pub prompt_tokens: u32,
    /// Prompt tokens / time to first token (median).
    pub prompt_tokens_per_s: f64,
    /// Tokens after the first / time after the first (median).
    pub gen_tokens_per_s: f64,
    /// Slowest and fastest request's prompt tokens/s: a ratio inside both paths' spreads is
    /// no win.
    pub prompt_tokens_per_s_range: (f64, f64),
    /// Slowest and fastest request's generation tokens/s.
    pub gen_tokens_per_s_range: (f64, f64),
    /// Time to first token, in milliseconds.
    pub ttft_ms: Summary,
}

/// A reference engine's single-stream figures against the embedded engine's.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// Its figures.
    pub stream: SingleStream,
    /// Prompt tokens/s, embedded / this reference.
    pub prompt_ratio: f64,
    /// Generation tokens/s, embedded / this reference (above 1: the embedded engine is faster).
    pub gen_ratio: f64,
    /// TTFT p50, embedded / this reference (below 1: the embedded engine answers sooner).
    pub ttft_ratio: f64,
}

/// One path's figures at one concurrency level, on the short prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Which path was measured, e.g. "embedded engine via client -> proxy -> worker".
    pub path: String,
    /// Concurrent streams.
    pub streams: usize,
    /// Requests completed across all streams.
    pub requests: usize,
    /// All completion tokens / wall time.
    pub aggregate_tokens_per_s: f64,
    /// One stream's decode rate (median).
    pub stream_tokens_per_s: f64,
    /// Time to first token under this load, in milliseconds.
    pub ttft_ms: Summary,
}

/// The engine section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    /// Model id as the backend lists it.
    pub model: String,
    /// CPU threads each engine used.
    pub threads: u32,
    /// Tokens generated per request.
    pub max_tokens: u32,
    /// The embedded engine called in-process, single stream.
    pub embedded: SingleStream,
    /// Each llama-server run (none when none was given), single stream, same requests
    /// interleaved with the embedded engine's.
    pub references: Vec<Reference>,
    /// Each path at each concurrency level, in the order measured.
    pub levels: Vec<Level>,
    /// References that failed at a concurrency level, and how (their later levels are not
    /// run).
    pub failures: Vec<(String, String)>,
}

pub(super) fn request(model: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        max_price: None,
        cache_scope: None,
        model: model.into(),
        input: Input::Chat {
            messages: vec![ChatMessage::new(Role::User, prompt)],
            tools: None,
        },
        // A fixed number of tokens, so every path does the same work.
        params: SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

fn http_body(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
        // llama-server would otherwise reuse the cached prompt of the previous request; the
        // embedded engine runs this section with its cache off, so both read every prompt
        // afresh (the multi-turn section measures the caches).
        "cache_prompt": false,
    })
}

/// One generation on the backend in-process, timed as the HTTP paths are.
pub async fn direct(backend: &Arc<dyn Backend>, req: GenerateRequest) -> anyhow::Result<Answer> {
    let start = Instant::now();
    let mut chunks = Vec::new();
    let mut events = backend.generate(req);
    while let Some(ev) = events.next().await {
        match ev {
            GenerateEvent::Delta { text, .. } | GenerateEvent::Reasoning { text, .. } => {
                chunks.push((Instant::now(), text))
            }
            GenerateEvent::Done { usage, .. } => {
                let latency = start.elapsed();
                return Ok(Answer {
                    start,
                    ttft: chunks.first().map_or(latency, |c| c.0 - start),
                    latency,
                    chunks,
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    cached_tokens: usage.cached_tokens,
                });
            }
            GenerateEvent::Error { error } => anyhow::bail!("direct request failed: {error}"),
            GenerateEvent::Sealed { .. } => anyhow::bail!("an engine answered sealed"),
            GenerateEvent::ToolCall { .. } => anyhow::bail!("the bench offers no tools"),
            GenerateEvent::Embedding { .. } => anyhow::bail!("the bench asks no embeddings"),
        }
    }
    anyhow::bail!("direct stream ended early")
}

/// A path the engine and memory sections drive.
#[derive(Clone)]
pub(super) enum Target {
    Direct(Arc<dyn Backend>, String),
    Http(reqwest::Client, String, String),
}

impl Target {
    pub(super) async fn once(&self, prompt: &str, max_tokens: u32) -> anyhow::Result<Answer> {
        let answer = match self {
            Target::Direct(b, model) => direct(b, request(model, prompt, max_tokens)).await?,
            Target::Http(http, url, model) => {
                stream_chat(http, url, &http_body(model, prompt, max_tokens)).await?
            }
        };
        anyhow::ensure!(
            answer.completion_tokens == max_tokens,
            "expected {max_tokens} tokens, got {}",
            answer.completion_tokens
        );
        Ok(answer)
    }
}

fn single(path: &str, answers: &[Answer]) -> SingleStream {
    let prompt: Vec<f64> = answers.iter().map(Answer::prompt_tokens_per_s).collect();
    let generation: Vec<f64> = answers.iter().map(Answer::gen_tokens_per_s).collect();
    SingleStream {
        path: path.into(),
        requests: answers.len(),
        prompt_tokens: answers.first().map_or(0, |a| a.prompt_tokens),
        prompt_tokens_per_s_range: super::stats::range(&prompt),
        gen_tokens_per_s_range: super::stats::range(&generation),
        prompt_tokens_per_s: median(prompt),
        gen_tokens_per_s: median(generation),
        ttft_ms: Summary::of(answers.iter().map(|a| ms(a.ttft)).collect()),
    }
}

/// `streams` concurrent streams of `per_stream` short-prompt requests each.
pub(super) async fn level(
    target: &Target,
    path: &str,
    streams: usize,
    per_stream: usize,
    max_tokens: u32,
) -> anyhow::Result<Level> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..per_stream {
                    answers.push(target.once(SHORT_PROMPT, max_tokens).await?);
                }
                anyhow::Ok(answers)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await??);
    }
    let wall = start.elapsed();
    let tokens: u64 = answers.iter().map(|a| u64::from(a.completion_tokens)).sum();
    Ok(Level {
        path: path.into(),
        streams,
        requests: answers.len(),
        aggregate_tokens_per_s: tokens as f64 / wall.as_secs_f64(),
        stream_tokens_per_s: median(answers.iter().map(Answer::gen_tokens_per_s).collect()),
        ttft_ms: Summary::of(answers.iter().map(|a| ms(a.ttft)).collect()),
    })
}

/// `llama-server` run for the comparison, stopped when dropped.
pub struct LlamaServer {
    child: tokio::process::Child,
    /// Its OpenAI API base URL (`http://127.0.0.1:<port>/v1`).
    pub url: String,
}

impl LlamaServer {
    /// Starts `binary` on `model` with the engine's threads, context and parallel sequences,
    /// and waits up to 60 s for it to be healthy; its output goes to `log`.
    pub async fn start(
        binary: &Path,
        model: &Path,
        options: &EngineOptions,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, model, options, log, &[]).await
    }

    /// [`Self::start`] with `extra` arguments (speculative decoding, say).
    pub async fn start_with(
        binary: &Path,
        model: &Path,
        options: &EngineOptions,
        log: PathBuf,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let port = super::free_loopback_addr()?.port();
        let threads = options.threads.to_string();
        let mut child = tokio::process::Command::new(binary)
            .arg("--model")
            .arg(model)
            .args(["--threads", &threads, "--threads-batch", &threads])
            .args(["--ctx-size", &options.kv_cache_tokens.to_string()])
            .args(["--parallel", &options.parallel.to_string(), "--kv-unified"])
            .args(["--batch-size", "512", "--ubatch-size", "512"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(extra)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", binary.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("llama-server exited with {status}; see {}", log.display());
            }
            let health = http.get(format!("{base}/health")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "llama-server did not become ready in 60 s; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            child,
            url: format!("{base}/v1"),
        })
    }

    /// Kills the server and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// `backend` must be the embedded engine made with `options`' threads, parallel and KV
/// cells; `gateway_url` fronts a network whose only worker serves it; `servers` are the
/// references, each with its name.
pub async fn run(
    backend: Arc<dyn Backend>,
    gateway_url: &str,
    servers: &[(&str, &LlamaServer)],
    options: &EngineOptions,
) -> anyhow::Result<EngineReport> {
    let model = backend
        .models()
        .first()
        .map(|m| m.id.clone())
        .ok_or_else(|| anyhow::anyhow!("backend serves no model"))?;
    let http = reqwest::Client::new();
    let ours = Target::Direct(backend.clone(), model.clone());
    let network = Target::Http(
        http.clone(),
        format!("{gateway_url}/chat/completions"),
        model.clone(),
    );
    let theirs: Vec<(&str, Target)> = servers
        .iter()
        .map(|(name, s)| {
            let target = Target::Http(
                http.clone(),
                format!("{}/chat/completions", s.url),
                model.clone(),
            );
            (*name, target)
        })
        .collect();
    let n = options.max_tokens;
    // Warm up.
    ours.once(PROMPT, n).await?;
    network.once(PROMPT, n).await?;
    for (_, t) in &theirs {
        t.once(PROMPT, n).await?;
    }
    // Interleaved request by request, each round starting one engine further on, so that
    // every engine follows every other as often (llama.cpp's threads spin a moment after a
    // decode, which slows whoever comes next).
    let mut answers: Vec<Vec<Answer>> = vec![Vec::new(); 1 + theirs.len()];
    for round in 0..options.requests {
        for k in 0..answers.len() {
            let i = (round + k) % answers.len();
            let target = if i == 0 { &ours } else { &theirs[i - 1].1 };
            answers[i].push(target.once(PROMPT, n).await?);
        }
    }
    let embedded = single("embedded engine (in-process)", &answers[0]);
    let references = theirs
        .iter()
        .zip(&answers[1..])
        .map(|((name, _), answers)| {
            let stream = single(name, answers);
            Reference {
                prompt_ratio: embedded.prompt_tokens_per_s / stream.prompt_tokens_per_s,
                gen_ratio: embedded.gen_tokens_per_s / stream.gen_tokens_per_s,
                ttft_ratio: embedded.ttft_ms.p50 / stream.ttft_ms.p50,
                stream,
            }
        })
        .collect();
    let mut levels = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    for &streams in &options.levels {
        let per = options.requests_per_stream;
        levels.push(level(&ours, "embedded engine (in-process)", streams, per, n).await?);
        levels.push(
            level(
                &network,
                "embedded engine via client -> proxy -> worker",
                streams,
                per,
                n,
            )
            .await?,
        );
        for (name, t) in &theirs {
            if failures.iter().any(|(failed, _)| failed == name) {
                continue;
            }
            // A reference that fails (a crashed server) is reported, not the end of the run.
            match level(t, name, streams, per, n).await {
                Ok(l) => levels.push(l),
                Err(e) => failures.push((name.to_string(), format!("at {streams} streams: {e}"))),
            }
        }
    }
    Ok(EngineReport {
        model,
        threads: options.threads,
        max_tokens: n,
        embedded,
        references,
        levels,
        failures,
    })
}

/// The engine report as Markdown: single-stream table, ratios, concurrency table.
pub fn table(r: &EngineReport) -> String {
    let mut out = format!(
        "### Embedded engine vs llama-server: {} , {} threads, {} generated tokens, same prompt\n\n\
         | engine | requests | prompt tokens | prompt tok/s (range) | gen tok/s (range) | TTFT p50 ms |\n\
         |---|---|---|---|---|---|\n",
        r.model, r.threads, r.max_tokens
    );
    for s in std::iter::once(&r.embedded).chain(r.references.iter().map(|x| &x.stream)) {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} ({:.0}–{:.0}) | {:.1} ({:.1}–{:.1}) | {:.1} |\n",
            s.path,
            s.requests,
            s.prompt_tokens,
            s.prompt_tokens_per_s,
            s.prompt_tokens_per_s_range.0,
            s.prompt_tokens_per_s_range.1,
            s.gen_tokens_per_s,
            s.gen_tokens_per_s_range.0,
            s.gen_tokens_per_s_range.1,
            s.ttft_ms.p50
        ));
    }
    out.push('\n');
    for x in &r.references {
        out.push_str(&format!(
            "embedded / {}: prompt tok/s x{:.3}, gen tok/s x{:.3}, TTFT p50 x{:.3}\n",
            x.stream.path, x.prompt_ratio, x.gen_ratio, x.ttft_ratio
        ));
    }
    if r.references.is_empty() {
        out.push_str("llama-server not run (see --llama-server)\n");
    }
    out.push('\n');
    out.push_str(
        "### Concurrency: aggregate generated tokens/s, short prompt\n\n\
         | path | streams | requests | aggregate tok/s | per-stream tok/s | TTFT p50 ms |\n|---|---|---|---|---|---|\n",
    );
    for l in &r.levels {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            l.path,
            l.streams,
            l.requests,
            l.aggregate_tokens_per_s,
            l.stream_tokens_per_s,
            l.ttft_ms.p50
        ));
    }
    for (name, why) in &r.failures {
        out.push_str(&format!("\n{name} failed {why}\n"));
    }
    out
}
