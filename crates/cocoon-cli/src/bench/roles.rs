//! The network's three roles (proxy, worker, client gateway) each run as its own `cocoon`
//! process from a written configuration, as separate hosts would run them: what the memory
//! and per-hop CPU sections measure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_client::ClientConfig;
use cocoon_proxy::ProxyConfig;
use cocoon_testkit::dev::DevNetwork;
use cocoon_worker::{BackendConfig, WorkerConfig};

/// One role's process.
pub struct Role {
    /// "proxy", "worker" or "client".
    pub name: &'static str,
    /// Its process id, for /proc.
    pub pid: u32,
    child: tokio::process::Child,
}

/// Proxy, worker and gateway, up and serving one model.
pub struct Roles {
    /// Client, proxy, worker: in the order a request crosses them.
    pub roles: Vec<Role>,
    /// The gateway's OpenAI API, `http://host:port/v1`.
    pub base_url: String,
    /// The model the gateway lists.
    pub model: String,
    /// Lends its dev attester and policy; otherwise idle.
    net: DevNetwork,
}

fn spawn(
    cocoon: &Path,
    name: &'static str,
    args: &[&str],
    config: &Path,
    dir: &Path,
) -> anyhow::Result<Role> {
    let child = tokio::process::Command::new(cocoon)
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
    Ok(Role { name, pid, child })
}

impl Roles {
    /// Writes the three configurations (dev attestation, no payments, no abuse limits) and
    /// starts each with `cocoon` (this binary, or the one named), the worker serving
    /// `backend`; returns once the gateway lists the worker's model.
    pub async fn start(cocoon: Option<PathBuf>, backend: BackendConfig) -> anyhow::Result<Self> {
        let cocoon = match cocoon {
            Some(path) => path,
            None => std::env::current_exe()?,
        };
        let net = super::network(vec![], false).await?;
        let dir = net.dir().to_owned();
        let proxy_addr = super::free_loopback_addr()?.to_string();
        let gateway_addr = super::free_loopback_addr()?.to_string();
        let proxy = ProxyConfig {
            listen: proxy_addr.clone(),
            key_file: Some(dir.join("roles-proxy.key")),
            attester: net.dev_attester(),
            worker_policy: net.dev_policy(),
            limits: super::unlimited(),
            ..ProxyConfig::default()
        };
        let worker = WorkerConfig {
            name: "roles-worker".into(),
            proxy_addr: proxy_addr.clone(),
            key_file: Some(dir.join("roles-worker.key")),
            attester: net.dev_attester(),
            proxy_policy: net.dev_policy(),
            backends: vec![backend],
            ..WorkerConfig::default()
        };
        let client = ClientConfig {
            listen: gateway_addr.clone(),
            proxy_addr: proxy_addr.clone(),
            key_file: Some(dir.join("roles-client.key")),
            attester: net.dev_attester(),
            proxy_policy: net.dev_policy(),
            ..ClientConfig::default()
        };
        let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let proxy_toml = write("roles-proxy.toml", toml::to_string(&proxy)?)?;
        let worker_toml = write("roles-worker.toml", toml::to_string(&worker)?)?;
        let client_toml = write("roles-client.toml", toml::to_string(&client)?)?;
        let proxy = spawn(&cocoon, "proxy", &["proxy"], &proxy_toml, &dir)?;
        let worker = spawn(&cocoon, "worker", &["worker"], &worker_toml, &dir)?;
        let client = spawn(&cocoon, "client", &["client", "serve"], &client_toml, &dir)?;
        let roles = vec![client, proxy, worker];

        // Up when the gateway lists the worker's model.
        let http = reqwest::Client::new();
        let base_url = format!("http://{gateway_addr}/v1");
        let deadline = Instant::now() + Duration::from_secs(60);
        let model = loop {
            let models = http.get(format!("{base_url}/models")).send().await;
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
        Ok(Self {
            roles,
            base_url,
            model,
            net,
        })
    }

    /// Stops the three processes and the lending network.
    pub async fn stop(mut self) {
        for r in &mut self.roles {
            let _ = r.child.kill().await;
        }
        self.net.shutdown().await;
    }
}
