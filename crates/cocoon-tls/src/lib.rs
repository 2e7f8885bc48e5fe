//! TLS identities and peer verification for every cocoon hop.
//!
//! This crate owns how a node proves who it is ([`Identity`]: an Ed25519 key and the short-lived
//! self-signed certificate made from it) and how it decides whether to trust a peer
//! ([`PeerVerifier`]). Everything else (the transport, the roles) only sees the rustls configs
//! built here, so attestation (RA-TLS: a TDX quote inside the certificate) is added in this one
//! place. Only TLS 1.3 and Ed25519 are spoken.

mod config;
mod identity;
mod measure;
mod ratls;
mod trust;
mod verify;

pub use cocoon_attest::{CONFIG_EVENT, MeasuredEvent};
pub use config::{client_config, peer_identity, server_config, verified_peer};
pub use identity::{Fingerprint, Identity, IdentityError};
pub use measure::{ledger_for_measurement, url_for_measurement};
pub use ratls::{CacheStats, DEFAULT_CACHE_TTL, RaTlsVerifier, attestation_extensions};
pub use trust::{
    AttesterChoice, AttesterConfig, MAX_CACHE_SECS, MIN_CERT_AGE_HOURS, PeerPolicy, Registers,
    TrustError, dev_attester,
};
pub use verify::{
    AllOf, AnyOf, AnyPeer, Attested, FreshCertificates, PeerCertificate, PeerVerifier, PinnedPeers,
    Verified, VerifyError,
};

/// Name the client side puts in SNI. Peers are identified by key, never by name.
pub const SERVER_NAME: &str = "cocoon.invalid";
