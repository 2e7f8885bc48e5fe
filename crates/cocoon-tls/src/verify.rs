use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Fingerprint;

/// Extensions a cocoon certificate may mark critical and that this crate understands.
const KNOWN_CRITICAL: &[&str] = &[
    "2.5.29.15", // keyUsage
    "2.5.29.19", // basicConstraints
    crate::ratls::OID_QUOTE_STR,
    crate::ratls::OID_CLAIMS_STR,
];

const ED25519_OID: &str = "1.3.101.112";

/// Why a peer's certificate is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The certificate could not be parsed as DER X.509; carries the parser's message.
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    /// The certificate's subject key is not an Ed25519 key.
    #[error("certificate key is not Ed25519")]
    NotEd25519,
    /// The verification time is before the certificate's `notBefore`.
    #[error("certificate is not yet valid")]
    NotYetValid,
    /// The verification time is after the certificate's `notAfter`.
    #[error("certificate has expired")]
    Expired,
    /// The certificate is not signed by its own key.
    #[error("certificate self-signature does not verify")]
    BadSelfSignature,
    /// The certificate marks critical an extension this crate does not understand; carries its OID.
    #[error("certificate has an unknown critical extension {0}")]
    UnknownCriticalExtension(String),
    /// Key pinning is configured and the peer's fingerprint is not listed.
    #[error("peer {0} is not among the pinned keys")]
    NotPinned(Fingerprint),
    /// A policy refused the peer (no or bad quote, key binding, measurements, TCB status); carries
    /// why.
    #[error("peer refused by policy: {0}")]
    Policy(String),
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        use rustls::CertificateError as C;
        match e {
            VerifyError::Malformed(_) => rustls::Error::InvalidCertificate(C::BadEncoding),
            VerifyError::NotYetValid => rustls::Error::InvalidCertificate(C::NotValidYet),
            VerifyError::Expired => rustls::Error::InvalidCertificate(C::Expired),
            VerifyError::BadSelfSignature => rustls::Error::InvalidCertificate(C::BadSignature),
            other => rustls::Error::InvalidCertificate(C::Other(rustls::OtherError(
                std::sync::Arc::new(other),
            ))),
        }
    }
}

/// A peer's certificate after the checks every cocoon certificate must pass: well-formed,
/// Ed25519, self-signed, inside its validity window, no critical extension we do not know.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// The peer's raw Ed25519 public key (32 bytes).
    pub public_key: Vec<u8>,
    /// SHA-256 of `public_key`: the peer's stable name.
    pub fingerprint: Fingerprint,
    /// The subject's common name, when the certificate has one.
    pub common_name: Option<String>,
    /// Validity window, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of the validity window, seconds since the Unix epoch.
    pub not_after: i64,
    /// Every extension, as (OID, critical, raw value), for policies that look further.
    pub extensions: Vec<(String, bool, Vec<u8>)>,
}

impl PeerCertificate {
    /// The value of the extension with this dotted OID, if present.
    pub fn extension(&self, oid: &str) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|(o, _, _)| o == oid)
            .map(|(_, _, v)| v.as_slice())
    }
}

impl PeerCertificate {
    /// Parses and checks `der` at time `now`.
    pub fn parse(der: &CertificateDer<'_>, now: UnixTime) -> Result<Self, VerifyError> {
        let cert = Self::parse_any_time(der)?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if now < cert.not_before {
            return Err(VerifyError::NotYetValid);
        }
        if now > cert.not_after {
            return Err(VerifyError::Expired);
        }
        Ok(cert)
    }

