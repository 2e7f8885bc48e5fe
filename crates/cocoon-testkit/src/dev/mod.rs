//! A whole network in one process: one proxy, its workers and a client gateway, all on
//! loopback, every hop mutual RA-TLS with DEVELOPMENT attestation: each node's certificate
//! carries a dev quote of the fixed dev image, signed by a key made for this network, and each
//! side checks the other's quote, image and key binding exactly as it would a TDX quote. That
//! proves nothing about the machine, and every part says so in its logs and status output.
//!
//! Payments are real too (unless turned off for comparison): an embedded ledger is served on
//! loopback, the proxy bills every request against the gateway's funded contract and workers
//! claim their payouts, as in [`ledger`]. With [`DevLedgerKind::Ton`] the money is on a local
//! emulated TON chain running the contracts instead, as in [`chain`].

pub mod chain;
pub mod keys;
pub mod ledger;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::path::{Path, PathBuf};

use cocoon_client::{ClientConfig, ClientPayments, Gateway};
use cocoon_engine::Backend;
use cocoon_ledger::{EmbeddedLedger, PublicKey};
use cocoon_proxy::{
    LimitsConfig, PaymentsConfig, Proxy, ProxyConfig, ProxyStatus, RoutingConfig, StatusSource,
};
use cocoon_tls::{AttesterChoice, AttesterConfig, Identity, PeerPolicy};
use cocoon_worker::{PayoutStore, PriceConfig, Worker};

use self::chain::DevChain;
use self::ledger::{DevLedger, key_wallet};
use tokio_util::sync::CancellationToken;

/// Where the parts listen.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The OpenAI-compatible API.
    pub gateway_listen: String,
    /// Seal every request end to end to the workers the gateway verified (its
    /// `[worker_policy]`, on dev attestation): the proxy routes them unread. Off only to
    /// compare with the path a clear request takes.
    pub sealed: bool,
    /// Sees every clear byte the proxy reads or writes (see `Proxy::with_wire_tap`).
    pub proxy_tap: Option<ProxyTap>,
    /// The gateway's `[sealing]`.
    pub gateway_sealing: cocoon_client::SealingConfig,
    /// The measured worker configurations the gateway's `[worker_policy]` allows (empty: any);
    /// the proxy's may allow more (`worker_config_hashes`).
    pub gateway_worker_config_hashes: Vec<String>,
    /// Give every role an operator's listener on loopback (`[admin]`): see
    /// [`DevNetwork::proxy_admin`], [`DevNetwork::gateway_admin`], [`DevNetwork::worker_admin`]
    /// (a worker's serves its first run only).
    pub admin: bool,
    /// Seconds the proxy and workers let answers in flight finish when stopped (0: they are
    /// cut at once, as most tests of faults want).
    pub drain_secs: u64,
    /// The proxy; port 0 picks a free one.
    pub proxy_listen: String,
    /// The proxy's key file; a fresh key in the network's directory when unset.
    pub proxy_key_file: Option<std::path::PathBuf>,
    /// Bill requests through a ledger (off only to measure what payments cost).
    pub payments: bool,
    /// Which ledger bills them.
    pub ledger: DevLedgerKind,
    /// Seconds between the proxy's batched commits to the ledger.
    pub commit_interval_secs: u64,
    /// The proxy's abuse limits.
    pub limits: LimitsConfig,
    /// The proxy's failover, health checks and reputation settings.
    pub routing: RoutingConfig,
    /// The prices of worker `i` (the network's floor for those not listed).
    pub worker_prices: Vec<PriceConfig>,
    /// Who may use the gateway: API keys, host names, browser origins (none of them by
    /// default: a loopback gateway for the machine's own apps).
    pub gateway_access: cocoon_client::AccessConfig,
    /// The most answer text the gateway gathers for a request without streaming.
    pub gateway_max_answer_bytes: usize,
    /// The proxy's `max_connections` (client connections).
    pub proxy_max_connections: usize,
    /// The most the gateway pays per weighted token (`[payments] max_price_per_token`);
    /// `None`: ten floors.
    pub gateway_max_price: Option<u64>,
    /// The gateway's `stream_keep_alive_secs`.
    pub gateway_keep_alive_secs: u64,
    /// The measured worker configurations the proxy admits (`[worker_policy] config_hashes`);
    /// empty: any.
    pub worker_config_hashes: Vec<String>,
    /// Seconds between the proxy's readings of the registry's allowed models.
    pub registry_refresh_secs: u64,
    /// Whether the proxy also requires the registry to allow workers' images.
    pub worker_images_from_registry: bool,
    /// Whether workers serve the proxy only while the registry allows its image (read every
    /// `registry_refresh_secs`).
    pub proxy_images_from_registry: bool,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            gateway_listen: "127.0.0.1:10000".into(),
            sealed: true,
            proxy_tap: None,
            gateway_sealing: cocoon_client::SealingConfig::default(),
            gateway_worker_config_hashes: Vec::new(),
            admin: false,
            drain_secs: 0,
            proxy_listen: "127.0.0.1:0".into(),
            proxy_key_file: None,
            payments: true,
            ledger: DevLedgerKind::Embedded,
            commit_interval_secs: 2,
            limits: LimitsConfig::default(),
            routing: RoutingConfig::default(),
            worker_prices: Vec::new(),
            gateway_access: cocoon_client::AccessConfig::default(),
            gateway_max_answer_bytes: ClientConfig::default().max_answer_bytes,
            proxy_max_connections: ProxyConfig::default().max_connections,
            gateway_max_price: None,
            gateway_keep_alive_secs: ClientConfig::default().stream_keep_alive_secs,
            worker_config_hashes: Vec::new(),
            registry_refresh_secs: 60,
            worker_images_from_registry: false,
            proxy_images_from_registry: false,
        }
    }
}

