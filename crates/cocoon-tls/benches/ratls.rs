//! What attestation costs a connection: quote verification alone, and whole mutual TLS 1.3
//! handshakes (in memory, so only crypto and policy are measured) with plain pinned keys and
//! with RA-TLS, the quote cache on and off.
//!
//! `cargo bench -p cocoon-tls --bench ratls`. Figures in docs/performance.md.

use std::sync::Arc;
use std::time::Duration;

use cocoon_attest::{
    AttestError, Attester, AttesterKind, DevAttester, Policy, dev_image, parse_collateral,
    verify_dev_quote, verify_quote,
};
use cocoon_tls::{Identity, PeerCertificate, PeerVerifier, PinnedPeers, RaTlsVerifier};
use criterion::{Criterion, criterion_group, criterion_main};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{ClientConnection, ServerConnection};

const TDX_TIME: u64 = cocoon_testdata::TDX.at;

/// One complete mutual handshake between fresh connections, bytes passed in memory.
fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    let name = ServerName::try_from(cocoon_tls::SERVER_NAME).unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::with_capacity(16 << 10);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().expect("server accepts");
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().expect("client accepts");
        }
    }
}

fn configs(
    client_id: Arc<Identity>,
    client_accepts: Arc<dyn PeerVerifier>,
    server_id: Arc<Identity>,
    server_accepts: Arc<dyn PeerVerifier>,
) -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
    (
        cocoon_tls::client_config(client_id, client_accepts, &[b"b"]),
        cocoon_tls::server_config(server_id, server_accepts, &[b"b"]),
    )
}

fn dev_policy() -> Policy {
    let mut p = Policy::default();
    p.image_hashes.insert(dev_image().image_hash());
    p
}

fn handshakes(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    let a = Arc::new(Identity::ephemeral("a").unwrap());
    let b = Arc::new(Identity::ephemeral("b").unwrap());
    let (client, server) = configs(
        a.clone(),
        Arc::new(PinnedPeers::new([b.fingerprint()])),
        b.clone(),
        Arc::new(PinnedPeers::new([a.fingerprint()])),
    );
    group.bench_function("pinned_keys", |bench| {
        bench.iter(|| handshake(&client, &server))
    });

    let (dev, _) = DevAttester::generate(dev_image()).unwrap();
    let dev = Arc::new(dev);
    let attested = |name: &str| {
        Arc::new(
            Identity::ephemeral(name)
                .unwrap()
                .with_attester(name, dev.clone())
                .unwrap(),
        )
    };
    let (ca, sa) = (attested("client"), attested("server"));
    for (label, ttl) in [
        ("ratls_dev_cached", cocoon_tls::DEFAULT_CACHE_TTL),
        ("ratls_dev_uncached", Duration::ZERO),
    ] {
        let verifier = || -> Arc<dyn PeerVerifier> {
            Arc::new(
                RaTlsVerifier::new(dev_policy(), vec![])
                    .allow_dev_key(dev.public_key())
                    .cache_ttl(ttl),
            )
        };
        let (client, server) = configs(ca.clone(), verifier(), sa.clone(), verifier());
        group.bench_function(label, |bench| bench.iter(|| handshake(&client, &server)));
    }
    group.finish();
}

/// Replays a recorded quote: the certificate then carries a real TDX quote, whose binding
/// check fails last, after the full verification that a bound quote would also cost.
struct Recorded(Vec<u8>);

impl Attester for Recorded {
    fn kind(&self) -> AttesterKind {
        AttesterKind::Tdx
    }
    fn quote(&self, _report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        Ok(self.0.clone())
    }
    fn measure(
        &self,
        _event: &cocoon_attest::MeasuredEvent,
    ) -> Result<Vec<cocoon_attest::MeasuredEvent>, AttestError> {
        Err(AttestError::NoTee("a recorded quote cannot change".into()))
    }
}

fn quote_verification(c: &mut Criterion) {
    let mut group = c.benchmark_group("quote_verification");
    let quote = cocoon_testdata::TDX.quote;
    let collateral = parse_collateral(cocoon_testdata::TDX.collateral).unwrap();
    group.bench_function("tdx_dcap_qvl", |bench| {
        bench.iter(|| verify_quote(quote, &collateral, TDX_TIME).unwrap())
    });
    let (dev, _) = DevAttester::generate(dev_image()).unwrap();
    let dev_quote = dev.quote(&[7; 64]).unwrap();
    let keys = [dev.public_key()];
    group.bench_function("dev", |bench| {
        bench.iter(|| verify_dev_quote(&dev_quote, &keys).unwrap())
    });

    // The whole per-peer check on a certificate carrying the real TDX quote.
    let image = verify_quote(quote, &collateral, TDX_TIME)
        .unwrap()
        .measurements
        .image_hash();
    let mut policy = Policy::default();
    policy.image_hashes.insert(image);
    let id = Identity::ephemeral("tdx")
        .unwrap()
        .with_attester("worker", Arc::new(Recorded(quote.to_vec())))
        .unwrap();
    let cert = PeerCertificate::parse(&id.certified_key().cert[0], UnixTime::now()).unwrap();
    for (label, ttl) in [
        ("ratls_peer_check_tdx_cached", cocoon_tls::DEFAULT_CACHE_TTL),
        ("ratls_peer_check_tdx_uncached", Duration::ZERO),
    ] {
        let verifier = RaTlsVerifier::new(policy.clone(), vec![collateral.clone()])
            .at_time(TDX_TIME)
            .cache_ttl(ttl);
        group.bench_function(label, |bench| {
            bench.iter(|| {
                let err = verifier.verify(&cert).unwrap_err().to_string();
                assert!(err.contains("not SHA-512"), "{err}");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, handshakes, quote_verification);
criterion_main!(benches);
