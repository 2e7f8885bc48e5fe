//! The operations a ledger executes and the trait every ledger backend implements.

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::message::SignedMessage;
use crate::registry::NetworkParams;
use crate::state::LedgerState;
use crate::types::{Address, ClientContract, Nanoton, Network, PublicKey, hex_32};

/// Which role an image hash is allowed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRole {
    /// The image a worker runs in.
    Worker,
    /// The image a proxy runs in.
    Proxy,
}

/// One operation, as a message to a contract. `amount`s on deposits are money the sender
/// brings in; everything paid out goes to the sender (or, for a refund, to the client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    // Root registry: owner only.
    /// Replaces the network's prices, minimum stakes and close delays.
    SetParams {
        /// The new parameters; refused unless they validate.
        params: NetworkParams,
    },
    /// Adds an image hash to those allowed for a role.
    AllowImage {
        /// The role the image is allowed for.
        role: ImageRole,
        /// The image hash, in hex (stored lowercase).
        hash: String,
    },
    /// Removes an image hash from those allowed for a role.
    RevokeImage {
        /// The role the image is no longer allowed for.
        role: ImageRole,
        /// The image hash, in hex (any case).
        hash: String,
    },
    /// Adds a model hash to those workers may serve.
    AllowModel {
        /// The model hash, in hex (stored lowercase).
        hash: String,
    },
    /// Registers a proxy, so that it may open its contract.
    RegisterProxy {
        /// The proxy's public key.
        #[serde(with = "hex_32")]
        key: PublicKey,
        /// Where the proxy is reached on the network.
        address: String,
    },
    /// Removes a model hash from those workers may serve.
    RevokeModel {
        /// The model hash, in hex (any case).
        hash: String,
    },
    /// Removes a proxy from the registry: it can no longer open a contract, and nodes reading
    /// the registry no longer find it. A contract it already opened keeps running until it
    /// closes, so its clients and workers settle as before.
    UnregisterProxy {
        /// The proxy's public key.
        #[serde(with = "hex_32")]
        key: PublicKey,
    },
    /// The first of two steps handing the registry to another key: the owner names it. A
    /// second proposal replaces the first.
    ProposeOwner {
        /// The proposed owner's public key.
        #[serde(with = "hex_32")]
        owner: PublicKey,
    },
    /// The second step: the proposed owner takes over (sent by that key, so a mistyped key
    /// cannot take the registry).
    AcceptOwner,
    // Proxy contract: the proxy itself.
    /// Opens the sender's proxy contract with a stake it brings in; it must be registered.
    ProxyOpen {
        /// The stake, in nanoton; at least the network's minimum proxy stake.
        stake: Nanoton,
    },
    /// Withdraws from the proxy's earnings (never from its stake).
    ProxyWithdraw {
        /// How much, in nanoton.
        amount: Nanoton,
    },
    /// Adds to the stake of the sender's open proxy contract, which guarantees workers' pay.
    ProxyAddStake {
        /// How much, in nanoton; brought in with the operation.
        amount: Nanoton,
    },
    /// Starts closing the proxy's contract; it pays out after the proxy close delay.
    ProxyClose,
    /// After the close delay, pays out the proxy's balance and stake and closes it.
    ProxyFinishClose,
    /// The proxy, up and cooperating, closes a client's contract and refunds it at once.
    ProxyRefundClient {
        /// The client whose contract with the sender is closed and refunded.
        #[serde(with = "hex_32")]
        client: PublicKey,
    },
    // Client contract: the client.
    /// Brings money into the sender's contract with a proxy, opening the contract if new.
    ClientDeposit {
        /// The proxy the contract is with; its own contract must be open.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        /// How much is brought in, in nanoton.
        amount: Nanoton,
    },
    /// Locks more of the client's balance as stake.
    ClientStake {
        /// The proxy the contract is with.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        /// How much to add to the stake, in nanoton; the total must be within the balance
        /// and at least the minimum client stake.
        amount: Nanoton,
    },
    /// Withdraws from the client's balance, down to no less than its stake.
    ClientWithdraw {
        /// The proxy the contract is with.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        /// How much, in nanoton.
        amount: Nanoton,
    },
    /// Starts closing the contract without the proxy: what is above the stake is paid out
    /// now, the stake after the client close delay.
    ClientClose {
        /// The proxy the contract is with.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
    },
    /// After the close delay, pays out what is left in the contract and closes it.
    ClientFinishClose {
        /// The proxy the contract is with.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
    },
    // Signed by the proxy; anyone may submit.
    /// Applies a proxy's charge message: the cost of the newly used tokens moves from the
    /// client's contract to the proxy's.
    Charge {
        /// The proxy that signed the message.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        /// The signed charge message.
        message: SignedMessage,
    },
    // Worker contract: the worker, with the proxy's signed payout.
    /// Applies a proxy's payout message: the worker's earnings for the newly paid tokens
    /// move from the proxy's contract (earnings first, then stake) to the worker's.
    Payout {
        /// The proxy that signed the message.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
        /// The signed payout message.
        message: SignedMessage,
    },
    /// Pays out everything the sender's worker contract with the proxy holds.
    WorkerWithdraw {
        /// The proxy the contract is with.
        #[serde(with = "hex_32")]
        proxy: PublicKey,
    },
}

