//! Settlement on TON. This crate owns everything chain-side: the Tolk contracts' committed code
//! ([`code`]), their storage layouts and message bodies as cells ([`layout`], tonlib-core), the
//! parties' wallets and their signed wallet-v5 requests ([`wallet`]), a local emulated chain
//! executing the contracts in tycho-vm ([`emulator`]), and the toncenter v2 API shape that both
//! a real node and the emulator answer ([`toncenter`]); the [`Ledger`](cocoon_ledger::Ledger)
//! backend on top ([`TonLedger`]), how a config names it ([`LedgerSpec`]) and the [`Opener`]
//! that opens any such setting for the roles, and a local chain served for development and
//! tests ([`local`]).

pub mod code;
pub mod emulator;
mod error;
pub mod layout;
mod ledger;
pub mod local;
mod select;
pub mod toncenter;
pub mod wallet;

pub use error::TonError;
pub use ledger::{GAS_ATTACHED, TonLedger, refusal};
pub use select::{API_KEY_VAR, LedgerSpec, Opener, open_ledger};
