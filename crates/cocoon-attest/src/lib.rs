//! Attestation for cocoon's RA-TLS: verifying Intel TDX quotes offline, reading the measured
//! registers out of them, and deciding by policy whether a measured image may join.
//!
//! Verification uses `dcap-qvl` (pinned) with collateral supplied by the caller and the time
//! passed in, so the verifier never reaches the network and its result is reproducible.
//! Putting quotes into certificates and producing them inside a TD (the `Attester` side) build
//! on this crate.

mod measurements;
mod policy;
mod quote;

pub use measurements::{ImageHash, Measurements};
pub use policy::{Policy, PolicyError};
pub use quote::{AttestError, Collateral, VerifiedQuote, parse_collateral, verify_quote};
