//! Each hop against nginx: the same synthetic SSE origin called directly, through a chain of
//! three nginx processes (see [`super::nginx`]), and through our gateway → proxy → worker
//! chain, each role its own process (see [`super::roles`]), in rounds interleaved path by
//! path. Per path: latency added to the origin's, the most requests/s of closed loops, and
//! the CPU time each process of the chain spends per 1,000 requests and per 100,000 relayed
//! tokens (from /proc/PID/stat). Our chain runs as shipped: requests sealed end to end to the
//! worker, payments off (nginx bills nobody; what payments cost is the load section's).

use std::path::PathBuf;
use std::time::Duration;

use cocoon_worker::BackendConfig;
use serde::Serialize;

use super::client::stream_chat;
use super::nginx::NginxChain;
use super::path::{body, check, closed_loop, upstream_config};
use super::proc::cpu_seconds;
use super::roles::Roles;
use super::stats::{Summary, median, ms};
use super::synthetic::Synthetic;

/// Settings of the hops section.
#[derive(Debug, Clone)]
pub struct HopsOptions {
    /// The `cocoon` binary to run the roles with; none: this one.
    pub cocoon: Option<PathBuf>,
    /// The `nginx` binary.
    pub nginx: PathBuf,
    /// Rounds, each running every path once in turn.
    pub rounds: usize,
    /// Sequential requests per path per round, for latency.
    pub latency_requests: usize,
    /// Tokens per short answer (latency and requests/s).
    pub short_tokens: u32,
    /// Closed loops of the requests/s and tokens runs.
    pub concurrency: usize,
    /// Short requests per path per round, for requests/s and CPU per request.
    pub requests: usize,
    /// Tokens per long answer, for CPU per relayed token.
    pub stream_tokens: u32,
    /// Long answers per path per round.
    pub stream_requests: usize,
}

impl Default for HopsOptions {
    fn default() -> Self {
        Self {
            cocoon: None,
            nginx: PathBuf::from("nginx"),
            rounds: 3,
            latency_requests: 200,
            short_tokens: 16,
            concurrency: 32,
            requests: 3000,
            stream_tokens: 1000,
            stream_requests: 64,
        }
    }
}

/// CPU one process of a chain spent.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    /// Which process: "client", "proxy", "worker", "nginx hop 1", ...
    pub process: String,
    /// CPU ms per 1,000 short requests (median over rounds).
    pub cpu_ms_per_1000_requests: f64,
    /// CPU ms per 100,000 tokens relayed in long answers (median over rounds).
    pub cpu_ms_per_100k_tokens: f64,
}

/// One path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ChainFigures {
    /// "direct (synthetic origin)", "nginx × 3 (TLS 1.3 inside)" or "client → proxy → worker".
    pub path: String,
    /// Latency of a whole short streamed answer, one request at a time, ms (all rounds).
    pub latency_ms: Summary,
    /// This path's p50 latency minus the origin's, ms.
    pub added_latency_p50_ms: f64,
    /// This path's p99 latency minus the origin's, ms.
    pub added_latency_p99_ms: f64,
    /// Most requests/s of the closed loops, each round.
    pub requests_per_s_rounds: Vec<f64>,
    /// Their median.
    pub requests_per_s: f64,
    /// Tokens/s relayed in long answers (median over rounds).
    pub tokens_per_s: f64,
    /// The chain's processes (none for the origin called directly).
    pub processes: Vec<ProcessCpu>,
    /// All the chain's processes together: CPU ms per 1,000 requests.
    pub cpu_ms_per_1000_requests: f64,
    /// All the chain's processes together: CPU ms per 100,000 relayed tokens.
    pub cpu_ms_per_100k_tokens: f64,
    /// The bench's own process (load loops and origin), CPU ms per 1,000 requests: the same
    /// work on every path, for scale.
    pub bench_cpu_ms_per_1000_requests: f64,
}

/// The hops section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct HopsReport {
    /// Tokens per short answer.
    pub short_tokens: u32,
    /// Closed loops.
    pub concurrency: usize,
    /// Tokens per long answer.
    pub stream_tokens: u32,
    /// Rounds per path.
    pub rounds: usize,
    /// Direct, nginx, ours.
    pub paths: Vec<ChainFigures>,
    /// Ours / nginx: CPU per request, all hops together (≤ 1 is the target).
    pub cpu_per_request_ratio: f64,
    /// Ours / nginx: CPU per relayed token (≤ 1 is the target).
    pub cpu_per_token_ratio: f64,
    /// Ours / nginx: most requests/s (≥ 1 is the target).
    pub requests_per_s_ratio: f64,
}

