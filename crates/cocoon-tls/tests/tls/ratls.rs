//! RA-TLS handshakes: certificates carrying quotes, checked by policy on both sides.

use std::sync::Arc;

use crate::common::handshake;
use cocoon_attest::{Attester, DevAttester, Measurements, Policy, parse_collateral};
use cocoon_tls::{AnyPeer, Identity, PeerCertificate, PeerVerifier, RaTlsVerifier};
use rustls::pki_types::UnixTime;

fn image(mrtd: u8) -> Measurements {
    Measurements {
        mrtd: [mrtd; 48],
        rtmr: [[1; 48], [2; 48], [3; 48], [0; 48]],
        ..Measurements::default()
    }
}

fn dev(mrtd: u8) -> Arc<DevAttester> {
    Arc::new(DevAttester::generate(image(mrtd)).unwrap().0)
}

fn policy_for(mrtd: u8) -> Policy {
    let mut p = Policy::default();
    p.image_hashes.insert(image(mrtd).image_hash());
    p
}

fn cert_of(id: &Identity) -> PeerCertificate {
    PeerCertificate::parse(&id.certified_key().cert[0], UnixTime::now()).unwrap()
}

#[tokio::test]
async fn attested_peers_with_allowed_images_connect() {
    let (wa, pa) = (dev(7), dev(8));
    let worker = Arc::new(
        Identity::ephemeral("worker")
            .unwrap()
            .with_attester("worker", wa.clone())
            .unwrap(),
    );
    let proxy = Arc::new(
        Identity::ephemeral("proxy")
            .unwrap()
            .with_attester("proxy", pa.clone())
            .unwrap(),
    );
    let proxy_accepts =
        Arc::new(RaTlsVerifier::new(policy_for(7), vec![]).allow_dev_key(wa.public_key()));
    let worker_accepts =
        Arc::new(RaTlsVerifier::new(policy_for(8), vec![]).allow_dev_key(pa.public_key()));
    let (c, s) = handshake(proxy, proxy_accepts, worker, worker_accepts).await;
    c.unwrap();
    s.unwrap();
}

#[tokio::test]
async fn image_not_in_policy_is_refused_in_the_handshake() {
    let wa = dev(7);
    let worker = Arc::new(
        Identity::ephemeral("worker")
            .unwrap()
            .with_attester("worker", wa.clone())
            .unwrap(),
    );
    let proxy = Arc::new(Identity::ephemeral("proxy").unwrap());
    let proxy_accepts =
        Arc::new(RaTlsVerifier::new(policy_for(9), vec![]).allow_dev_key(wa.public_key()));
    let (_c, s) = handshake(proxy, proxy_accepts, worker, Arc::new(AnyPeer)).await;
    let err = s.unwrap_err();
    assert!(err.contains("is not allowed"), "{err}");
}

#[test]
fn dev_quotes_are_refused_unless_opted_in_and_plain_certs_have_no_attestation() {
    let wa = dev(7);
    let worker = Identity::ephemeral("worker")
        .unwrap()
        .with_attester("worker", wa.clone())
        .unwrap();
    let strict = RaTlsVerifier::new(policy_for(7), vec![]);
    let err = strict.verify(&cert_of(&worker)).unwrap_err().to_string();
    assert!(err.contains("development quotes are not accepted"), "{err}");
    let plain = Identity::ephemeral("plain").unwrap();
    let err = strict.verify(&cert_of(&plain)).unwrap_err().to_string();
    assert!(err.contains("no attestation"), "{err}");
    // Only the key this verifier trusts.
    let other = dev(7);
    let err = RaTlsVerifier::new(policy_for(7), vec![])
        .allow_dev_key(other.public_key())
        .verify(&cert_of(&worker))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not signed by a trusted dev key"), "{err}");
}

#[test]
fn a_quote_replayed_under_another_key_is_refused() {
    let wa = dev(7);
    let genuine = Identity::ephemeral("genuine")
        .unwrap()
        .with_attester("worker", wa.clone())
        .unwrap();
    let impostor = Identity::ephemeral("impostor").unwrap();
    let mut stolen = cert_of(&impostor);
    // The impostor presents the genuine certificate's quote and claims beside its own key.
    stolen.extensions = cert_of(&genuine).extensions;
    let verifier = RaTlsVerifier::new(policy_for(7), vec![]).allow_dev_key(wa.public_key());
    let first = verifier.verify(&cert_of(&genuine)).unwrap();
    assert_eq!(first.mode(), "dev");
    assert_eq!(first.attestation.unwrap().image_hash, image(7).image_hash());
    // The stolen quote is in the cache by now, yet the binding to the impostor's key fails.
    let err = verifier.verify(&stolen).unwrap_err().to_string();
    assert!(err.contains("another public key"), "{err}");
    let stats = verifier.cache_stats().unwrap();
    assert_eq!((stats.verifications, stats.hits), (1, 1));
}

