//! `cocoon bench`: every speed claim of the project measured side by side with its reference,
//! in one run.
//!
//! - [`path`]: the network path alone, on a fast deterministic backend ([`synthetic`]):
//!   routing latency and most requests/s, streaming chunks/s and per-token transit, against
//!   the same backend called directly;
//! - [`engine`]: the embedded engine against llama.cpp's `llama-server` on the same model,
//!   one stream and 1/4/16 concurrent streams;
//! - [`memory`]: peak RSS of each role as its own process, idle and under load;
//! - [`payments`]: the real model through the network without and with payments;
//! - [`load`]: payments under load: 32 closed loops on the synthetic backend, with and
//!   without payments;
//! - [`market`]: the proxy's choice of worker among up to 10,000 simulated workers, sampled
//!   against scoring them all.
//!
//! Output: tables (Markdown), one JSON report, and an SVG figure ([`plot`]).

pub mod client;
pub mod engine;
pub mod hops;
pub mod load;
pub mod lookup;
pub mod market;
pub mod memory;
pub mod multiturn;
pub mod nginx;
pub mod path;
pub mod payments;
pub mod plot;
pub mod proc;
pub mod roles;
pub mod stats;
pub mod synthetic;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_engine::{Backend, LlamaConfig};
use cocoon_llama::LlamaBackend;
use cocoon_proxy::LimitsConfig;
use serde::Serialize;

use cocoon_testkit::dev::{DevNetwork, DevOptions};

/// The parts of the bench; all by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    /// The network path alone on a synthetic backend, against the backend called directly.
    Path,
    /// Each hop against nginx: our three roles as processes against three nginx hops, CPU per
    /// process per request and per token.
    Hops,
    /// The embedded engine against llama.cpp's llama-server on the same model.
    Engine,
    /// Prompt-lookup speculative decoding on a copying workload, against llama-server's.
    Lookup,
    /// Peak RSS of each role as its own process, idle and under load.
    Memory,
    /// The real model through the network, without and with payments.
    Payments,
    /// Payments under load: many closed loops on the synthetic backend, with and without.
    Load,
    /// The proxy's choice among many simulated workers, sampled against scoring them all.
    Market,
}

/// What `cocoon bench` runs and with which settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The sections to run.
    pub sections: Vec<Section>,
    /// GGUF model for the engine, memory and payments sections.
    pub model: PathBuf,
    /// The `llama-server` binary to measure the engine against; none: no reference.
    pub llama_server: Option<PathBuf>,
    /// A second reference: llama-server built as llama.cpp's release binaries are
    /// (`scripts/build-llama-server.sh --release-like`); none: not measured.
    pub llama_server_release: Option<PathBuf>,
    /// Settings of the network-path section.
    pub path: path::PathOptions,
    /// Settings of the hops section.
    pub hops: hops::HopsOptions,
    /// Settings of the engine section (also used by the memory and lookup sections).
    pub engine: engine::EngineOptions,
    /// Settings of the lookup section.
    pub lookup: lookup::LookupOptions,
    /// Settings of the payments section.
    pub payments: payments::PaymentsOptions,
    /// Settings of the payments-under-load section.
    pub load: load::LoadOptions,
    /// Settings of the market section.
    pub market: market::MarketOptions,
    /// Where llama-server's log and the role processes' files go.
    pub work_dir: PathBuf,
}

/// The machine the bench ran on, so that reports can be compared.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// CPU model name from `/proc/cpuinfo`, or "unknown".
    pub cpu_model: String,
    /// Operating system (`std::env::consts::OS`).
    pub os: String,
}

/// The whole bench result: the JSON report; a section not run is null.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Where it ran.
    pub machine: Machine,
    /// Network-path figures.
    pub path: Option<path::PathReport>,
    /// Each hop against nginx.
    pub hops: Option<hops::HopsReport>,
    /// Embedded engine vs llama-server figures.
    pub engine: Option<engine::EngineReport>,
    /// A growing conversation, with and without prompt caches (run with the engine section).
    pub multiturn: Option<multiturn::MultiTurnReport>,
    /// Prompt lookup against no lookup and llama-server's speculation.
    pub lookup: Option<lookup::LookupReport>,
    /// Per-role memory figures.
    pub memory: Option<memory::MemoryReport>,
    /// Without vs with payments figures.
    pub payments: Option<payments::PaymentsReport>,
    /// Payments under load.
    pub load: Option<load::LoadReport>,
    /// Worker-choice figures.
    pub market: Option<market::MarketReport>,
}

