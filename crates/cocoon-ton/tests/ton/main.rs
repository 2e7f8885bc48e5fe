//! The contracts on tycho-vm and the TON ledger backend against the emulated chain.
//!
//! One test binary for the crate (each module was its own): one link, one process start per
//! test instead of one binary per file.

mod confirm;
mod governance_attacks;
mod ledger;
mod money;
mod scenarios;
mod toncenter;
