//! System tests of the whole network: gateway, proxy, workers and ledger, in process and as processes.
//!
//! One test binary for the crate (each module was its own): one link, one process start per
//! test instead of one binary per file.

mod attest_cli;
mod attestation;
mod bad_input;
mod bench;
mod collateral;
mod common;
mod crash;
mod flood;
mod hosts;
mod llama_server;
mod openai_api;
mod openai_sdk;
mod operators;
mod payments;
mod payments_cli;
mod resilience;
mod security;
mod soak;
mod ton;
mod upstream;
