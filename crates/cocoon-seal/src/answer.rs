//! The answer's chunks: each event encrypted under the key exported from the request's HPKE
//! context, numbered from 0, its clear counts authenticated with it. The gateway accepts
//! chunks only in order, and an answer only once its last chunk (the worker's `Done`, with the
//! worker's receipt over every chunk) has arrived.

use cocoon_protocol::{FinishReason, GenerateEvent, Receipt, RequestId, Usage};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::digest::{Context, SHA256};

use crate::{SealError, b64, unb64};

fn aead_key(raw: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, raw).expect("32-byte key"))
}

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
    seq: u64,
    hash: Context,
}

impl std::fmt::Debug for AnswerSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnswerSealer(seq {})", self.seq)
    }
}

impl AnswerSealer {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Self {
            key: aead_key(key),
            seq: 0,
            hash: Context::new(&SHA256),
        }
    }

    /// `event` sealed: a `Delta` or `Reasoning` as a chunk, a `Done` as the last chunk (its
    /// receipt is for the caller to add). An `Error` is not sealed (`None`): it is the proxy's
    /// to read and word.
    pub fn seal(&mut self, event: &GenerateEvent) -> Option<GenerateEvent> {
        let (tokens, reasoning, last) = match event {
            GenerateEvent::Delta { tokens, .. } => (*tokens, 0, false),
            GenerateEvent::Reasoning { tokens, .. } => (*tokens, *tokens, false),
            GenerateEvent::Done { .. } => (0, 0, true),
            GenerateEvent::Error { .. } | GenerateEvent::Sealed { .. } => return None,
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
    key: LessSafeKey,
}

impl Candidate {
    pub(crate) fn new(worker: String, signing_key: [u8; 32], key: &[u8; 32]) -> Self {
        Self {
            worker,
            signing_key,
            key: aead_key(key),
        }
    }
}

/// The gateway's side: opens the chunks of whichever candidate answers, in order, and checks
/// the end of the answer and its receipt.
pub struct AnswerOpener {
    request_id: RequestId,
    model: String,
    candidates: Vec<Candidate>,
    /// The candidate whose key opened the first chunk: the one that serves.
    chosen: Option<usize>,
    next: u64,
    hash: Context,
    /// The worker's own `Done`, from the last chunk.
    done: Option<(FinishReason, Usage)>,
    receipt: Option<Receipt>,
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
        }
    }

    /// The fingerprint of the worker serving the answer, once its first chunk opened.
    pub fn worker(&self) -> Option<&str> {
        self.chosen.map(|i| self.candidates[i].worker.as_str())
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
                receipt,
            } => self.chunk(seq, last, tokens, reasoning, &data, receipt),
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
            GenerateEvent::Error { error } => Ok(Some(GenerateEvent::Error { error })),
            GenerateEvent::Delta { .. } | GenerateEvent::Reasoning { .. } => Err(
                SealError::Tampered("text in clear where the answer is sealed".into()),
            ),
        }
    }

    fn chunk(
        &mut self,
        seq: u64,
        last: bool,
        tokens: u32,
        reasoning: u32,
        data: &str,
        receipt: Option<Box<Receipt>>,
    ) -> Result<Option<GenerateEvent>, SealError> {
        if self.done.is_some() {
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
        let try_open = |c: &Candidate| {
            let mut buf = sealed.clone();
            c.key
                .open_in_place(nonce(seq), Aad::from(aad), &mut buf)
                .ok()
                .map(|p| p.to_vec())
        };
        let plain = match self.chosen {
            Some(i) => try_open(&self.candidates[i]),
            None => self
                .candidates
                .iter()
                .enumerate()
                .find_map(|(i, c)| try_open(c).map(|p| (i, p)))
                .map(|(i, p)| {
                    self.chosen = Some(i);
                    p
                }),
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
            (GenerateEvent::Delta { tokens: t, .. }, false) if *t == tokens && reasoning == 0 => {
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
                let worker = &self.candidates[self.chosen.expect("a chunk opened")];
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
            _ => Err(SealError::Tampered(format!(
                "chunk {seq}'s clear counts or place do not match what it holds"
            ))),
        }
    }
}