/// A tap on the proxy's clear bytes, for [`DevOptions::proxy_tap`].
#[derive(Clone)]
pub struct ProxyTap(pub cocoon_net::WireTap);

impl std::fmt::Debug for ProxyTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyTap")
    }
}

/// Where a dev network's money is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DevLedgerKind {
    /// The embedded ledger, durable in the network's directory, served on loopback.
    #[default]
    Embedded,
    /// The TON contracts on a local emulated chain (in memory), through the toncenter API.
    Ton,
}

struct WorkerSlot {
    name: String,
    backend: Arc<dyn Backend>,
    identity: Arc<Identity>,
    /// Opens requests sealed to this worker.
    sealing: Option<Arc<cocoon_worker::Sealing>>,
    /// Its operator's listener, until its first run serves it.
    admin: Option<cocoon_admin::AdminListener>,
    admin_addr: Option<SocketAddr>,
    stop: Option<CancellationToken>,
    connected: Arc<AtomicBool>,
    payouts: Option<Arc<PayoutStore>>,
    /// The ledger as this worker opened it (with payments on).
    ledger: Option<Arc<dyn cocoon_ledger::Ledger>>,
}

/// A running network.
pub struct DevNetwork {
    /// Where the gateway's OpenAI-compatible HTTP API listens (loopback).
    pub gateway_addr: SocketAddr,
    gateway_admin: Option<SocketAddr>,
    proxy_admin: Option<SocketAddr>,
    /// Where the proxy listens for RA-TLS connections from clients and workers.
    pub proxy_addr: SocketAddr,
    /// Fingerprint of the proxy's TLS key, which clients and workers pin.
    pub proxy_fingerprint: cocoon_tls::Fingerprint,
    options: DevOptions,
    shutdown: CancellationToken,
    proxy_stop: CancellationToken,
    proxy_status: Arc<dyn StatusSource>,
    /// Ends once the proxy has stopped and released its record.
    proxy_task: Option<tokio::task::JoinHandle<()>>,
    workers: Vec<WorkerSlot>,
    /// Holds the development attester's key for the life of the network.
    dev_dir: tempfile::TempDir,
    dev_key: String,
    ledger: Option<DevLedger>,
    chain: Option<DevChain>,
    proxy_key_file: PathBuf,
    client_key: PublicKey,
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
        let (ledger, chain) = match (options.payments, options.ledger) {
            (false, _) => (None, None),
            (true, DevLedgerKind::Embedded) => (
                Some(DevLedger::start(dev_dir.path(), shutdown.clone()).await?),
                None,
            ),
            (true, DevLedgerKind::Ton) => (None, Some(DevChain::start(dev_dir.path()).await?)),
        };
        let ledger_url = match (&ledger, &chain) {
            (Some(l), _) => Some(l.url.clone()),
            (_, Some(c)) => Some(c.spec.clone()),
            _ => None,
        };
        // The registry allows what the network's workers serve, as its owner would.
        for backend in &backends {
            allow_models(ledger.as_ref(), chain.as_ref(), &**backend).await?;
        }
        let mut workers = Vec::new();
        for (i, backend) in backends.into_iter().enumerate() {
            let slot = WorkerSetup {
                attester: &attester,
                dir: dev_dir.path(),
                ledger_url: ledger_url.as_deref(),
                chain: chain.as_ref(),
                shutdown: &shutdown,
                admin: options.admin,
            }
            .slot(format!("dev-worker-{i}"), backend, None)
            .await?;
            workers.push(slot);
        }
        let proxy_key_file = options
            .proxy_key_file
            .clone()
            .unwrap_or_else(|| dev_dir.path().join("proxy.key"));
        let proxy_key = key_wallet(&proxy_key_file)?.public_key();
        let client_key_file = dev_dir.path().join("client.key");
        let client_key = key_wallet(&client_key_file)?.public_key();
        let proxy_listen = concrete_port(&options.proxy_listen)?;
        if let Some(ledger) = &ledger {
            ledger.open_proxy(proxy_key, &proxy_listen).await?;
            ledger.fund_client(client_key, proxy_key).await?;
        }
        if let Some(chain) = &chain {
            chain.open_proxy(&proxy_key_file, &proxy_listen).await?;
            chain.fund_client(&client_key_file, proxy_key).await?;
        }
        let proxy_stop = shutdown.child_token();
        let (proxy_addr, proxy_fingerprint, proxy_status, proxy_task, proxy_admin) = start_proxy(
            &ProxySetup {
                options: &options,
                key_file: &proxy_key_file,
                dev_dir: dev_dir.path(),
                dev_key: &dev_key,
                ledger_url: ledger_url.as_deref(),
            },
            &proxy_listen,
            proxy_stop.clone(),
        )
        .await?;
        let gateway = Gateway::bind(
            &ClientConfig {
                listen: options.gateway_listen.clone(),
                proxy_addr: proxy_addr.to_string(),
                key_file: Some(client_key_file),
                attester,
                proxy_policy: PeerPolicy {
                    fingerprints: vec![proxy_fingerprint.to_string()],
                    ..dev_policy(&dev_key)
                },
                worker_policy: options.sealed.then(|| PeerPolicy {
                    config_hashes: options.gateway_worker_config_hashes.clone(),
                    ..dev_policy(&dev_key)
                }),
                sealing: options.gateway_sealing.clone(),
                admin: loopback_admin(options.admin),
                payments: ClientPayments {
                    ledger: ledger_url.clone(),
                    proxy_key: Some(hex::encode(proxy_key)),
                    bill_file: dev_dir.path().join("client-bills.json"),
                    max_price_per_token: options.gateway_max_price,
                    ..ClientPayments::default()
                },
                access: options.gateway_access.clone(),
                max_answer_bytes: options.gateway_max_answer_bytes,
                stream_keep_alive_secs: options.gateway_keep_alive_secs,
                ..ClientConfig::default()
            },
            keys::LEDGERS,
        )
        .await?;
        let gateway_addr = gateway.local_addr();
        let gateway_admin = gateway.admin_addr();
        tokio::spawn(gateway.run(shutdown.clone()));
        let mut net = Self {
            gateway_addr,
            gateway_admin,
            proxy_admin,
            proxy_addr,
            proxy_fingerprint,
            options,
            shutdown,
            proxy_stop,
            proxy_status,
            proxy_task: Some(proxy_task),
            workers,
            dev_dir,
            dev_key,
            ledger,
            chain,
            proxy_key_file,
            client_key,
        };
        for i in 0..net.workers.len() {
            net.start_worker(i);
        }
        Ok(net)
    }

    /// How configs name the ledger (the embedded ledger's URL, or the TON root), when
    /// payments are on.
    pub fn ledger_url(&self) -> Option<&str> {
        match (&self.ledger, &self.chain) {
            (Some(l), _) => Some(l.url.as_str()),
            (_, Some(c)) => Some(c.spec.as_str()),
            _ => None,
        }
    }

    /// The local TON chain, when the network settles on TON.
    pub fn chain(&self) -> Option<&DevChain> {
        self.chain.as_ref()
    }

    /// The ledger itself, for reading its state directly.
    pub fn ledger(&self) -> Option<&Arc<EmbeddedLedger>> {
        self.ledger.as_ref().map(|l| &l.ledger)
    }

    /// The dev ledger's helpers (funding, registering), when payments are on.
    pub fn dev_ledger(&self) -> Option<&DevLedger> {
        self.ledger.as_ref()
    }

    /// The gateway's key: its contract with the proxy is bound to it.
    pub fn client_key(&self) -> PublicKey {
        self.client_key
    }

    /// The proxy's key: its contract, and every message it signs.
    pub fn proxy_key(&self) -> anyhow::Result<PublicKey> {
        Ok(key_wallet(&self.proxy_key_file)?.public_key())
    }

    /// Worker `i`'s key: its payouts are bound to it.
    pub fn worker_key(&self, i: usize) -> PublicKey {
        self.workers[i]
            .identity
            .public_key()
            .try_into()
            .expect("Ed25519 keys are 32 bytes")
    }

    /// The payouts worker `i` has kept.
    pub fn worker_payouts(&self, i: usize) -> Option<&Arc<PayoutStore>> {
        self.workers[i].payouts.as_ref()
    }

    /// The proxy's record of charges and debts.
    pub fn book_path(&self) -> PathBuf {
        self.dev_dir.path().join("proxy-book.redb")
    }

    /// The directory holding this network's keys, ledger and records.
    pub fn dir(&self) -> &Path {
        self.dev_dir.path()
    }

    /// Writes a `client.toml` for the `cocoon client` commands to act on this network's
    /// funded contract; returns its path.
    pub fn write_client_config(&self) -> anyhow::Result<PathBuf> {
        let config = ClientConfig {
            proxy_addr: self.proxy_addr.to_string(),
            key_file: Some(self.dev_dir.path().join("client.key")),
            attester: self.dev_attester(),
            proxy_policy: PeerPolicy {
                fingerprints: vec![self.proxy_fingerprint.to_string()],
                ..self.dev_policy()
            },
            worker_policy: self.options.sealed.then(|| self.dev_policy()),
            payments: ClientPayments {
                ledger: self.ledger_url().map(str::to_owned),
                proxy_key: Some(hex::encode(self.proxy_key()?)),
                bill_file: self.dev_dir.path().join("client-bills.json"),
                ..ClientPayments::default()
            },
            ..ClientConfig::default()
        };
        let path = self.dev_dir.path().join("client.toml");
        std::fs::write(&path, toml::to_string_pretty(&config)?)?;
        Ok(path)
    }

    /// The proxy's operator's listener (with [`DevOptions::admin`]; the first proxy's).
    pub fn proxy_admin(&self) -> Option<SocketAddr> {
        self.proxy_admin
    }

    /// The gateway's operator's listener (with [`DevOptions::admin`]).
    pub fn gateway_admin(&self) -> Option<SocketAddr> {
        self.gateway_admin
    }

    /// Worker `i`'s operator's listener (with [`DevOptions::admin`]), for its first run.
    pub fn worker_admin(&self, i: usize) -> Option<SocketAddr> {
        self.workers[i].admin_addr
    }

    /// Base URL of the gateway's OpenAI-compatible API (`http://<gateway_addr>/v1`).
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

    /// The backend that worker `worker` serves generations with.
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
    pub async fn add_worker(
        &mut self,
        name: &str,
        backend: Arc<dyn Backend>,
        attester: &AttesterConfig,
    ) -> anyhow::Result<usize> {
        self.add_measured_worker(name, backend, attester, None)
            .await
    }

    /// [`Self::add_worker`], the worker having measured `measured` (its configuration) into
    /// RTMR3 first, as `cocoon worker` does.
    pub async fn add_measured_worker(
        &mut self,
        name: &str,
        backend: Arc<dyn Backend>,
        attester: &AttesterConfig,
        measured: Option<cocoon_tls::MeasuredEvent>,
    ) -> anyhow::Result<usize> {
        allow_models(self.ledger.as_ref(), self.chain.as_ref(), &*backend).await?;
        let slot = WorkerSetup {
            attester,
            dir: self.dev_dir.path(),
            ledger_url: self.ledger_url(),
            chain: self.chain.as_ref(),
            shutdown: &self.shutdown,
            admin: self.options.admin,
        }
        .slot(name.to_owned(), backend, measured)
        .await?;
        self.workers.push(slot);
        let i = self.workers.len() - 1;
        self.start_worker(i);
        Ok(i)
    }

    /// (Re)starts worker `i`; it dials the proxy and joins.
    pub fn start_worker(&mut self, i: usize) {
        let mut proxy_policy = PeerPolicy {
            fingerprints: vec![self.proxy_fingerprint.to_string()],
            ..dev_policy(&self.dev_key)
        };
        if self.options.proxy_images_from_registry {
            // The registry's proxy images instead of the policy's own.
            proxy_policy.registers.clear();
            proxy_policy.image_hashes.clear();
            proxy_policy.images_from_registry = true;
        }
        let proxy_policy = proxy_policy
            .build("proxy_policy", "proxy")
            .expect("the dev policy is valid");
        let slot = &mut self.workers[i];
        let stop = self.shutdown.child_token();
        let mut worker = Worker::new(
            slot.name.clone(),
            self.proxy_addr.to_string(),
            slot.backend.clone(),
            slot.identity.clone(),
            proxy_policy,
            Duration::from_millis(500),
        )
        .with_sealing(slot.sealing.clone())
        .with_drain(Duration::from_secs(self.options.drain_secs))
        .with_prices(
            self.options
                .worker_prices
                .get(i)
                .cloned()
                .unwrap_or_default(),
        );
        if let Some(store) = &slot.payouts {
            worker = worker.with_payouts(store.clone());
        }
        if self.options.proxy_images_from_registry {
            let ledger = slot
                .ledger
                .clone()
                .expect("proxy_images_from_registry needs payments on");
            worker = worker.with_registry(
                ledger,
                Duration::from_secs(self.options.registry_refresh_secs.max(1)),
            );
        }
        slot.connected = worker.connected_flag();
        slot.stop = Some(stop.clone());
        if let Some(listener) = slot.admin.take() {
            tokio::spawn(worker.admin(listener, None, stop.clone()));
        }
        tokio::spawn(worker.run(stop));
    }

    /// Stops worker `i` abruptly: its connection to the proxy closes.
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(stop) = self.workers[i].stop.take() {
            stop.cancel();
        }
    }

    /// Stops worker `i` and waits until the proxy lists one worker fewer.
    pub async fn stop_worker_until_gone(&mut self, i: usize) {
        let before = self.proxy_status().workers.len();
        self.stop_worker(i);
        crate::http::wait_until("the worker to leave", Duration::from_secs(10), || {
            self.proxy_status().workers.len() < before
        })
        .await;
    }

    /// Starts worker `i` again and waits, up to `timeout`, until the proxy lists one worker
    /// more.
    pub async fn start_worker_until_joined(&mut self, i: usize, timeout: Duration) {
        let before = self.proxy_status().workers.len();
        self.start_worker(i);
        crate::http::wait_until("the worker to join", timeout, || {
            self.proxy_status().workers.len() > before
        })
        .await;
    }

    /// Whether worker `i` is connected to the proxy now.
    pub fn worker_connected(&self, i: usize) -> bool {
        self.workers[i].connected.load(Ordering::SeqCst)
    }

    /// Stops the proxy and waits until it has made its last commit and released its record.
    pub async fn stop_proxy(&mut self) {
        self.proxy_stop.cancel();
        if let Some(task) = self.proxy_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }

    /// Stops the proxy (if running) and starts a new one on the same address (same key if a key file is
    /// configured). Workers reconnect by themselves.
    pub async fn restart_proxy(&mut self) -> anyhow::Result<()> {
        self.stop_proxy().await;
        self.proxy_stop = self.shutdown.child_token();
        let listen = self.proxy_addr.to_string();
        let (addr, fingerprint, status, task, _) = start_proxy(
            &ProxySetup {
                options: &self.options,
                key_file: &self.proxy_key_file,
                dev_dir: self.dev_dir.path(),
                dev_key: &self.dev_key,
                ledger_url: self.ledger_url(),
            },
            &listen,
            self.proxy_stop.clone(),
        )
        .await?;
        anyhow::ensure!(
            fingerprint == self.proxy_fingerprint,
            "restarted proxy has a different key"
        );
        self.proxy_addr = addr;
        self.proxy_status = status;
        self.proxy_task = Some(task);
        Ok(())
    }

    /// Waits until the gateway lists `models` served by at least `workers` workers in total.
    pub async fn wait_ready(&self, workers: u32, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}/models", self.gateway_url());
        let deadline = tokio::time::Instant::now() + timeout;
        // A gateway with API keys answers its own network's tests with the first one.
        let key = self
            .options
            .gateway_access
            .keys
            .first()
            .and_then(|k| k.key.clone());
        loop {
            let mut get = http.get(&url);
            if let Some(key) = &key {
                get = get.bearer_auth(key);
            }
            if let Ok(r) = get.send().await
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

    /// Stops the proxy first, so its last commit reaches the ledger, then everything else.
    pub async fn shutdown(&mut self) {
        self.stop_proxy().await;
        self.shutdown.cancel();
    }
}

