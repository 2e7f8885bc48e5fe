//! Sealed requests: a prompt encrypted by the client's gateway to the attested workers that may
//! serve it, so that the proxy between them routes and bills without reading it.
//!
//! The gateway asks the proxy for [`Candidates`] (workers' attested certificates), verifies
//! them itself, and sends a [`SealedRequest`]: the [`GenerateRequest`](crate::GenerateRequest)
//! encrypted once under a fresh key, that key wrapped by HPKE for each verified candidate, and
//! in clear only the [`SealedHeader`] routing and billing need. The worker answers with
//! [`GenerateEvent::Sealed`](crate::GenerateEvent::Sealed) chunks (their token counts in
//! clear for the bill), then a clear `Done` that carries its signed [`Receipt`]. The
//! cryptography is `cocoon-seal`'s; these are the wire types.

use serde::{Deserialize, Serialize};

use crate::{ProtocolError, RequestId};

/// Most candidates a proxy offers for one request (each costs the gateway an HPKE wrap).
pub const MAX_CANDIDATES: usize = 4;

/// What the proxy reads of a sealed request: what routing and billing need, nothing of the
/// prompt. It is the associated data of every seal, so a proxy that changes it makes the
/// request undecryptable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedHeader {
    /// The client's id for the request; the worker's receipt names it.
    pub request_id: RequestId,
    /// The model asked for.
    pub model: String,
    /// The request's `max_tokens` (the worker refuses a body that says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The most the client pays per weighted token, in nanoton.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price: Option<u64>,
    /// The most prompt tokens the request may be billed for, as the gateway computed it from
    /// the prompt ([`UsageBounds`](crate::UsageBounds)): the proxy bills within it (and within
    /// what the ciphertext's size allows), the worker refuses a request it understates.
    pub prompt_bound: u64,
    /// A keyed hash (under a secret of the gateway) of the prompt's first message: the proxy
    /// sees repeats of a conversation, for cache affinity, without learning its prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// The gateway's prompt-cache hint, already a digest (see `GenerateRequest::cache_scope`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hint: Option<String>,
}

/// The request's key, wrapped for one candidate worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    /// The worker's key fingerprint (hex SHA-256 of its Ed25519 key).
    pub worker: String,
    /// HPKE's encapsulated key of the gateway's session with the worker, base64: the same
    /// for the requests of one session.
    pub enc: String,
    /// The nonce the request's secret is wrapped with, base64 (12 bytes).
    pub nonce: String,
    /// The request's secret, wrapped under the session's exported key, base64.
    pub key: String,
}

/// A generation request only its recipients can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedRequest {
    /// What the proxy may read.
    pub header: SealedHeader,
    /// The workers that can open it: the proxy routes only to these.
    pub recipients: Vec<Recipient>,
    /// The encrypted [`GenerateRequest`](crate::GenerateRequest) JSON, base64.
    pub body: String,
    /// Set by the proxy for the worker (the client's value is replaced): the prompt-cache
    /// scope, as in `GenerateRequest::cache_scope`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_scope: Option<String>,
}

/// Bytes the AEAD adds to a sealed body.
pub const SEAL_TAG_BYTES: usize = 16;

impl SealedRequest {
    /// Checks what the proxy can check without the key.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.header.model.is_empty() {
            return Err(ProtocolError::invalid("model must not be empty"));
        }
        if self.recipients.is_empty() || self.recipients.len() > MAX_CANDIDATES {
            return Err(ProtocolError::invalid(format!(
                "a sealed request names 1 to {MAX_CANDIDATES} recipients, got {}",
                self.recipients.len()
            )));
        }
        for hint in [&self.header.affinity, &self.header.cache_hint]
            .into_iter()
            .flatten()
        {
            if hint.len() > crate::MAX_CACHE_SCOPE_BYTES {
                return Err(ProtocolError::invalid(format!(
                    "affinity and cache hints are at most {} bytes",
                    crate::MAX_CACHE_SCOPE_BYTES
                )));
            }
        }
        Ok(())
    }

    /// Bytes of the request in clear, at most: what bounds the prompt's tokens (a token covers
    /// at least one byte, and JSON never encodes a byte of text in less than one).
    pub fn plaintext_bound(&self) -> u64 {
        // base64: 4 characters per 3 bytes.
        ((self.body.len() as u64).div_ceil(4) * 3).saturating_sub(SEAL_TAG_BYTES as u64)
    }

    /// The recipient entry for the worker with fingerprint `worker` (hex).
    pub fn recipient(&self, worker: &str) -> Option<&Recipient> {
        self.recipients.iter().find(|r| r.worker == worker)
    }
}

