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
