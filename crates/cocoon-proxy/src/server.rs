use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cocoon_ledger::LedgerOpener;
use cocoon_net::{Body, Channel, error_response, json, no_route, response};
use cocoon_protocol::{
    ALPN_CLIENT, ALPN_WORKER, PROTOCOL_VERSION, ProtocolError, WorkerHello, paths,
};
use cocoon_tls::{CacheStats, Fingerprint, Verified};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, Refusal};
use crate::billing::{Billing, PaymentsStatus};
use crate::config::{ProxyConfig, RoutingConfig};
use crate::handshakes::{Handshakes, Place};
use crate::limits::{self, Limiter};
use crate::market::{Offer, Reputation};
use crate::relay;
use crate::workers::{WorkerLink, WorkerSet};
use cocoon_admin::AdminListener;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest body of a client's ask for a bill: one request id.
const LATE_BILL_QUERY_BYTES: usize = 256;
/// How long answers cut at the end of a drain have to settle what they delivered before the
/// last commit.
const SETTLE_AFTER_CUT: Duration = Duration::from_secs(5);

/// A generation request counted in flight (see [`State::request_in_flight`]).
pub(crate) struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
/// Largest candidate query (a model id and a price).
const CANDIDATE_QUERY_BYTES: usize = 4096;
/// The answer length candidates are ranked for (their expected time is part of the score).
const CANDIDATE_TOKENS: u32 = 256;
/// How often changed reputation records are written (penalties are written at once).
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// A bound proxy, ready to serve.
pub struct Proxy {
    listener: TcpListener,
    state: Arc<State>,
    admin: Option<AdminListener>,
}

pub(crate) struct State {
    pub(crate) workers: WorkerSet,
    /// What `/metrics` counts.
    pub(crate) metrics: crate::metrics::SharedMetrics,
    /// Set at shutdown: new requests are refused while the answers in flight finish.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Generation requests from their arrival to the end of their answer's relay (its bill
    /// settled): what a drain waits for.
    pub(crate) requests: Arc<std::sync::atomic::AtomicUsize>,
    /// How long they have (`drain_secs`).
    drain: Duration,
    /// Sees every clear byte of every connection, when a test asks ([`Proxy::with_wire_tap`]).
    tap: std::sync::OnceLock<cocoon_net::WireTap>,
    pub(crate) max_request_bytes: usize,
    tls: Arc<rustls::ServerConfig>,
    fingerprint: Fingerprint,
    /// Client connections (`max_connections`).
    connections: Arc<Semaphore>,
    /// Connections still in their TLS handshake.
    handshakes: Arc<Handshakes>,
    /// Worker connections, apart from the clients'.
    worker_slots: Arc<Semaphore>,
    pub(crate) admission: Admission,
    attestation: &'static str,
    pub(crate) billing: Option<Arc<Billing>>,
    pub(crate) limiter: Arc<Limiter>,
    /// Replaced by a reload: requests and connections from then on use the new one.
    pub(crate) routing: parking_lot::RwLock<Arc<RoutingConfig>>,
    commit_interval: Duration,
    /// How often the registry is asked whether connected workers' models are still allowed.
    registry_refresh: Duration,
    /// Whether workers' attested images must be in the registry too.
    registry_images: bool,
    /// The `[collateral]` fetcher keeping the policies' Intel collateral current, if any.
    pub(crate) collateral: Option<cocoon_collateral::Running>,
    /// Keys the cache scopes handed to workers, so that a scope names no client.
    cache_secret: [u8; 32],
    /// The configuration in force, for reloads and the operator's controls.
    pub(crate) reloadable: crate::reload::Reloadable,
}

impl State {
    /// The prompt-cache scope of `client`'s requests under the gateway's `hint`: a keyed hash,
    /// the same for the same pair while this proxy runs, unguessable for anyone else.
    pub(crate) fn cache_scope(&self, client: &[u8; 32], hint: Option<&str>) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.cache_secret);
        ctx.update(client);
        ctx.update(hint.unwrap_or_default().as_bytes());
        hex::encode(&ctx.finish().as_ref()[..16])
    }
}

/// The proxy's whole status, as its operator sees it on the `[admin]` listener (`GET
/// /status`); clients get only a [`PublicStatus`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProxyStatus {
    /// The proxy's key fingerprint (hex): what clients and workers pin.
    pub fingerprint: String,
    /// The cocoon protocol version the proxy speaks.
    pub protocol_version: u32,
    /// How this proxy attests itself: `tdx`, `dev` (proves nothing) or `none`.
    pub attestation: String,
    /// Counters of the quote cache of the worker policy, when it requires attestation.
    pub worker_quote_cache: Option<CacheStats>,
    /// Intel collateral by platform, when `[collateral]` is set: until when it is in force,
    /// when it is next fetched, the last fetch's error.
    #[serde(default)]
    pub collateral: Vec<cocoon_collateral::PlatformStatus>,
    /// The connected workers, in the order they joined.
    pub workers: Vec<WorkerStatus>,
    /// Models served, with their context, price range and number of workers.
    pub models: Vec<cocoon_protocol::ListedModel>,
    /// The network's floor price per weighted token (nanoton); 0 without payments.
    pub price_floor: u64,
    /// The latest peers refused, and why.
    pub recent_refusals: Vec<Refusal>,
    /// Absent when the proxy takes no payments.
    pub payments: Option<PaymentsStatus>,
}

