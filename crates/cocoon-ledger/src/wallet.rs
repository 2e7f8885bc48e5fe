//! Signed transactions: how a party that does not share the ledger's process proves it sent an
//! operation. As a TON wallet does with its seqno, every transaction carries a nonce that must
//! exceed the sender's last one, so a captured transaction cannot be replayed; and it names the
//! network it is for, so it cannot be replayed on another ledger the same key uses either.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::ledger::Op;
use crate::types::{Network, PublicKey, hex_32};

/// What a sender signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxBody {
    /// Who sends the operation; the signature must verify under this key.
    #[serde(with = "hex_32")]
    pub sender: PublicKey,
    /// The operation to execute.
    pub op: Op,
    /// Must exceed the sender's previous nonce.
    pub nonce: u64,
    /// The network of the ledger it is for; any other refuses it.
    pub network: Network,
}

/// A transaction as it travels: the exact JSON text that was signed, and the signature over
/// its SHA-256 (hex). Keeping the text avoids any question of canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTx {
    /// The signed [`TxBody`], as the exact JSON text that was signed.
    pub body: String,
    /// The sender's Ed25519 signature over the body's domain-prefixed SHA-256, in hex.
    pub signature: String,
}

fn digest(body: &str) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // A domain prefix so a transaction signature can never pass for a payment message's.
    ctx.update(b"cocoon-ledger-tx/v1\0");
    ctx.update(body.as_bytes());
    ctx.finish()
}

impl SignedTx {
    /// Parses the body and checks the signature against the sender it names.
    pub fn open(&self) -> Result<TxBody, LedgerError> {
        let body: TxBody = serde_json::from_str(&self.body)
            .map_err(|e| LedgerError::BadTransaction(format!("malformed body: {e}")))?;
        let signature = hex::decode(&self.signature)
            .map_err(|_| LedgerError::BadTransaction("signature is not hex".into()))?;
        UnparsedPublicKey::new(&ED25519, &body.sender)
            .verify(digest(&self.body).as_ref(), &signature)
            .map_err(|_| {
                LedgerError::BadTransaction("signature does not match the sender".into())
            })?;
        Ok(body)
    }
}

/// A party's signing key, with the nonce of its next transaction.
pub struct Wallet {
    key: Ed25519KeyPair,
    public: PublicKey,
    last_nonce: AtomicU64,
}

impl Wallet {
    /// A wallet for `key`, its nonces starting from the clock.
    pub fn new(key: Ed25519KeyPair) -> Self {
        let public = key
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes");
        Self {
            key,
            public,
            last_nonce: AtomicU64::new(0),
        }
    }

    /// A wallet whose key derives from `seed`: reproducible keys for tests and examples.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self::new(Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are a seed"))
    }

    /// Reads a PKCS#8 Ed25519 key (the key files every role already has).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, LedgerError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(Self::new)
            .map_err(|e| LedgerError::BadTransaction(format!("not an Ed25519 key: {e}")))
    }

    /// The wallet's public key: the sender of its transactions.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The wallet's signing key, e.g. for signing payment messages with the same identity.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key
    }

    /// Signs `op` with a fresh nonce: microseconds since the epoch, or one more than the last
    /// nonce if the clock has not moved, so that several processes holding the same key (a
    /// proxy and its operator's CLI) rarely collide and never go backwards within one.
    pub fn sign(&self, op: Op, network: Network) -> SignedTx {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let prev = self
            .last_nonce
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .expect("the update never declines");
        self.sign_with_nonce(op, now.max(prev + 1), network)
    }

    /// Signs `op` with the given nonce (tests use this to replay and reorder).
    pub fn sign_with_nonce(&self, op: Op, nonce: u64, network: Network) -> SignedTx {
        let body = serde_json::to_string(&TxBody {
            sender: self.public,
            op,
            nonce,
            network,
        })
        .expect("transactions serialize");
        let signature = hex::encode(self.key.sign(digest(&body).as_ref()));
        SignedTx { body, signature }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: Network = Network::UNNAMED;

    fn wallet(seed: u8) -> Wallet {
        Wallet::new(Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap())
    }

    #[test]
    fn signed_tx_opens_only_untouched() {
        let w = wallet(1);
        let tx = w.sign(Op::ProxyClose, NET);
        let body = tx.open().unwrap();
        assert_eq!(body.sender, w.public_key());
        assert_eq!(body.op, Op::ProxyClose);

        // Another sender named in the body: the signature no longer matches.
        let mut forged = tx.clone();
        forged.body = forged
            .body
            .replace(&hex::encode(w.public_key()), &hex::encode([2u8; 32]));
        assert!(matches!(forged.open(), Err(LedgerError::BadTransaction(_))));
        // A changed nonce.
        let mut forged = tx.clone();
        forged.body = forged
            .body
            .replace(&format!("\"nonce\":{}", body.nonce), "\"nonce\":1");
        assert!(forged.open().is_err());
        // A garbage signature.
        let mut forged = tx;
        forged.signature = "zz".into();
        assert!(forged.open().is_err());
    }

    #[test]
    fn nonces_increase() {
        let w = wallet(1);
        let a = w.sign(Op::ProxyClose, NET).open().unwrap().nonce;
        let b = w.sign(Op::ProxyClose, NET).open().unwrap().nonce;
        let c = w.sign(Op::ProxyClose, NET).open().unwrap().nonce;
        assert!(a < b && b < c, "{a} {b} {c}");
    }
}
