//! The worker role: serves inference backends to one proxy or several at once.
//!
//! A worker dials out to each of its proxies (so it can sit behind NAT), then serves HTTP/2 on
//! that connection: the proxy sends it generation requests over streams it opens. When a
//! connection drops, the worker reconnects with jittered backoff. The backends are shared by
//! every connection. This crate owns those loops, the worker's configuration and its
//! operator's controls (pause, prices), the routing of requests to the right backend by model,
//! and the payouts its proxies sign for it (kept durably, claimed on the ledger).
//!
//! The backends come in built, as `Arc<dyn Backend>`: whatever starts the worker (the
//! `cocoon` binary) turns each [`BackendConfig`] into one. So this crate, and every test of
//! it, depends only on the `Backend` trait and never builds or links llama.cpp.

mod admin;
mod config;
mod metrics;
mod payouts;
mod router;
mod sealing;
mod service;
mod shape;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cocoon_engine::Backend;
use cocoon_protocol::ALPN_WORKER;
use cocoon_tls::{Identity, PeerVerifier, Verified};
use tokio_util::sync::CancellationToken;

pub use config::{BackendConfig, PriceConfig, WorkerConfig};
pub use metrics::WorkerMetrics;
pub use payouts::{Earnings, PayoutStore, PayoutsConfig, claim_loop};
pub use router::ModelRouter;
pub use sealing::{Sealing, with_sealing_key};

/// First wait before reconnecting; doubles up to the configured maximum.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Why the registry check refused a proxy.
enum Refused {
    /// Not attested, or its image is not listed.
    NotListed(std::io::Error),
    /// The registry could not be read.
    Unreadable(std::io::Error),
}

impl Refused {
    fn into_error(self) -> std::io::Error {
        match self {
            Self::NotListed(e) | Self::Unreadable(e) => e,
        }
    }
}

/// A worker ready to run.
pub struct Worker {
    name: String,
    /// `proxy_addr`, then any further proxies served at once.
    proxies: Vec<String>,
    backend: Arc<dyn Backend>,
    tls: Arc<rustls::ClientConfig>,
    proxy_policy: Arc<dyn PeerVerifier>,
    max_backoff: Duration,
    /// Connected to at least one proxy.
    connected: Arc<AtomicBool>,
    /// Connected to each of `proxies`, in their order (set once [`Self::run`] starts).
    links: Arc<parking_lot::Mutex<Vec<bool>>>,
    payouts: Option<Arc<PayoutStore>>,
    /// What it asks; the operator may change it while it runs (each proxy follows at its
    /// next health check).
    prices: Arc<parking_lot::RwLock<PriceConfig>>,
    /// Set by the operator: no new request is taken (answers in flight finish), as while
    /// draining, until resumed.
    paused: Arc<AtomicBool>,
    /// The ledger whose registry must list the proxy's attested image, and how often it is
    /// read again while connected.
    registry: Option<(Arc<dyn cocoon_ledger::Ledger>, Duration)>,
    /// Opens sealed requests (see [`with_sealing_key`]).
    sealing: Option<Arc<Sealing>>,
    identity: Arc<Identity>,
    metrics: WorkerMetrics,
    /// How long answers in flight may take to finish once stopped.
    drain: Duration,
    /// Set once stopped: new requests are refused.
    draining: Arc<AtomicBool>,
}

