//! rustls glue: certificate resolvers that always present the identity's current certificate,
//! and verifiers that run [`PeerCertificate::parse`] plus a [`PeerVerifier`] policy instead of
//! the Web PKI.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use crate::identity::Identity;
use crate::verify::{PeerCertificate, PeerVerifier, Verified, VerifyError};

#[derive(Debug)]
struct IdentityResolver(Arc<Identity>);

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct PolicyVerifier(Arc<dyn PeerVerifier>);

impl PolicyVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "cocoon peers present one self-signed certificate".into(),
            ));
        }
        let peer = PeerCertificate::parse(end_entity, now)?;
        self.0.verify(&peer).map(drop).map_err(|e| {
            tracing::warn!(peer = %peer.fingerprint, error = %e, "peer refused");
            rustls::Error::from(e)
        })
    }

    /// Proof that the peer holds the certificate's key. The key is taken from the certificate
    /// already checked by `check`.
    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoSignatureSchemesInCommon,
            ));
        }
        let peer = PeerCertificate::parse(cert, UnixTime::now())?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &peer.public_key)
            .verify(message, dss.signature())
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
            })?;
        Ok(HandshakeSignatureValid::assertion())
    }
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PolicyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of a mutual-TLS hop: presents `identity`, requires a client certificate that
/// `peers` accepts, offers the `alpn` protocols.
pub fn server_config(
    identity: Arc<Identity>,
    peers: Arc<dyn PeerVerifier>,
    alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(PolicyVerifier(peers)))
        .with_cert_resolver(Arc::new(IdentityResolver(identity)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No session resumption: a resumed session skips the peer's certificate, so a peer whose
    // attestation went stale or whose image was withdrawn could come back without being
    // checked. Every connection runs the policy; the quote cache keeps that cheap.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Arc::new(config)
}

/// Client side of a mutual-TLS hop.
pub fn client_config(
    identity: Arc<Identity>,
    peers: Arc<dyn PeerVerifier>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PolicyVerifier(peers)))
        .with_client_cert_resolver(Arc::new(IdentityResolver(identity)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // See server_config: every connection is verified in full against the current policy.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The verified peer of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerCertificate> {
    PeerCertificate::parse(certs?.first()?, UnixTime::now()).ok()
}

/// What `policy` established about the peer of an established connection. The handshake ran
/// the policy already, but rustls does not hand its result back; running it again costs a
/// quote-cache hit.
pub fn verified_peer(
    certs: Option<&[CertificateDer<'_>]>,
    policy: &dyn PeerVerifier,
) -> Result<Verified, VerifyError> {
    let peer = peer_identity(certs)
        .ok_or_else(|| VerifyError::Malformed("the peer presented no usable certificate".into()))?;
    policy.verify(&peer)
}
