//! Resident memory of each role run as its own `cocoon` process (proxy, worker with the
//! embedded engine, client gateway): idle once the network is up, and the most seen while
//! concurrent streams run through it.

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_client::ClientConfig;
use cocoon_engine::LlamaConfig;
use cocoon_proxy::ProxyConfig;
use cocoon_worker::{BackendConfig, WorkerConfig};
use serde::Serialize;

use super::engine::{EngineOptions, Target, level};

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

/// Resident set size of `pid` in MB, from /proc.
fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))?;
    Ok(kb / 1024.0)
}

struct Role {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
}

fn spawn(name: &'static str, args: &[&str], config: &Path, dir: &Path) -> anyhow::Result<Role> {
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("{name} exited at once"))?;
    Ok(Role { name, child, pid })
}

/// Runs proxy, worker (embedded engine on `model_path`) and gateway as separate processes and
/// measures each one's RSS idle and under `streams` concurrent streams.
pub async fn run(
    model_path: &Path,
    options: &EngineOptions,
    streams: usize,
) -> anyhow::Result<MemoryReport> {
    // The in-process network lends its dev attester and policy and stays idle.
    let mut net = super::network(vec![], false).await?;
    let dir = net.dir().to_owned();
    let proxy_addr = super::free_loopback_addr()?.to_string();
    let gateway_addr = super::free_loopback_addr()?.to_string();
    let proxy = ProxyConfig {
        listen: proxy_addr.clone(),
        key_file: Some(dir.join("mem-proxy.key")),
        attester: net.dev_attester(),
        worker_policy: net.dev_policy(),
        limits: super::unlimited(),
        ..ProxyConfig::default()
    };
    let worker = WorkerConfig {
        name: "mem-worker".into(),
        proxy_addr: proxy_addr.clone(),
        key_file: Some(dir.join("mem-worker.key")),
        attester: net.dev_attester(),
        proxy_policy: net.dev_policy(),
        backends: vec![BackendConfig::Llama(LlamaConfig {
            model_path: model_path.to_owned(),
            threads: options.threads,
            parallel: options.parallel,
            kv_cache_tokens: options.kv_cache_tokens,
            ..LlamaConfig::default()
        })],
        ..WorkerConfig::default()
    };
    let client = ClientConfig {
        listen: gateway_addr.clone(),
        proxy_addr: proxy_addr.clone(),
        key_file: Some(dir.join("mem-client.key")),
        attester: net.dev_attester(),
        proxy_policy: net.dev_policy(),
        ..ClientConfig::default()
    };
    let write = |name: &str, text: String| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let proxy_toml = write("mem-proxy.toml", toml::to_string(&proxy)?)?;
    let worker_toml = write("mem-worker.toml", toml::to_string(&worker)?)?;
    let client_toml = write("mem-client.toml", toml::to_string(&client)?)?;
    let mut roles = vec![spawn("proxy", &["proxy"], &proxy_toml, &dir)?];
    roles.push(spawn("worker", &["worker"], &worker_toml, &dir)?);
    roles.push(spawn("client", &["client", "serve"], &client_toml, &dir)?);

    // Up when the gateway lists the worker's model.
    let http = reqwest::Client::new();
    let base = format!("http://{gateway_addr}/v1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let model = loop {
        let models = http.get(format!("{base}/models")).send().await;
        if let Ok(r) = models
            && let Ok(v) = r.json::<serde_json::Value>().await
            && let Some(id) = v["data"][0]["id"].as_str()
        {
            break id.to_owned();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the roles did not come up in 60 s; logs in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // One request wakes every lazy part (connections, the engine's first batch).
    let target = Target::Http(http, format!("{base}/chat/completions"), model);
    target.once(super::engine::PROMPT, 4).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle: Vec<f64> = roles
        .iter()
        .map(|r| rss_mb(r.pid))
        .collect::<anyhow::Result<_>>()?;

    let per_stream = options.requests_per_stream;
    let max_tokens = options.max_tokens;
    let load =
        tokio::spawn(
            async move { level(&target, "memory", streams, per_stream, max_tokens).await },
        );
    let mut peak = idle.clone();
    while !load.is_finished() {
        for (p, r) in peak.iter_mut().zip(&roles) {
            *p = p.max(rss_mb(r.pid)?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = load.await??;
    let report = MemoryReport {
        streams,
        requests: served.requests,
        roles: roles
            .iter()
            .zip(idle.iter().zip(&peak))
            .map(|(r, (&idle, &peak))| RoleMemory {
                role: r.name.into(),
                idle_rss_mb: idle,
                peak_rss_under_load_mb: peak,
            })
            .collect(),
    };
    for r in &mut roles {
        let _ = r.child.kill().await;
    }
    net.shutdown().await;
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
