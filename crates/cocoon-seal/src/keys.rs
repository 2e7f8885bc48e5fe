//! A worker's encryption key pair.

use hpke::{Deserializable, Kem as _, Serializable};

pub(crate) type Kem = hpke::kem::X25519HkdfSha256;
pub(crate) type Kdf = hpke::kdf::HkdfSha256;
pub(crate) type Aead = hpke::aead::ChaCha20Poly1305;

/// A worker's HPKE key pair, made in memory at start (inside the TD) and never written down:
/// its public half is named in the worker's attested claims, so only the attested process can
/// read what is sealed to it.
pub struct WorkerKeys {
    pub(crate) private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
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
        Self { private, public }
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