impl Drop for DevNetwork {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `host:0` made concrete: the proxy's address is registered on the ledger before it binds.
fn concrete_port(listen: &str) -> anyhow::Result<String> {
    if !listen.ends_with(":0") {
        return Ok(listen.to_owned());
    }
    let probe = std::net::TcpListener::bind(listen)?;
    Ok(probe.local_addr()?.to_string())
}

/// What the dev proxy is made of, beside its address.
struct ProxySetup<'a> {
    options: &'a DevOptions,
    key_file: &'a Path,
    dev_dir: &'a Path,
    dev_key: &'a str,
    ledger_url: Option<&'a str>,
}

async fn start_proxy(
    setup: &ProxySetup<'_>,
    listen: &str,
    stop: CancellationToken,
) -> anyhow::Result<(
    SocketAddr,
    cocoon_tls::Fingerprint,
    Arc<dyn StatusSource>,
    tokio::task::JoinHandle<()>,
    Option<SocketAddr>,
)> {
    // Workers are admitted by attestation alone, as in a real network: any worker running an
    // allowed image may join, whatever its key.
    let proxy = Proxy::bind(
        &ProxyConfig {
            listen: listen.to_owned(),
            key_file: Some(setup.key_file.to_owned()),
            attester: attester_in(setup.dev_dir),
            worker_policy: PeerPolicy {
                config_hashes: setup.options.worker_config_hashes.clone(),
                ..dev_policy(setup.dev_key)
            },
            payments: PaymentsConfig {
                ledger: setup.ledger_url.map(str::to_owned),
                book: setup.dev_dir.join("proxy-book.redb"),
                commit_interval_secs: setup.options.commit_interval_secs,
                registry_refresh_secs: setup.options.registry_refresh_secs,
                worker_images_from_registry: setup.options.worker_images_from_registry,
            },
            limits: setup.options.limits.clone(),
            routing: setup.options.routing.clone(),
            max_connections: setup.options.proxy_max_connections,
            admin: loopback_admin(setup.options.admin),
            drain_secs: setup.options.drain_secs,
            ..ProxyConfig::default()
        },
        keys::LEDGERS,
    )
    .await?;
    let proxy = match &setup.options.proxy_tap {
        Some(ProxyTap(tap)) => proxy.with_wire_tap(tap.clone()),
        None => proxy,
    };
    let addr = proxy.local_addr();
    let fingerprint = proxy.fingerprint();
    let status = proxy.status_handle();
    let admin = proxy.admin_addr();
    let task = tokio::spawn(proxy.run(stop));
    Ok((addr, fingerprint, status, task, admin))
}

