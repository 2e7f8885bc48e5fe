//! Sealed requests on the worker: opened with the key its attestation names, answered in
//! chunks only the client's gateway can read, and ended with a receipt signed by the
//! worker's attested key.

use std::sync::Arc;

use cocoon_protocol::{GenerateEvent, ProtocolError, Receipt, SealedRequest};
use cocoon_seal::{AnswerSealer, WorkerKeys};
use cocoon_tls::{Identity, IdentityError};

/// What a worker needs to serve sealed requests.
pub struct Sealing {
    keys: WorkerKeys,
    /// The worker's key fingerprint (hex): how recipients name it.
    me: String,
    /// Signs receipts: the identity's own key, which the attestation binds.
    signer: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("me", &self.me)
            .field("keys", &self.keys)
            .finish()
    }
}

/// `identity` with a fresh encryption key named in its attested claims, and what serving
/// sealed requests takes; without attestation there is nothing to bind a key to, so no sealed
/// request is served (gateways that require attestation never seal to such a worker anyway).
pub fn with_sealing_key(identity: Identity) -> Result<(Identity, Option<Sealing>), IdentityError> {
    if identity.attestation_kind().is_none() {
        return Ok((identity, None));
    }
    let keys = WorkerKeys::generate();
    let identity = identity.with_encryption_key(keys.public_key())?;
    let sealing = Sealing {
        keys,
        me: identity.fingerprint().to_string(),
        signer: identity.signing_key(),
    };
    Ok((identity, Some(sealing)))
}

/// A sealed request opened for serving: the clear request for the backend, and how its
/// answer goes back.
pub(crate) struct Opened {
    pub(crate) request: cocoon_protocol::GenerateRequest,
    pub(crate) answer: SealedAnswer,
}

impl Sealing {
    /// Opens `sealed`; the proxy's cache scope replaces whatever the body says.
    pub(crate) fn open(
        self: &Arc<Self>,
        sealed: &SealedRequest,
        model_hash: Option<String>,
    ) -> Result<Opened, ProtocolError> {
        let opened = cocoon_seal::open_request(sealed, &self.me, &self.keys).map_err(|e| {
            tracing::warn!(error = %e, "a sealed request did not open");
            ProtocolError::from(e)
        })?;
        let mut request = opened.request;
        request.cache_scope = sealed.cache_scope.clone();
        request.validate()?;
        let answer = SealedAnswer {
            sealing: self.clone(),
            sealer: opened.answer,
            receipt: Receipt {
                request_id: sealed.header.request_id,
                worker: self.me.clone(),
                model: request.model.clone(),
                model_hash,
                answer_sha256: String::new(),
                usage: Default::default(),
                signature: String::new(),
            },
        };
        Ok(Opened { request, answer })
    }
}

/// Seals one answer's events.
pub(crate) struct SealedAnswer {
    sealing: Arc<Sealing>,
    sealer: AnswerSealer,
    /// The receipt, filled in at the end.
    receipt: Receipt,
}

impl SealedAnswer {
    /// The frames that carry `event` to the gateway: a chunk for a delta, the last chunk and
    /// the receipt then the clear `Done` (which the proxy bills) for the end, an error as is.
    pub(crate) fn seal(&mut self, event: GenerateEvent) -> Vec<GenerateEvent> {
        let Some(GenerateEvent::Sealed {
            seq,
            last,
            tokens,
            reasoning,
            data,
            ..
        }) = self.sealer.seal(&event)
        else {
            return vec![event];
        };
        let GenerateEvent::Done { usage, .. } = &event else {
            return vec![GenerateEvent::Sealed {
                seq,
                last,
                tokens,
                reasoning,
                data,
                receipt: None,
            }];
        };
        let receipt = cocoon_seal::sign_receipt(
            Receipt {
                answer_sha256: self.sealer.answer_sha256(),
                usage: *usage,
                ..self.receipt.clone()
            },
            &self.sealing.signer,
        );
        vec![
            GenerateEvent::Sealed {
                seq,
                last,
                tokens,
                reasoning,
                data,
                receipt: Some(Box::new(receipt)),
            },
            event,
        ]
    }
}
