//! The `cocoon` command's library half: loading role configuration files, building a worker's
//! backends and every role's ledger from them (the concrete types are chosen here, at the
//! edge), the benchmarks, the attestation tool (`cocoon attest`, with `collateral` to fetch Intel's) and the money commands
//! (`cocoon ledger`, `cocoon client deposit` and the rest). The in-process network that
//! `cocoon dev` runs is `cocoon_testkit::dev`.

pub mod attest;
pub mod backends;
pub mod bench;
pub mod collateral;
pub mod config;
pub mod money;
pub mod status;
