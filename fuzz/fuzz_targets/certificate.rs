//! RA-TLS certificate parsing and the policy check behind every handshake: any DER is either
//! parsed or refused, and a parsed certificate goes through a quote-requiring policy without a
//! panic (it can only be refused: the fuzzer holds no dev attester key the policy trusts).
#![no_main]

use std::sync::OnceLock;

use cocoon_tls::{PeerCertificate, PeerPolicy, PeerVerifier};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};

fn policy() -> &'static std::sync::Arc<dyn PeerVerifier> {
    static POLICY: OnceLock<std::sync::Arc<dyn PeerVerifier>> = OnceLock::new();
    POLICY.get_or_init(|| {
        PeerPolicy {
            require_attestation: true,
            image_hashes: vec![cocoon_attest::dev_image().image_hash().to_string()],
            dev_attester_keys: vec!["11".repeat(32)],
            ..PeerPolicy::default()
        }
        .build("fuzz_policy", "peer")
        .expect("the policy is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data.to_vec());
    if let Ok(cert) = PeerCertificate::parse_any_time(&der) {
        assert!(
            policy().verify(&cert).is_err(),
            "an unsigned certificate passed"
        );
    }
    let _ = PeerCertificate::parse(&der, UnixTime::now());
});
