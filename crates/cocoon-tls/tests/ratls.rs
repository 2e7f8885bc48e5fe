//! RA-TLS handshakes: certificates carrying quotes, checked by policy on both sides.

mod common;

use std::sync::Arc;

use cocoon_attest::{Attester, DevAttester, Measurements, Policy, parse_collateral};
use cocoon_tls::{AnyPeer, Identity, PeerCertificate, PeerVerifier, RaTlsVerifier};
use common::handshake;
use rustls::pki_types::UnixTime;

fn image(mrtd: u8) -> Measurements {
    Measurements {
        mrtd: [mrtd; 48],
        rtmr: [[1; 48], [2; 48], [3; 48], [0; 48]],
        report_data: [0; 64],
        td_attributes: [0; 8],
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
    verifier.verify(&cert_of(&genuine)).unwrap();
    let err = verifier.verify(&stolen).unwrap_err().to_string();
    assert!(err.contains("another public key"), "{err}");
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
}

#[test]
fn real_tdx_quote_verifies_but_is_not_bound_to_our_key_and_goes_stale() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors/tdx");
    let quote = std::fs::read(dir.join("tdx_quote")).unwrap();
    let collateral =
        parse_collateral(&std::fs::read(dir.join("tdx_quote_collateral.json")).unwrap()).unwrap();
    let image = cocoon_attest::verify_quote(&quote, &collateral, 1_750_332_747)
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
        RaTlsVerifier::new(policy.clone(), vec![collateral.clone()]).at_time(1_750_332_747);
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
    assert!(err.contains("quote verification failed"), "{err}");
}