/// Describes this machine: CPU count, CPU model and OS.
pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        os: std::env::consts::OS.into(),
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_loopback_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Abuse limits out of the way: the bench measures the path, not the limits.
pub fn unlimited() -> LimitsConfig {
    LimitsConfig {
        requests_per_second: 1e6,
        burst: 1_000_000,
        concurrent_requests: 1_000_000,
        connections_per_ip: 1_000_000,
        ..LimitsConfig::default()
    }
}

/// A whole network on loopback with one worker per backend, ready to serve.
pub async fn network(
    backends: Vec<Arc<dyn Backend>>,
    payments: bool,
) -> anyhow::Result<DevNetwork> {
    network_sealed(backends, payments, true).await
}

/// [`network`], its requests sealed end to end (as `cocoon dev` runs) or, without `sealed`,
/// sent to the proxy in clear: the reference the cost of sealing is measured against.
pub async fn network_sealed(
    backends: Vec<Arc<dyn Backend>>,
    payments: bool,
    sealed: bool,
) -> anyhow::Result<DevNetwork> {
    let n = backends.len() as u32;
    let net = DevNetwork::start(
        DevOptions {
            gateway_listen: "127.0.0.1:0".into(),
            sealed,
            payments,
            limits: unlimited(),
            ..Default::default()
        },
        backends,
    )
    .await?;
    net.wait_ready(n, Duration::from_secs(30)).await?;
    Ok(net)
}

fn section(name: &str) {
    eprintln!("bench: {name} ...");
}

/// Runs the chosen sections one after another and collects their results.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let on = |s| options.sections.contains(&s);
    let mut report = BenchReport {
        machine: machine(),
        path: None,
        hops: None,
        engine: None,
        multiturn: None,
        lookup: None,
        memory: None,
        payments: None,
        load: None,
        market: None,
    };
    if on(Section::Path) {
        section("network path on the synthetic backend");
        report.path = Some(path::run(&options.path).await?);
    }
    if on(Section::Hops) {
        section("each hop against nginx");
        report.hops = Some(Box::pin(hops::run(&options.hops)).await?);
    }
    let engine_options = &options.engine;
    if on(Section::Engine) {
        let load = |prompt_cache| -> anyhow::Result<Arc<dyn Backend>> {
            Ok(Arc::new(LlamaBackend::load(&LlamaConfig {
                model_path: options.model.clone(),
                threads: engine_options.threads,
                parallel: engine_options.parallel,
                kv_cache_tokens: engine_options.kv_cache_tokens,
                prompt_cache,
                ..Default::default()
            })?))
        };
        // Prefill is measured with the cache off, as llama-server runs with cache_prompt off
        // there: both read every prompt afresh.
        let backend = load(false)?;
        let server = match &options.llama_server {
            Some(binary) => {
                section("starting llama-server");
                Some(
                    engine::LlamaServer::start(
                        binary,
                        &options.model,
                        engine_options,
                        options.work_dir.join("llama-server.log"),
                    )
                    .await?,
                )
            }
            None => {
                eprintln!(
                    "bench: WARNING: no llama-server given (--llama-server, or build one with \
                     scripts/build-llama-server.sh); the engine is measured without its reference"
                );
                None
            }
        };
        let release = match &options.llama_server_release {
            Some(binary) => {
                section("starting llama-server built as llama.cpp releases it");
                Some(
                    engine::LlamaServer::start(
                        binary,
                        &options.model,
                        engine_options,
                        options.work_dir.join("llama-server-release.log"),
                    )
                    .await?,
                )
            }
            None => None,
        };
        section("embedded engine vs llama-server");
        let mut net = network(vec![backend.clone()], false).await?;
        let mut servers = Vec::new();
        if let Some(s) = &server {
            servers.push(("llama-server (our build flags)", s));
        }
        if let Some(s) = &release {
            servers.push(("llama-server (as released: OpenMP, not native)", s));
        }
        let result = engine::run(
            backend.clone(),
            &net.gateway_url(),
            &servers,
            engine_options,
        )
        .await;
        net.shutdown().await;
        if let Some(s) = release {
            s.stop().await;
        }
        report.engine = Some(result?);
        section("multi-turn conversation, prompt caches");
        let cached = load(true)?;
        let multiturn = multiturn::run(
            &cached,
            &backend,
            server.as_ref(),
            engine_options.max_tokens,
        )
        .await;
        if let Some(s) = server {
            s.stop().await;
        }
        report.multiturn = Some(multiturn?);
    }
    if on(Section::Lookup) {
        section("prompt lookup on a copying workload");
        report.lookup = Some(
            lookup::run(
                &options.model,
                options.llama_server.as_deref(),
                engine_options,
                &options.lookup,
                &options.work_dir,
            )
            .await?,
        );
    }
    if on(Section::Memory) {
        section("memory of each role");
        let streams = engine_options.levels.iter().copied().max().unwrap_or(1);
        report.memory = Some(Box::pin(memory::run(&options.model, engine_options, streams)).await?);
    }
    if on(Section::Payments) {
        section("payments through the network");
        report.payments = Some(payments::run(&options.model, &options.payments).await?);
    }
    if on(Section::Load) {
        section("payments under load");
        report.load = Some(load::run(&options.load).await?);
    }
    if on(Section::Market) {
        section("choosing among many workers");
        let market = options.market.clone();
        report.market = Some(tokio::task::spawn_blocking(move || market::run(&market)).await??);
    }
    Ok(report)
}