/// What `GET /cocoon/v1/status` shows a client: what it needs to choose a proxy and a price
/// (the proxy's identity, the models with their prices, the load in aggregate), and nothing of
/// the other peers: no worker's name, key, image or record, no refusal, no ledger. Those are
/// the operator's, on the `[admin]` listener.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PublicStatus {
    /// The proxy's key fingerprint (hex).
    pub fingerprint: String,
    /// The cocoon protocol version the proxy speaks.
    pub protocol_version: u32,
    /// How this proxy attests itself: `tdx`, `dev` (proves nothing) or `none`.
    pub attestation: String,
    /// Models served, with their context, price range and number of workers.
    pub models: Vec<cocoon_protocol::ListedModel>,
    /// The network's floor price per weighted token (nanoton); 0 without payments.
    pub price_floor: u64,
    /// The workers' load, all together.
    pub load: LoadStatus,
}

/// The load of all connected workers together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LoadStatus {
    /// Connected workers.
    pub workers: usize,
    /// Of them, those that answered their last health check.
    pub healthy_workers: usize,
    /// Requests they run at once, together.
    pub capacity: u64,
    /// Requests routed to them and not yet finished, together.
    pub in_flight: u64,
}

impl LoadStatus {
    /// Adds one worker's share.
    fn add(self, healthy: bool, capacity: u32, in_flight: u32) -> Self {
        Self {
            workers: self.workers + 1,
            healthy_workers: self.healthy_workers + usize::from(healthy),
            capacity: self.capacity + u64::from(capacity),
            in_flight: self.in_flight + u64::from(in_flight),
        }
    }
}

/// One connected worker, as the status shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkerStatus {
    /// The name the worker gave itself.
    pub name: String,
    /// The worker's key fingerprint (hex).
    pub fingerprint: String,
    /// The ids of the models it serves.
    pub models: Vec<String>,
    /// What it asks per model, nanoton per weighted token (0: the network's floor).
    pub offers: Vec<OfferStatus>,
    /// Requests it runs at once.
    pub capacity: u32,
    /// Requests routed to it and not yet finished.
    pub in_flight: u32,
    /// Tokens expected of the requests in flight (their `max_tokens`, capped).
    pub in_flight_tokens: u64,
    /// Requests routed to it since it connected.
    pub served: u64,
    /// Whether it answered its last health check (it gets no requests while not).
    pub healthy: bool,
    /// Kept out of routing by the operator (its answers in flight finish).
    #[serde(default)]
    pub disabled: bool,
    /// The worker policy in force no longer admits it: it is routed nothing new and let go
    /// once its answers end (whatever the operator says).
    #[serde(default)]
    pub leaving: bool,
    /// Its measured, time-decayed performance: what routing decides on.
    pub reputation: Reputation,
    /// How the worker proved what it runs: `tdx`, `dev` or `none`.
    pub attestation: String,
    /// The worker's verified image hash, when attested.
    pub image_hash: Option<String>,
    /// The configuration it measured into RTMR3 (hex SHA-256), when it did.
    #[serde(default)]
    pub config_hash: Option<String>,
}

/// What a worker offers for one model, as the status shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct OfferStatus {
    /// The model's id.
    pub model: String,
    /// The worker's context window for it, in tokens.
    pub context_length: u32,
    /// The least it takes, in nanoton per weighted token; 0: the network's floor.
    pub price: u64,
}

impl From<&Offer> for OfferStatus {
    fn from(o: &Offer) -> Self {
        Self {
            model: o.model.clone(),
            context_length: o.context_length,
            price: o.price,
        }
    }
}

