//! Settlement on TON. This crate owns everything chain-side: the Tolk contracts' committed code
//! ([`code`]), their storage layouts and message bodies as cells ([`layout`], tonlib-core), the
//! parties' wallets and their signed wallet-v5 requests ([`wallet`]), a local emulated chain
//! executing the contracts in tycho-vm ([`emulator`]), and the toncenter v2 API shape that both
//! a real node and the emulator answer ([`toncenter`]).

pub mod code;
pub mod emulator;
mod error;
pub mod layout;
mod ledger;
pub mod toncenter;
pub mod wallet;

pub use error::TonError;
pub use ledger::{GAS_ATTACHED, TonLedger, refusal};
