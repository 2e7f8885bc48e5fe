//! A worker's encryption key pair.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use hpke::{Deserializable, Kem as _, Serializable};
use ring::aead::LessSafeKey;

use crate::SealError;

pub(crate) type Kem = hpke::kem::X25519HkdfSha256;
pub(crate) type Kdf = hpke::kdf::HkdfSha256;
pub(crate) type Aead = hpke::aead::ChaCha20Poly1305;

/// Gateway sessions a worker keeps open at most; the oldest is forgotten first (its gateway's
/// next request opens it again, one key agreement).
const SESSIONS: usize = 4096;

/// A worker's HPKE key pair, made in memory at start (inside the TD) and never written down:
/// its public half is named in the worker's attested claims, so only the attested process can
/// read what is sealed to it. It keeps the gateways' sessions it opened.
pub struct WorkerKeys {
    pub(crate) private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
    sessions: Mutex<Sessions>,
}

/// Opened sessions' wrapping keys by their encapsulated key, oldest first.
#[derive(Default)]
struct Sessions {
    keys: HashMap<String, Arc<LessSafeKey>>,
    order: VecDeque<String>,
}

impl WorkerKeys {
    /// A fresh key pair.
    pub fn generate() -> Self {
        let (private, public) = Kem::gen_keypair();
        let public = public
            .to_bytes()
            .as_slice()
            .try_into()
            .expect("X25519 public keys are 32 bytes");
        Self {
            private,
            public,
            sessions: Mutex::default(),
        }
    }

    /// The wrapping key of the session whose encapsulated key is `enc`: kept, or opened by
    /// `open` (a key agreement) and kept.
    pub(crate) fn session(
        &self,
        enc: &str,
        open: impl FnOnce(&str) -> Result<LessSafeKey, SealError>,
    ) -> Result<Arc<LessSafeKey>, SealError> {
        if let Some(key) = self.lock().keys.get(enc) {
            return Ok(key.clone());
        }
        let key = Arc::new(open(enc)?);
        let mut sessions = self.lock();
        if sessions.keys.len() >= SESSIONS
            && let Some(oldest) = sessions.order.pop_front()
        {
            sessions.keys.remove(&oldest);
        }
        if sessions.keys.insert(enc.to_owned(), key.clone()).is_none() {
            sessions.order.push_back(enc.to_owned());
        }
        Ok(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The public key (X25519, 32 bytes): what the worker's claims name.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }
}

impl std::fmt::Debug for WorkerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerKeys({})", hex::encode(self.public))
    }
}

/// `raw` as a recipient key.
pub(crate) fn public_key(raw: &[u8]) -> Option<<Kem as hpke::Kem>::PublicKey> {
    <Kem as hpke::Kem>::PublicKey::from_bytes(raw).ok()
}