impl Worker {
    /// `proxy` decides which proxies this worker will serve (a pinned key, later an attested
    /// image).
    pub fn new(
        name: impl Into<String>,
        proxy_addr: impl Into<String>,
        backend: Arc<dyn Backend>,
        identity: Arc<Identity>,
        proxy: Arc<dyn PeerVerifier>,
        max_backoff: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            proxies: vec![proxy_addr.into()],
            backend,
            tls: cocoon_tls::client_config(identity.clone(), proxy.clone(), &[ALPN_WORKER]),
            identity,
            proxy_policy: proxy,
            max_backoff,
            connected: Arc::default(),
            links: Arc::default(),
            payouts: None,
            prices: Arc::default(),
            paused: Arc::default(),
            registry: None,
            sealing: None,
            metrics: WorkerMetrics::default(),
            drain: Duration::ZERO,
            draining: Arc::default(),
        }
    }

    /// Serves a proxy only while `ledger`'s registry lists its attested image: checked before
    /// serving and every `every` while connected.
    pub fn with_registry(
        mut self,
        ledger: Arc<dyn cocoon_ledger::Ledger>,
        every: Duration,
    ) -> Self {
        self.registry = Some((ledger, every));
        self
    }

    /// Whether the registry (when one is required) lists the image `verified` attests; fails
    /// closed when the proxy is not attested or the registry cannot be read.
    async fn registry_allows(&self, addr: &str, verified: &Verified) -> Result<(), Refused> {
        let Some((ledger, _)) = &self.registry else {
            return Ok(());
        };
        let refused = |why: String| std::io::Error::other(format!("proxy {addr} refused: {why}"));
        let Some(image) = verified.attestation.as_ref().map(|a| a.image_hash) else {
            return Err(Refused::NotListed(refused(
                "it is not attested, so the registry cannot vouch for its image".into(),
            )));
        };
        match ledger
            .image_allowed(cocoon_ledger::ImageRole::Proxy, &image.to_string())
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refused::NotListed(refused(format!(
                "its image {image} is not among the registry's proxy images"
            )))),
            Err(e) => Err(Refused::Unreadable(refused(format!(
                "the registry could not be read to check its image: {e}"
            )))),
        }
    }

    /// Resolves, with the reason, once the registry no longer lists the proxy's image (or
    /// cannot be read three times in a row: a short outage keeps the proxy, a lasting one
    /// does not); never without a registry to read.
    async fn revoked(&self, addr: &str, verified: &Verified) -> std::io::Error {
        let Some((_, every)) = &self.registry else {
            return std::future::pending().await;
        };
        let mut unreadable = 0;
        loop {
            tokio::time::sleep(*every).await;
            match self.registry_allows(addr, verified).await {
                Ok(()) => unreadable = 0,
                Err(Refused::Unreadable(e)) if unreadable + 1 < 3 => {
                    unreadable += 1;
                    tracing::warn!(proxy = %addr, error = %e, "registry unreadable; serving the proxy for now");
                }
                Err(Refused::NotListed(e) | Refused::Unreadable(e)) => return e,
            }
        }
    }

    /// Lets answers in flight finish for up to `drain` once stopped (new requests are refused
    /// meanwhile) instead of closing the connection at once.
    pub fn with_drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Serves requests sealed to this worker, with the key `sealing` holds (which must be the
    /// one the identity's claims name: see [`with_sealing_key`]).
    pub fn with_sealing(mut self, sealing: Option<Arc<Sealing>>) -> Self {
        self.sealing = sealing;
        self
    }

    /// Asks these prices (the network's floor by default).
    pub fn with_prices(self, prices: PriceConfig) -> Self {
        *self.prices.write() = prices;
        self
    }

    /// Puts `prices` in force while the worker runs (its configuration file reloaded): each
    /// proxy follows at its next health check. The handle stays valid after [`Self::run`]
    /// takes the worker.
    pub fn price_setter(&self) -> impl Fn(PriceConfig) + Send + Sync + 'static {
        let prices = self.prices.clone();
        move |new| *prices.write() = new
    }

    /// Also serves each of `proxies` at the same time, over a connection of its own with the
    /// same proxy policy; the backends' capacity is shared by all of them.
    pub fn with_more_proxies(mut self, proxies: Vec<String>) -> Self {
        self.proxies.extend(proxies);
        self
    }

    /// Keeps the payouts the proxy sends in `store` (without one they are refused).
    pub fn with_payouts(mut self, store: Arc<PayoutStore>) -> Self {
        self.payouts = Some(store);
        self
    }

    /// What this worker counts, for its `/metrics`.
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// Whether the worker is connected to its proxy now.
    pub fn connected_flag(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }

    /// The backend this worker serves requests with.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Stopped: refuses new requests and keeps serving the connection (`attempt`) until the
    /// answers in flight have ended or `drain` has passed.
    async fn drain_answers(&self, attempt: std::pin::Pin<&mut impl std::future::Future>) {
        self.draining.store(true, Ordering::SeqCst);
        let in_flight = self.metrics.in_flight();
        if in_flight == 0 || self.drain.is_zero() {
            return;
        }
        tracing::info!(
            answers = in_flight,
            secs = self.drain.as_secs(),
            "stopping: new requests are refused; waiting for the answers in flight"
        );
        let idle = async {
            while self.metrics.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = attempt => {}
            () = idle => {}
            () = tokio::time::sleep(self.drain) => {
                tracing::warn!(answers = self.metrics.in_flight(), "drain deadline passed: cutting the answers still in flight");
            }
        }
    }

    /// Serves every proxy until `shutdown` is cancelled, each over its own connection,
    /// reconnecting whenever one drops; then lets the answers in flight finish (see
    /// [`Self::with_drain`]).
    pub async fn run(self, shutdown: CancellationToken) {
        *self.links.lock() = vec![false; self.proxies.len()];
        let this = Arc::new(self);
        let service = service::WorkerService::of(&this);
        let loops: Vec<_> = (0..this.proxies.len())
            .map(|i| tokio::spawn(this.clone().serve(i, service.clone(), shutdown.clone())))
            .collect();
        for l in loops {
            let _ = l.await;
        }
        tracing::info!("worker stopped");
    }

    /// Records whether the connection to proxy `i` is up; `connected` is whether any is.
    fn set_link(&self, i: usize, up: bool) {
        let mut links = self.links.lock();
        links[i] = up;
        self.connected
            .store(links.iter().any(|&l| l), Ordering::SeqCst);
    }

    /// Serves proxy `i` until `shutdown`, reconnecting with jittered backoff.
    async fn serve(
        self: Arc<Self>,
        i: usize,
        service: service::WorkerService,
        shutdown: CancellationToken,
    ) {
        let addr = self.proxies[i].clone();
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let attempt = async {
                let tls = cocoon_net::connect_tls(&addr, self.tls.clone()).await?;
                let certs = tls.get_ref().1.peer_certificates();
                let verified = cocoon_tls::verified_peer(certs, &*self.proxy_policy)
                    .map_err(|e| std::io::Error::other(format!("proxy refused: {e}")))?;
                let proxy_key = cocoon_tls::peer_identity(certs)
                    .and_then(|p| <[u8; 32]>::try_from(p.public_key.as_slice()).ok())
                    .ok_or_else(|| std::io::Error::other("the proxy has no Ed25519 key"))?;
                // Before serving a single request: the registry must list the proxy's image,
                // if asked.
                self.registry_allows(&addr, &verified)
                    .await
                    .map_err(Refused::into_error)?;
                tracing::info!(proxy = %addr, attestation = verified.mode(), "connected to proxy");
                self.set_link(i, true);
                let service = service.for_proxy(proxy_key);
                let result = tokio::select! {
                    served = cocoon_net::serve_h2(tls, None, move |req| service.clone().handle(req)) => {
                        served.map_err(std::io::Error::other)
                    }
                    // Revoked while connected: the connection is closed (requests under way
                    // end with it), and the next one is refused until the image is listed.
                    revoked = self.revoked(&addr, &verified) => Err(revoked),
                };
                self.set_link(i, false);
                result
            };
            let started = tokio::time::Instant::now();
            let mut attempt = std::pin::pin!(attempt);
            tokio::select! {
                result = &mut attempt => match result {
                    Ok(()) => tracing::warn!(proxy = %addr, "proxy closed the connection"),
                    Err(e) => tracing::warn!(proxy = %addr, error = %e, "connection to proxy failed"),
                },
                _ = shutdown.cancelled() => {
                    self.drain_answers(attempt).await;
                    break;
                }
            }
            self.set_link(i, false);
            // A connection that lived a while was healthy: start over with a short wait.
            if started.elapsed() > Duration::from_secs(30) {
                backoff = INITIAL_BACKOFF;
            }
            // Jittered, so that the workers of a proxy that restarts do not all come back in
            // the same instant.
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}
