//! The money side of cocoon: who may take part and what each party is owed.
//!
//! This crate owns the semantics of COCOON's contracts, independent of where they run:
//! the root [`Registry`] (allowed images and models, registered proxies, prices), and the
//! per-proxy, per-(client, proxy) and per-(worker, proxy) contracts with their balances,
//! stakes, token counters and delayed closes ([`state`]). Proxies sign cumulative, monotonic
//! [`PaymentMessage`]s ("charge client C up to N tokens", "pay worker W up to N tokens");
//! contracts refuse any message whose counter does not move forward or that names another
//! contract. The [`Ledger`] trait is the seam: [`EmbeddedLedger`] executes the rules on one
//! machine with durable storage (redb), [`service`] serves it to other processes, which reach
//! it as a [`RemoteLedger`] with transactions signed by their [`Wallet`]; a TON backend drives
//! the same operations on chain.

mod embedded;
mod error;
mod ledger;
mod message;
mod registry;
mod remote;
pub mod service;
pub mod state;
mod types;
mod wallet;

pub use embedded::EmbeddedLedger;
pub use error::LedgerError;
pub use ledger::{ImageRole, Ledger, Op, Receipt, Tx, unix_now};
pub use message::{MessageError, OP_CHARGE_CLIENT, OP_PAY_WORKER, PaymentMessage, SignedMessage};
pub use registry::{NetworkParams, Registry, TokenKind};
pub use remote::RemoteLedger;
pub use state::{LedgerState, Touched};
pub use types::{
    Address, ClientContract, ContractState, Nanoton, ProxyContract, PublicKey, WorkerContract,
};
pub use wallet::{SignedTx, TxBody, Wallet};
