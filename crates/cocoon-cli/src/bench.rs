//! `cocoon bench`: the same requests sent to a backend directly, through the whole network
//! (HTTP gateway -> TLS -> proxy -> TLS -> worker) without payments, and through the same
//! network with payments (reservation, settlement written to the proxy's record, signed
//! messages), interleaved in one run, so the ratios are the cost of the path and of payments.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_engine::Backend;
use cocoon_protocol::{ChatMessage, GenerateEvent, GenerateRequest, Input, Role, SamplingParams};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub requests: usize,
    pub max_tokens: u32,
    pub prompt: String,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            requests: 20,
            max_tokens: 64,
            prompt: "Explain in a few sentences why the sky is blue.".into(),
        }
    }
}

/// One request's timings.
#[derive(Debug, Clone, Copy)]
struct Sample {
    latency: Duration,
    ttft: Duration,
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// Figures for one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    pub path: String,
    pub requests: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub ttft_p50_ms: f64,
    pub requests_per_s: f64,
    /// Prompt tokens / time to first token (median over requests).
    pub prompt_tokens_per_s: f64,
    /// Generated tokens after the first / time after the first (median over requests).
    pub gen_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub max_tokens: u32,
    pub prompt_tokens: u32,
    pub direct: PathFigures,
    /// The network without payments.
    pub network: PathFigures,
    /// The network with payments.
    pub paid: PathFigures,
    /// network / direct.
    pub latency_p50_ratio: f64,
    pub throughput_ratio: f64,
    pub added_latency_p50_ms: f64,
    /// paid / network: what payments cost per request.
    pub payments_latency_p50_ratio: f64,
    pub payments_throughput_ratio: f64,
    pub payments_added_latency_p50_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn figures(path: &str, samples: &[Sample], wall: Duration) -> PathFigures {
    let mut lat: Vec<f64> = samples
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    PathFigures {
        path: path.into(),
        requests: samples.len(),
        latency_p50_ms: percentile(&lat, 50.0),
        latency_p99_ms: percentile(&lat, 99.0),
        ttft_p50_ms: median(samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect()),
        requests_per_s: samples.len() as f64 / wall.as_secs_f64(),
        prompt_tokens_per_s: median(
            samples
                .iter()
                .map(|s| f64::from(s.prompt_tokens) / s.ttft.as_secs_f64())
                .collect(),
        ),
        gen_tokens_per_s: median(
            samples
                .iter()
                .map(|s| {
                    f64::from(s.completion_tokens.saturating_sub(1))
                        / (s.latency - s.ttft).as_secs_f64()
                })
                .collect(),
        ),
    }
}

fn request(model: &str, options: &BenchOptions) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: options.prompt.clone(),
            }],
        },
        // A fixed number of tokens, so both paths do the same work.
        params: SamplingParams {
            max_tokens: Some(options.max_tokens),
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

async fn direct_once(backend: &Arc<dyn Backend>, req: GenerateRequest) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut ttft = None;
    let mut events = backend.generate(req);
    while let Some(ev) = events.next().await {
        match ev {
            GenerateEvent::Delta { .. } => {
                ttft.get_or_insert_with(|| start.elapsed());
            }
            GenerateEvent::Done { usage, .. } => {
                let latency = start.elapsed();
                return Ok(Sample {
                    latency,
                    ttft: ttft.unwrap_or(latency),
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                });
            }
            GenerateEvent::Error { error } => anyhow::bail!("direct request failed: {error}"),
        }
    }
    anyhow::bail!("direct stream ended early")
}

async fn network_once(
    http: &reqwest::Client,
    url: &str,
    req: &GenerateRequest,
) -> anyhow::Result<Sample> {
    let Input::Chat { messages } = &req.input else {
        unreachable!("bench sends chat")
    };
    let body = json!({
        "model": req.model,
        "messages": messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>(),
        "max_tokens": req.params.max_tokens,
        "temperature": req.params.temperature,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let response = http
        .post(url)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut stream = response.bytes_stream();
    let mut ttft = None;
    let mut buf = Vec::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let line: Vec<u8> = buf.drain(..pos + 2).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(data)?;
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                ttft.get_or_insert_with(|| start.elapsed());
            }
            if v["usage"].is_object() {
                usage = Some((
                    v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                    v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
                ));
            }
        }
    }
    let latency = start.elapsed();
    let (p, c) = usage.ok_or_else(|| anyhow::anyhow!("no usage in stream"))?;
    Ok(Sample {
        latency,
        ttft: ttft.unwrap_or(latency),
        prompt_tokens: p as u32,
        completion_tokens: c as u32,
    })
}

/// Runs `options.requests` sequential requests on each path, interleaved so that drift in the
/// machine's speed hits all equally. `gateway_url` fronts a network without payments,
/// `paid_gateway_url` the same network with them.
pub async fn run(
    backend: Arc<dyn Backend>,
    gateway_url: &str,
    paid_gateway_url: &str,
    options: &BenchOptions,
) -> anyhow::Result<BenchReport> {
    let model = backend
        .models()
        .first()
        .map(|m| m.id.clone())
        .ok_or_else(|| anyhow::anyhow!("backend serves no model"))?;
    let req = request(&model, options);
    let http = reqwest::Client::new();
    let url = format!("{gateway_url}/chat/completions");
    let paid_url = format!("{paid_gateway_url}/chat/completions");
    // Warm up every path (connections, caches).
    direct_once(&backend, req.clone()).await?;
    network_once(&http, &url, &req).await?;
    network_once(&http, &paid_url, &req).await?;
    let (mut direct, mut network, mut paid) = (Vec::new(), Vec::new(), Vec::new());
    let mut walls = [Duration::ZERO; 3];
    for _ in 0..options.requests {
        let t = Instant::now();
        direct.push(direct_once(&backend, req.clone()).await?);
        walls[0] += t.elapsed();
        let t = Instant::now();
        network.push(network_once(&http, &url, &req).await?);
        walls[1] += t.elapsed();
        let t = Instant::now();
        paid.push(network_once(&http, &paid_url, &req).await?);
        walls[2] += t.elapsed();
    }
    let direct = figures("direct (in-process Backend)", &direct, walls[0]);
    let network = figures("client -> proxy -> worker", &network, walls[1]);
    let paid = figures("same, with payments", &paid, walls[2]);
    Ok(BenchReport {
        model,
        max_tokens: options.max_tokens,
        prompt_tokens: direct_once(&backend, req).await?.prompt_tokens,
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
pub fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "model {} | {} prompt tokens | {} generated tokens per request (greedy, ignore_eos)\n\n",
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
