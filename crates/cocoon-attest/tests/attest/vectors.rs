//! Real Intel DCAP quotes (cocoon-testdata), verified offline at their stated times.

use cocoon_attest::{
    AttestError, Collateral, ImageHash, Policy, PolicyError, parse_collateral, verify_quote,
};

use cocoon_testdata::{SGX, TDX, TDX15, Vector};

const TDX_TIME: u64 = TDX.at;
const TD15_TIME: u64 = TDX15.at;

fn load(v: Vector) -> (Vec<u8>, Collateral) {
    (v.quote.to_vec(), parse_collateral(v.collateral).unwrap())
}

#[test]
fn tdx_quote_verifies_up_to_date_with_known_measurements() {
    let (q, c) = load(TDX);
    let v = verify_quote(&q, &c, TDX_TIME).unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
    assert!(v.advisory_ids.is_empty());
    assert!(v.measurements.mrtd.starts_with(&[0x91, 0xeb, 0x2b, 0x44]));
    assert_eq!(v.measurements.rtmr[3], [0u8; 48]);
    assert!(!v.measurements.is_debug());
}

#[test]
fn tdx_15_quote_v5_verifies() {
    let (q, c) = load(TDX15);
    let v = verify_quote(&q, &c, TD15_TIME).unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
}

#[test]
fn sgx_quote_is_not_a_tdx_quote() {
    let (q, c) = load(SGX);
    // Within its collateral's validity (same day as the TDX sample).
    assert_eq!(
        verify_quote(&q, &c, TDX_TIME).unwrap_err(),
        AttestError::NotTdx
    );
}

#[test]
fn flipped_bytes_are_refused() {
    let (q, c) = load(TDX);
    // Header, TD report body (MRTD, report_data), and the signature itself.
    for at in [10usize, 48 + 136, 48 + 520, q.len() - 100] {
        let mut bad = q.clone();
        bad[at] ^= 0x01;
        assert!(
            matches!(
                verify_quote(&bad, &c, TDX_TIME),
                Err(AttestError::Verification(_))
            ),
            "flipped byte {at} accepted"
        );
    }
}

#[test]
fn verification_outside_the_validity_window_is_refused() {
    let (q, c) = load(TDX);
    for t in [1_500_000_000, TDX_TIME + 3 * 365 * 86_400] {
        assert!(
            matches!(verify_quote(&q, &c, t), Err(AttestError::Verification(_))),
            "accepted at {t}"
        );
    }
}

#[test]
fn collateral_of_another_platform_is_refused() {
    let (q, _) = load(TDX);
    let (_, other) = load(TDX15);
    assert!(matches!(
        verify_quote(&q, &other, TDX_TIME),
        Err(AttestError::Verification(_))
    ));
}

#[test]
fn garbage_collateral_is_a_clear_error() {
    assert!(matches!(
        parse_collateral(b"{\"nope\":1}"),
        Err(AttestError::BadCollateral(_))
    ));
}

#[test]
fn policy_admits_only_listed_images_statuses_and_no_debug() {
    let (q, c) = load(TDX);
    let v = verify_quote(&q, &c, TDX_TIME).unwrap();
    let image = v.measurements.image_hash();
    assert_eq!(ImageHash::from_hex(&image.to_string()), Some(image));

    let mut policy = Policy::default();
    assert!(matches!(policy.check(&v), Err(PolicyError::ImageNotAllowed(i, _)) if i == image));
    policy.image_hashes.insert(image);
    policy.check(&v).unwrap();

    let strict = Policy {
        tcb_statuses: vec![],
        ..policy.clone()
    };
    assert_eq!(
        strict.check(&v),
        Err(PolicyError::TcbStatus("UpToDate".into()))
    );

    // A debug TD cannot be produced from a real quote without breaking its signature, so the
    // policy is checked on the verified measurements with the debug bit set.
    let mut debug = v.clone();
    debug.measurements.td_attributes[0] |= 0x01;
    assert_eq!(policy.check(&debug), Err(PolicyError::DebugTd));
    let lax = Policy {
        allow_debug: true,
        ..policy.clone()
    };
    lax.check(&debug).unwrap();
}

/// The image hash is COCOON's: SHA-256 over the TD report's MRTD through RTMR3 (384 bytes,
/// contiguous in the quote) and 64 zero bytes in place of the report data. Computed here from
/// the quote's own bytes, at the offsets of the quote formats (v4: a 48-byte header; v5: the
/// header and a 6-byte body descriptor; then 136 bytes of TEE TCB and TD attributes before
/// MRTD), and pinned.
#[test]
fn image_hashes_are_cocoons_over_the_quotes_own_bytes() {
    for (v, mrtd_at, pinned) in [
        (
            TDX,
            48 + 136,
            "b260fa9168ca9f28e7f15f128a45ac31c419705b31a60feac30b322ee06bc752",
        ),
        (
            TDX15,
            48 + 6 + 136,
            "828898d0193ff4cbc40f8a6510c9c70136035d828c8525de40ec3ed71b52ca4f",
        ),
    ] {
        let (q, c) = load(v);
        let verified = verify_quote(&q, &c, v.at).unwrap();
        let mut attestation = q[mrtd_at..mrtd_at + 8 * 48].to_vec();
        assert_eq!(attestation[..48], verified.measurements.mrtd);
        attestation.extend_from_slice(&[0; 64]);
        let expected = ring::digest::digest(&ring::digest::SHA256, &attestation);
        let image = verified.measurements.image_hash();
        assert_eq!(image.0, expected.as_ref());
        assert_eq!(image, ImageHash::from_hex(pinned).unwrap(), "{image}");
    }
}
