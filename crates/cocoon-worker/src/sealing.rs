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

fn rand_bytes() -> [u8; 16] {
    let mut out = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
        .expect("the system's random generator works");
    out
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
        // Cells are shared within the proxy's scope (this client, under its hint) and the
        // gateway's sealed one together: the proxy alone cannot put a sealed prompt in a scope
        // it probes, nor the gateway reach into another client's.
        // Never no scope: to an upstream backend no scope is no `cache_salt`, the cache every
        // unsalted request shares (the proxy's own probes included). Without both parts, a
        // scope of its own that nothing shares.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        match (&sealed.cache_scope, &request.cache_scope) {
            (Some(proxy), Some(gateway)) => {
                for part in [proxy, gateway] {
                    ctx.update(&(part.len() as u64).to_be_bytes());
                    ctx.update(part.as_bytes());
                }
            }
            _ => ctx.update(&rand_bytes()),
        }
        request.cache_scope = Some(hex::encode(&ctx.finish().as_ref()[..16]));
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
    /// A refusal before any answer, as the proxy may read it: its kind in fixed words, the
    /// worker's own words sealed for the gateway beside them.
    pub(crate) fn refusal(&mut self, error: &ProtocolError) -> ProtocolError {
        let words = self.sealer.seal(&GenerateEvent::Error {
            error: error.clone(),
        });
        ProtocolError {
            sealed_words: words.map(Box::new),
            ..error.withheld()
        }
    }

    /// The frames that carry `event` to the gateway: a chunk for a delta; for the end, the
    /// last chunk with the receipt, then the clear `Done` (which the proxy bills); for an
    /// error, the last chunk holding it, then a clear error with its words withheld.
    pub(crate) fn seal(&mut self, event: GenerateEvent) -> (GenerateEvent, Option<GenerateEvent>) {
        let Some(chunk) = self.sealer.seal(&event) else {
            return (event, None);
        };
        let usage = match &event {
            GenerateEvent::Done { usage, .. } => usage,
            GenerateEvent::Error { error } => {
                let error = error.withheld();
                return (chunk, Some(GenerateEvent::Error { error }));
            }
            _ => return (chunk, None),
        };
        let receipt = cocoon_seal::sign_receipt(
            Receipt {
                answer_sha256: self.sealer.answer_sha256(),
                usage: *usage,
                ..self.receipt.clone()
            },
            &self.sealing.signer,
        );
        (chunk.with_receipt(receipt), Some(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::{
        ChatMessage, GenerateRequest, Input, RequestId, Role, SamplingParams, SealedHeader,
        UsageBounds,
    };

    /// An attested (development) worker's sealing, and how a gateway names it.
    fn attested() -> (tempfile::TempDir, Arc<Sealing>, cocoon_seal::SealTo) {
        let dir = tempfile::tempdir().unwrap();
        let attester = cocoon_tls::AttesterConfig {
            kind: cocoon_tls::AttesterChoice::Dev,
            dev_key_file: Some(dir.path().join("dev-attester.key")),
            dev_mrtd: None,
        };
        let identity = attester.identity(None, "w", "worker", None).unwrap();
        let (identity, sealing) = with_sealing_key(identity).unwrap();
        let sealing = Arc::new(sealing.expect("an attested worker opens sealed requests"));
        let to = cocoon_seal::SealTo {
            worker: identity.fingerprint().to_string(),
            encryption_key: sealing.keys.public_key(),
            signing_key: identity.public_key().try_into().unwrap(),
        };
        (dir, sealing, to)
    }

    /// `prompt` sealed to `to`, its body naming `scope` as its cache scope.
    fn sealed(
        to: &cocoon_seal::SealTo,
        scope: Option<&str>,
        prompt: &str,
    ) -> cocoon_protocol::SealedRequest {
        let request = GenerateRequest {
            model: "m".into(),
            input: Input::Chat {
                messages: vec![ChatMessage::new(Role::User, prompt)],
                tools: None,
            },
            params: SamplingParams::default(),
            max_price: None,
            cache_scope: scope.map(str::to_owned),
        };
        let header = SealedHeader {
            request_id: RequestId([3; 16]),
            model: "m".into(),
            max_tokens: None,
            max_price: None,
            prompt_bound: UsageBounds::new(&request, u32::MAX).prompt(),
            affinity: None,
            cache_hint: None,
        };
        cocoon_seal::seal_request(
            header,
            &request,
            &[Arc::new(cocoon_seal::Session::new(to.clone()).unwrap())],
        )
        .unwrap()
        .0
    }

    /// REVIEW, fixed: a sealed request's prompt-cache scope is the proxy's `cache_scope` alone (outside
    /// the seal, replacing whatever the body says), so a proxy reading no prompt still chooses
    /// which requests share cached cells: it gives a client's sealed request a scope of its own
    /// and sends probes in that scope (in clear, or sealed by itself to the same worker: it has
    /// the certificate), and each probe's clear `cached_tokens` says how much of the client's
    /// prompt it guessed (the leak `cache_salt` exists to stop between clients). Fix: the worker
    /// derives the scope from the proxy's and a secret the gateway seals in the body (its
    /// keyed per-app scope), so that only requests of the same gateway and hint share cells.
    #[test]
    fn review_the_proxy_alone_cannot_put_a_sealed_prompt_in_a_cache_it_can_probe() {
        let (_dir, sealing, to) = attested();
        let chosen = "a scope the proxy chose";
        let mut client = sealed(
            &to,
            Some("a secret of the client's gateway"),
            "the client's secret system prompt",
        );
        let mut probe = sealed(&to, None, "the client's secret sys");
        client.cache_scope = Some(chosen.into());
        probe.cache_scope = Some(chosen.into());
        let client = sealing.open(&client, None).unwrap().request.cache_scope;
        let probe = sealing.open(&probe, None).unwrap().request.cache_scope;
        assert!(
            client.is_none() || (client != probe && client.as_deref() != Some(chosen)),
            "the client's sealed prompt shares the cache scope {client:?} the proxy chose and \
             probes in (sealed probe: {probe:?}; a clear probe names {chosen:?})"
        );
    }

    /// REVIEW, fixed: a proxy that leaves out its own scope (`SealedRequest::cache_scope` is outside
    /// the seal, the proxy's to set) has the worker open a gateway's sealed request with no
    /// cache scope at all (`(None, Some(gateway)) => None`), and no scope is "shares nothing"
    /// only on the llama backend: the upstream backend then sends no `cache_salt`, so vLLM
    /// keeps the sealed prompt in its unsalted prefix cache, the one every request without a
    /// salt shares, such as the clear probes the proxy sends this worker itself with no
    /// `cache_scope`; their `cached_tokens` read how the client's prompt began (the leak the
    /// combined scope was meant to close). Fix: a sealed request never runs without a scope:
    /// when either part is missing, use the part there is (hashed with a label) or a fresh
    /// random scope (or refuse the request).
    #[test]
    fn review_a_proxy_that_drops_its_scope_does_not_unsalt_a_sealed_prompt() {
        let (_dir, sealing, to) = attested();
        let mut client = sealed(
            &to,
            Some("a secret of the client's gateway"),
            "the client's secret system prompt",
        );
        // The proxy sends it on without its own scope.
        client.cache_scope = None;
        match sealing.open(&client, None) {
            Err(_) => {} // refusing it is a fix too
            Ok(opened) => assert!(
                opened.request.cache_scope.is_some(),
                "the client's sealed prompt runs with no cache scope: an upstream (vLLM) \
                 backend puts it in the unsalted cache the proxy's own clear requests probe"
            ),
        }
    }
}