/// An attester that returns a fixed real TDX quote, whatever it is asked to bind.
struct Recorded(Vec<u8>);

impl Attester for Recorded {
    fn kind(&self) -> cocoon_attest::AttesterKind {
        cocoon_attest::AttesterKind::Tdx
    }
    fn quote(&self, _report_data: &[u8; 64]) -> Result<Vec<u8>, cocoon_attest::AttestError> {
        Ok(self.0.clone())
    }
    fn measure(
        &self,
        _event: &cocoon_attest::MeasuredEvent,
    ) -> Result<Vec<cocoon_attest::MeasuredEvent>, cocoon_attest::AttestError> {
        Err(cocoon_attest::AttestError::NoTee(
            "a recorded quote cannot change".into(),
        ))
    }
}

#[test]
fn real_tdx_quote_verifies_but_is_not_bound_to_our_key_and_goes_stale() {
    let tdx = cocoon_testdata::TDX;
    let quote = tdx.quote.to_vec();
    let collateral = parse_collateral(tdx.collateral).unwrap();
    let image = cocoon_attest::verify_quote(&quote, &collateral, tdx.at)
        .unwrap()
        .measurements
        .image_hash();
    let mut policy = Policy::default();
    policy.image_hashes.insert(image);
    let id = Identity::ephemeral("n")
        .unwrap()
        .with_attester("worker", Arc::new(Recorded(quote)))
        .unwrap();
    let at_vector_time =
        RaTlsVerifier::new(policy.clone(), vec![collateral.clone()]).at_time(tdx.at);
    let err = at_vector_time
        .verify(&cert_of(&id))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not SHA-512 of the certificate's claims"),
        "{err}"
    );
    // Verified with today's clock, the recorded collateral has expired.
    let now = RaTlsVerifier::new(policy, vec![collateral]);
    let err = now.verify(&cert_of(&id)).unwrap_err().to_string();
    assert!(err.contains("expired on 2025-07-19"), "{err}");
}

#[test]
fn cached_quotes_expire() {
    let wa = dev(7);
    let id = Identity::ephemeral("n")
        .unwrap()
        .with_attester("worker", wa.clone())
        .unwrap();
    let verifier = RaTlsVerifier::new(policy_for(7), vec![])
        .allow_dev_key(wa.public_key())
        .cache_ttl(std::time::Duration::from_millis(50));
    verifier.verify(&cert_of(&id)).unwrap();
    verifier.verify(&cert_of(&id)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(80));
    verifier.verify(&cert_of(&id)).unwrap();
    let stats = verifier.cache_stats().unwrap();
    assert_eq!((stats.verifications, stats.hits), (2, 1));
    let uncached = RaTlsVerifier::new(policy_for(7), vec![])
        .allow_dev_key(wa.public_key())
        .cache_ttl(std::time::Duration::ZERO);
    uncached.verify(&cert_of(&id)).unwrap();
    uncached.verify(&cert_of(&id)).unwrap();
    assert_eq!(uncached.cache_stats().unwrap().verifications, 2);
}

/// A server presenting an RA-TLS certificate made by hand with the given validity window:
/// a genuine dev quote bound to the key, only the dates chosen by the test.
async fn serve_handmade_cert(
    attester: &DevAttester,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> std::net::SocketAddr {
    use rcgen::{CertificateParams, CustomExtension, KeyPair, PKCS_ED25519};
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let claims = cocoon_attest::Claims {
        public_key: hex::encode(key.public_key_raw()),
        role: "proxy".into(),
        measured: Vec::new(),
        encryption_key: None,
    }
    .to_bytes();
    let quote = attester
        .quote(&cocoon_attest::Claims::report_data(&claims))
        .unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.not_before = not_before;
    params.not_after = not_after;
    for (oid, content) in [
        (&[1, 3, 6, 1, 4, 1, 12345, 1][..], quote),
        (&[1, 3, 6, 1, 4, 1, 12345, 2][..], claims),
    ] {
        let mut ext = CustomExtension::from_oid_content(oid, content);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
    }
    let cert = params.self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Fixed(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        rustls::crypto::ring::sign::any_supported_type(&rustls::pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap(),
    )))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    addr
}