impl Proxy {
    /// Binds the listening socket and loads (or creates) the proxy's key. With `[payments]`,
    /// `ledgers` opens the ledger it names: the binary decides which ledgers there are.
    pub async fn bind(config: &ProxyConfig, ledgers: &dyn LedgerOpener) -> anyhow::Result<Self> {
        if config.payments.worker_images_from_registry && config.payments.ledger.is_none() {
            anyhow::bail!(
                "[payments] worker_images_from_registry needs a ledger: it reads the registry"
            );
        }
        let identity = Arc::new(config.attester.identity(
            config.key_file.as_deref(),
            "cocoon-proxy",
            "proxy",
            Some(config.measured()),
        )?);
        config.limits.check()?;
        config.routing.check()?;
        let attestation = identity.attestation_kind().map_or("none", |k| k.as_str());
        let collateral = cocoon_collateral::NodeCollateral::prepare(&config.collateral)?;
        // With the registry's worker images, the policy may list none of its own.
        let worker_policy = config
            .worker_policy
            .registry_images(config.payments.worker_images_from_registry);
        let admission = Admission::new(
            worker_policy.build_with("worker_policy", "worker", &collateral.store)?,
            config
                .client_policy
                .build_with("client_policy", "client", &collateral.store)?,
        );
        let store = collateral.store.clone();
        let collateral = collateral.start().await;
        // The handshake cannot know yet (ALPN is settled with it) whether the peer is a client
        // or a worker: it admits a peer that either policy accepts, and the policy of the role
        // the peer asks for is applied right after. Quote verification is cached, so this
        // costs one verification, not two.
        let tls = cocoon_tls::server_config(
            identity.clone(),
            admission.handshake_verifier(),
            &[ALPN_CLIENT, ALPN_WORKER],
        );
        let billing = match &config.payments.ledger {
            Some(url) => {
                anyhow::ensure!(
                    config.key_file.is_some(),
                    "[payments] needs a key_file: the proxy's contract and every message it \
                     signs are bound to its key, which must outlive the process"
                );
                let wallet = Arc::new(cocoon_ledger::Wallet::new(identity.signing_key()));
                let billing = Billing::open(
                    &config.payments,
                    url,
                    ledgers,
                    wallet,
                    &identity.key_pkcs8(),
                )
                .await?;
                tracing::info!(ledger = %url, book = %config.payments.book.display(), "payments on: record and ledger agree");
                Some(billing)
            }
            None => {
                tracing::warn!("no [payments] ledger configured: this proxy serves for FREE");
                None
            }
        };
        let workers = match config.routing.reputation_path(&config.payments) {
            Some(path) => {
                let market = WorkerSet::persistent(&path)?;
                tracing::info!(file = %path.display(), "worker reputation kept across restarts");
                market
            }
            None => {
                tracing::warn!(
                    "worker reputation is kept in memory only: set [routing] reputation_file \
                     to keep it across restarts"
                );
                WorkerSet::new()
            }
        };
        if let Some(b) = &billing {
            workers.set_floor(b.floor());
        }
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let state = Arc::new(State {
            workers,
            tap: std::sync::OnceLock::new(),
            metrics: Arc::new(crate::metrics::ProxyMetrics::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            requests: Arc::default(),
            drain: Duration::from_secs(config.drain_secs),
            routing: parking_lot::RwLock::new(Arc::new(config.routing.clone())),
            max_request_bytes: config.max_request_bytes,
            tls,
            fingerprint: identity.fingerprint(),
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            handshakes: Handshakes::new(config.limits.handshaking_connections as usize),
            worker_slots: Arc::new(Semaphore::new(config.limits.worker_connections as usize)),
            admission,
            attestation,
            billing,
            limiter: Limiter::new(config.limits.clone()),
            commit_interval: Duration::from_secs(config.payments.commit_interval_secs.max(1)),
            registry_refresh: Duration::from_secs(config.payments.registry_refresh_secs),
            registry_images: config.payments.worker_images_from_registry,
            collateral,
            cache_secret: rand::random(),
            reloadable: crate::reload::Reloadable {
                current: parking_lot::Mutex::new(config.clone()),
                file: std::sync::OnceLock::new(),
                attested: identity.attestation_kind().is_some(),
                store,
                disabled: Default::default(),
            },
        });
        let admin = config.admin.bind().await?;
        if let Some(a) = &admin {
            tracing::info!(addr = %a.local_addr(), "operator's status on the admin listener (GET /status)");
        }
        Ok(Self {
            listener,
            state,
            admin,
        })
    }

    /// Hands `tap` every byte this proxy reads from or writes to any peer, after TLS: what
    /// the proxy itself could see. For tests that prove what a proxy never sees (a sealed
    /// prompt); a proxy's operator can read its memory anyway, so it reveals nothing more.
    pub fn with_wire_tap(self, tap: cocoon_net::WireTap) -> Self {
        let _ = self.state.tap.set(tap);
        self
    }

    /// The address the proxy listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound socket has an address")
    }