impl Op {
    /// The proxy whose client or worker contract the operation acts on, if it is one of those
    /// (a chain names those contracts by terms the proxy's contract holds).
    pub fn proxy(&self) -> Option<&PublicKey> {
        match self {
            Op::ClientDeposit { proxy, .. }
            | Op::ClientStake { proxy, .. }
            | Op::ClientWithdraw { proxy, .. }
            | Op::ClientClose { proxy }
            | Op::ClientFinishClose { proxy }
            | Op::Charge { proxy, .. }
            | Op::Payout { proxy, .. }
            | Op::WorkerWithdraw { proxy } => Some(proxy),
            _ => None,
        }
    }
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
    /// Who sends the operation: the party it acts as, and to whom payouts go.
    #[serde(with = "hex_32")]
    pub sender: PublicKey,
    /// The operation to execute.
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
    /// Executes `tx` under the contracts' rules, durably; a refusal changes nothing.
    async fn execute(&self, tx: Tx) -> Result<Receipt, LedgerError>;

    /// The whole state as last committed (for queries, audits and rollback checks).
    async fn snapshot(&self) -> Result<LedgerState, LedgerError>;

    /// The network's current prices and delays.
    async fn params(&self) -> Result<NetworkParams, LedgerError> {
        Ok(self.snapshot().await?.registry.params)
    }

    /// Whether the registry allows the image `hash` (hex) for `role`.
    async fn image_allowed(&self, role: ImageRole, hash: &str) -> Result<bool, LedgerError> {
        let registry = self.snapshot().await?.registry;
        let set = match role {
            ImageRole::Worker => registry.worker_images,
            ImageRole::Proxy => registry.proxy_images,
        };
        Ok(set.contains(&hash.to_ascii_lowercase()))
    }

    /// Whether the registry allows workers to serve the model whose weights hash to `hash`
    /// (hex SHA-256).
    async fn model_allowed(&self, hash: &str) -> Result<bool, LedgerError> {
        Ok(self
            .snapshot()
            .await?
            .registry
            .models
            .contains(&hash.to_ascii_lowercase()))
    }

    /// The network every payment message on this ledger must be signed for (it never changes
    /// for a ledger, so callers may keep it).
    async fn network(&self) -> Result<Network, LedgerError> {
        Ok(self.snapshot().await?.registry.network)
    }

    /// How a proxy's charge messages name this client's contract with it. The embedded
    /// ledger's addresses by default; a chain names contracts by their account ids, which
    /// depend on the terms the proxy's contract holds (so naming may read the chain).
    async fn client_address(
        &self,
        proxy: &PublicKey,
        client: &PublicKey,
    ) -> Result<Address, LedgerError> {
        Ok(Address::client(proxy, client))
    }

    /// How a proxy's payout messages name this worker's contract with it.
    async fn worker_address(
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
