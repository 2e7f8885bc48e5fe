//! The gateway's proxies, in order of preference. A request goes to the first proxy in good
//! standing and moves on to the next when a proxy cannot be reached or cannot start the
//! answer (nothing of it has reached the app yet, so the app never notices). A proxy that
//! failed is passed over for a while that doubles with each failure in a row (1 s up to a
//! minute); when every proxy is in that state they are all tried anyway, in order. A proxy
//! whose bills did not check out `max_bad_bills` times is never tried again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_net::EventReader;
use cocoon_protocol::{ErrorKind, GenerateRequest, ModelList, ProtocolError, RequestId};
use cocoon_tls::{Identity, PeerVerifier};
use parking_lot::Mutex;
use serde::Serialize;

use crate::bill::BillRecord;
use crate::link::ProxyLink;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Standing {
    failures: u32,
    passed_over_until: Option<Instant>,
    last_error: Option<String>,
    answers: u64,
}

/// What `GET /v1/network` shows of one proxy.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyState {
    /// The proxy's address, as configured (`host:port`).
    pub addr: String,
    /// `up` (last contact worked), `down` (passed over for now), `unknown` (not tried) or
    /// `distrusted` (its bills did not check out; never tried again).
    pub state: &'static str,
    /// Its bills that did not check out.
    pub bad_bills: u32,
    /// Times in a row it could not be reached or could not start an answer; 0 after a
    /// success.
    pub failures_in_a_row: u32,
    /// Why it last failed, kept after it recovers; `None` if it never failed.
    pub last_error: Option<String>,
    /// Answers started through it since the gateway started.
    pub answers: u64,
    /// How it attested itself when last connected.
    pub attestation: Option<String>,
    /// Requests whose answers ended without their bill, which it is still to be asked for.
    pub unsettled_bills: usize,
}

/// The gateway's proxies, in the configured order, each with its standing: where requests go,
/// with failover between them.
pub struct ProxyPool {
    links: Vec<(ProxyLink, Mutex<Standing>)>,
    bills: Arc<BillRecord>,
}

fn retryable(e: &ProtocolError) -> bool {
    e.kind == ErrorKind::Unavailable
}

impl ProxyPool {
    /// The proxies at `addrs`, admitted by `policy` and, with `registry`, only while the
    /// ledger's registry lists their attested images.
    pub(crate) fn new(
        addrs: &[String],
        identity: Arc<Identity>,
        policy: Arc<dyn PeerVerifier>,
        bills: Arc<BillRecord>,
        registry: Option<Arc<dyn cocoon_ledger::Ledger>>,
    ) -> Self {
        Self {
            bills,
            links: addrs
                .iter()
                .map(|a| {
                    let mut link = ProxyLink::new(a.clone(), identity.clone(), policy.clone());
                    if let Some(ledger) = &registry {
                        link = link.with_registry(ledger.clone());
                    }
                    (link, Mutex::new(Standing::default()))
                })
                .collect(),
        }
    }