    /// The proxy's key fingerprint: what clients and workers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.state.fingerprint
    }

    /// The operator's listener's address, when `[admin] listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminListener::local_addr)
    }

    /// Reloads read `path` (the file this proxy's configuration came from): SIGHUP in
    /// `cocoon proxy`, `POST /reload` on the operator's listener.
    pub fn with_config_file(self, path: std::path::PathBuf) -> Self {
        let _ = self.state.reloadable.file.set(path);
        self
    }

    /// The operator's controls of this proxy while it runs: reload, disable a worker.
    pub fn controls(&self) -> crate::Controls {
        crate::Controls {
            state: self.state.clone(),
        }
    }

    /// A handle on the live worker set (for status pages and tests).
    pub fn status_handle(&self) -> Arc<dyn StatusSource> {
        self.state.clone()
    }

    /// Accepts connections until `shutdown` is cancelled; then refuses new requests, lets the
    /// answers in flight finish (for up to `drain_secs`), makes its last commit and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(addr = %self.local_addr(), fingerprint = %self.state.fingerprint, "proxy listening");
        // Connections end once the answers in flight have (or the drain runs out); commits and
        // housekeeping after that, once the cut answers have settled.
        let cut = CancellationToken::new();
        let stop = CancellationToken::new();
        let commits = self
            .state
            .billing
            .clone()
            .map(|b| tokio::spawn(b.run_commits(self.state.commit_interval, stop.clone())));
        let housekeeping = tokio::spawn(self.state.clone().housekeeping(stop.clone()));
        let registry = tokio::spawn(self.state.clone().watch_registry(stop.clone()));
        if let Some(admin) = self.admin {
            tokio::spawn(crate::admin::serve(admin, self.state.clone(), stop.clone()));
        }
        loop {
            let (tcp, peer_addr) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            // One address may not take every slot: the rest of the network keeps its way in.
            let Some(per_ip) = self.state.limiter.connect(peer_addr.ip()) else {
                tracing::debug!(%peer_addr, "connection refused: too many from this address");
                continue;
            };
            // Handshakes have their own share: a peer is neither client nor worker before it.
            let Some(handshake) = self.state.handshakes.enter(limits::group(peer_addr.ip())) else {
                tracing::debug!(%peer_addr, "connection refused: too many handshakes under way");
                continue;
            };
            let state = self.state.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                let _per_ip = per_ip;
                tokio::select! {
                    _ = state.connection(tcp, peer_addr, handshake) => {}
                    _ = cut.cancelled() => {}
                }
            });
        }
        let answers = self
            .state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst);
        if answers > 0 {
            tracing::info!(
                answers,
                secs = self.state.drain.as_secs(),
                "shutting down: new requests are refused; waiting for the answers in flight"
            );
        }
        if !self.state.drain(self.state.drain).await {
            tracing::warn!(
                answers = self
                    .state
                    .requests
                    .load(std::sync::atomic::Ordering::SeqCst),
                "drain deadline passed: cutting the answers still in flight"
            );
            cut.cancel();
            // A cut answer settles what it delivered: that bill goes in the last commit.
            if !self.state.drain(SETTLE_AFTER_CUT).await {
                tracing::error!(
                    "answers still unsettled after the cut: their bills miss the last commit"
                );
            }
        }
        cut.cancel();
        stop.cancel();
        // The commit loop makes a last commit once shut down.
        if let Some(commits) = commits {
            let _ = commits.await;
        }
        let _ = housekeeping.await;
        registry.abort();
        tracing::info!("proxy stopped");
    }
}

