//! The bodies of cocoon's fuzz targets: one function per target, each asserting a property of
//! code that parses what the network sends, not only the absence of a panic.
//!
//! `fuzz/fuzz_targets/*.rs` hand libFuzzer's inputs to these functions; this crate's tests
//! replay the committed seeds (and a local corpus, when one exists) through the same functions
//! on every test run, so a regression a seed finds fails the ordinary suite. [`TARGETS`] names
//! them all, with the folders their seeds come from.

use std::sync::{Arc, OnceLock};

use cocoon_client::openai::{ChatRequest, CompletionRequest};
use cocoon_ledger::{Network, SignedMessage, SignedTx, Wallet};
use cocoon_protocol::{FrameDecoder, GenerateEvent, MAX_FRAME_BYTES, encode_frame};
use cocoon_tls::{PeerCertificate, PeerPolicy, PeerVerifier};
use rustls::pki_types::{CertificateDer, UnixTime};

/// A fuzz target: its name (as `cargo fuzz run NAME`) and its body.
#[derive(Clone, Copy)]
pub struct Target {
    /// The target's name, also the folder of its seeds under `fuzz/seeds/`.
    pub name: &'static str,
    /// The property, run on one input; it panics when the property breaks.
    pub check: fn(&[u8]),
}

/// Every fuzz target.
pub const TARGETS: [Target; 5] = [
    Target {
        name: "frames",
        check: frames,
    },
    Target {
        name: "openai_request",
        check: openai_request,
    },
    Target {
        name: "certificate",
        check: certificate,
    },
    Target {
        name: "quote",
        check: quote,
    },
    Target {
        name: "payment_message",
        check: payment_message,
    },
];

/// The NDJSON frame decoder and event parsing, under any bytes in any chunking: never a panic,
/// never a frame over the limit, and every event that parses re-encodes to one that parses the
/// same. The first byte picks the chunk size, so the fuzzer explores chunkings too.
pub fn frames(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new();
    for piece in data.chunks(chunk) {
        decoder.push(piece);
        // An error ends the piece as the end of the buffered frames does.
        while let Ok(Some(frame)) = decoder.next_frame() {
            assert!(frame.len() <= MAX_FRAME_BYTES);
            if let Ok(event) = serde_json::from_slice::<GenerateEvent>(&frame) {
                let again = encode_frame(&event);
                let back: GenerateEvent =
                    serde_json::from_slice(&again).expect("re-encoded event parses");
                assert_eq!(back, event);
            }
        }
    }
    let _ = decoder.finish();
}

/// The gateway's OpenAI request parsing and translation: any body either becomes a request
/// that passes the protocol's own validation, or a clear error; never a panic.
pub fn openai_request(data: &[u8]) {
    if let Ok(chat) = serde_json::from_slice::<ChatRequest>(data)
        && let Ok(request) = chat.into_generate()
    {
        request.validate().expect("a translated request is valid");
    }
    if let Ok(completion) = serde_json::from_slice::<CompletionRequest>(data)
        && let Ok(request) = completion.into_generate()
    {
        request.validate().expect("a translated request is valid");
    }
}

fn quote_policy() -> &'static Arc<dyn PeerVerifier> {
    static POLICY: OnceLock<Arc<dyn PeerVerifier>> = OnceLock::new();
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

/// RA-TLS certificate parsing and the policy check behind every handshake: any DER is either
/// parsed or refused, and a parsed certificate goes through a quote-requiring policy without a
/// panic. It can only be refused: nobody here holds the dev attester key the policy trusts.
pub fn certificate(data: &[u8]) {
    let der = CertificateDer::from(data.to_vec());
    if let Ok(cert) = PeerCertificate::parse_any_time(&der) {
        assert!(
            quote_policy().verify(&cert).is_err(),
            "an unsigned certificate passed"
        );
    }
    let _ = PeerCertificate::parse(&der, UnixTime::now());
}

fn collateral() -> &'static cocoon_attest::Collateral {
    static C: OnceLock<cocoon_attest::Collateral> = OnceLock::new();
    C.get_or_init(|| {
        cocoon_attest::parse_collateral(cocoon_testdata::TDX.collateral)
            .expect("vector collateral parses")
    })
}

/// Quote parsing and verification (dcap-qvl) on any bytes, against the real collateral of the
/// TDX vector at its time: never a panic, and whatever verifies measures exactly what the
/// genuine quote measures (only its signed content can pass).
pub fn quote(data: &[u8]) {
    let measured = cocoon_attest::read_measurements(data);
    if cocoon_attest::verify_quote(data, collateral(), cocoon_testdata::TDX.at).is_ok() {
        let genuine = cocoon_attest::read_measurements(cocoon_testdata::TDX.quote)
            .expect("the vector parses");
        assert_eq!(
            measured.ok().map(|(_, m)| m),
            Some(genuine.1),
            "a quote measuring something else verified"
        );
    }
}

/// Signed payment messages and signed ledger transactions, as parsed from the wire: never a
/// panic, and no forgery verifies (nobody here can sign with the proxy key below).
pub fn payment_message(data: &[u8]) {
    let proxy = Wallet::from_seed([9; 32]).public_key();
    let message = SignedMessage(data.to_vec());
    // On the network it names, too: the network is signed, not a way around the signature.
    for network in [message.named_network(), Some(Network::TON_MAINNET)]
        .into_iter()
        .flatten()
    {
        assert!(message.verify(&proxy, network).is_err());
    }
    if let Ok(tx) = serde_json::from_slice::<SignedTx>(data)
        && let Ok(body) = tx.open()
    {
        // Only a genuine signature opens, and no key here signs: a body that opens must name
        // a sender whose key signed it, which cannot be the proxy's.
        assert_ne!(body.sender, proxy);
    }
}
