use serde::{Deserialize, Serialize};

use crate::types::Address;

/// Why the ledger refused an operation. Every refusal leaves the ledger unchanged. It travels
/// as JSON (`code` and `detail`) so a remote ledger's refusals read exactly as local ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "code", content = "detail", rename_all = "snake_case")]
pub enum LedgerError {
    /// An owner-only registry operation was sent by someone other than the registry owner.
    #[error("only the registry owner may do this")]
    NotOwner,
    /// The sender is not a party allowed to act on the contract at this address.
    #[error("sender is not allowed to act on contract {0}")]
    NotAllowed(Address),
    /// The proxy's key is not in the registry, or the proxy has no contract yet.
    #[error("proxy is not registered")]
    UnknownProxy,
    /// A proxy tried to open its contract when one already exists at its address.
    #[error("a contract already exists at {0}")]
    AlreadyExists(Address),
    /// The operation or message names a contract that does not exist.
    #[error("no contract at {0}")]
    NoContract(Address),
    /// The contract is closing or closed and no longer accepts this operation.
    #[error("contract {0} is closing or closed")]
    NotOpen(Address),
    /// A close or refund was asked of a contract that is already closing or closed.
    #[error("contract {0} is already closing or closed")]
    AlreadyClosing(Address),
    /// A close was to be finished on a contract that is not in its closing delay.
    #[error("contract {0} is not closing")]
    NotClosing(Address),
    /// A close was to be finished before the contract's close delay had passed.
    #[error("contract {address} unlocks at {unlock_at}, it is {now}")]
    StillLocked {
        /// The closing contract.
        address: Address,
        /// When its close may be finished, in seconds since the Unix epoch.
        unlock_at: u64,
        /// The transaction's time, in seconds since the Unix epoch.
        now: u64,
    },
    /// A deposit, stake or withdrawal of zero, or a withdrawal from an empty worker contract.
    #[error("amount must be above zero")]
    ZeroAmount,
    /// The contract cannot cover the withdrawal, stake, charge or payout asked of it.
    #[error("balance {balance} cannot cover {needed}")]
    InsufficientBalance {
        /// What the contract has available, in nanoton.
        balance: u128,
        /// What the operation needs, in nanoton.
        needed: u128,
    },
    /// A client's withdrawal would leave its balance below its stake.
    #[error("withdrawing {amount} would leave {left}, below the stake {stake}")]
    BelowStake {
        /// The amount asked for, in nanoton.
        amount: u128,
        /// The balance that would be left (zero if `amount` exceeds the balance), in nanoton.
        left: u128,
        /// The client's stake, in nanoton.
        stake: u128,
    },
    /// A proxy's or client's stake would be below the network's minimum (or zero).
    #[error("stake {stake} is below the minimum {min}")]
    StakeTooLow {
        /// The stake the operation would result in, in nanoton.
        stake: u128,
        /// The minimum stake from the network parameters, in nanoton.
        min: u128,
    },
    /// A payment message's cumulative token counter is not above the contract's: a replay or
    /// an older message.
    #[error(
        "the message's counter {got} does not move past the stored {stored}: replayed or out of order"
    )]
    CounterNotIncreasing {
        /// The contract's stored counter, in weighted tokens.
        stored: u64,
        /// The message's counter, in weighted tokens.
        got: u64,
    },
    /// A payment message names a contract other than the one it was submitted to.
    #[error("the message is for contract {expected_in_message}, not {this}")]
    WrongContract {
        /// The contract the message was applied to, derived from the proxy and the party.
        this: Address,
        /// The contract the message names.
        expected_in_message: Address,
    },
    /// A signed payment message is malformed, fails its signature check, or is of the wrong
    /// kind for the operation.
    #[error("bad signed message: {0}")]
    BadMessage(String),
    /// An amount or counter would exceed its integer type.
    #[error("an amount or counter would overflow")]
    Overflow,
    /// New network parameters fail validation (e.g. a worker fee above the price).
    #[error("bad network parameters: {0}")]
    BadParams(String),
    /// The backend's storage failed or holds something unexpected; the ledger may need reopening.
    #[error("ledger storage: {0}")]
    Storage(String),
    /// A signed transaction is malformed or its signature does not match its sender, or there
    /// is no key (or the wrong one) to sign it with.
    #[error("bad transaction: {0}")]
    BadTransaction(String),
    /// A signed transaction's nonce is not above the sender's last one: a replay or a
    /// transaction overtaken by a later one.
    #[error("nonce {got} is not above the sender's last {last}: replayed or out of order")]
    StaleNonce {
        /// The highest nonce already accepted from this sender.
        last: u64,
        /// The refused transaction's nonce.
        got: u64,
    },
    /// A remote ledger could not be reached or gave an answer that could not be read.
    #[error("ledger unreachable: {0}")]
    Unreachable(String),
}

impl From<crate::message::MessageError> for LedgerError {
    fn from(e: crate::message::MessageError) -> Self {
        Self::BadMessage(e.to_string())
    }
}
