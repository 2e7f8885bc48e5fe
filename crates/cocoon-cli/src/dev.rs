//! A whole network in one process: one proxy, its workers and a client gateway, all on
//! loopback, every hop mutual TLS with pinned keys.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cocoon_client::{ClientConfig, Gateway};
use cocoon_engine::Backend;
use cocoon_proxy::{Proxy, ProxyConfig, ProxyStatus, StatusSource};
use cocoon_tls::{Identity, PinnedPeers};
use cocoon_worker::Worker;
use tokio_util::sync::CancellationToken;

/// Where the parts listen.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The OpenAI-compatible API.
    pub gateway_listen: String,
    /// The proxy; port 0 picks a free one.
    pub proxy_listen: String,
    /// The proxy's key file; a fresh key when unset.
    pub proxy_key_file: Option<std::path::PathBuf>,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            gateway_listen: "127.0.0.1:10000".into(),
            proxy_listen: "127.0.0.1:0".into(),
            proxy_key_file: None,
        }
    }
}

struct WorkerSlot {
    backend: Arc<dyn Backend>,
    identity: Arc<Identity>,
    stop: Option<CancellationToken>,
    connected: Arc<AtomicBool>,
}

/// A running network.
pub struct DevNetwork {
    pub gateway_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub proxy_fingerprint: cocoon_tls::Fingerprint,
    options: DevOptions,
    shutdown: CancellationToken,
    proxy_stop: CancellationToken,
    proxy_status: Arc<dyn StatusSource>,
    workers: Vec<WorkerSlot>,
}

impl DevNetwork {
    /// Starts a proxy, one worker per backend and the gateway.
    pub async fn start(
        options: DevOptions,
        backends: Vec<Arc<dyn Backend>>,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let workers: Vec<WorkerSlot> = backends
            .into_iter()
            .map(|backend| {
                Ok(WorkerSlot {
                    backend,
                    identity: Arc::new(Identity::ephemeral("cocoon-worker")?),
                    stop: None,
                    connected: Arc::default(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let proxy_stop = shutdown.child_token();
        let (proxy_addr, proxy_fingerprint, proxy_status) = start_proxy(
            &options,
            &options.proxy_listen,
            &workers,
            proxy_stop.clone(),
        )
        .await?;
        let gateway = Gateway::bind(&ClientConfig {
            listen: options.gateway_listen.clone(),
            proxy_addr: proxy_addr.to_string(),
            proxy_fingerprint: Some(proxy_fingerprint.to_string()),
            ..ClientConfig::default()
        })
        .await?;
        let gateway_addr = gateway.local_addr();
        tokio::spawn(gateway.run(shutdown.clone()));
        let mut net = Self {
            gateway_addr,
            proxy_addr,
            proxy_fingerprint,
            options,
            shutdown,
            proxy_stop,
            proxy_status,
            workers,
        };
        for i in 0..net.workers.len() {
            net.start_worker(i);
        }
        Ok(net)
    }

    pub fn gateway_url(&self) -> String {
        format!("http://{}/v1", self.gateway_addr)
    }

    /// The proxy's view: connected workers, their load and requests served.
    pub fn proxy_status(&self) -> ProxyStatus {
        self.proxy_status.status()
    }

    /// Fingerprint of worker `i`'s key.
    pub fn worker_fingerprint(&self, i: usize) -> cocoon_tls::Fingerprint {
        self.workers[i].identity.fingerprint()
    }

    pub fn backend(&self, worker: usize) -> &Arc<dyn Backend> {
        &self.workers[worker].backend
    }

    /// (Re)starts worker `i`; it dials the proxy and joins.
    pub fn start_worker(&mut self, i: usize) {
        let slot = &mut self.workers[i];
        let stop = self.shutdown.child_token();
        let worker = Worker::new(
            format!("dev-worker-{i}"),
            self.proxy_addr.to_string(),
            slot.backend.clone(),
            slot.identity.clone(),
            Arc::new(PinnedPeers::new([self.proxy_fingerprint])),
            Duration::from_millis(500),
        );
        slot.connected = worker.connected_flag();
        slot.stop = Some(stop.clone());
        tokio::spawn(worker.run(stop));
    }

    /// Stops worker `i` abruptly: its connection to the proxy closes.
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(stop) = self.workers[i].stop.take() {
            stop.cancel();
        }
    }

    pub fn worker_connected(&self, i: usize) -> bool {
        self.workers[i].connected.load(Ordering::SeqCst)
    }

    /// Stops the proxy and starts a new one on the same address (same key if a key file is
    /// configured). Workers reconnect by themselves.
    pub async fn restart_proxy(&mut self) -> anyhow::Result<()> {
        self.proxy_stop.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.proxy_stop = self.shutdown.child_token();
        let listen = self.proxy_addr.to_string();
        let (addr, fingerprint, status) = start_proxy(
            &self.options,
            &listen,
            &self.workers,
            self.proxy_stop.clone(),
        )
        .await?;
        anyhow::ensure!(
            fingerprint == self.proxy_fingerprint,
            "restarted proxy has a different key"
        );
        self.proxy_addr = addr;
        self.proxy_status = status;
        Ok(())
    }

    /// Waits until the gateway lists `models` served by at least `workers` workers in total.
    pub async fn wait_ready(&self, workers: u32, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}/models", self.gateway_url());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(r) = http.get(&url).send().await
                && let Ok(v) = r.json::<serde_json::Value>().await
            {
                let total: u64 = v["data"]
                    .as_array()
                    .map_or(0, |d| d.iter().filter_map(|m| m["workers"].as_u64()).sum());
                if total >= u64::from(workers) {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "network not ready after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for DevNetwork {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_proxy(
    options: &DevOptions,
    listen: &str,
    workers: &[WorkerSlot],
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, cocoon_tls::Fingerprint, Arc<dyn StatusSource>)> {
    let proxy = Proxy::bind(&ProxyConfig {
        listen: listen.to_owned(),
        key_file: options.proxy_key_file.clone(),
        worker_fingerprints: workers
            .iter()
            .map(|w| w.identity.fingerprint().to_string())
            .collect(),
        ..ProxyConfig::default()
    })
    .await?;
    let addr = proxy.local_addr();
    let fingerprint = proxy.fingerprint();
    let status = proxy.status_handle();
    tokio::spawn(proxy.run(stop));
    Ok((addr, fingerprint, status))
}