/// The report as Markdown tables, one per section that ran, under a line about the machine.
pub fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "machine: {} CPUs, {} ({})\n\n",
        r.machine.cpus, r.machine.cpu_model, r.machine.os
    );
    if let Some(p) = &r.path {
        out.push_str(&path::table(p));
        out.push('\n');
    }
    if let Some(h) = &r.hops {
        out.push_str(&hops::table(h));
        out.push('\n');
    }
    if let Some(e) = &r.engine {
        out.push_str(&engine::table(e));
        out.push('\n');
    }
    if let Some(m) = &r.multiturn {
        out.push_str(&multiturn::table(m));
        out.push('\n');
    }
    if let Some(l) = &r.lookup {
        out.push_str(&lookup::table(l));
        out.push('\n');
    }
    if let Some(m) = &r.memory {
        out.push_str(&memory::table(m));
        out.push('\n');
    }
    if let Some(p) = &r.payments {
        out.push_str(&payments::table(p));
        out.push('\n');
    }
    if let Some(l) = &r.load {
        out.push_str(&load::table(l));
        out.push('\n');
    }
    if let Some(m) = &r.market {
        out.push_str(&market::table(m));
    }
    out
}

/// The figure, when the report holds what it draws.
pub fn figure(r: &BenchReport) -> Option<String> {
    let p = r.path.as_ref()?;
    let e = r.engine.as_ref()?;
    let cats = ["p50", "p90", "p99"].map(String::from).to_vec();
    let latency = [&p.direct, &p.network]
        .iter()
        .map(|f| plot::Series {
            name: f.path.clone(),
            values: vec![f.latency_ms.p50, f.latency_ms.p90, f.latency_ms.p99],
        })
        .collect::<Vec<_>>();
    let mut levels: Vec<usize> = e.levels.iter().map(|l| l.streams).collect();
    levels.dedup();
    let mut names: Vec<String> = Vec::new();
    for l in &e.levels {
        if !names.contains(&l.path) {
            names.push(l.path.clone());
        }
    }
    let throughput = names
        .into_iter()
        .map(|name| plot::Series {
            values: levels
                .iter()
                .map(|s| {
                    e.levels
                        .iter()
                        .find(|l| l.path == name && l.streams == *s)
                        .map_or(f64::NAN, |l| l.aggregate_tokens_per_s)
                })
                .collect(),
            name,
        })
        .collect::<Vec<_>>();
    let level_cats = levels
        .iter()
        .map(|s| format!("{s} stream{}", if *s == 1 { "" } else { "s" }))
        .collect::<Vec<_>>();
    Some(plot::figure(&cats, &latency, &level_cats, &throughput))
}
