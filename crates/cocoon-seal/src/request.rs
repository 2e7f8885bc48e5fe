//! Sealing a request for its candidate workers, and opening it on the one chosen.

use cocoon_protocol::{GenerateRequest, Recipient, SealedHeader, SealedRequest};
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom;

use crate::answer::{AnswerOpener, AnswerSealer, Candidate};
use crate::keys::{Aead, Kdf, Kem, WorkerKeys, public_key};
use crate::{SealError, b64, unb64};

/// HPKE's `info`: binds every context to this protocol and its version.
const INFO: &[u8] = b"cocoon-seal/1 request";
/// The exporter context the answer's key is derived under.
const ANSWER_KEY: &[u8] = b"cocoon-seal/1 answer";

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

/// Seals `request` under `header` for each of `to`; the gateway keeps the returned opener to
/// read the answer of whichever candidate serves it.
pub fn seal_request(
    header: SealedHeader,
    request: &GenerateRequest,
    to: &[SealTo],
) -> Result<(SealedRequest, AnswerOpener), SealError> {
    check_header(&header, request)?;
    let aad = associated_data(&header);
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| SealError::Malformed("the system's random generator failed".into()))?;
    let mut body = serde_json::to_vec(request).expect("requests always serialize");
    aead_key(&key)
        .seal_in_place_append_tag(body_nonce(), Aad::from(&aad), &mut body)
        .map_err(|_| SealError::Malformed("the request is too large to seal".into()))?;
    let mut recipients = Vec::with_capacity(to.len());
    let mut candidates = Vec::with_capacity(to.len());
    for worker in to {
        let bad = || SealError::BadPublicKey {
            worker: worker.worker.clone(),
        };
        let pk = public_key(&worker.encryption_key).ok_or_else(bad)?;
        let (enc, mut ctx) =
            hpke::setup_sender::<Aead, Kdf, Kem>(&OpModeS::Base, &pk, INFO).map_err(|_| bad())?;
        let wrapped = ctx.seal(&key, &aad).map_err(|_| bad())?;
        let mut answer_key = [0u8; 32];
        ctx.export(ANSWER_KEY, &mut answer_key)
            .expect("32 bytes is within HKDF-SHA256's export limit");
        recipients.push(Recipient {
            worker: worker.worker.clone(),
            enc: b64(&enc.to_bytes()),
            key: b64(&wrapped),
        });
        candidates.push(Candidate::new(
            worker.worker.clone(),
            worker.signing_key,
            answer_key,
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
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&unb64(&recipient.enc, "enc")?)
        .map_err(|_| SealError::Malformed("enc is not an X25519 public key".into()))?;
    let mut ctx = hpke::setup_receiver::<Aead, Kdf, Kem>(&OpModeR::Base, &keys.private, &enc, INFO)
        .map_err(|_| SealError::DoesNotOpen("the request's key"))?;
    let key: [u8; 32] = ctx
        .open(&unb64(&recipient.key, "key")?, &aad)
        .map_err(|_| SealError::DoesNotOpen("the request's key"))?
        .try_into()
        .map_err(|_| SealError::Malformed("the request's key is not 32 bytes".into()))?;
    let mut body = unb64(&sealed.body, "body")?;
    let plain = aead_key(&key)
        .open_in_place(body_nonce(), Aad::from(&aad), &mut body)
        .map_err(|_| SealError::DoesNotOpen("the request"))?;
    let request: GenerateRequest = serde_json::from_slice(plain)
        .map_err(|e| SealError::Malformed(format!("the sealed request is not a request: {e}")))?;
    check_header(&sealed.header, &request)?;
    let mut answer_key = [0u8; 32];
    ctx.export(ANSWER_KEY, &mut answer_key)
        .expect("32 bytes is within HKDF-SHA256's export limit");
    Ok(OpenedRequest {
        request,
        answer: AnswerSealer::new(&answer_key),
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
