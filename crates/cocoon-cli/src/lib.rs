//! The `cocoon` command's library half: loading role configuration files, building a worker's
//! backends from them, assembling a whole network in one process (`cocoon dev`, tests,
//! benchmarks), the benchmarks, the attestation tool (`cocoon attest`) and the money commands (`cocoon ledger`, `cocoon client
//! deposit` and the rest).

pub mod attest;
pub mod backends;
pub mod bench;
pub mod config;
pub mod dev;
pub mod money;
