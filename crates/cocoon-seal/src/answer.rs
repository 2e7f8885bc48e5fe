//! The answer's chunks: each event encrypted under a key derived from the secret exported
//! from the request's HPKE context and a fresh salt of the worker's (sent with the first
//! chunk, so that a request a proxy replays to the same worker never reuses a key and nonce),
//! numbered from 0, its clear counts authenticated with it. The gateway accepts chunks only in
//! order, and an answer only once its last chunk (the worker's `Done`, with the worker's
//! receipt over every chunk) has arrived.

use cocoon_protocol::{FinishReason, GenerateEvent, Receipt, RequestId, Usage};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::digest::{Context, SHA256};
use ring::rand::SecureRandom;

use crate::{SealError, b64, unb64};

/// The chunks' key: HKDF-SHA256 of the request's secret under the worker's salt, for the
/// worker whose fingerprint is `worker`. Every recipient holds the secret; the fingerprint
/// makes the key the serving worker's, so the gateway knows whose receipt to expect.
fn chunk_key(secret: &[u8; 32], salt: &[u8], worker: &str) -> LessSafeKey {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(secret);
    let info: [&[u8]; 2] = [b"cocoon-seal/1 chunks ", worker.as_bytes()];
    let okm = prk
        .expand(&info, &CHACHA20_POLY1305)
        .expect("one key is within HKDF's limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Bytes of the worker's salt.
const SALT_BYTES: usize = 32;

/// Each chunk's nonce is its position: a key never seals two chunks under one nonce.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// What a chunk authenticates beside its ciphertext: its place and its clear counts.
fn associated_data(seq: u64, last: bool, tokens: u32, reasoning: u32) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..15].copy_from_slice(b"cocoon-seal/1 a");
    aad[15] = u8::from(last);
    aad[16..24].copy_from_slice(&seq.to_be_bytes());
    aad[24..28].copy_from_slice(&tokens.to_be_bytes());
    aad[28..32].copy_from_slice(&reasoning.to_be_bytes());
    aad
}

/// Adds one chunk's plaintext to the answer's hash (length-prefixed, so chunk boundaries
/// count).
fn hash_chunk(hash: &mut Context, plain: &[u8]) {
    hash.update(&(plain.len() as u64).to_be_bytes());
    hash.update(plain);
}

/// The worker's side: seals each event of its answer.
pub struct AnswerSealer {
    key: LessSafeKey,
    /// Sent with the first chunk.
    salt: Option<[u8; SALT_BYTES]>,
    seq: u64,
    hash: Context,
}

impl std::fmt::Debug for AnswerSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnswerSealer(seq {})", self.seq)
    }
}

impl AnswerSealer {
    pub(crate) fn new(secret: &[u8; 32], worker: &str) -> Self {
        let mut salt = [0u8; SALT_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .expect("the system's random generator works");
        Self {
            key: chunk_key(secret, &salt, worker),
            salt: Some(salt),
            seq: 0,
            hash: Context::new(&SHA256),
        }
    }

    /// `event` sealed: a `Delta` or `Reasoning` as a chunk, a `Done` as the last chunk (its
    /// receipt is for the caller to add), an `Error` as a last chunk too (its words may quote
    /// the prompt: the proxy gets them withheld, in a clear error of its own).
    pub fn seal(&mut self, event: &GenerateEvent) -> Option<GenerateEvent> {
        let (tokens, reasoning, last) = match event {
            GenerateEvent::Delta { tokens, .. } | GenerateEvent::ToolCall { tokens, .. } => {
                (*tokens, 0, false)
            }
            GenerateEvent::Embedding { .. } => (0, 0, false),
            GenerateEvent::Reasoning { tokens, .. } => (*tokens, *tokens, false),
            GenerateEvent::Done { .. } | GenerateEvent::Error { .. } => (0, 0, true),
            GenerateEvent::Sealed { .. } => return None,
        };
        let mut data = serde_json::to_vec(event).expect("events always serialize");
        hash_chunk(&mut self.hash, &data);
        let seq = self.seq;
        self.seq += 1;
        self.key
            .seal_in_place_append_tag(
                nonce(seq),
                Aad::from(associated_data(seq, last, tokens, reasoning)),
                &mut data,
            )
            .expect("chunks are far below ChaCha20-Poly1305's limit");
        Some(GenerateEvent::Sealed {
            seq,
            last,
            tokens,
            reasoning,
            data: b64(&data),
            salt: self.salt.take().map(|s| b64(&s)),
            receipt: None,
        })
    }

    /// Hex SHA-256 of every chunk sealed so far: what the receipt names.
    pub fn answer_sha256(&self) -> String {
        hex::encode(self.hash.clone().finish())
    }
}

/// One candidate the gateway sealed the request for.
pub(crate) struct Candidate {
    worker: String,
    signing_key: [u8; 32],
    /// The secret exported from its HPKE context.
    secret: [u8; 32],
}

impl Candidate {
    pub(crate) fn new(worker: String, signing_key: [u8; 32], secret: [u8; 32]) -> Self {
        Self {
            worker,
            signing_key,
            secret,
        }
    }
}

/// The gateway's side: opens the chunks of whichever candidate answers, in order, and checks
/// the end of the answer and its receipt.
pub struct AnswerOpener {
    request_id: RequestId,
    model: String,
    candidates: Vec<Candidate>,
    /// The candidate whose key opened the first chunk (the one that serves), and that key.
    chosen: Option<(usize, LessSafeKey)>,
    next: u64,
    hash: Context,
    /// The worker's own `Done`, from the last chunk.
    done: Option<(FinishReason, Usage)>,
    receipt: Option<Receipt>,
    /// The worker's own error, from a last chunk that holds one.
    error: Option<cocoon_protocol::ProtocolError>,
}

impl std::fmt::Debug for AnswerOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerOpener")
            .field("request_id", &self.request_id)
            .field("next", &self.next)
            .field("worker", &self.worker())
            .finish()
    }
}