    /// Every check of [`parse`](Self::parse) except the validity window: for showing a
    /// certificate to a person, whatever its dates.
    pub fn parse_any_time(der: &CertificateDer<'_>) -> Result<Self, VerifyError> {
        let (rest, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(VerifyError::Malformed(
                "trailing bytes after the certificate".into(),
            ));
        }
        let spki = cert.public_key();
        if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
            return Err(VerifyError::NotEd25519);
        }
        let public_key = spki.subject_public_key.data.to_vec();
        if public_key.len() != 32 {
            return Err(VerifyError::NotEd25519);
        }
        let validity = cert.validity();
        if cert.signature_algorithm.algorithm.to_id_string() != ED25519_OID {
            return Err(VerifyError::BadSelfSignature);
        }
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public_key)
            .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
            .map_err(|_| VerifyError::BadSelfSignature)?;
        let mut extensions: Vec<(String, bool, Vec<u8>)> = Vec::new();
        for ext in cert.extensions() {
            let oid = ext.oid.to_id_string();
            if ext.critical && !KNOWN_CRITICAL.contains(&oid.as_str()) {
                return Err(VerifyError::UnknownCriticalExtension(oid));
            }
            extensions.push((oid, ext.critical, ext.value.to_vec()));
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(Self {
            fingerprint: Fingerprint::of_public_key(&public_key),
            public_key,
            common_name,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            extensions,
        })
    }
}

/// What a verifier established about a peer beyond its key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Set when the peer proved what it runs with an attestation.
    pub attestation: Option<Attested>,
}

/// A peer's attestation, as verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// Which kind of quote the peer presented: TDX or development.
    pub kind: cocoon_attest::AttesterKind,
    /// The peer's image hash (COCOON's: MRTD, the config ids and RTMR0..3) from its quote.
    pub image_hash: cocoon_attest::ImageHash,
    /// Intel's TCB status of the platform; `None` for development quotes.
    pub tcb_status: Option<String>,
    /// The configuration the peer measured into RTMR3 (hex SHA-256 of it), if it did.
    pub config_hash: Option<String>,
    /// What the peer measured into RTMR3, as its claims name it (replayed to the quote).
    pub measured: Vec<cocoon_attest::MeasuredEvent>,
    /// The peer's HPKE public key, if its claims name one (a worker's): bound by the quote.
    pub encryption_key: Option<[u8; 32]>,
}

impl Verified {
    /// `tdx`, `dev` or `none`: how the peer is attested, for status pages and logs.
    pub fn mode(&self) -> &'static str {
        self.attestation
            .as_ref()
            .map_or("none", |a| a.kind.as_str())
    }

    /// Whether the peer is attested only by a development quote, which proves nothing.
    pub fn is_development(&self) -> bool {
        self.attestation
            .as_ref()
            .is_some_and(|a| a.kind == cocoon_attest::AttesterKind::Dev)
    }
}

/// Decides whether a peer whose certificate passed the basic checks may connect.
/// RA-TLS policies (a TDX quote bound to the key, measurements in the registry) implement this.
pub trait PeerVerifier: Debug + Send + Sync {
    /// Checks `peer`; on success says what was established beyond its key, otherwise why it is
    /// refused.
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError>;

    /// Counters of the verifier's quote cache, where it has one.
    fn cache_stats(&self) -> Option<crate::CacheStats> {
        None
    }
}

/// Accepts any well-formed peer: identity without authorization. Right for a proxy facing its
/// clients (a client is known by its key and pays from a contract bound to it).
#[derive(Debug, Default, Clone, Copy)]
pub struct AnyPeer;

impl PeerVerifier for AnyPeer {
    fn verify(&self, _peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        Ok(Verified::default())
    }
}

/// Accepts only peers whose key fingerprint is listed.
#[derive(Debug, Clone)]
pub struct PinnedPeers {
    allowed: HashSet<Fingerprint>,
}

impl PinnedPeers {
    /// A verifier that admits exactly the peers whose key fingerprints are in `allowed`.
    pub fn new(allowed: impl IntoIterator<Item = Fingerprint>) -> Self {
        Self {
            allowed: allowed.into_iter().collect(),
        }
    }
}

impl PeerVerifier for PinnedPeers {
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        if self.allowed.contains(&peer.fingerprint) {
            Ok(Verified::default())
        } else {
            Err(VerifyError::NotPinned(peer.fingerprint))
        }
    }
}

/// Accepts a peer only if every one of its verifiers does (a pinned key AND an attested image).
#[derive(Debug)]
pub struct AllOf(pub Vec<Arc<dyn PeerVerifier>>);

/// Admits only certificates issued within `max_age`: a verifier's demand that a peer's quote
/// be fresh (it was taken when the certificate was issued), so that a change of the peer's
/// TCB or collateral since shows within that time.
#[derive(Debug)]
pub struct FreshCertificates {
    /// The oldest a certificate may be.
    pub max_age: std::time::Duration,
}

