//! Sealing a request for its candidate workers, and opening it on the one chosen.
//!
//! A gateway keeps one HPKE context with each verified candidate for as long as it keeps the
//! candidate list (a [`Session`]): one key agreement per worker per refresh, not per request.
//! Each request has its own secret (32 random bytes) from which its body key and its answer's
//! keys are derived; the secret is wrapped for each candidate under a key exported from that
//! candidate's context, with a random nonce. The worker keeps the contexts it has opened
//! (bounded), so it too agrees a key once per gateway session.

use std::sync::Arc;

use cocoon_protocol::{GenerateRequest, Recipient, SealedHeader, SealedRequest};
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom;

use crate::answer::{AnswerOpener, AnswerSealer, Candidate};
use crate::keys::{Aead, Kdf, Kem, WorkerKeys, public_key};
use crate::{SealError, b64, unb64};

/// HPKE's `info`: binds every context to this protocol and its version.
const INFO: &[u8] = b"cocoon-seal/1 session";
/// The exporter context a session's wrapping key is derived under.
const WRAP_KEY: &[u8] = b"cocoon-seal/1 wrap";
/// HKDF's `info` for a request's body key, from the request's secret.
const BODY_KEY: &[u8] = b"cocoon-seal/1 body";

/// A candidate worker, as the gateway verified it.
#[derive(Debug, Clone)]
pub struct SealTo {
    /// Its key fingerprint (hex), as the proxy names it.
    pub worker: String,
    /// Its X25519 encryption key, from its attested claims.
    pub encryption_key: [u8; 32],
    /// Its Ed25519 key (the certificate's), which signs its receipts.
    pub signing_key: [u8; 32],
}

/// A gateway's HPKE context with one verified candidate, reused for the requests sealed to it
/// until the gateway verifies its candidates again.
pub struct Session {
    to: SealTo,
    /// HPKE's encapsulated key: how the worker finds (or opens) the same context.
    enc: String,
    wrap: LessSafeKey,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("worker", &self.to.worker)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A fresh context with `to` (one X25519 key agreement).
    pub fn new(to: SealTo) -> Result<Self, SealError> {
        let bad = || SealError::BadPublicKey {
            worker: to.worker.clone(),
        };
        let pk = public_key(&to.encryption_key).ok_or_else(bad)?;
        let (enc, ctx) =
            hpke::setup_sender::<Aead, Kdf, Kem>(&OpModeS::Base, &pk, INFO).map_err(|_| bad())?;
        let mut wrap = [0u8; 32];
        ctx.export(WRAP_KEY, &mut wrap)
            .expect("32 bytes is within HKDF-SHA256's export limit");
        Ok(Self {
            enc: b64(&enc.to_bytes()),
            wrap: aead_key(&wrap),
            to,
        })
    }

    /// The worker this session is with.
    pub fn to(&self) -> &SealTo {
        &self.to
    }
}

/// The header's bytes as every seal authenticates them.
fn associated_data(header: &SealedHeader) -> Vec<u8> {
    serde_json::to_vec(header).expect("headers always serialize")
}

/// The fixed nonce of a body key: each key seals exactly one body.
fn body_nonce() -> Nonce {
    Nonce::assume_unique_for_key([0; 12])
}

fn aead_key(raw: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, raw).expect("32-byte key"))
}

/// The body key of the request whose secret is `secret`.
fn body_key(secret: &[u8; 32]) -> LessSafeKey {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(secret);
    let okm = prk
        .expand(&[BODY_KEY], &CHACHA20_POLY1305)
        .expect("one key is within HKDF's limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| SealError::Malformed("the system's random generator failed".into()))?;
    Ok(out)
}

/// Seals `request` under `header` for each of `to`; the gateway keeps the returned opener to
/// read the answer of whichever candidate serves it.
pub fn seal_request(
    header: SealedHeader,
    request: &GenerateRequest,
    to: &[Arc<Session>],
) -> Result<(SealedRequest, AnswerOpener), SealError> {
    check_header(&header, request)?;
    let aad = associated_data(&header);
    let secret: [u8; 32] = random()?;
    let mut body = serde_json::to_vec(request).expect("requests always serialize");
    body_key(&secret)
        .seal_in_place_append_tag(body_nonce(), Aad::from(&aad), &mut body)
        .map_err(|_| SealError::Malformed("the request is too large to seal".into()))?;
    let mut recipients = Vec::with_capacity(to.len());
    let mut candidates = Vec::with_capacity(to.len());
    for session in to {
        // A random nonce per wrap: a session's key wraps many secrets (far fewer than the
        // 2^32 a 96-bit random nonce allows).
        let nonce: [u8; 12] = random()?;
        let mut wrapped = secret.to_vec();
        session
            .wrap
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut wrapped,
            )
            .expect("32 bytes seal");
        recipients.push(Recipient {
            worker: session.to.worker.clone(),
            enc: session.enc.clone(),
            nonce: b64(&nonce),
            key: b64(&wrapped),
        });
        candidates.push(Candidate::new(
            session.to.worker.clone(),
            session.to.signing_key,
            secret,
        ));
    }
    let opener = AnswerOpener::new(header.request_id, header.model.clone(), candidates);
    let sealed = SealedRequest {
        header,
        recipients,
        body: b64(&body),
        cache_scope: None,
    };
    Ok((sealed, opener))
}