impl State {
    /// Refuses new requests and waits for the requests in flight to end (each answer relayed
    /// and its bill settled), for up to `within`; whether they all did.
    async fn drain(&self, within: Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.draining.store(true, Ordering::SeqCst);
        let in_flight = || self.requests.load(Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        while in_flight() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Counts a generation request in flight until the guard is dropped.
    pub(crate) fn request_in_flight(&self) -> InFlight {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(self.requests.clone())
    }

    /// The worker policy's quote-cache counters, if it has a cache.
    pub(crate) fn worker_cache_stats(&self) -> Option<cocoon_tls::CacheStats> {
        self.admission.workers().cache_stats()
    }
}

/// Read access to the proxy's state from outside the crate.
pub trait StatusSource: Send + Sync {
    /// The whole status as of now: what the operator's `GET /status` answers.
    fn status(&self) -> ProxyStatus;
}

impl StatusSource for State {
    fn status(&self) -> ProxyStatus {
        ProxyStatus {
            fingerprint: self.fingerprint.to_string(),
            protocol_version: PROTOCOL_VERSION,
            attestation: self.attestation.to_owned(),
            worker_quote_cache: self.admission.workers().cache_stats(),
            collateral: self
                .collateral
                .as_ref()
                .map(|c| c.fetcher.status())
                .unwrap_or_default(),
            recent_refusals: self.admission.recent_refusals(),
            payments: self.billing.as_ref().map(|b| b.status()),
            models: self.workers.models().models,
            price_floor: self.workers.floor(),
            // A worker still joining is not shown until its last check passed.
            workers: self
                .workers
                .snapshot()
                .iter()
                .filter(|w| !w.joining())
                .map(|w| WorkerStatus {
                    name: w.name.clone(),
                    fingerprint: w.link.fingerprint.to_string(),
                    models: w.offers_now().into_iter().map(|o| o.model).collect(),
                    offers: w.offers_now().iter().map(OfferStatus::from).collect(),
                    capacity: w.capacity,
                    in_flight: w.in_flight(),
                    in_flight_tokens: w.in_flight_tokens(),
                    served: w.served(),
                    healthy: w.healthy(),
                    disabled: w.disabled(),
                    leaving: w.excluded(),
                    reputation: self.workers.reputation(w),
                    attestation: w.link.attestation.mode().to_owned(),
                    image_hash: w
                        .link
                        .attestation
                        .attestation
                        .as_ref()
                        .map(|a| a.image_hash.to_string()),
                    config_hash: w
                        .link
                        .attestation
                        .attestation
                        .as_ref()
                        .and_then(|a| a.config_hash.clone()),
                })
                .collect(),
        }
    }
}

impl State {
    /// Asks the registry again, every `[payments] registry_refresh_secs`, whether the models
    /// (and, with `worker_images_from_registry`, the image) of each connected worker are still
    /// allowed, and disconnects a worker whose were revoked (its requests go to the others):
    /// no restart needed. What the ledger cannot answer leaves things as they are until the
    /// next round.
    async fn watch_registry(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(billing) = self.billing.clone() else {
            return;
        };
        let every = self.registry_refresh;
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            // Workers serving the same weights ask the ledger once per round.
            let mut models: HashMap<String, Listed> = HashMap::new();
            for worker in self.workers.snapshot() {
                let mut verdicts = vec![self.image_listed(&worker.link.attestation).await];
                for (_, hash) in &worker.link.model_hashes {
                    if !models.contains_key(hash) {
                        models.insert(hash.clone(), model_listed(&billing, hash).await);
                    }
                    verdicts.push(models[hash].clone());
                }
                for verdict in verdicts {
                    let reason = match verdict {
                        Listed::Yes => continue,
                        Listed::Unknown(why) => {
                            tracing::warn!(worker = %worker.name, %why, "cannot read the registry");
                            continue;
                        }
                        Listed::Revoked(what) => format!(
                            "{what} was revoked by the registry while the worker served: it is \
                             not allowed by the registry now"
                        ),
                        Listed::Bad(why) => why,
                    };
                    tracing::warn!(worker = %worker.name, %reason, "disconnecting a worker");
                    self.admission
                        .refused_offer(&worker.link.fingerprint, reason);
                    worker.link.evict.cancel();
                    break;
                }
            }
        }
    }

    /// Keeps the market's floor price in step with the ledger's and writes reputation
    /// changes, at once after a penalty and otherwise every few seconds; once more at
    /// shutdown.
    async fn housekeeping(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SAVE_EVERY) => {}
                _ = self.workers.penalized() => {}
                _ = shutdown.cancelled() => break,
            }
            self.tidy(false).await;
        }
        self.tidy(true).await;
    }

    /// With `last`, the reputation file is released after the save.
    async fn tidy(self: &Arc<Self>, last: bool) {
        if let Some(b) = &self.billing {
            self.workers.set_floor(b.floor());
        }
        let state = self.clone();
        let save = move || match last {
            true => state.workers.close(),
            false => state.workers.save(),
        };
        match tokio::task::spawn_blocking(save).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save worker reputation"),
            Err(e) => tracing::warn!(error = %e, "reputation save panicked"),
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer_addr: SocketAddr,
        handshake: Place,
    ) {
        let tls = tokio::select! {
            tls = cocoon_net::accept_tls(
                tcp,
                self.tls.clone(),
                self.limiter.config().handshake_timeout(),
            ) => tls,
            () = handshake.displaced() => {
                tracing::debug!(%peer_addr, "TLS handshake given up: its place went to a newer one");
                return;
            }
        };
        drop(handshake);
        let tls = match tls {
            Ok(tls) => tls,
            Err(e) => {
                tracing::debug!(%peer_addr, error = %e, "TLS handshake failed");
                return;
            }
        };
        let (_, conn) = tls.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        // A worker's is offered to gateways, which verify it themselves before sealing a
        // request to it.
        let certificate = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default();
        let Some(peer) = cocoon_tls::peer_identity(conn.peer_certificates()) else {
            tracing::debug!(%peer_addr, "peer presented no usable certificate");
            return;
        };
        match alpn.as_deref() {
            Some(ALPN_CLIENT) => {
                let admitted_at = Arc::new(std::sync::atomic::AtomicU64::new(
                    self.admission.generation(),
                ));
                let Ok(verified) = self.admission.client(&peer) else {
                    return;
                };
                tracing::debug!(%peer_addr, client = %peer.fingerprint, attestation = verified.mode(), "client connected");
                let Some(client) = ed25519_key(&peer.public_key) else {
                    return;
                };
                let Ok(_slot) = self.connections.clone().try_acquire_owned() else {
                    tracing::debug!(%peer_addr, "client connection refused: max_connections reached");
                    return;
                };
                let state = self.clone();
                let idle = Some(self.limiter.config().idle_timeout());
                // Only what uses the network keeps a client's connection: a POST the proxy
                // carries out (generating, closing the contract; a refused one or one to a path
                // that does not exist is no activity). Status and model reads every few minutes
                // would hold a slot for ever.
                let _ = cocoon_net::serve_h2_counting(
                    cocoon_net::Tapped::new(tls, self.tap.get().cloned()),
                    idle,
                    |req| req.method() == Method::POST,
                    move |req| {
                        let (state, peer, admitted_at) =
                            (state.clone(), peer.clone(), admitted_at.clone());
                        async move {
                            // A reload may have narrowed the client policy since it connected.
                            if let Err(e) = state.admission.client_still(&peer, &admitted_at) {
                                return error_response(&ProtocolError::unavailable(format!(
                                    "this proxy's client policy no longer admits this client: {e}"
                                )));
                            }
                            state.client_request(client, req).await
                        }
                    },
                )
                .await;
            }
            Some(ALPN_WORKER) => {
                let Ok(verified) = self.admission.worker(&peer) else {
                    return;
                };
                let Some(key) = ed25519_key(&peer.public_key) else {
                    return;
                };
                let Ok(_slot) = self.worker_slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer_addr, "worker connection refused: [limits] worker_connections reached");
                    return;
                };
                let who = (peer.fingerprint, key, certificate);
                let tls = cocoon_net::Tapped::new(tls, self.tap.get().cloned());
                self.worker_connection(tls, who, verified, peer_addr).await;
            }
            _ => tracing::debug!(%peer_addr, "peer offered no cocoon protocol"),
        }
    }

    async fn worker_connection(
        &self,
        tls: cocoon_net::Tapped<cocoon_net::ServerTls>,
        (fingerprint, public_key, certificate): (Fingerprint, [u8; 32], Vec<u8>),
        attestation: Verified,
        peer_addr: SocketAddr,
    ) {
        let (channel, driver) = match Channel::handshake(tls).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer_addr, error = %e, "worker HTTP/2 handshake failed");
                return;
            }
        };
        let driver = tokio::spawn(driver);
        let hello: WorkerHello = match channel.get_json(paths::HELLO, HELLO_TIMEOUT).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%peer_addr, error = %e, "worker did not say hello");
                driver.abort();
                return;
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(%peer_addr, version = hello.protocol_version, "worker speaks another protocol version");
            driver.abort();
            return;
        }
        if let Some(reason) = self.image_listed(&attestation).await.refusal() {
            tracing::warn!(worker = %hello.name, %reason, "refused a worker");
            self.admission.refused_offer(&fingerprint, reason);
            driver.abort();
            return;
        }
        let models = self.allowed_models(&hello, &fingerprint).await;
        if models.is_empty() && !hello.models.is_empty() {
            tracing::warn!(worker = %hello.name, "no model the worker serves is allowed by the registry");
            driver.abort();
            return;
        }
        let floor = self.billing.as_ref().map(|b| b.floor());
        let (offers, refused) = self.limiter.offers(&models, floor);
        for reason in &refused {
            tracing::warn!(worker = %hello.name, %reason, "refused a worker's offer");
        }
        let evict = CancellationToken::new();
        // In the market before its last check, held out of routing: a reload from here on
        // checks it with every other worker, and one before has put the policy in force.
        let entry = self.workers.add_joining(
            public_key,
            hello.name.clone(),
            hello.capacity,
            offers,
            WorkerLink {
                fingerprint,
                certificate: parking_lot::Mutex::new(certificate),
                attestation,
                channel,
                evict: evict.clone(),
                overreports: Default::default(),
                model_hashes: models
                    .iter()
                    .filter_map(|m| Some((m.id.clone(), m.model_hash.clone()?)))
                    .collect(),
            },
        );
        entry.link.renew_certificate(&hello);
        // Admitted at its handshake, maybe under a policy a reload replaced since.
        if let Err(why) = self.still_admitted(&entry) {
            tracing::warn!(worker = %hello.name, reason = %why, "the worker policy in force no longer admits a joining worker");
            self.workers.remove(entry.id);
            driver.abort();
            return;
        }
        if self.reloadable.disabled.lock().contains(&fingerprint) {
            tracing::info!(worker = %hello.name, "the operator disabled this worker: it is routed nothing");
            entry.set_disabled(true);
        }
        entry.joined();
        if entry.link.attestation.is_development() {
            tracing::warn!(worker = %hello.name, "worker is attested by a DEVELOPMENT quote: it proves nothing about its machine");
        }
        tracing::info!(worker = %hello.name, %fingerprint, attestation = entry.link.attestation.mode(), offers = ?entry.offers_now().iter().map(|o| (o.model.clone(), o.price)).collect::<Vec<_>>(), "worker joined");
        // A worker that missed payouts while away gets the latest, which covers them all.
        if let Some(payout) = self
            .billing
            .as_ref()
            .and_then(|b| b.latest_payout(&public_key))
        {
            crate::relay::send_payout(&entry, payout);
        }
        let mut driver = driver;
        let routing = self.routing.read().clone();
        let repriced = |said: &WorkerHello| self.follow_prices(&entry, said);
        tokio::select! {
            _ = &mut driver => {}
            _ = crate::workers::watch(&self.workers, &entry, &routing, repriced) => {}
        }
        // Evicted or gone: its streams fail now, and it gets no new ones.
        entry.set_healthy(false);
        driver.abort();
        self.workers.remove(entry.id);
        tracing::info!(worker = %hello.name, "worker left");
    }

    async fn client_request(
        self: Arc<Self>,
        client: [u8; 32],
        req: Request<Incoming>,
    ) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, paths::MODELS) => response(StatusCode::OK, json(&self.workers.models())),
            (&Method::GET, paths::STATUS) => response(StatusCode::OK, json(&self.public_status())),
            (&Method::POST, paths::GENERATE) => relay::generate(&self, client, req, false).await,
            (&Method::POST, paths::SEALED) => relay::generate(&self, client, req, true).await,
            (&Method::POST, paths::CANDIDATES) => match self.candidates(req.into_body()).await {
                Ok(candidates) => response(StatusCode::OK, json(&candidates)),
                Err(e) => error_response(&e),
            },
            (&Method::POST, paths::BILL) => match self.late_bill(client, req.into_body()).await {
                Ok(bill) => response(StatusCode::OK, json(&bill)),
                Err(e) => error_response(&e),
            },
            (&Method::POST, paths::CLOSE) => match self.close(client).await {
                Ok(refund) => response(StatusCode::OK, json(&refund)),
                Err(e) => error_response(&e),
            },
            (method, path) => no_route(method, path),
        }
    }

    /// With `worker_images_from_registry`, what the registry says of the worker's attested
    /// image (an unattested worker has none); [`Listed::Yes`] without it.
    async fn image_listed(&self, attestation: &Verified) -> Listed {
        let (Some(billing), true) = (&self.billing, self.registry_images) else {
            return Listed::Yes;
        };
        let Some(image) = attestation.attestation.as_ref().map(|a| a.image_hash) else {
            return Listed::Bad("not attested, and the registry allows images only".into());
        };
        Listed::of(
            billing.worker_image_allowed(&image.to_string()).await,
            &format!("image {image}"),
        )
    }

    /// The models of `hello` the network allows: on a ledger, only those whose weights' hash
    /// the registry lists (a model without a hash, or one the ledger cannot confirm, is not
    /// served: prompts go only to allowed weights). Each refusal is in the operator's status.
    async fn allowed_models(
        &self,
        hello: &WorkerHello,
        fingerprint: &Fingerprint,
    ) -> Vec<cocoon_protocol::ModelCard> {
        let Some(billing) = &self.billing else {
            return hello.models.clone();
        };
        let mut allowed = Vec::new();
        for card in &hello.models {
            let verdict = match &card.model_hash {
                None => Listed::Bad("announces no model hash".to_owned()),
                Some(hash) => model_listed(billing, hash).await,
            };
            match verdict.refusal() {
                None => allowed.push(card.clone()),
                Some(why) => {
                    let reason = format!("model {}: {why}", card.id);
                    tracing::warn!(worker = %hello.name, %reason, "refused a worker's model");
                    self.admission.refused_offer(fingerprint, reason);
                }
            }
        }
        allowed
    }

    /// Whether the worker policy in force admits `entry`, on the certificate it presented.
    pub(crate) fn still_admitted(&self, entry: &crate::WorkerEntry) -> Result<(), String> {
        let der = entry.link.certificate.lock().clone();
        let peer = cocoon_tls::PeerCertificate::parse(
            &rustls::pki_types::CertificateDer::from(der),
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| e.to_string())?;
        self.admission
            .worker(&peer)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Takes the prices a connected worker's latest hello asks (its owner changed them), each
    /// within `[limits] max_price_floors` as at join; a price above it is refused, the old
    /// one staying, with the reason in the operator's status.
    fn follow_prices(&self, entry: &Arc<crate::WorkerEntry>, said: &WorkerHello) {
        let floor = self.billing.as_ref().map(|b| b.floor());
        for card in &said.models {
            let Some(now) = entry.offer(&card.id) else {
                continue;
            };
            if now.price == card.min_price {
                continue;
            }
            let (_, refused) = self.limiter.offers(std::slice::from_ref(card), floor);
            if let Some(reason) = refused.into_iter().next() {
                tracing::warn!(worker = %entry.name, %reason, "refused a worker's new price");
                self.admission
                    .refused_offer(&entry.link.fingerprint, format!("new price: {reason}"));
                continue;
            }
            if self.workers.reprice(entry, &card.id, card.min_price) {
                tracing::info!(worker = %entry.name, model = %card.id, from = now.price, to = card.min_price, "worker changed its price");
            }
        }
    }

    /// What a client may see, built without what only the operator's status needs (the
    /// book's figures, every worker's record): clients may ask often.
    fn public_status(&self) -> PublicStatus {
        PublicStatus {
            fingerprint: self.fingerprint.to_string(),
            protocol_version: PROTOCOL_VERSION,
            attestation: self.attestation.to_owned(),
            models: self.workers.models().models,
            price_floor: self.workers.floor(),
            load: self
                .workers
                .snapshot()
                .iter()
                .filter(|w| !w.joining())
                .fold(LoadStatus::default(), |l, w| {
                    l.add(w.healthy(), w.capacity, w.in_flight())
                }),
        }
    }

    /// The workers a sealed request for a model may be encrypted to: the market's best few
    /// within the client's price, each with the certificate it presented here (the gateway
    /// verifies it against its own policy).
    /// Not counted against the client's rate: as cheap as a model list, and fetched once per
    /// model every few seconds beside the requests that are counted.
    async fn candidates(
        &self,
        body: Incoming,
    ) -> Result<cocoon_protocol::Candidates, ProtocolError> {
        use base64::Engine as _;
        let query: cocoon_protocol::CandidateQuery =
            cocoon_net::read_json(body, CANDIDATE_QUERY_BYTES).await?;
        self.workers
            .can_serve(&query.model, query.max_price)
            .map_err(|no| crate::relay::no_pick(no, &query.model, query.max_price))?;
        let candidates = self
            .workers
            .candidates(
                &query.model,
                query.max_price,
                CANDIDATE_TOKENS,
                cocoon_protocol::MAX_CANDIDATES,
            )
            .into_iter()
            .map(|w| cocoon_protocol::Candidate {
                worker: w.link.fingerprint.to_string(),
                certificate: base64::engine::general_purpose::STANDARD
                    .encode(&*w.link.certificate.lock()),
            })
            .filter(|c| !c.certificate.is_empty())
            .collect();
        Ok(cocoon_protocol::Candidates { candidates })
    }

    /// The bill of one of `client`'s requests, which it asks for by the request's id. Counts
    /// against the client's rate and requests in flight: each ask reads the book.
    async fn late_bill(
        &self,
        client: [u8; 32],
        body: Incoming,
    ) -> Result<cocoon_protocol::LateBill, ProtocolError> {
        let Some(billing) = &self.billing else {
            return Err(ProtocolError::invalid(
                "this proxy takes no payments: it bills nothing",
            ));
        };
        let _permit = self.limiter.permit(client)?;
        let query: cocoon_protocol::BillQuery =
            cocoon_net::read_json(body, LATE_BILL_QUERY_BYTES).await?;
        billing.late_bill(client, query.id).await
    }

    /// Closes `client`'s contract with the proxy's cooperation. A close counts against the
    /// client's rate and requests in flight like a generation: each may cost the proxy a
    /// ledger read, and a transaction.
    async fn close(&self, client: [u8; 32]) -> Result<cocoon_protocol::Refund, ProtocolError> {
        let Some(billing) = &self.billing else {
            return Err(ProtocolError::invalid(
                "this proxy takes no payments: there is no contract to close",
            ));
        };
        let _permit = self.limiter.permit(client)?;
        billing.refund(client).await
    }
}

