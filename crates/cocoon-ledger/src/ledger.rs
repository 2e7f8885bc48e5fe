//! The operations a ledger executes and the trait every ledger backend implements.

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::message::SignedMessage;
use crate::registry::NetworkParams;
use crate::state::LedgerState;
use crate::types::{Address, ClientContract, Nanoton, PublicKey, hex_32};

/// Which role an image hash is allowed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRole {
    Worker,
    Proxy,
}

/// One operation, as a message to a contract. `amount`s on deposits are money the sender
/// brings in; everything paid out goes to the sender (or, for a refund, to the client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    // Root registry: owner only.
    SetParams {
        params: NetworkParams,
    },
    AllowImage {
        role: ImageRole,
        hash: String,
    },
    RevokeImage {
        role: ImageRole,
        hash: String,
    },
    AllowModel {
        hash: String,
    },
    RegisterProxy {
        #[serde(with = "hex_32")]
        key: PublicKey,
        address: String,
    },
    // Proxy contract: the proxy itself.
    ProxyOpen {
        stake: Nanoton,
    },
    ProxyWithdraw {
        amount: Nanoton,
    },
    ProxyClose,
    ProxyFinishClose,
    /// The proxy, up and cooperating, closes a client's contract and refunds it at once.
    ProxyRefundClient {
        #[serde(with = "hex_32")]
        client: PublicKey,
    },
    // Client contract: the client.
    ClientDeposit {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        amount: Nanoton,
    },
    ClientStake {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        amount: Nanoton,
    },
    ClientWithdraw {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        amount: Nanoton,
    },
    ClientClose {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
    },
    ClientFinishClose {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
    },
    // Signed by the proxy; anyone may submit.
    Charge {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        message: SignedMessage,
    },
    // Worker contract: the worker, with the proxy's signed payout.
    Payout {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        message: SignedMessage,
    },
    WorkerWithdraw {
        #[serde(with = "hex_32")]
        proxy: PublicKey,
    },
}

/// Seconds since the Unix epoch: the clock transactions run at.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An operation with its sender (authenticated by the transport: a wallet signature on
/// chain, the caller in the embedded ledger) and the time it executes at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tx {
    #[serde(with = "hex_32")]
    pub sender: PublicKey,
    pub op: Op,
    /// Seconds since the Unix epoch.
    pub now: u64,
}

/// What an operation moved across the ledger's edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Brought in by the sender.
    pub deposited: Nanoton,
    /// Sent out of the ledger (to the sender, or to the refunded client).
    pub paid_out: Nanoton,
    /// Moved from a client to its proxy by a charge.
    pub charged: Nanoton,
    /// Moved from a proxy to a worker by a payout.
    pub earned: Nanoton,
}

/// A ledger: executes operations under the contracts' rules and answers queries. Executed
/// operations are durable when `execute` returns.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    async fn execute(&self, tx: Tx) -> Result<Receipt, LedgerError>;

    /// The whole state as last committed (for queries, audits and rollback checks).
    async fn snapshot(&self) -> Result<LedgerState, LedgerError>;

    /// The network's current prices and delays.
    async fn params(&self) -> Result<NetworkParams, LedgerError> {
        Ok(self.snapshot().await?.registry.params)
    }

    /// How a proxy's charge messages name this client's contract with it. The embedded
    /// ledger's addresses by default; a chain names contracts by their account ids.
    fn client_address(
        &self,
        proxy: &PublicKey,
        client: &PublicKey,
    ) -> Result<Address, LedgerError> {
        Ok(Address::client(proxy, client))
    }

    /// How a proxy's payout messages name this worker's contract with it.
    fn worker_address(
        &self,
        proxy: &PublicKey,
        worker: &PublicKey,
    ) -> Result<Address, LedgerError> {
        Ok(Address::worker(proxy, worker))
    }

    /// What one proxy needs to check its record against: its own contract and those of the
    /// named clients and workers (a chain cannot list contracts, so only the ones the proxy
    /// knows of are read). By default the whole snapshot, which holds them all and more.
    async fn proxy_view(
        &self,
        proxy: PublicKey,
        clients: &[PublicKey],
        workers: &[PublicKey],
    ) -> Result<LedgerState, LedgerError> {
        let _ = (proxy, clients, workers);
        self.snapshot().await
    }

    /// A client's contract with one proxy, if it exists.
    async fn client(
        &self,
        proxy: PublicKey,
        client: PublicKey,
    ) -> Result<Option<ClientContract>, LedgerError> {
        let state = self.snapshot().await?;
        Ok(state
            .clients
            .get(&Address::client(&proxy, &client))
            .cloned())
    }
}
