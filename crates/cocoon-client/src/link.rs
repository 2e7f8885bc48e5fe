use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cocoon_ledger::{ImageRole, Ledger};
use cocoon_net::{Channel, EventReader};
use cocoon_protocol::{
    ALPN_CLIENT, BillQuery, CandidateQuery, Candidates, ErrorKind, GenerateRequest, LateBill,
    ModelList, ProtocolError, Refund, RequestId, SealedRequest, paths,
};
use cocoon_tls::{Identity, PeerVerifier, Verified};
use tokio::sync::Mutex;

const MODELS_TIMEOUT: Duration = Duration::from_secs(10);
/// A close commits the last charge and the refund on the ledger: two durable transactions.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the proxy may send nothing on an answer: longer than a proxy's own default limit
/// on a silent worker (120 s), so that the proxy's clearer verdict arrives first.
const PROXY_SILENCE: Duration = Duration::from_secs(180);

/// The gateway's connection to its proxy: one multiplexed HTTP/2 connection, opened on first
/// use and reopened after it drops.
pub struct ProxyLink {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    proxy_policy: Arc<dyn PeerVerifier>,
    channel: Mutex<Option<Channel>>,
    /// What the current proxy proved in its handshake, for status output.
    proxy_attestation: std::sync::Mutex<Option<Verified>>,
    /// The current proxy's key: its bills must be signed with it.
    proxy_key: std::sync::Mutex<Option<[u8; 32]>>,
    /// The ledger whose registry must list the proxy's attested image, when the gateway
    /// takes proxy images from it.
    registry: Option<Arc<dyn Ledger>>,
    /// Readings of the registry in a row that failed while connected.
    unreadable: AtomicU32,
}

/// A generation request as it leaves the gateway.
#[derive(Clone, Copy)]
enum Outgoing<'a> {
    Clear(&'a GenerateRequest),
    Sealed(&'a SealedRequest),
}

impl Outgoing<'_> {
    async fn send(
        self,
        channel: &Channel,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        match self {
            Outgoing::Clear(r) => channel.generate(r, id).await,
            Outgoing::Sealed(r) => channel.generate_sealed(r, id).await,
        }
    }
}

/// Failed readings of the registry in a row after which a connected proxy is let go.
const UNREADABLE_READINGS: u32 = 3;

/// What the registry says of a proxy's image.
enum Listing {
    Listed,
    NotListed(ProtocolError),
    Unreadable(ProtocolError),
}

impl ProxyLink {
    /// A link to the proxy at `addr` (`host:port`), which must satisfy the `proxy` policy;
    /// nothing is connected until first use.
    pub fn new(
        addr: impl Into<String>,
        identity: Arc<Identity>,
        proxy: Arc<dyn PeerVerifier>,
    ) -> Self {
        Self {
            addr: addr.into(),
            tls: cocoon_tls::client_config(identity, proxy.clone(), &[ALPN_CLIENT]),
            proxy_policy: proxy,
            channel: Mutex::new(None),
            proxy_attestation: std::sync::Mutex::new(None),
            proxy_key: std::sync::Mutex::new(None),
            registry: None,
            unreadable: AtomicU32::new(0),
        }
    }

    /// Also requires `ledger`'s registry to list the proxy's attested image, before a
    /// prompt is sent and at every [`recheck_registry`](Self::recheck_registry).
    pub fn with_registry(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.registry = Some(ledger);
        self
    }

    /// Whether the registry (when one is required) lists the image `verified` attests. Fails
    /// closed: a proxy with no attested image, or a registry that cannot be read, is refused.
    async fn registry_allows(&self, verified: &Verified) -> Result<(), ProtocolError> {
        match self.listing(verified).await {
            Listing::Listed => Ok(()),
            Listing::NotListed(e) | Listing::Unreadable(e) => Err(e),
        }
    }

    async fn listing(&self, verified: &Verified) -> Listing {
        let Some(ledger) = &self.registry else {
            return Listing::Listed;
        };
        let Some(image) = verified.attestation.as_ref().map(|a| a.image_hash) else {
            return Listing::NotListed(ProtocolError::unavailable(format!(
                "proxy {} refused: it is not attested, so the registry cannot vouch for its image",
                self.addr
            )));
        };
        match ledger
            .image_allowed(ImageRole::Proxy, &image.to_string())
            .await
        {
            Ok(true) => Listing::Listed,
            Ok(false) => Listing::NotListed(ProtocolError::unavailable(format!(
                "proxy {} refused: its image {image} is not among the registry's proxy images",
                self.addr
            ))),
            Err(e) => Listing::Unreadable(ProtocolError::unavailable(format!(
                "proxy {} refused: the registry could not be read to check its image: {e}",
                self.addr
            ))),
        }
    }

    /// Asks the registry again about the connected proxy's image; if it is no longer listed,
    /// the connection is let go (answers under way finish on it; nothing new is sent) and the
    /// reason is returned. `None` when there is nothing to check or the image is still listed.
    pub(crate) async fn recheck_registry(&self) -> Option<ProtocolError> {
        self.registry.as_ref()?;
        let verified = self.proxy_attestation()?;
        if self.channel.lock().await.is_none() {
            return None;
        }
        let refused = match self.listing(&verified).await {
            Listing::Listed => {
                self.unreadable.store(0, Ordering::Relaxed);
                return None;
            }
            Listing::NotListed(e) => e,
            // A proxy already admitted survives a short outage of the ledger; one that lasts
            // (a host blocking it, say) drops it, as a revocation would.
            Listing::Unreadable(e) => {
                let n = self.unreadable.fetch_add(1, Ordering::Relaxed) + 1;
                if n < UNREADABLE_READINGS {
                    tracing::warn!(proxy = %self.addr, reason = %e.message, "registry unreadable; keeping the proxy for now");
                    return None;
                }
                e
            }
        };
        self.unreadable.store(0, Ordering::Relaxed);
        *self.channel.lock().await = None;
        tracing::warn!(proxy = %self.addr, reason = %refused.message, "proxy dropped");
        Some(refused)
    }

