//! The dev network's money: an embedded ledger served on loopback, with the proxy registered
//! and staked and the gateway's client contract funded, so requests are billed from the first
//! one exactly as they would be on a real ledger. Development TON: deposits here mint it.

use std::path::Path;
use std::sync::Arc;

use cocoon_ledger::{EmbeddedLedger, Ledger, Nanoton, NetworkParams, Op, PublicKey, Tx, unix_now};
use tokio_util::sync::CancellationToken;

/// One TON in nanotons (10^9).
pub const TON: Nanoton = 1_000_000_000;
/// What the dev client starts with, and how much of it is staked.
pub const CLIENT_DEPOSIT: Nanoton = 100 * TON;
/// Part of [`CLIENT_DEPOSIT`] the dev client stakes in its contract.
pub const CLIENT_STAKE: Nanoton = 10 * TON;
/// Stake the dev proxy opens its contract with.
pub const PROXY_STAKE: Nanoton = 50 * TON;

/// The network's prices, with close delays short enough to try closing by hand.
pub fn dev_params() -> NetworkParams {
    NetworkParams {
        client_close_delay: 60,
        proxy_close_delay: 120,
        ..NetworkParams::default()
    }
}

pub use super::keys::key_wallet;

/// The dev network's embedded ledger, served over HTTP on loopback, with dev network parameters
/// set.
pub struct DevLedger {
    /// Base URL the nodes reach the ledger service at (`http://127.0.0.1:<port>`).
    pub url: String,
    /// The ledger itself, for running operations in process.
    pub ledger: Arc<EmbeddedLedger>,
    owner: PublicKey,
}

impl DevLedger {
    /// Opens `dir/ledger.redb` owned by `dir/owner.key` and serves it until `shutdown`.
    pub async fn start(dir: &Path, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let owner = key_wallet(&dir.join("owner.key"))?.public_key();
        let ledger = Arc::new(EmbeddedLedger::open(&dir.join("ledger.redb"), owner)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(cocoon_ledger::service::serve(
            ledger.clone(),
            listener,
            async move { shutdown.cancelled().await },
        ));
        let dev = Self { url, ledger, owner };
        dev.exec(
            owner,
            Op::SetParams {
                params: dev_params(),
            },
        )
        .await?;
        Ok(dev)
    }

    /// Runs `op` as `sender`, in process: the dev network holds every key.
    pub async fn exec(&self, sender: PublicKey, op: Op) -> anyhow::Result<()> {
        self.ledger
            .execute(Tx {
                sender,
                op,
                now: unix_now(),
            })
            .await?;
        Ok(())
    }

    /// The owner allows workers to serve the model whose weights hash to `hash`.
    pub async fn allow_model(&self, hash: &str) -> anyhow::Result<()> {
        self.exec(self.owner, Op::AllowModel { hash: hash.into() })
            .await
    }

    /// Registers the proxy at `address` and opens its contract with its stake.
    pub async fn open_proxy(&self, proxy: PublicKey, address: &str) -> anyhow::Result<()> {
        self.exec(
            self.owner,
            Op::RegisterProxy {
                key: proxy,
                address: address.to_owned(),
            },
        )
        .await?;
        self.exec(proxy, Op::ProxyOpen { stake: PROXY_STAKE }).await
    }

    /// Funds and stakes the client's contract with `proxy`.
    pub async fn fund_client(&self, client: PublicKey, proxy: PublicKey) -> anyhow::Result<()> {
        self.exec(
            client,
            Op::ClientDeposit {
                proxy,
                amount: CLIENT_DEPOSIT,
            },
        )
        .await?;
        self.exec(
            client,
            Op::ClientStake {
                proxy,
                amount: CLIENT_STAKE,
            },
        )
        .await
    }
}