/// A worker the gateway may seal a request to: its attested certificate, which the gateway
/// verifies against its own worker policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The worker's key fingerprint (hex).
    pub worker: String,
    /// The certificate the worker presented to the proxy, DER in base64: it carries the quote
    /// and the claims that name the worker's encryption key.
    pub certificate: String,
}

/// `POST` [`paths::CANDIDATES`](crate::paths::CANDIDATES): which workers may serve a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateQuery {
    /// The model.
    pub model: String,
    /// The client's price cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price: Option<u64>,
}

/// The answer to a [`CandidateQuery`]: at most [`MAX_CANDIDATES`], the market's best first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidates {
    /// The candidates.
    pub candidates: Vec<Candidate>,
}

/// What a worker signs at the end of a sealed answer, with the key its attestation names: the
/// counts it reports, over the answer it sent. The gateway checks the proxy's bill against it
/// and keeps it, so a client can prove what it was charged for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The client's id for the request (from the sealed header).
    pub request_id: RequestId,
    /// The worker's key fingerprint (hex).
    pub worker: String,
    /// The model served.
    pub model: String,
    /// The weights' hash the worker serves the model with, if it declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// Hex SHA-256 of the answer's sealed plaintexts, in order (see `cocoon-seal`).
    pub answer_sha256: String,
    /// The counts the worker reports.
    pub usage: crate::Usage,
    /// Ed25519 signature of [`Self::signed_bytes`] by the worker's key, hex.
    pub signature: String,
}

impl Receipt {
    /// What the signature covers: a domain tag, then the receipt's JSON without the signature.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Self {
            signature: String::new(),
            ..self.clone()
        };
        let mut out = b"cocoon-receipt/1\0".to_vec();
        out.extend(serde_json::to_vec(&unsigned).expect("receipts always serialize"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(body_bytes: usize, recipients: usize) -> SealedRequest {
        SealedRequest {
            header: SealedHeader {
                request_id: RequestId([7; 16]),
                model: "m".into(),
                max_tokens: Some(4),
                max_price: None,
                prompt_bound: 100,
                affinity: None,
                cache_hint: None,
            },
            recipients: (0..recipients)
                .map(|i| Recipient {
                    worker: format!("{i:064x}"),
                    enc: String::new(),
                    nonce: String::new(),
                    key: String::new(),
                })
                .collect(),
            body: "A".repeat(body_bytes),
            cache_scope: None,
        }
    }

    #[test]
    fn the_plaintext_bound_is_never_below_the_plaintext() {
        use base64::Engine as _;
        for len in [0usize, 1, 2, 3, 4, 100, 1001] {
            let body = base64::engine::general_purpose::STANDARD.encode(vec![0u8; len + 16]);
            let mut s = sealed(0, 1);
            s.body = body;
            assert!(s.plaintext_bound() >= len as u64, "{len}");
            assert!(s.plaintext_bound() <= len as u64 + 2, "{len}");
        }
    }

    #[test]
    fn recipients_are_bounded_and_headers_checked() {
        assert!(sealed(10, 1).validate().is_ok());
        assert!(sealed(10, 0).validate().is_err());
        assert!(sealed(10, MAX_CANDIDATES + 1).validate().is_err());
        let mut s = sealed(10, 1);
        s.header.affinity = Some("x".repeat(crate::MAX_CACHE_SCOPE_BYTES + 1));
        assert!(s.validate().is_err());
        // max_tokens 0 is an embedding request's; the worker refuses a body that is not one.
        let mut s = sealed(10, 1);
        s.header.max_tokens = Some(0);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_receipt_signs_everything_but_its_signature() {
        let r = Receipt {
            request_id: RequestId([1; 16]),
            worker: "w".into(),
            model: "m".into(),
            model_hash: None,
            answer_sha256: "00".into(),
            usage: crate::Usage::new(3, 4),
            signature: "aa".into(),
        };
        let mut other = r.clone();
        other.signature = "bb".into();
        assert_eq!(r.signed_bytes(), other.signed_bytes());
        other.usage.completion_tokens = 5;
        assert_ne!(r.signed_bytes(), other.signed_bytes());
    }
}
