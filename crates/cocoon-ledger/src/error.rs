use serde::{Deserialize, Serialize};

use crate::types::Address;

/// Why the ledger refused an operation. Every refusal leaves the ledger unchanged. It travels
/// as JSON (`code` and `detail`) so a remote ledger's refusals read exactly as local ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "code", content = "detail", rename_all = "snake_case")]
pub enum LedgerError {
    #[error("only the registry owner may do this")]
    NotOwner,
    #[error("sender is not allowed to act on contract {0}")]
    NotAllowed(Address),
    #[error("proxy is not registered")]
    UnknownProxy,
    #[error("a contract already exists at {0}")]
    AlreadyExists(Address),
    #[error("no contract at {0}")]
    NoContract(Address),
    #[error("contract {0} is closing or closed")]
    NotOpen(Address),
    #[error("contract {0} is already closing or closed")]
    AlreadyClosing(Address),
    #[error("contract {0} is not closing")]
    NotClosing(Address),
    #[error("contract {address} unlocks at {unlock_at}, it is {now}")]
    StillLocked {
        address: Address,
        unlock_at: u64,
        now: u64,
    },
    #[error("amount must be above zero")]
    ZeroAmount,
    #[error("balance {balance} cannot cover {needed}")]
    InsufficientBalance { balance: u128, needed: u128 },
    #[error("withdrawing {amount} would leave {left}, below the stake {stake}")]
    BelowStake {
        amount: u128,
        left: u128,
        stake: u128,
    },
    #[error("stake {stake} is below the minimum {min}")]
    StakeTooLow { stake: u128, min: u128 },
    #[error(
        "the message's counter {got} does not move past the stored {stored}: replayed or out of order"
    )]
    CounterNotIncreasing { stored: u64, got: u64 },
    #[error("the message is for contract {expected_in_message}, not {this}")]
    WrongContract {
        this: Address,
        expected_in_message: Address,
    },
    #[error("bad signed message: {0}")]
    BadMessage(String),
    #[error("an amount or counter would overflow")]
    Overflow,
    #[error("bad network parameters: {0}")]
    BadParams(String),
    #[error("ledger storage: {0}")]
    Storage(String),
    #[error("bad transaction: {0}")]
    BadTransaction(String),
    #[error("nonce {got} is not above the sender's last {last}: replayed or out of order")]
    StaleNonce { last: u64, got: u64 },
    #[error("ledger unreachable: {0}")]
    Unreachable(String),
}

impl From<crate::message::MessageError> for LedgerError {
    fn from(e: crate::message::MessageError) -> Self {
        Self::BadMessage(e.to_string())
    }
}
