//! Attestation for cocoon's RA-TLS: verifying Intel TDX quotes offline, reading the measured
//! registers out of them, and deciding by policy whether a measured image may join.
//!
//! Verification uses `dcap-qvl` (pinned) with collateral supplied by the caller and the time
//! passed in, so the verifier never reaches the network and its result is reproducible. The
//! [`CollateralStore`] holds a node's collateral per platform and says in words when a piece
//! has expired; fetching it from a PCCS is the node's business (`cocoon-collateral`).
//! Putting quotes into certificates and producing them inside a TD (the `Attester` side) build
//! on this crate.

mod collateral;
mod measured;
mod measurements;
mod policy;
mod quote;

pub use collateral::{
    CollateralStore, Dates, Described, Offered, Piece, Platform, date, intel_root_ca,
    quote_platform,
};
pub use measured::{CONFIG_EVENT, MeasuredEvent, RTMR3_SYSFS, config_hash, extend, replay};
pub use measurements::{ImageHash, Measurements};
pub use policy::{Policy, PolicyError, RegisterRule};
pub use quote::{
    AttestError, Collateral, VerifiedQuote, parse_collateral, read_measurements, verify_quote,
};

mod attester;
mod binding;

pub use attester::{
    Attester, AttesterKind, DEV_QUOTE_MAGIC, DevAttester, RTMR3_EVENT_LOG, TSM_REPORT_ROOT,
    TdxAttester, dev_image, verify_dev_quote,
};
pub use binding::{BindingError, Claims, check_binding};