/// A path under test: where requests go and which processes relay them.
struct Path {
    name: &'static str,
    url: String,
    processes: Vec<(String, u32)>,
    latencies: Vec<f64>,
    rps: Vec<f64>,
    tokens_per_s: Vec<f64>,
    /// Per process (and the bench's own last): CPU ms per 1,000 requests, each round.
    cpu_requests: Vec<Vec<f64>>,
    /// Per process: CPU ms per 100k tokens, each round.
    cpu_tokens: Vec<Vec<f64>>,
}

impl Path {
    fn new(name: &'static str, base_url: &str, processes: Vec<(String, u32)>) -> Self {
        let n = processes.len() + 1;
        Self {
            name,
            url: format!("{base_url}/chat/completions"),
            processes,
            latencies: Vec::new(),
            rps: Vec::new(),
            tokens_per_s: Vec::new(),
            cpu_requests: vec![Vec::new(); n],
            cpu_tokens: vec![Vec::new(); n],
        }
    }

    /// CPU seconds so far of each process, the bench's own last.
    fn cpu(&self) -> anyhow::Result<Vec<f64>> {
        self.processes
            .iter()
            .map(|(_, pid)| *pid)
            .chain([std::process::id()])
            .map(cpu_seconds)
            .collect()
    }

    async fn round(&mut self, http: &reqwest::Client, o: &HopsOptions) -> anyhow::Result<()> {
        let short = body(o.short_tokens);
        for _ in 0..o.latency_requests {
            let answer = check(stream_chat(http, &self.url, &short).await?, o.short_tokens)?;
            self.latencies.push(ms(answer.latency));
        }
        let before = self.cpu()?;
        let (done, took) =
            closed_loop(http, &self.url, o.short_tokens, o.concurrency, o.requests).await?;
        let after = self.cpu()?;
        self.rps.push(done as f64 / took.as_secs_f64());
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            self.cpu_requests[i].push((a - b) * 1e3 * 1000.0 / done as f64);
        }
        let before = self.cpu()?;
        let (done, took) = closed_loop(
            http,
            &self.url,
            o.stream_tokens,
            o.concurrency.min(o.stream_requests),
            o.stream_requests,
        )
        .await?;
        let after = self.cpu()?;
        let tokens = (done as u64 * u64::from(o.stream_tokens)) as f64;
        self.tokens_per_s.push(tokens / took.as_secs_f64());
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            self.cpu_tokens[i].push((a - b) * 1e3 * 100_000.0 / tokens);
        }
        Ok(())
    }

    fn figures(&self, origin: Option<&Summary>) -> ChainFigures {
        let latency = Summary::of(self.latencies.clone());
        let n = self.processes.len();
        let processes: Vec<ProcessCpu> = self
            .processes
            .iter()
            .enumerate()
            .map(|(i, (name, _))| ProcessCpu {
                process: name.clone(),
                cpu_ms_per_1000_requests: median(self.cpu_requests[i].clone()),
                cpu_ms_per_100k_tokens: median(self.cpu_tokens[i].clone()),
            })
            .collect();
        // The chain's total each round, then the median: not a sum of medians.
        let total = |per: &Vec<Vec<f64>>| {
            median(
                (0..self.rps.len())
                    .map(|round| per[..n].iter().map(|p| p[round]).sum())
                    .collect(),
            )
        };
        ChainFigures {
            path: self.name.into(),
            added_latency_p50_ms: origin.map_or(0.0, |o| latency.p50 - o.p50),
            added_latency_p99_ms: origin.map_or(0.0, |o| latency.p99 - o.p99),
            latency_ms: latency,
            requests_per_s_rounds: self.rps.clone(),
            requests_per_s: median(self.rps.clone()),
            tokens_per_s: median(self.tokens_per_s.clone()),
            cpu_ms_per_1000_requests: if n == 0 {
                0.0
            } else {
                total(&self.cpu_requests)
            },
            cpu_ms_per_100k_tokens: if n == 0 { 0.0 } else { total(&self.cpu_tokens) },
            processes,
            bench_cpu_ms_per_1000_requests: median(self.cpu_requests[n].clone()),
        }
    }
}

