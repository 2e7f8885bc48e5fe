use std::sync::Arc;
use std::time::Duration;

use cocoon_net::{Channel, EventReader};
use cocoon_protocol::{ALPN_CLIENT, GenerateRequest, ModelList, ProtocolError, paths};
use cocoon_tls::{Identity, PeerVerifier};
use tokio::sync::Mutex;

const MODELS_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's connection to its proxy: one multiplexed HTTP/2 connection, opened on first
/// use and reopened after it drops.
pub struct ProxyLink {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    channel: Mutex<Option<Channel>>,
}

impl ProxyLink {
    pub fn new(
        addr: impl Into<String>,
        identity: Arc<Identity>,
        proxy: Arc<dyn PeerVerifier>,
    ) -> Self {
        Self {
            addr: addr.into(),
            tls: cocoon_tls::client_config(identity, proxy, &[ALPN_CLIENT]),
            channel: Mutex::new(None),
        }
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
        let (channel, driver) = Channel::handshake(tls)
            .await
            .map_err(|e| ProtocolError::unavailable(format!("proxy {}: {e}", self.addr)))?;
        tokio::spawn(driver);
        tracing::info!(proxy = %self.addr, "connected to proxy");
        *slot = Some(channel.clone());
        Ok(channel)
    }

    pub async fn generate(&self, request: &GenerateRequest) -> Result<EventReader, ProtocolError> {
        self.channel().await?.generate(request).await
    }

    pub async fn models(&self) -> Result<ModelList, ProtocolError> {
        self.channel()
            .await?
            .get_json(paths::MODELS, MODELS_TIMEOUT)
            .await
    }
}
