//! Binding a TLS key to a quote: the quote's report data is SHA-512 of the certificate's
//! claims, and the claims name the certificate's public key.

use serde::{Deserialize, Serialize};

use crate::measurements::Measurements;

/// What a node asserts in its RA-TLS certificate (COCOON's extension 1.3.6.1.4.1.12345.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The certificate's raw Ed25519 public key, hex.
    pub public_key: String,
    /// `worker`, `proxy` or `client`.
    pub role: String,
    /// What the node measured into RTMR3 since boot, in order: a verifier replays it to the
    /// quote's RTMR3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measured: Vec<crate::MeasuredEvent>,
    /// A worker's HPKE public key (X25519, hex), made in the TD: gateways seal requests to it,
    /// so only this attested process reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
}

impl Claims {
    /// The exact bytes that are hashed into the quote and carried in the certificate.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("claims always serialize")
    }

    /// SHA-512 of the claim bytes: the quote's report data.
    pub fn report_data(bytes: &[u8]) -> [u8; 64] {
        ring::digest::digest(&ring::digest::SHA512, bytes)
            .as_ref()
            .try_into()
            .expect("SHA-512 is 64 bytes")
    }
}

/// Why a quote does not vouch for the certificate's claims or key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    /// The claim bytes are not valid claims JSON.
    #[error("claims are not valid: {0}")]
    BadClaims(String),
    /// The quote's report data is not SHA-512 of the claim bytes.
    #[error("quote report data is not SHA-512 of the certificate's claims")]
    ReportDataMismatch,
    /// The claims name a public key other than the one that signed the TLS handshake.
    #[error("claims name another public key than the certificate's")]
    KeyMismatch,
}

/// Checks that `measurements` (from a verified quote) vouch for `claim_bytes`, and that the
/// claims are about `presented_key`, the key that signed the TLS handshake.
pub fn check_binding(
    measurements: &Measurements,
    claim_bytes: &[u8],
    presented_key: &[u8],
) -> Result<Claims, BindingError> {
    if Claims::report_data(claim_bytes) != measurements.report_data {
        return Err(BindingError::ReportDataMismatch);
    }
    let claims: Claims =
        serde_json::from_slice(claim_bytes).map_err(|e| BindingError::BadClaims(e.to_string()))?;
    if hex::decode(&claims.public_key).ok().as_deref() != Some(presented_key) {
        return Err(BindingError::KeyMismatch);
    }
    Ok(claims)
}