impl AnswerOpener {
    pub(crate) fn new(request_id: RequestId, model: String, candidates: Vec<Candidate>) -> Self {
        Self {
            request_id,
            model,
            candidates,
            chosen: None,
            next: 0,
            hash: Context::new(&SHA256),
            done: None,
            receipt: None,
            error: None,
        }
    }

    /// The fingerprint of the worker serving the answer, once its first chunk opened.
    pub fn worker(&self) -> Option<&str> {
        self.chosen
            .as_ref()
            .map(|(i, _)| self.candidates[*i].worker.as_str())
    }

    /// `error`, a refusal of the request before any answer, with the worker's own words in
    /// place of the withheld ones when it sealed them (it may have; it cannot be made to).
    pub fn refusal(
        &mut self,
        error: cocoon_protocol::ProtocolError,
    ) -> cocoon_protocol::ProtocolError {
        let Some(chunk) = error.sealed_words.clone() else {
            return error;
        };
        match self.open(*chunk) {
            Ok(None) => match self.error.take() {
                Some(own) => error.with_own_words(&own),
                None => error,
            },
            // Words that do not open are dropped: the withheld ones stand.
            _ => cocoon_protocol::ProtocolError {
                sealed_words: None,
                ..error
            },
        }
    }

    /// The worker's verified receipt, once the last chunk arrived.
    pub fn receipt(&self) -> Option<&Receipt> {
        self.receipt.as_ref()
    }

    /// The next event for the app from `event` as the proxy relayed it: a chunk's event, the
    /// proxy's `Done` once the last chunk has been checked, an `Error` as it is; `None` for
    /// the last chunk (its `Done` is the worker's, and the proxy's follows with the bill).
    pub fn open(&mut self, event: GenerateEvent) -> Result<Option<GenerateEvent>, SealError> {
        match event {
            GenerateEvent::Sealed {
                seq,
                last,
                tokens,
                reasoning,
                data,
                salt,
                receipt,
            } => self.chunk(seq, (last, tokens, reasoning), &data, salt, receipt),
            GenerateEvent::Done {
                finish_reason,
                usage,
                billing,
            } => {
                if self.done.is_none() {
                    return Err(SealError::Tampered(
                        "the answer ended before the worker's last chunk (truncated)".into(),
                    ));
                }
                // The proxy's counts against the receipt's are the bill check's (see
                // `receipt`): a difference is reported like any bad bill.
                Ok(Some(GenerateEvent::Done {
                    finish_reason,
                    usage,
                    billing,
                }))
            }
            // The proxy's words (what it billed) with the worker's own, which it could not read.
            GenerateEvent::Error { error } => Ok(Some(GenerateEvent::Error {
                error: match self.error.take() {
                    Some(own) => error.with_own_words(&own),
                    None => error,
                },
            })),
            GenerateEvent::Delta { .. }
            | GenerateEvent::Reasoning { .. }
            | GenerateEvent::ToolCall { .. }
            | GenerateEvent::Embedding { .. } => Err(SealError::Tampered(
                "text in clear where the answer is sealed".into(),
            )),
        }
    }