/// Presents one certificate whatever the client asks (rustls' own single-cert helper refuses
/// certificates with critical extensions it does not know, such as the RA-TLS ones).
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

async fn connect_to(
    addr: std::net::SocketAddr,
    verifier: Arc<dyn PeerVerifier>,
) -> Result<(), String> {
    let me = Arc::new(Identity::ephemeral("client").unwrap());
    let connector = tokio_rustls::TlsConnector::from(cocoon_tls::client_config(me, verifier, &[]));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(cocoon_tls::SERVER_NAME).unwrap();
    connector
        .connect(name, tcp)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn an_expired_attested_certificate_is_refused_in_the_handshake() {
    let wa = dev(7);
    let verifier: Arc<dyn PeerVerifier> =
        Arc::new(RaTlsVerifier::new(policy_for(7), vec![]).allow_dev_key(wa.public_key()));
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let current = serve_handmade_cert(&wa, now - day, now + day).await;
    connect_to(current, verifier.clone()).await.unwrap();
    let expired = serve_handmade_cert(&wa, now - 3 * day, now - day).await;
    let err = connect_to(expired, verifier).await.unwrap_err();
    assert_eq!(err, "invalid peer certificate: Expired");
}

/// The role a peer attests is the role its image was told to play: a node attested as a
/// client is refused where a worker is expected (a proxy's worker ALPN), though its image,
/// key binding and attester all check out.
#[test]
fn a_peer_attested_for_another_role_is_refused() {
    let a = dev(7);
    let as_client = Identity::ephemeral("client")
        .unwrap()
        .with_attester("client", a.clone())
        .unwrap();
    let workers_only = RaTlsVerifier::new(policy_for(7), vec![])
        .allow_dev_key(a.public_key())
        .expect_role("worker");
    let err = workers_only
        .verify(&cert_of(&as_client))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("attested as a \"client\", not a \"worker\""),
        "{err}"
    );
    let as_worker = Identity::ephemeral("worker")
        .unwrap()
        .with_attester("worker", a)
        .unwrap();
    workers_only.verify(&cert_of(&as_worker)).unwrap();
}

/// A certificate made by hand: `attester`'s genuine quote over claims naming the key, `role`
/// and the events `named` (whatever the attester really measured).
fn claiming(
    attester: &DevAttester,
    role: &str,
    named: Vec<cocoon_attest::MeasuredEvent>,
) -> PeerCertificate {
    use rcgen::{CertificateParams, CustomExtension, KeyPair, PKCS_ED25519};
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let claims = cocoon_attest::Claims {
        public_key: hex::encode(key.public_key_raw()),
        role: role.into(),
        measured: named,
        encryption_key: None,
    }
    .to_bytes();
    let quote = attester
        .quote(&cocoon_attest::Claims::report_data(&claims))
        .unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    for (oid, content) in [
        (&[1, 3, 6, 1, 4, 1, 12345, 1][..], quote),
        (&[1, 3, 6, 1, 4, 1, 12345, 2][..], claims),
    ] {
        let mut ext = CustomExtension::from_oid_content(oid, content);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
    }
    let cert = params.self_signed(&key).unwrap();
    PeerCertificate::parse(cert.der(), UnixTime::now()).unwrap()
}