    async fn channel(&self) -> Result<Channel, ProtocolError> {
        let mut slot = self.channel.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let tls = cocoon_net::connect_tls(&self.addr, self.tls.clone())
            .await
            .map_err(|e| {
                ProtocolError::unavailable(format!("cannot reach proxy {}: {e}", self.addr))
            })?;
        let certs = tls.get_ref().1.peer_certificates();
        let verified = cocoon_tls::verified_peer(certs, &*self.proxy_policy)
            .map_err(|e| ProtocolError::unavailable(format!("proxy refused: {e}")))?;
        let key = cocoon_tls::peer_identity(certs)
            .and_then(|p| <[u8; 32]>::try_from(p.public_key.as_slice()).ok());
        // Before a byte of a request: the registry must list the proxy's image, if asked. A
        // refused proxy's key is not taken as this link's.
        self.registry_allows(&verified).await?;
        *self.proxy_key.lock().unwrap_or_else(|e| e.into_inner()) = key;
        let (channel, driver) = Channel::handshake(tls)
            .await
            .map_err(|e| ProtocolError::unavailable(format!("proxy {}: {e}", self.addr)))?;
        tokio::spawn(driver);
        tracing::info!(proxy = %self.addr, attestation = verified.mode(), "connected to proxy");
        if verified.is_development() {
            tracing::warn!(
                "the proxy is attested by a DEVELOPMENT quote: it proves nothing about its machine"
            );
        }
        *self
            .proxy_attestation
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(verified);
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// The proxy's address, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The proxy's own status page: its workers, models, prices, load and reputation.
    pub async fn status(&self) -> Result<serde_json::Value, ProtocolError> {
        self.channel()
            .await?
            .get_json(paths::STATUS, MODELS_TIMEOUT)
            .await
    }

    /// The key of the proxy last connected to; `None` before the first connection.
    pub fn proxy_key(&self) -> Option<[u8; 32]> {
        *self.proxy_key.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the proxy proved when last connected; `None` before the first connection.
    pub fn proxy_attestation(&self) -> Option<Verified> {
        self.proxy_attestation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connects, if not connected: the proxy's key is known from then on.
    pub(crate) async fn connect(&self) -> Result<(), ProtocolError> {
        self.channel().await.map(drop)
    }

    /// What the proxy billed this client's request `id`, whose answer ended without its bill.
    pub(crate) async fn late_bill(&self, id: RequestId) -> Result<LateBill, ProtocolError> {
        self.channel()
            .await?
            .post_json(paths::BILL, &BillQuery { id }, MODELS_TIMEOUT)
            .await
    }

    /// Starts a generation through the proxy, under the client's `id` for it if it has one;
    /// an answer that does not start, or stalls, within `PROXY_SILENCE` fails instead of
    /// hanging the app.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        self.open(Outgoing::Clear(request), id).await
    }

    /// [`Self::generate`] for a request sealed to some of the proxy's workers.
    pub async fn generate_sealed(
        &self,
        request: &SealedRequest,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        self.open(Outgoing::Sealed(request), id).await
    }

    /// The workers a sealed request for `query`'s model may be encrypted to, by the proxy's
    /// word (the gateway verifies each).
    pub async fn candidates(&self, query: &CandidateQuery) -> Result<Candidates, ProtocolError> {
        self.channel()
            .await?
            .post_json(paths::CANDIDATES, query, MODELS_TIMEOUT)
            .await
    }

    async fn open(
        &self,
        request: Outgoing<'_>,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        tokio::time::timeout(PROXY_SILENCE, self.start(request, id))
            .await
            .map_err(|_| {
                ProtocolError::unavailable(format!(
                    "the proxy did not start the answer within {} s",
                    PROXY_SILENCE.as_secs()
                ))
            })?
            .map(|events| events.with_silence_limit(PROXY_SILENCE))
    }

    async fn start(
        &self,
        request: Outgoing<'_>,
        id: Option<RequestId>,
    ) -> Result<EventReader, ProtocolError> {
        let channel = self.channel().await?;
        match request.send(&channel, id).await {
            // The proxy closes a connection that has been idle a while (its `idle_timeout`),
            // and a request can cross that close on the wire. The proxy only closes once no
            // request is open, so this one never started there: it is safe to send again on a
            // fresh connection.
            Err(e) if e.kind == ErrorKind::Unavailable && channel.is_closed() => {
                tracing::debug!(error = %e, "proxy connection closed under a request; reconnecting");
                request.send(&self.channel().await?, id).await
            }
            answer => answer,
        }
    }

    /// Asks the proxy to close this client's contract and refund it at once.
    pub async fn close_contract(&self) -> Result<Refund, ProtocolError> {
        self.channel()
            .await?
            .post_json(paths::CLOSE, &serde_json::json!({}), CLOSE_TIMEOUT)
            .await
    }

    /// The models the proxy's workers serve, with their context, prices and worker count.
    pub async fn models(&self) -> Result<ModelList, ProtocolError> {
        self.channel()
            .await?
            .get_json(paths::MODELS, MODELS_TIMEOUT)
            .await
    }
}