/// What every worker of the network shares.
struct WorkerSetup<'a> {
    attester: &'a AttesterConfig,
    dir: &'a Path,
    ledger_url: Option<&'a str>,
    chain: Option<&'a DevChain>,
    shutdown: &'a CancellationToken,
    /// Give the worker an operator's listener.
    admin: bool,
}

impl WorkerSetup<'_> {
    /// A worker with its own key file and, with a ledger, a payout store it claims from.
    async fn slot(
        &self,
        name: String,
        backend: Arc<dyn Backend>,
        measured: Option<cocoon_tls::MeasuredEvent>,
    ) -> anyhow::Result<WorkerSlot> {
        let key_file = self.dir.join(format!("{name}.key"));
        let (identity, sealing) = cocoon_worker::with_sealing_key(self.attester.identity(
            Some(&key_file),
            "cocoon-worker",
            "worker",
            measured,
        )?)?;
        let identity = Arc::new(identity);
        if let Some(chain) = self.chain {
            chain.enrol(&key_file)?;
        }
        let admin = loopback_admin(self.admin).bind().await?;
        let mut opened = None;
        let payouts = match self.ledger_url {
            Some(url) => {
                let wallet = Arc::new(cocoon_ledger::Wallet::new(identity.signing_key()));
                let ledger = keys::open_ledger(url, wallet.clone(), &identity.key_pkcs8()).await?;
                let store = Arc::new(
                    PayoutStore::open(
                        &self.dir.join(format!("{name}-payouts.json")),
                        wallet.public_key(),
                    )?
                    .with_ledger(ledger.clone()),
                );
                opened = Some(ledger.clone());
                tokio::spawn(cocoon_worker::claim_loop(
                    store.clone(),
                    ledger,
                    Duration::from_secs(2),
                    self.shutdown.clone(),
                ));
                Some(store)
            }
            None => None,
        };
        Ok(WorkerSlot {
            name,
            backend,
            identity,
            sealing: sealing.map(Arc::new),
            admin_addr: admin.as_ref().map(cocoon_admin::AdminListener::local_addr),
            admin,
            stop: None,
            connected: Arc::default(),
            payouts,
            ledger: opened,
        })
    }
}