/// Every cocoon key is Ed25519 (the verifier refuses others), 32 bytes raw.
fn ed25519_key(raw: &[u8]) -> Option<[u8; 32]> {
    raw.try_into().ok()
}

/// What the registry says of one hash a worker serves with.
#[derive(Debug, Clone)]
enum Listed {
    Yes,
    /// Not listed (or no longer): what.
    Revoked(String),
    /// Nothing the registry could list, and why.
    Bad(String),
    /// The ledger could not say (a worker joining is refused; one serving keeps serving).
    Unknown(String),
}

impl Listed {
    /// The ledger's answer about `what`.
    fn of(answer: Result<bool, cocoon_ledger::LedgerError>, what: &str) -> Self {
        match answer {
            Ok(true) => Listed::Yes,
            Ok(false) => Listed::Revoked(what.to_owned()),
            Err(e) => Listed::Unknown(format!("{what} could not be checked: {e}")),
        }
    }

    /// Why a worker joining is refused, if it is.
    fn refusal(self) -> Option<String> {
        match self {
            Listed::Yes => None,
            Listed::Revoked(what) => Some(format!("{what} is not allowed by the registry")),
            Listed::Bad(why) | Listed::Unknown(why) => Some(why),
        }
    }
}

/// What the registry says of the model weights hashing to `hash`: named as the registry and
/// bills name them (64 lowercase hex digits), whatever a ledger would accept.
async fn model_listed(billing: &Billing, hash: &str) -> Listed {
    if !cocoon_protocol::is_model_hash(hash) {
        return Listed::Bad(format!(
            "model hash {hash:?} is not 64 lowercase hex digits"
        ));
    }
    Listed::of(
        billing.model_allowed(hash).await,
        &format!("model hash {hash}"),
    )
}