/// A node measures its configuration into RTMR3 and names it in its claims: a verifier
/// admits only listed configurations, and a certificate naming another configuration than the
/// one measured (RTMR3 does not replay) is refused, though its quote and binding hold.
#[test]
fn measured_configurations_replay_and_must_be_listed() {
    let a = dev(7);
    let mine = cocoon_attest::MeasuredEvent::config("{\"role\":\"worker\",\"url\":\"a\"}".into());
    let other = cocoon_attest::MeasuredEvent::config("{\"role\":\"worker\",\"url\":\"b\"}".into());
    let node = Identity::ephemeral("worker")
        .unwrap()
        .with_measured_attester("worker", a.clone(), vec![mine.clone()])
        .unwrap();
    let boot = cocoon_attest::RegisterRule {
        mrtd: image(7).mrtd,
        rtmr: [None; 4],
    };
    let listing = |hashes: &[String]| {
        let mut p = Policy::default();
        p.registers.push(boot.clone());
        p.config_hashes = hashes.iter().cloned().collect();
        RaTlsVerifier::new(p, vec![])
            .allow_dev_key(a.public_key())
            .expect_role("worker")
    };
    let verified = listing(&[mine.config_hash()])
        .verify(&cert_of(&node))
        .unwrap();
    assert_eq!(
        verified.attestation.unwrap().config_hash,
        Some(mine.config_hash())
    );
    let err = listing(&[other.config_hash()])
        .verify(&cert_of(&node))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not allowed"), "{err}");
    // The attester measured `mine`; a certificate naming `other` does not replay to RTMR3.
    let err = listing(&[other.config_hash()])
        .verify(&claiming(&a, "worker", vec![other]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not replay"), "{err}");
}

/// REVIEW, fixed: a certificate that names no events passes a register rule leaving RTMR3 open,
/// whatever its RTMR3 holds. The attester here measured a configuration (into its RTMR3); the
/// certificate, with a genuine quote and binding, names none, and the verifier neither replays
/// nor refuses: the node's measured configuration goes unseen, and the docs' "refuses a
/// certificate whose quote's RTMR3 differs" from the replay does not hold.
#[test]
fn review_a_certificate_naming_no_events_cannot_hide_its_rtmr3() {
    let a = dev(7);
    let elsewhere =
        cocoon_attest::MeasuredEvent::config("{\"role\":\"worker\",\"url\":\"elsewhere\"}".into());
    a.measure(&elsewhere).unwrap();
    let boot = image(7);
    let mut p = Policy::default();
    p.registers.push(cocoon_attest::RegisterRule {
        mrtd: boot.mrtd,
        rtmr: [
            Some(boot.rtmr[0]),
            Some(boot.rtmr[1]),
            Some(boot.rtmr[2]),
            None,
        ],
    });
    let verifier = RaTlsVerifier::new(p, vec![])
        .allow_dev_key(a.public_key())
        .expect_role("worker");
    let err = verifier
        .verify(&claiming(&a, "worker", vec![]))
        .map(|v| v.attestation.and_then(|a| a.config_hash))
        .expect_err("RTMR3 holds a measurement the certificate does not name");
    assert!(err.to_string().contains("does not replay"), "{err}");
}

/// REVIEW, fixed: a `[[*_policy.registers]]` rule may fix MRTD alone. MRTD measures only the TD's
/// firmware (TDVF), shared by every TD booted with that firmware build; the kernel, initrd and
/// command line (hence the software that writes the claims and measures RTMR3) are in
/// RTMR1..2. An MRTD-only rule therefore admits any software, which can name an allowed
/// configuration and extend RTMR3 with its digest while running another: config_hashes mean
/// nothing under it. The rule's own doc says "a rule fixing nothing would admit any image";
/// fixing MRTD alone is no better, and the policy should refuse it at start.
#[test]
fn review_a_register_rule_fixing_only_the_firmware_is_refused() {
    let a = dev(7);
    let firmware_only = cocoon_tls::PeerPolicy {
        require_attestation: true,
        registers: vec![cocoon_tls::Registers {
            mrtd: hex::encode(image(7).mrtd),
            ..cocoon_tls::Registers::default()
        }],
        config_hashes: vec![hex::encode([0u8; 32])],
        dev_attester_keys: vec![hex::encode(a.public_key())],
        ..cocoon_tls::PeerPolicy::default()
    };
    assert!(
        firmware_only.build("worker_policy", "worker").is_err(),
        "a register rule fixing only MRTD (any kernel, any software) is accepted"
    );
}

/// A verifier may demand fresh quotes: a certificate (whose quote was taken when it was
/// issued) older than the policy's age is refused, a young one passes.
#[test]
fn certificates_older_than_the_policy_allows_are_refused() {
    use cocoon_tls::FreshCertificates;
    let a = dev(7);
    let node = Identity::ephemeral("worker")
        .unwrap()
        .with_attester("worker", a)
        .unwrap();
    let fresh = FreshCertificates {
        max_age: std::time::Duration::from_secs(19 * 3600),
    };
    let mut cert = cert_of(&node);
    fresh.verify(&cert).unwrap();
    cert.not_before -= 20 * 3600;
    let err = fresh.verify(&cert).unwrap_err().to_string();
    assert!(
        err.contains("20 h old; this policy takes at most 19 h"),
        "{err}"
    );
}