/// An operator's listener on a free loopback port, when `on`.
fn loopback_admin(on: bool) -> cocoon_admin::AdminConfig {
    cocoon_admin::AdminConfig {
        listen: on.then(|| "127.0.0.1:0".to_owned()),
        token_file: None,
    }
}

fn dev_attester_config(dev_dir: &tempfile::TempDir) -> AttesterConfig {
    attester_in(dev_dir.path())
}

fn attester_in(dir: &Path) -> AttesterConfig {
    AttesterConfig {
        kind: AttesterChoice::Dev,
        dev_key_file: Some(dir.join("dev-attester.key")),
        dev_mrtd: None,
    }
}

/// Allows the models `backend` serves in the dev network's registry (with payments).
async fn allow_models(
    ledger: Option<&DevLedger>,
    chain: Option<&DevChain>,
    backend: &dyn Backend,
) -> anyhow::Result<()> {
    for hash in backend.models().into_iter().filter_map(|c| c.model_hash) {
        if let Some(ledger) = ledger {
            ledger.allow_model(&hash).await?;
        }
        if let Some(chain) = chain {
            chain.allow_model(&hash).await?;
        }
    }
    Ok(())
}

/// The development image's boot registers (MRTD, RTMR0..2), its RTMR3 left to what each node
/// measures: every node of the network measures its own configuration there.
fn dev_policy(dev_key: &str) -> PeerPolicy {
    PeerPolicy {
        require_attestation: true,
        registers: vec![cocoon_tls::Registers::boot_of(&cocoon_attest::dev_image())],
        dev_attester_keys: vec![dev_key.to_owned()],
        ..PeerPolicy::default()
    }
}

