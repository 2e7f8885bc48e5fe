//! The `cocoon` command's library half: loading role configuration files, assembling a whole
//! network in one process (`cocoon dev`, tests, benchmarks), the benchmarks, and the
//! attestation tool (`cocoon attest`).

pub mod attest;
pub mod bench;
pub mod config;
pub mod dev;
