use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ED25519};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// How long a certificate is valid. Short, because a certificate will carry an attestation that
/// goes stale; the identity reissues it well before it expires.
const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Reissue when less than this much validity is left.
const RENEW_BEFORE: Duration = Duration::from_secs(6 * 3600);
/// Backdating tolerates peers whose clocks run a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why a node identity (its key and certificates) could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Generating a new Ed25519 key pair failed.
    #[error("cannot generate key: {0}")]
    Key(rcgen::Error),
    /// Building or signing the self-signed certificate failed.
    #[error("cannot create certificate: {0}")]
    Certificate(rcgen::Error),
    /// The key file could not be read, or a new key could not be written to it.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The key file's path, as shown to people.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file exists but is not an Ed25519 key in PKCS#8 PEM.
    #[error("key file {path} does not hold an Ed25519 PKCS#8 PEM key: {reason}")]
    BadKeyFile {
        /// The key file's path, as shown to people.
        path: String,
        /// What is wrong with its contents.
        reason: String,
    },
    /// Getting a quote over the certificate's claims failed.
    #[error("cannot attest the certificate: {0}")]
    Attestation(cocoon_attest::AttestError),
    /// rustls does not accept the key as a signing key.
    #[error("rustls refused the key: {0}")]
    Rustls(rustls::Error),
    /// An encryption key was given to an identity without attestation: nothing would bind
    /// it to what runs.
    #[error("an encryption key needs an attested identity (set an attester)")]
    NotAttested,
}

/// SHA-256 of a node's raw Ed25519 public key: the stable name of a node, what operators pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a raw 32-byte Ed25519 public key.
    pub fn of_public_key(raw: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, raw);
        Self(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A node's key and its current certificate, reissued automatically before expiry.
pub struct Identity {
    key_pair: KeyPair,
    name: String,
    attestation: Option<Attestation>,
    fingerprint: Fingerprint,
    current: RwLock<Issued>,
}

/// Who produces the quote put in each certificate, and the role claimed beside the key.
struct Attestation {
    attester: Arc<dyn cocoon_attest::Attester>,
    role: String,
    /// What this node measured into RTMR3, named in every certificate's claims.
    measured: Vec<cocoon_attest::MeasuredEvent>,
    /// The node's HPKE public key (a worker's), named in every certificate's claims.
    encryption_key: Option<[u8; 32]>,
}

struct Issued {
    key: Arc<CertifiedKey>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Identity {
    /// A fresh key that lives as long as the process.
    pub fn ephemeral(name: &str) -> Result<Self, IdentityError> {
        let key_pair = KeyPair::generate_for(&PKCS_ED25519).map_err(IdentityError::Key)?;
        Self::from_key_pair(key_pair, name)
    }

    /// The key stored at `path`, created (readable by the owner only) if the file is missing.
    /// A stable key gives a stable fingerprint that peers can pin.
    pub fn load_or_create(path: &Path, name: &str) -> Result<Self, IdentityError> {
        Self::from_key_pair(load_or_create_key(path)?, name)
    }

    /// The key in `key_file` (created if missing), or a fresh one per run when unset: the
    /// `key_file` setting every role shares.
    pub fn from_key_file(key_file: Option<&Path>, name: &str) -> Result<Self, IdentityError> {
        match key_file {
            Some(path) => Self::load_or_create(path, name),
            None => Self::ephemeral(name),
        }
    }

    /// The same key as a ring signer: the key a node's payment contracts are bound to, so
    /// that the party paying or paid is the party the handshake authenticated.
    pub fn signing_key(&self) -> ring::signature::Ed25519KeyPair {
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&self.key_pair.serialize_der())
            .expect("identities hold Ed25519 keys")
    }

    /// The key as PKCS#8 DER: how a chain wallet bound to the same key is made.
    pub fn key_pkcs8(&self) -> Vec<u8> {
        self.key_pair.serialize_der()
    }

    fn from_key_pair(key_pair: KeyPair, name: &str) -> Result<Self, IdentityError> {
        let fingerprint = Fingerprint::of_public_key(key_pair.public_key_raw());
        let issued = issue(&key_pair, name, None)?;
        Ok(Self {
            key_pair,
            name: name.to_owned(),
            attestation: None,
            fingerprint,
            current: RwLock::new(issued),
        })
    }

    /// Makes every certificate of this identity an RA-TLS certificate: it carries a quote from
    /// `attester` whose report data is SHA-512 of claims naming this key and `role`.
    pub fn with_attester(
        self,
        role: &str,
        attester: Arc<dyn cocoon_attest::Attester>,
    ) -> Result<Self, IdentityError> {
        self.with_measured_attester(role, attester, Vec::new())
    }

    /// [`Self::with_attester`], after measuring `measured` into RTMR3 (in order) through the
    /// attester: every certificate's claims name the events, so peers can replay RTMR3.
    pub fn with_measured_attester(
        mut self,
        role: &str,
        attester: Arc<dyn cocoon_attest::Attester>,
        measured: Vec<cocoon_attest::MeasuredEvent>,
    ) -> Result<Self, IdentityError> {
        let mut log = Vec::new();
        for event in &measured {
            log = attester
                .measure(event)
                .map_err(IdentityError::Attestation)?;
        }
        let measured = if measured.is_empty() { measured } else { log };
        if attester.kind() == cocoon_attest::AttesterKind::Dev {
            tracing::warn!(
                "DEVELOPMENT ATTESTATION: certificates carry a dev quote that proves nothing about this machine"
            );
        }
        let attestation = Attestation {
            attester,
            role: role.to_owned(),
            measured,
            encryption_key: None,
        };
        let issued = issue(&self.key_pair, &self.name, Some(&attestation))?;
        self.attestation = Some(attestation);
        self.current = RwLock::new(issued);
        Ok(self)
    }

    /// Names `key` (a worker's HPKE public key) in every certificate's claims from now on, so
    /// the quote binds it like the TLS key.
    pub fn with_encryption_key(mut self, key: [u8; 32]) -> Result<Self, IdentityError> {
        let attestation = self
            .attestation
            .as_mut()
            .ok_or(IdentityError::NotAttested)?;
        attestation.encryption_key = Some(key);
        let issued = issue(&self.key_pair, &self.name, self.attestation.as_ref())?;
        self.current = RwLock::new(issued);
        Ok(self)
    }

    /// SHA-256 of this identity's public key: how peers and operators name this node.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The kind of evidence in this identity's certificates; `None` for plain certificates.
    pub fn attestation_kind(&self) -> Option<cocoon_attest::AttesterKind> {
        self.attestation.as_ref().map(|a| a.attester.kind())
    }

    /// The raw 32-byte Ed25519 public key of this identity.
    pub fn public_key(&self) -> &[u8] {
        self.key_pair.public_key_raw()
    }

    /// The certificate to present now; reissued first if it is close to expiry.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        let now = OffsetDateTime::now_utc();
        {
            let current = self.current.read();
            if current.not_after - now > RENEW_BEFORE {
                return current.key.clone();
            }
        }
        let mut current = self.current.write();
        if current.not_after - now <= RENEW_BEFORE {
            match issue(&self.key_pair, &self.name, self.attestation.as_ref()) {
                Ok(fresh) => *current = fresh,
                // The old certificate is still valid for a while; keep serving it.
                Err(e) => tracing::error!(error = %e, "certificate renewal failed"),
            }
        }
        current.key.clone()
    }
}