/// Options for a test's network: the gateway on a free port too.
pub fn test_options() -> DevOptions {
    DevOptions {
        gateway_listen: "127.0.0.1:0".into(),
        ..Default::default()
    }
}

/// A test's network with one worker per backend, once every worker has joined.
pub async fn network(backends: Vec<Arc<dyn Backend>>) -> DevNetwork {
    let n = u32::try_from(backends.len()).expect("a handful of workers");
    let net = DevNetwork::start(test_options(), backends)
        .await
        .expect("the dev network starts");
    net.wait_ready(n, Duration::from_secs(20))
        .await
        .expect("every worker joins");
    net
}

impl DevNetwork {
    /// A gateway of a test's own on this network's dev attestation, with the key in
    /// `key_file`, trying `proxies` in order; serves until `stop`. Its API's base URL.
    pub async fn own_gateway(
        &self,
        proxies: &[String],
        key_file: PathBuf,
        stop: &CancellationToken,
    ) -> anyhow::Result<String> {
        let gateway = Gateway::bind(
            &ClientConfig {
                listen: "127.0.0.1:0".into(),
                proxy_addr: proxies[0].clone(),
                fallback_proxies: proxies[1..].to_vec(),
                key_file: Some(key_file),
                attester: self.dev_attester(),
                proxy_policy: self.dev_policy(),
                worker_policy: self.options.sealed.then(|| self.dev_policy()),
                ..ClientConfig::default()
            },
            keys::LEDGERS,
        )
        .await?;
        let url = format!("http://{}/v1", gateway.local_addr());
        tokio::spawn(gateway.run(stop.clone()));
        Ok(url)
    }
}
