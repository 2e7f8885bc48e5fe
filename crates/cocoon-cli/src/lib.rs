//! The `cocoon` command's library half: loading role configuration files, assembling a whole
//! network in one process (`cocoon dev`, tests, benchmarks) and the benchmark itself.

pub mod bench;
pub mod config;
pub mod dev;