/// The Ed25519 key (PKCS#8 PEM) stored at `path`, created readable by the owner only if the
/// file is missing.
pub(crate) fn load_or_create_key(path: &Path) -> Result<KeyPair, IdentityError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(pem) => {
            let kp = KeyPair::from_pem(&pem).map_err(|e| IdentityError::BadKeyFile {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            if !kp.is_compatible(&PKCS_ED25519) {
                return Err(IdentityError::BadKeyFile {
                    path: shown,
                    reason: "not Ed25519".into(),
                });
            }
            Ok(kp)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = KeyPair::generate_for(&PKCS_ED25519).map_err(IdentityError::Key)?;
            write_private(path, kp.serialize_pem().as_bytes()).map_err(|source| {
                IdentityError::KeyFile {
                    path: shown,
                    source,
                }
            })?;
            tracing::info!(path = %path.display(), "created a new key");
            Ok(kp)
        }
        Err(source) => Err(IdentityError::KeyFile {
            path: shown,
            source,
        }),
    }
}

fn issue(
    key_pair: &KeyPair,
    name: &str,
    attestation: Option<&Attestation>,
) -> Result<Issued, IdentityError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(IdentityError::Certificate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CERT_LIFETIME;
    if let Some(a) = attestation {
        let claims = cocoon_attest::Claims {
            public_key: hex::encode(key_pair.public_key_raw()),
            role: a.role.clone(),
            measured: a.measured.clone(),
            encryption_key: a.encryption_key.map(hex::encode),
        }
        .to_bytes();
        let quote = a
            .attester
            .quote(&cocoon_attest::Claims::report_data(&claims))
            .map_err(IdentityError::Attestation)?;
        for (oid, content) in [
            (crate::ratls::OID_QUOTE, quote),
            (crate::ratls::OID_CLAIMS, claims),
        ] {
            let mut ext = rcgen::CustomExtension::from_oid_content(oid, content);
            // Critical: a verifier that does not understand attestation must refuse the peer.
            ext.set_criticality(true);
            params.custom_extensions.push(ext);
        }
    }
    let cert = params
        .self_signed(key_pair)
        .map_err(IdentityError::Certificate)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(IdentityError::Rustls)?;
    let key = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer));
    Ok(Issued {
        key,
        not_after: params.not_after,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_to_the_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let a = Identity::load_or_create(&path, "n").unwrap();
        let b = Identity::load_or_create(&path, "n").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(&path, "not a key").unwrap();
        let err = Identity::load_or_create(&path, "n").unwrap_err();
        assert!(
            err.to_string().contains("does not hold an Ed25519"),
            "{err}"
        );
    }

    #[test]
    fn signing_key_is_the_tls_key() {
        use ring::signature::KeyPair as _;
        let id = Identity::ephemeral("n").unwrap();
        assert_eq!(id.signing_key().public_key().as_ref(), id.public_key());
    }

    #[test]
    fn fingerprint_hex_round_trips() {
        let id = Identity::ephemeral("n").unwrap();
        let hex = id.fingerprint().to_string();
        assert_eq!(Fingerprint::from_hex(&hex), Some(id.fingerprint()));
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }
}
