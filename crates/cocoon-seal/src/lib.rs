//! End-to-end encryption between a client's gateway and the attested worker that serves its
//! request, so that the proxy between them routes and bills without reading prompts or answers.
//!
//! This crate owns the cryptography of sealed requests (the wire types are
//! `cocoon-protocol`'s): a worker's HPKE key pair ([`WorkerKeys`], whose public half its
//! attestation names), sealing a request once for several candidate workers and opening it on
//! the one chosen ([`seal_request`], [`open_request`]), the answer's encrypted, ordered chunks
//! ([`AnswerSealer`], [`AnswerOpener`]) and the worker's signed [`Receipt`](cocoon_protocol::Receipt)
//! ([`sign_receipt`], [`verify_receipt`]).
//!
//! The suite is HPKE base mode with X25519, HKDF-SHA256 and ChaCha20-Poly1305 (RFC 9180). A
//! gateway keeps one HPKE context per verified candidate while it keeps the candidate list (a
//! [`Session`]; the worker keeps it too), so a key agreement is paid once per worker per
//! refresh, not per request. Each request has a fresh 32-byte secret: its body is encrypted
//! once under a key derived from it, and the secret is wrapped for each candidate under its
//! session's exported key (as Apple's Private Cloud Compute wraps for several nodes), with the
//! clear header as associated data everywhere, so a proxy that edits the header makes the
//! request unreadable. The answer's keys derive from the same secret and a fresh salt of the
//! worker's: only the gateway and the worker that opened the request hold them.

mod answer;
mod keys;
mod receipt;
mod request;

pub use answer::{AnswerOpener, AnswerSealer};
pub use keys::WorkerKeys;
pub use receipt::{sign_receipt, verify_receipt};
pub use request::{OpenedRequest, SealTo, Session, open_request, seal_request};

/// Why a sealed request or answer could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A worker's public key is not an X25519 key.
    #[error("worker {worker}'s encryption key is not a valid X25519 key")]
    BadPublicKey {
        /// The worker's fingerprint.
        worker: String,
    },
    /// The request names no key for this worker: it was sealed for others.
    #[error("the request was not sealed for this worker")]
    NotARecipient,
    /// Decryption failed: wrong key, or the header or ciphertext was altered.
    #[error("{0} does not open: it was altered, or sealed for another key")]
    DoesNotOpen(&'static str),
    /// Not base64, or not the shape this crate writes.
    #[error("{0}")]
    Malformed(String),
    /// The sealed body disagrees with the clear header the proxy routed by.
    #[error("the sealed request disagrees with its clear header: {0}")]
    HeaderMismatch(String),
    /// The answer's chunks are not the ones the worker sent, in its order.
    #[error("the sealed answer was tampered with: {0}")]
    Tampered(String),
    /// A receipt that does not check out.
    #[error("the worker's receipt does not check out: {0}")]
    BadReceipt(String),
}

impl From<SealError> for cocoon_protocol::ProtocolError {
    fn from(e: SealError) -> Self {
        match e {
            SealError::Tampered(_) | SealError::BadReceipt(_) => Self::internal(e.to_string()),
            // A worker restarts with a fresh key under the same identity: a gateway's list of
            // candidates may name its old one. Unavailable lets the proxy try another
            // recipient and the gateway fetch the candidates again.
            SealError::NotARecipient | SealError::DoesNotOpen(_) => {
                Self::unavailable(cocoon_protocol::NOT_SEALED_FOR_THIS_WORKER)
            }
            _ => Self::invalid(e.to_string()),
        }
    }
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn unb64(s: &str, what: &str) -> Result<Vec<u8>, SealError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| SealError::Malformed(format!("{what} is not base64")))
}

#[cfg(test)]
mod tests;