    /// Every `every`, asks the registry again about each connected proxy's image; a proxy
    /// whose image was revoked is let go and passed over like one that failed, so requests go
    /// to the others, and it is refused at its next connection until the image is listed
    /// again.
    pub(crate) async fn watch_registry(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            for (i, (link, _)) in self.links.iter().enumerate() {
                if let Some(refused) = link.recheck_registry().await {
                    self.failed(i, &refused);
                }
            }
        }
    }

    fn distrusted(&self, i: usize) -> bool {
        self.links[i]
            .0
            .proxy_key()
            .is_some_and(|k| self.bills.distrusts(&k))
    }

    /// The proxies in the order to try them now: those in good standing first, none whose
    /// bills it stopped trusting.
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let trusted = (0..self.links.len()).filter(|&i| !self.distrusted(i));
        let (mut good, passed): (Vec<usize>, Vec<usize>) = trusted.partition(|&i| {
            self.links[i]
                .1
                .lock()
                .passed_over_until
                .is_none_or(|t| t <= now)
        });
        good.extend(passed);
        good
    }

    fn failed(&self, i: usize, e: &ProtocolError) {
        let (link, standing) = &self.links[i];
        let mut s = standing.lock();
        s.failures = s.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (s.failures - 1).min(6))
            .min(MAX_BACKOFF);
        s.passed_over_until = Some(Instant::now() + backoff);
        s.last_error = Some(e.message.clone());
        if self.links.len() > 1 {
            tracing::warn!(proxy = %link.addr(), error = %e, secs = backoff.as_secs(), "proxy failed; trying the next one");
        }
    }

    /// Runs `f` on the first proxy, in [`Self::order`], that does not answer `Unavailable`;
    /// its answer and the proxy's index.
    async fn first<'a, T, Fut>(
        &'a self,
        f: impl Fn(&'a ProxyLink) -> Fut,
    ) -> Result<(T, usize), ProtocolError>
    where
        Fut: Future<Output = Result<T, ProtocolError>>,
    {
        let mut last = None;
        for i in self.order() {
            match f(&self.links[i].0).await {
                Ok(v) => {
                    let mut s = self.links[i].1.lock();
                    s.failures = 0;
                    s.passed_over_until = None;
                    return Ok((v, i));
                }
                Err(e) if retryable(&e) => {
                    self.failed(i, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ProtocolError::unavailable(if self.links.is_empty() {
                "no proxy is configured"
            } else {
                "every proxy of this gateway sent bills that did not check out: none is used \
                 until the gateway restarts (see GET /v1/network)"
            })
        }))
    }

    /// Starts a generation on the first proxy that takes it, under the client's `id` for it if
    /// it has one; the link that did, for its key.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
        id: Option<RequestId>,
    ) -> Result<(EventReader, &ProxyLink), ProtocolError> {
        let (events, i) = self.first(|link| link.generate(request, id)).await?;
        self.links[i].1.lock().answers += 1;
        Ok((events, &self.links[i].0))
    }

    /// [`Self::generate`], sealed to workers `sealer` verified on the proxy that takes it.
    pub(crate) async fn generate_sealed(
        &self,
        request: &GenerateRequest,
        id: Option<RequestId>,
        sealer: &crate::sealing::Sealer,
    ) -> Result<(EventReader, &ProxyLink, crate::sealing::SharedOpener), ProtocolError> {
        let ((events, opener), i) = self
            .first(|link| sealer.generate(link, request, id))
            .await?;
        self.links[i].1.lock().answers += 1;
        Ok((events, &self.links[i].0, opener))
    }

    /// The link to the proxy whose key is `key` (hex), connecting the links not connected
    /// yet to learn theirs; `None` if no proxy of this gateway has it now.
    pub(crate) async fn link_for(&self, key: &str) -> Option<&ProxyLink> {
        let has = |link: &ProxyLink| link.proxy_key().is_some_and(|k| hex::encode(k) == key);
        if let Some((link, _)) = self.links.iter().find(|(l, _)| has(l)) {
            return Some(link);
        }
        for (link, _) in self.links.iter().filter(|(l, _)| l.proxy_key().is_none()) {
            if link.connect().await.is_ok() && has(link) {
                return Some(link);
            }
        }
        None
    }

    /// Answers started through the proxy whose key is `key` (hex) since the gateway started.
    pub(crate) fn answers_of(&self, key: &str) -> u64 {
        self.links
            .iter()
            .filter(|(l, _)| l.proxy_key().is_some_and(|k| hex::encode(k) == key))
            .map(|(_, s)| s.lock().answers)
            .sum()
    }

    /// The models of the first proxy that answers.
    pub async fn models(&self) -> Result<ModelList, ProtocolError> {
        Ok(self.first(|link| link.models()).await?.0)
    }

    /// The status of the first proxy that answers, as it reports it, and its address.
    pub async fn status(&self) -> Result<(serde_json::Value, &str), ProtocolError> {
        let (status, i) = self.first(|link| link.status()).await?;
        Ok((status, self.links[i].0.addr()))
    }

    /// The proxy answers go to first now (for the attestation shown beside the models).
    pub fn preferred(&self) -> &ProxyLink {
        &self.links[self.order().first().copied().unwrap_or(0)].0
    }

    /// Every proxy's standing now, in the configured order.
    pub fn states(&self) -> Vec<ProxyState> {
        let now = Instant::now();
        self.links
            .iter()
            .map(|(link, standing)| {
                let s = standing.lock();
                let key = link.proxy_key();
                let bad_bills = key.map_or(0, |k| self.bills.bad_bills(&k));
                let state = if key.is_some_and(|k| self.bills.distrusts(&k)) {
                    "distrusted"
                } else if s.failures > 0 || s.passed_over_until.is_some_and(|t| t > now) {
                    "down"
                } else if link.proxy_key().is_some() {
                    "up"
                } else {
                    "unknown"
                };
                ProxyState {
                    addr: link.addr().to_owned(),
                    state,
                    failures_in_a_row: s.failures,
                    bad_bills,
                    last_error: s.last_error.clone(),
                    answers: s.answers,
                    attestation: link.proxy_attestation().map(|v| v.mode().to_owned()),
                    unsettled_bills: key.map_or(0, |k| self.bills.unsettled_of(&k)),
                }
            })
            .collect()
    }
}
