//! A ledger reached over the network: the [`service`](crate::service) of an embedded ledger.
//! Operations go out signed by this party's [`Wallet`]; the service decides the time.

use std::sync::Arc;
use std::time::Duration;

use crate::error::LedgerError;
use crate::ledger::{Ledger, Receipt, Tx};
use crate::registry::NetworkParams;
use crate::service::{ErrorBody, paths};
use crate::state::LedgerState;
use crate::types::{ClientContract, Network, PublicKey};
use crate::wallet::Wallet;

/// Longest wait for the ledger: a commit is an fsync, so seconds mean trouble.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A ledger served by another process's [`service`](crate::service), reached over HTTP.
pub struct RemoteLedger {
    http: reqwest::Client,
    base: String,
    wallet: Option<Arc<Wallet>>,
    /// Read from the service once: a ledger's network never changes.
    network: tokio::sync::OnceCell<Network>,
}

impl RemoteLedger {
    /// `url` is the service's base, e.g. `http://127.0.0.1:9100`. Without a wallet the ledger
    /// can only be read.
    pub fn new(url: &str, wallet: Option<Arc<Wallet>>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .build()
                .expect("a default HTTP client builds"),
            base: url.trim_end_matches('/').to_owned(),
            wallet,
            network: tokio::sync::OnceCell::new(),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, LedgerError> {
        let response = self.http.get(url).send().await.map_err(unreachable)?;
        self.read(response).await
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, LedgerError> {
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| LedgerError::Unreachable(format!("malformed answer: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(body.error),
            Err(_) => Err(LedgerError::Unreachable(format!(
                "ledger answered {status}"
            ))),
        }
    }
}

fn unreachable(e: reqwest::Error) -> LedgerError {
    LedgerError::Unreachable(e.to_string())
}

#[async_trait::async_trait]
impl Ledger for RemoteLedger {
    /// `tx.now` is ignored: the ledger runs every transaction at its own clock.
    async fn execute(&self, tx: Tx) -> Result<Receipt, LedgerError> {
        let wallet = self
            .wallet
            .as_ref()
            .ok_or_else(|| LedgerError::BadTransaction("no key to sign with".into()))?;
        if wallet.public_key() != tx.sender {
            return Err(LedgerError::BadTransaction(
                "the sender is not this wallet's key".into(),
            ));
        }
        let signed = wallet.sign(tx.op, self.network().await?);
        let response = self
            .http
            .post(format!("{}{}", self.base, paths::TX))
            .json(&signed)
            .send()
            .await
            .map_err(unreachable)?;
        self.read(response).await
    }

    async fn snapshot(&self) -> Result<LedgerState, LedgerError> {
        self.get(&format!("{}{}", self.base, paths::STATE)).await
    }

    async fn params(&self) -> Result<NetworkParams, LedgerError> {
        self.get(&format!("{}{}", self.base, paths::PARAMS)).await
    }

    async fn network(&self) -> Result<Network, LedgerError> {
        let url = format!("{}{}", self.base, paths::NETWORK);
        self.network
            .get_or_try_init(|| self.get(&url))
            .await
            .copied()
    }

    async fn client(
        &self,
        proxy: PublicKey,
        client: PublicKey,
    ) -> Result<Option<ClientContract>, LedgerError> {
        let url = format!(
            "{}{}/{}/{}",
            self.base,
            paths::CLIENTS,
            hex::encode(proxy),
            hex::encode(client)
        );
        self.get(&url).await
    }
}