/// Runs the three paths in interleaved rounds.
pub async fn run(options: &HopsOptions) -> anyhow::Result<HopsReport> {
    anyhow::ensure!(options.rounds > 0, "the hops section needs a round");
    let origin = Synthetic::start(Duration::ZERO).await?;
    let nginx = NginxChain::start(&options.nginx, &origin.addr.to_string()).await?;
    let ours = Roles::start(
        options.cocoon.clone(),
        BackendConfig::Upstream(upstream_config(&origin)),
    )
    .await?;
    let mut paths = [
        Path::new("direct (synthetic origin)", &origin.url(), Vec::new()),
        Path::new(
            "nginx × 3 (TLS 1.3 inside)",
            &nginx.base_url,
            nginx.hops.clone(),
        ),
        Path::new(
            "client → proxy → worker",
            &ours.base_url,
            ours.roles
                .iter()
                .map(|r| (r.name.to_owned(), r.pid))
                .collect(),
        ),
    ];
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency.max(1))
        .build()?;
    // Warm every path (connections, TLS sessions, the worker's upstream pool).
    for path in &paths {
        closed_loop(
            &http,
            &path.url,
            2,
            options.concurrency,
            options.concurrency * 2,
        )
        .await?;
    }
    let mut outcome = Ok(());
    'rounds: for _ in 0..options.rounds {
        for path in &mut paths {
            outcome = path.round(&http, options).await;
            if outcome.is_err() {
                break 'rounds;
            }
        }
    }
    nginx.stop().await;
    ours.stop().await;
    outcome?;
    let direct = paths[0].figures(None);
    let nginx = paths[1].figures(Some(&direct.latency_ms));
    let ours = paths[2].figures(Some(&direct.latency_ms));
    Ok(HopsReport {
        short_tokens: options.short_tokens,
        concurrency: options.concurrency,
        stream_tokens: options.stream_tokens,
        rounds: options.rounds,
        cpu_per_request_ratio: ours.cpu_ms_per_1000_requests / nginx.cpu_ms_per_1000_requests,
        cpu_per_token_ratio: ours.cpu_ms_per_100k_tokens / nginx.cpu_ms_per_100k_tokens,
        requests_per_s_ratio: ours.requests_per_s / nginx.requests_per_s,
        paths: vec![direct, nginx, ours],
    })
}

/// The hops report as Markdown tables: the paths, then each process's CPU.
pub fn table(r: &HopsReport) -> String {
    let mut out = format!(
        "### Each hop against nginx: {} closed loops of {}-token answers, {}-token answers for \
         CPU per token, {} rounds\n\n\
         | path | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s (rounds) | tokens/s | \
         CPU ms / 1k req | CPU ms / 100k tokens |\n|---|---:|---:|---:|---:|---|---:|---:|---:|\n",
        r.concurrency, r.short_tokens, r.stream_tokens, r.rounds
    );
    for p in &r.paths {
        let rounds: Vec<String> = p
            .requests_per_s_rounds
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect();
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:+.2} | {:+.2} | {:.0} ({}) | {:.0} | {:.0} | {:.0} |\n",
            p.path,
            p.latency_ms.p50,
            p.latency_ms.p99,
            p.added_latency_p50_ms,
            p.added_latency_p99_ms,
            p.requests_per_s,
            rounds.join(" / "),
            p.tokens_per_s,
            p.cpu_ms_per_1000_requests,
            p.cpu_ms_per_100k_tokens,
        ));
    }
    out.push_str(&format!(
        "\nours / nginx: CPU per request ×{:.2}, CPU per token ×{:.2}, requests/s ×{:.2}\n\n\
         | process | CPU ms / 1k req | CPU ms / 100k tokens |\n|---|---:|---:|\n",
        r.cpu_per_request_ratio, r.cpu_per_token_ratio, r.requests_per_s_ratio
    ));
    for p in r.paths.iter().skip(1) {
        for c in &p.processes {
            out.push_str(&format!(
                "| {} | {:.0} | {:.0} |\n",
                c.process, c.cpu_ms_per_1000_requests, c.cpu_ms_per_100k_tokens
            ));
        }
    }
    out
}
