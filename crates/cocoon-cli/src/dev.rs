//! A whole network in one process: one proxy, its workers and a client gateway, all on
//! loopback, every hop mutual RA-TLS with DEVELOPMENT attestation: each node's certificate
//! carries a dev quote of the fixed dev image, signed by a key made for this network, and each
//! side checks the other's quote, image and key binding exactly as it would a TDX quote. That
//! proves nothing about the machine, and every part says so in its logs and status output.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cocoon_client::{ClientConfig, Gateway};
use cocoon_engine::Backend;
use cocoon_proxy::{Proxy, ProxyConfig, ProxyStatus, StatusSource};
use cocoon_tls::{AttesterChoice, AttesterConfig, Identity, PeerPolicy};
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
    name: String,
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
    /// Holds the development attester's key for the life of the network.
    dev_dir: tempfile::TempDir,
    dev_key: String,
}

impl DevNetwork {
    /// Starts a proxy, one worker per backend and the gateway.
    pub async fn start(
        options: DevOptions,
        backends: Vec<Arc<dyn Backend>>,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let dev_dir = tempfile::tempdir()?;
        let dev_key = hex::encode(
            cocoon_tls::dev_attester(
                &dev_dir.path().join("dev-attester.key"),
                cocoon_attest::dev_image(),
            )?
            .public_key(),
        );
        let attester = dev_attester_config(&dev_dir);
        let workers: Vec<WorkerSlot> = backends
            .into_iter()
            .enumerate()
            .map(|(i, backend)| worker_slot(format!("dev-worker-{i}"), backend, &attester))
            .collect::<anyhow::Result<_>>()?;
        let proxy_stop = shutdown.child_token();
        let (proxy_addr, proxy_fingerprint, proxy_status) = start_proxy(
            &options,
            &options.proxy_listen,
            &dev_dir,
            &dev_key,
            proxy_stop.clone(),
        )
        .await?;
        let gateway = Gateway::bind(&ClientConfig {
            listen: options.gateway_listen.clone(),
            proxy_addr: proxy_addr.to_string(),
            attester,
            proxy_policy: PeerPolicy {
                fingerprints: vec![proxy_fingerprint.to_string()],
                ..dev_policy(&dev_key)
            },
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
            dev_dir,
            dev_key,
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

    /// Public key (hex) of this network's development attester: what policies list in
    /// `dev_attester_keys` to accept its quotes.
    pub fn dev_attester_key(&self) -> &str {
        &self.dev_key
    }

    /// The `[attester]` every node of this network uses.
    pub fn dev_attester(&self) -> AttesterConfig {
        dev_attester_config(&self.dev_dir)
    }

    /// The policy every node of this network applies to its peers: a dev quote of the dev
    /// image, signed by this network's dev attester, bound to the peer's key.
    pub fn dev_policy(&self) -> PeerPolicy {
        dev_policy(&self.dev_key)
    }

    /// Adds a worker that attests itself as `attester` says and starts it; returns its index.
    /// For trying what the proxy admits.
    pub fn add_worker(
        &mut self,
        name: &str,
        backend: Arc<dyn Backend>,
        attester: &AttesterConfig,
    ) -> anyhow::Result<usize> {
        self.workers
            .push(worker_slot(name.to_owned(), backend, attester)?);
        let i = self.workers.len() - 1;
        self.start_worker(i);
        Ok(i)
    }

    /// (Re)starts worker `i`; it dials the proxy and joins.
    pub fn start_worker(&mut self, i: usize) {
        let proxy_policy = PeerPolicy {
            fingerprints: vec![self.proxy_fingerprint.to_string()],
            ..dev_policy(&self.dev_key)
        }
        .build("proxy_policy", "proxy")
        .expect("the dev policy is valid");
        let slot = &mut self.workers[i];
        let stop = self.shutdown.child_token();
        let worker = Worker::new(
            slot.name.clone(),
            self.proxy_addr.to_string(),
            slot.backend.clone(),
            slot.identity.clone(),
            proxy_policy,
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
            &self.dev_dir,
            &self.dev_key,
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
    dev_dir: &tempfile::TempDir,
    dev_key: &str,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, cocoon_tls::Fingerprint, Arc<dyn StatusSource>)> {
    // Workers are admitted by attestation alone, as in a real network: any worker running an
    // allowed image may join, whatever its key.
    let proxy = Proxy::bind(&ProxyConfig {
        listen: listen.to_owned(),
        key_file: options.proxy_key_file.clone(),
        attester: dev_attester_config(dev_dir),
        worker_policy: dev_policy(dev_key),
        ..ProxyConfig::default()
    })
    .await?;
    let addr = proxy.local_addr();
    let fingerprint = proxy.fingerprint();
    let status = proxy.status_handle();
    tokio::spawn(proxy.run(stop));
    Ok((addr, fingerprint, status))
}

fn worker_slot(
    name: String,
    backend: Arc<dyn Backend>,
    attester: &AttesterConfig,
) -> anyhow::Result<WorkerSlot> {
    Ok(WorkerSlot {
        name,
        backend,
        identity: Arc::new(attester.identity(None, "cocoon-worker", "worker")?),
        stop: None,
        connected: Arc::default(),
    })
}

fn dev_attester_config(dev_dir: &tempfile::TempDir) -> AttesterConfig {
    AttesterConfig {
        kind: AttesterChoice::Dev,
        dev_key_file: Some(dev_dir.path().join("dev-attester.key")),
        dev_mrtd: None,
    }
}

fn dev_policy(dev_key: &str) -> PeerPolicy {
    PeerPolicy {
        require_attestation: true,
        image_hashes: vec![cocoon_attest::dev_image().image_hash().to_string()],
        dev_attester_keys: vec![dev_key.to_owned()],
        ..PeerPolicy::default()
    }
}
