//! The ledger's rules, properties, durability and HTTP service.
//!
//! One test binary for the crate (each module was its own): one link, one process start per
//! test instead of one binary per file.

mod common;
mod durable;
mod properties;
mod rules;
mod service;
