//! The contracts on tycho-vm and the TON ledger backend against the emulated chain.
//!
//! One test binary for the crate (each module was its own): one link, one process start per
//! test instead of one binary per file.

/// The network every test chain's root is deployed for.
const NET: cocoon_ledger::Network = cocoon_ton::local::LOCAL_NETWORK;

mod confirm;
mod governance_attacks;
mod ledger;
mod money;
mod scenarios;
mod toncenter;
