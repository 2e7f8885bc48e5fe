//! The real model three ways, interleaved request by request: called directly, through the
//! whole network (HTTP gateway -> TLS -> proxy -> TLS -> worker) without payments, and through
//! the same network with payments (reservation, settlement written to the proxy's record,
//! signed messages), so the ratios are the cost of the path and of payments on real
//! inference.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_engine::{Backend, LlamaConfig};
use cocoon_llama::LlamaBackend;
use cocoon_protocol::{ChatMessage, GenerateRequest, Input, Role, SamplingParams};
use serde::Serialize;
use serde_json::json;

use super::client::{Answer, stream_chat};
use super::stats::{Summary, median, ms};

/// Settings of the payments section.
#[derive(Debug, Clone)]
pub struct PaymentsOptions {
    /// Timed requests per path (after one warm-up each).
    pub requests: usize,
    /// Tokens generated per request (EOS ignored, so exactly this many).
    pub max_tokens: u32,
    /// CPU threads of the embedded engine.
    pub threads: u32,
    /// The user message sent on every request.
    pub prompt: String,
}

impl Default for PaymentsOptions {
    fn default() -> Self {
        Self {
            requests: 40,
            max_tokens: 4,
            threads: 2,
            prompt: "Explain in a few sentences why the sky is blue.".into(),
        }
    }
}

/// Figures for one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    /// Which path: "direct (in-process Backend)", "client -> proxy -> worker" or
    /// "same, with payments".
    pub path: String,
    /// Number of timed requests.
    pub requests: usize,
    /// Median latency of a whole streamed answer, ms.
    pub latency_p50_ms: f64,
    /// 99th-percentile latency of a whole streamed answer, ms.
    pub latency_p99_ms: f64,
    /// Median time to first token, ms.
    pub ttft_p50_ms: f64,
    /// Requests per second of this path's own time (sequential requests).
    pub requests_per_s: f64,
    /// Prompt tokens / time to first token (median over requests).
    pub prompt_tokens_per_s: f64,
    /// Generated tokens after the first / time after the first (median over requests).
    pub gen_tokens_per_s: f64,
}

/// The payments section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct PaymentsReport {
    /// Model id as the backend lists it.
    pub model: String,
    /// Tokens generated per request.
    pub max_tokens: u32,
    /// Prompt length in tokens, as the engine counted it.
    pub prompt_tokens: u32,
    /// The embedded engine called in-process.
    pub direct: PathFigures,
    /// The network without payments.
    pub network: PathFigures,
    /// The network with payments.
    pub paid: PathFigures,
    /// network / direct.
    pub latency_p50_ratio: f64,
    /// Requests/s, network / direct.
    pub throughput_ratio: f64,
    /// Median latency the network adds over direct, ms.
    pub added_latency_p50_ms: f64,
    /// paid / network: what payments cost per request.
    pub payments_latency_p50_ratio: f64,
    /// Requests/s, paid / network.
    pub payments_throughput_ratio: f64,
    /// Median latency payments add over the network without them, ms.
    pub payments_added_latency_p50_ms: f64,
}

fn figures(path: &str, answers: &[Answer], wall: Duration) -> PathFigures {
    let latency = Summary::of(answers.iter().map(|a| ms(a.latency)).collect());
    PathFigures {
        path: path.into(),
        requests: answers.len(),
        latency_p50_ms: latency.p50,
        latency_p99_ms: latency.p99,
        ttft_p50_ms: median(answers.iter().map(|a| ms(a.ttft)).collect()),
        requests_per_s: answers.len() as f64 / wall.as_secs_f64(),
        prompt_tokens_per_s: median(answers.iter().map(Answer::prompt_tokens_per_s).collect()),
        gen_tokens_per_s: median(answers.iter().map(Answer::gen_tokens_per_s).collect()),
    }
}

