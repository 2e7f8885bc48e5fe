//! Quote verification on the real vectors, and producing and checking evidence.
//!
//! One test binary for the crate (each module was its own): one link, one process start per
//! test instead of one binary per file.

mod collateral;
mod evidence;
mod vectors;