    fn chunk(
        &mut self,
        seq: u64,
        (last, tokens, reasoning): (bool, u32, u32),
        data: &str,
        salt: Option<String>,
        receipt: Option<Box<Receipt>>,
    ) -> Result<Option<GenerateEvent>, SealError> {
        if self.done.is_some() || self.error.is_some() {
            return Err(SealError::Tampered("a chunk after the last one".into()));
        }
        if seq != self.next {
            return Err(SealError::Tampered(format!(
                "chunk {seq} where chunk {} was due (dropped, repeated or reordered)",
                self.next
            )));
        }
        let sealed = unb64(data, "a chunk")?;
        let aad = associated_data(seq, last, tokens, reasoning);
        // Opened in place: one buffer per chunk once the serving worker is known.
        let try_open = |key: &LessSafeKey, mut buf: Vec<u8>| {
            let len = key
                .open_in_place(nonce(seq), Aad::from(aad), &mut buf)
                .ok()?
                .len();
            buf.truncate(len);
            Some(buf)
        };
        let plain = match &self.chosen {
            Some((_, key)) => try_open(key, sealed),
            None => {
                // The first chunk names the salt; whichever candidate's secret opens it under
                // that salt is the worker that serves.
                let salt = unb64(
                    salt.as_deref().ok_or_else(|| {
                        SealError::Tampered("the first chunk carries no salt".into())
                    })?,
                    "the salt",
                )?;
                if salt.len() != SALT_BYTES {
                    return Err(SealError::Tampered("the salt is not 32 bytes".into()));
                }
                self.candidates
                    .iter()
                    .enumerate()
                    .find_map(|(i, c)| {
                        let key = chunk_key(&c.secret, &salt, &c.worker);
                        try_open(&key, sealed.clone()).map(|p| (i, key, p))
                    })
                    .map(|(i, key, p)| {
                        self.chosen = Some((i, key));
                        p
                    })
            }
        }
        .ok_or_else(|| {
            SealError::Tampered(format!(
                "chunk {seq} does not open under the key of any worker it was sealed for"
            ))
        })?;
        self.next += 1;
        hash_chunk(&mut self.hash, &plain);
        let event: GenerateEvent = serde_json::from_slice(&plain)
            .map_err(|e| SealError::Tampered(format!("chunk {seq} holds no event: {e}")))?;
        match (&event, last) {
            (
                GenerateEvent::Delta { tokens: t, .. } | GenerateEvent::ToolCall { tokens: t, .. },
                false,
            ) if *t == tokens && reasoning == 0 => Ok(Some(event)),
            (GenerateEvent::Embedding { .. }, false) if tokens == 0 && reasoning == 0 => {
                Ok(Some(event))
            }
            (GenerateEvent::Reasoning { tokens: t, .. }, false)
                if *t == tokens && reasoning == tokens =>
            {
                Ok(Some(event))
            }
            (
                GenerateEvent::Done {
                    finish_reason,
                    usage,
                    ..
                },
                true,
            ) => {
                let receipt = receipt.ok_or_else(|| {
                    SealError::BadReceipt("the last chunk carries no receipt".into())
                })?;
                let chosen = self.chosen.as_ref().map(|(i, _)| *i);
                let worker = &self.candidates[chosen.expect("a chunk opened")];
                crate::verify_receipt(&receipt, &worker.signing_key)?;
                let answer = hex::encode(self.hash.clone().finish());
                let expected = [
                    (receipt.request_id == self.request_id, "request id"),
                    (receipt.worker == worker.worker, "worker"),
                    (receipt.model == self.model, "model"),
                    (receipt.answer_sha256 == answer, "answer hash"),
                    (receipt.usage == *usage, "counts"),
                ];
                if let Some((_, what)) = expected.iter().find(|(ok, _)| !ok) {
                    return Err(SealError::BadReceipt(format!(
                        "its {what} is not this answer's"
                    )));
                }
                self.done = Some((*finish_reason, *usage));
                self.receipt = Some(*receipt);
                Ok(None)
            }
            (GenerateEvent::Error { error }, true) if tokens == 0 && receipt.is_none() => {
                self.error = Some(error.clone());
                Ok(None)
            }
            _ => Err(SealError::Tampered(format!(
                "chunk {seq}'s clear counts or place do not match what it holds"
            ))),
        }
    }
}
