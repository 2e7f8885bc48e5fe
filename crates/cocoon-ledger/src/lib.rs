//! The money side of cocoon: who may take part and what each party is owed.
//!
//! This crate owns the semantics of COCOON's contracts, independent of where they run:
//! the root [`Registry`] (allowed images and models, registered proxies, prices), and the
//! per-proxy, per-(client, proxy) and per-(worker, proxy) contracts with their balances,
//! stakes, token counters and delayed closes ([`state`]). Proxies sign cumulative, monotonic
//! [`PaymentMessage`]s ("charge client C up to N tokens", "pay worker W up to N tokens");
//! contracts refuse any message whose counter does not move forward or that names another
//! contract. The [`Ledger`] trait is the seam, and a [`LedgerOpener`] is how a role is handed
//! one without naming a backend: [`EmbeddedLedger`] executes the rules on one machine with
//! durable storage (redb), [`service`] serves it to other processes, which reach it as a
//! [`RemoteLedger`] with transactions signed by their [`Wallet`]; a TON backend drives the
//! same operations on chain.
//!
//! Features, both on by default: `embedded`, the [`EmbeddedLedger`] (redb); `http`, its
//! [`service`] (axum), the [`RemoteLedger`] that reaches it (reqwest) and the
//! [`ServiceOpener`]. Without them the crate is the rules, the messages and the wallets, for
//! users that only parse or sign them.

#[cfg(feature = "embedded")]
mod embedded;
mod error;
mod file;
mod ledger;
mod message;
mod opener;
mod registry;
#[cfg(feature = "http")]
mod remote;
#[cfg(feature = "http")]
pub mod service;
pub mod state;
mod types;
mod wallet;

#[cfg(feature = "embedded")]
pub use embedded::EmbeddedLedger;
pub use error::LedgerError;
pub use file::write_atomically;
pub use ledger::{ImageRole, Ledger, Op, Receipt, Tx, unix_now};
pub use message::{MessageError, OP_CHARGE_CLIENT, OP_PAY_WORKER, PaymentMessage, SignedMessage};
pub use opener::LedgerOpener;
#[cfg(feature = "http")]
pub use opener::ServiceOpener;
pub use registry::{NetworkParams, Registry, TokenKind};
#[cfg(feature = "http")]
pub use remote::RemoteLedger;
pub use state::{LedgerState, Touched};
pub use types::{
    Address, ClientContract, ContractState, Nanoton, Network, ProxyContract, PublicKey,
    WorkerContract,
};
pub use wallet::{SignedTx, TxBody, Wallet};