/// A request opened by the worker it was sealed for.
#[derive(Debug)]
pub struct OpenedRequest {
    /// The request, as the gateway sent it.
    pub request: GenerateRequest,
    /// Seals the answer for the gateway.
    pub answer: AnswerSealer,
}

/// Opens `sealed` as the worker whose fingerprint is `me` (hex) and whose keys are `keys`.
pub fn open_request(
    sealed: &SealedRequest,
    me: &str,
    keys: &WorkerKeys,
) -> Result<OpenedRequest, SealError> {
    let recipient = sealed.recipient(me).ok_or(SealError::NotARecipient)?;
    let aad = associated_data(&sealed.header);
    let wrap = keys.session(&recipient.enc, |enc| {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&unb64(enc, "enc")?)
            .map_err(|_| SealError::Malformed("enc is not an X25519 public key".into()))?;
        let ctx = hpke::setup_receiver::<Aead, Kdf, Kem>(&OpModeR::Base, &keys.private, &enc, INFO)
            .map_err(|_| SealError::DoesNotOpen("the request's key"))?;
        let mut wrap = [0u8; 32];
        ctx.export(WRAP_KEY, &mut wrap)
            .expect("32 bytes is within HKDF-SHA256's export limit");
        Ok(aead_key(&wrap))
    })?;
    let nonce: [u8; 12] = unb64(&recipient.nonce, "nonce")?
        .try_into()
        .map_err(|_| SealError::Malformed("the nonce is not 12 bytes".into()))?;
    let mut wrapped = unb64(&recipient.key, "key")?;
    let secret: [u8; 32] = wrap
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut wrapped,
        )
        .map_err(|_| SealError::DoesNotOpen("the request's key"))?
        .try_into()
        .map_err(|_| SealError::Malformed("the request's key is not 32 bytes".into()))?;
    let mut body = unb64(&sealed.body, "body")?;
    let plain = body_key(&secret)
        .open_in_place(body_nonce(), Aad::from(&aad), &mut body)
        .map_err(|_| SealError::DoesNotOpen("the request"))?;
    let request: GenerateRequest = serde_json::from_slice(plain)
        .map_err(|e| SealError::Malformed(format!("the sealed request is not a request: {e}")))?;
    check_header(&sealed.header, &request)?;
    Ok(OpenedRequest {
        request,
        answer: AnswerSealer::new(&secret, me),
    })
}

/// The proxy routes and bills by the header: the body must say the same.
fn check_header(header: &SealedHeader, request: &GenerateRequest) -> Result<(), SealError> {
    if header.model != request.model {
        return Err(SealError::HeaderMismatch(format!(
            "model {:?} in clear, {:?} sealed",
            header.model, request.model
        )));
    }
    if header.max_tokens != request.params.max_tokens {
        return Err(SealError::HeaderMismatch(format!(
            "max_tokens {:?} in clear, {:?} sealed",
            header.max_tokens, request.params.max_tokens
        )));
    }
    let bound = cocoon_protocol::UsageBounds::new(request, u32::MAX).prompt();
    if header.prompt_bound < bound {
        return Err(SealError::HeaderMismatch(format!(
            "prompt_bound {} in clear, {bound} for the sealed prompt",
            header.prompt_bound
        )));
    }
    if header.max_price != request.max_price {
        return Err(SealError::HeaderMismatch(format!(
            "max_price {:?} in clear, {:?} sealed",
            header.max_price, request.max_price
        )));
    }
    Ok(())
}