impl PeerVerifier for FreshCertificates {
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let age = now.saturating_sub(peer.not_before);
        let max = i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX);
        if age > max {
            return Err(VerifyError::Policy(format!(
                "the certificate (and its quote) is {} h old; this policy takes at most {} h",
                age / 3600,
                max / 3600
            )));
        }
        Ok(Verified::default())
    }
}

impl PeerVerifier for AllOf {
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        let mut verified = Verified::default();
        for v in &self.0 {
            let one = v.verify(peer)?;
            if one.attestation.is_some() {
                verified = one;
            }
        }
        Ok(verified)
    }

    fn cache_stats(&self) -> Option<crate::CacheStats> {
        self.0.iter().find_map(|v| v.cache_stats())
    }
}

/// Accepts a peer if any of its verifiers does: what a TLS server listening for several kinds
/// of peers checks in the handshake, before it knows (from ALPN) which kind this one is.
#[derive(Debug)]
pub struct AnyOf(pub Vec<Arc<dyn PeerVerifier>>);

impl PeerVerifier for AnyOf {
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        let mut first_error = None;
        for v in &self.0 {
            match v.verify(peer) {
                Ok(verified) => return Ok(verified),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(VerifyError::Policy("no policy admits any peer".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, CustomExtension, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
    };

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn cert_with(params: CertificateParams, key: &KeyPair) -> CertificateDer<'static> {
        params.self_signed(key).unwrap().der().clone()
    }

    #[test]
    fn own_certificate_passes() {
        let id = crate::Identity::ephemeral("node").unwrap();
        let der = id.certified_key().cert[0].clone();
        let peer = PeerCertificate::parse(&der, now()).unwrap();
        assert_eq!(peer.fingerprint, id.fingerprint());
        assert_eq!(peer.common_name.as_deref(), Some("node"));
        PinnedPeers::new([id.fingerprint()]).verify(&peer).unwrap();
        let other = crate::Identity::ephemeral("other").unwrap();
        assert_eq!(
            PinnedPeers::new([other.fingerprint()]).verify(&peer),
            Err(VerifyError::NotPinned(id.fingerprint()))
        );
    }

    #[test]
    fn expired_and_future_certificates_are_refused() {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let der = cert_with(CertificateParams::new(vec![]).unwrap(), &key);
        // rcgen's default validity is 1975..4096; check against times outside it.
        assert_eq!(
            PeerCertificate::parse(
                &der,
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(0))
            )
            .unwrap_err(),
            VerifyError::NotYetValid
        );
        let id = crate::Identity::ephemeral("n").unwrap();
        let short = id.certified_key().cert[0].clone();
        let later =
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now().as_secs() + 3 * 86400));
        assert_eq!(
            PeerCertificate::parse(&short, later).unwrap_err(),
            VerifyError::Expired
        );
    }

    #[test]
    fn non_ed25519_key_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = cert_with(CertificateParams::new(vec![]).unwrap(), &key);
        assert_eq!(
            PeerCertificate::parse(&der, now()).unwrap_err(),
            VerifyError::NotEd25519
        );
    }

    #[test]
    fn unknown_critical_extension_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        let mut ext =
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 12345, 99], vec![0x04, 0x00]);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
        let der = cert_with(params, &key);
        assert_eq!(
            PeerCertificate::parse(&der, now()).unwrap_err(),
            VerifyError::UnknownCriticalExtension("1.3.6.1.4.1.12345.99".into())
        );
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let id = crate::Identity::ephemeral("node").unwrap();
        let mut bytes = id.certified_key().cert[0].to_vec();
        // Flip a byte inside the common name: still parses, signature no longer matches.
        let at = bytes.windows(4).position(|w| w == b"node").unwrap();
        bytes[at] ^= 0x01;
        let der = CertificateDer::from(bytes);
        assert_eq!(
            PeerCertificate::parse(&der, now()).unwrap_err(),
            VerifyError::BadSelfSignature
        );
        assert!(matches!(
            PeerCertificate::parse(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]), now()),
            Err(VerifyError::Malformed(_))
        ));
    }
}
