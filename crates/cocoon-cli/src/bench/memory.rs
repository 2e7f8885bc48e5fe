//! Resident memory of each role run as its own `cocoon` process (proxy, worker with the
//! embedded engine, client gateway): idle once the network is up, and the most seen while
//! concurrent streams run through it.

use std::path::Path;
use std::time::Duration;

use cocoon_engine::LlamaConfig;
use cocoon_worker::BackendConfig;
use serde::Serialize;

use super::engine::{EngineOptions, Target, level};
use super::proc;

/// One role's resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct RoleMemory {
    /// The role: "proxy", "worker" or "client".
    pub role: String,
    /// Resident set size once up and after a warm-up request, at rest, in MiB (VmRSS kB / 1024).
    pub idle_rss_mb: f64,
    /// Highest resident set size seen (sampled every 20 ms) while the load ran, in MiB.
    pub peak_rss_under_load_mb: f64,
}

/// The memory section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Concurrent streams of the load.
    pub streams: usize,
    /// Requests served during the load.
    pub requests: usize,
    /// Each role's figures: proxy, worker, client.
    pub roles: Vec<RoleMemory>,
}

/// Runs proxy, worker (embedded engine on `model_path`) and gateway as separate processes and
/// measures each one's RSS idle and under `streams` concurrent streams.
pub async fn run(
    model_path: &Path,
    options: &EngineOptions,
    streams: usize,
) -> anyhow::Result<MemoryReport> {
    let roles = super::roles::Roles::start(
        None,
        BackendConfig::Llama(LlamaConfig {
            model_path: model_path.to_owned(),
            threads: options.threads,
            parallel: options.parallel,
            kv_cache_tokens: options.kv_cache_tokens,
            ..LlamaConfig::default()
        }),
    )
    .await?;
    let http = reqwest::Client::new();
    // One request wakes every lazy part (connections, the engine's first batch).
    let target = Target::Http(
        http,
        format!("{}/chat/completions", roles.base_url),
        roles.model.clone(),
    );
    target.once(super::engine::PROMPT, 4).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle: Vec<f64> = roles
        .roles
        .iter()
        .map(|r| proc::rss_mb(r.pid))
        .collect::<anyhow::Result<_>>()?;

    let per_stream = options.requests_per_stream;
    let max_tokens = options.max_tokens;
    let load =
        tokio::spawn(
            async move { level(&target, "memory", streams, per_stream, max_tokens).await },
        );
    let mut peak = idle.clone();
    while !load.is_finished() {
        for (p, r) in peak.iter_mut().zip(&roles.roles) {
            *p = p.max(proc::rss_mb(r.pid)?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = load.await??;
    let report = MemoryReport {
        streams,
        requests: served.requests,
        roles: roles
            .roles
            .iter()
            .zip(idle.iter().zip(&peak))
            .map(|(r, (&idle, &peak))| RoleMemory {
                role: r.name.into(),
                idle_rss_mb: idle,
                peak_rss_under_load_mb: peak,
            })
            .collect(),
    };
    roles.stop().await;
    Ok(report)
}

/// The memory report as a Markdown table, one row per role.
pub fn table(r: &MemoryReport) -> String {
    let mut out = format!(
        "### Memory: each role as its own process, {} streams, {} requests\n\n\
         | role | idle RSS MB | peak RSS under load MB |\n|---|---|---|\n",
        r.streams, r.requests
    );
    for m in &r.roles {
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} |\n",
            m.role, m.idle_rss_mb, m.peak_rss_under_load_mb
        ));
    }
    out
}