fn request(model: &str, options: &PaymentsOptions) -> GenerateRequest {
    GenerateRequest {
        max_price: None,
        cache_scope: None,
        model: model.into(),
        input: Input::Chat {
            messages: vec![ChatMessage::new(Role::User, options.prompt.clone())],
            tools: None,
        },
        // A fixed number of tokens, so every path does the same work.
        params: SamplingParams {
            max_tokens: Some(options.max_tokens),
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

/// Runs `options.requests` sequential requests on each path, interleaved so that drift in the
/// machine's speed hits all equally.
pub async fn run(model_path: &Path, options: &PaymentsOptions) -> anyhow::Result<PaymentsReport> {
    let backend: Arc<dyn Backend> = Arc::new(LlamaBackend::load(&LlamaConfig {
        model_path: model_path.to_owned(),
        threads: options.threads,
        ..Default::default()
    })?);
    let model = backend
        .models()
        .first()
        .map(|m| m.id.clone())
        .ok_or_else(|| anyhow::anyhow!("backend serves no model"))?;
    // The same network twice, without and with payments, over one backend.
    let mut free = super::network(vec![backend.clone()], false).await?;
    let mut paid_net = super::network(vec![backend.clone()], true).await?;
    let req = request(&model, options);
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": options.prompt}],
        "max_tokens": options.max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", free.gateway_url());
    let paid_url = format!("{}/chat/completions", paid_net.gateway_url());
    // Warm up every path (connections, caches).
    super::engine::direct(&backend, req.clone()).await?;
    stream_chat(&http, &url, &body).await?;
    stream_chat(&http, &paid_url, &body).await?;
    let (mut direct, mut network, mut paid) = (Vec::new(), Vec::new(), Vec::new());
    let mut walls = [Duration::ZERO; 3];
    for _ in 0..options.requests {
        let t = Instant::now();
        direct.push(super::engine::direct(&backend, req.clone()).await?);
        walls[0] += t.elapsed();
        let t = Instant::now();
        network.push(stream_chat(&http, &url, &body).await?);
        walls[1] += t.elapsed();
        let t = Instant::now();
        paid.push(stream_chat(&http, &paid_url, &body).await?);
        walls[2] += t.elapsed();
    }
    free.shutdown().await;
    paid_net.shutdown().await;
    let prompt_tokens = direct.first().map_or(0, |a| a.prompt_tokens);
    let direct = figures("direct (in-process Backend)", &direct, walls[0]);
    let network = figures("client -> proxy -> worker", &network, walls[1]);
    let paid = figures("same, with payments", &paid, walls[2]);
    Ok(PaymentsReport {
        model,
        max_tokens: options.max_tokens,
        prompt_tokens,
        latency_p50_ratio: network.latency_p50_ms / direct.latency_p50_ms,
        throughput_ratio: network.requests_per_s / direct.requests_per_s,
        added_latency_p50_ms: network.latency_p50_ms - direct.latency_p50_ms,
        payments_latency_p50_ratio: paid.latency_p50_ms / network.latency_p50_ms,
        payments_throughput_ratio: paid.requests_per_s / network.requests_per_s,
        payments_added_latency_p50_ms: paid.latency_p50_ms - network.latency_p50_ms,
        direct,
        network,
        paid,
    })
}

/// The report as a table for the terminal and docs.
pub fn table(r: &PaymentsReport) -> String {
    let mut out = format!(
        "### Payments: model {}, {} prompt tokens, {} generated tokens per request (greedy, ignore_eos)\n\n",
        r.model, r.prompt_tokens, r.max_tokens
    );
    out.push_str(
        "| path | requests | p50 ms | p99 ms | TTFT p50 ms | req/s | prompt tok/s | gen tok/s |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for f in [&r.direct, &r.network, &r.paid] {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.1} |\n",
            f.path,
            f.requests,
            f.latency_p50_ms,
            f.latency_p99_ms,
            f.ttft_p50_ms,
            f.requests_per_s,
            f.prompt_tokens_per_s,
            f.gen_tokens_per_s
        ));
    }
    out.push_str(&format!(
        "\nnetwork/direct: p50 latency x{:.3} (+{:.2} ms), throughput x{:.3}\n",
        r.latency_p50_ratio, r.added_latency_p50_ms, r.throughput_ratio
    ));
    out.push_str(&format!(
        "with payments/without: p50 latency x{:.3} ({:+.2} ms), throughput x{:.3}\n",
        r.payments_latency_p50_ratio, r.payments_added_latency_p50_ms, r.payments_throughput_ratio
    ));
    out
}
