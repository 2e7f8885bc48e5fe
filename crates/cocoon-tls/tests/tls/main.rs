//! RA-TLS certificates and handshakes.
//!
//! One test binary for the crate (each module was its own): one link, one process start per
//! test instead of one binary per file.

mod common;
mod handshake;
mod ratls;
