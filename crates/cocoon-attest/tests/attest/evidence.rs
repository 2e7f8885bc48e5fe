//! Producing and checking evidence: the dev attester, key binding, configfs-tsm detection.

use cocoon_attest::{
    AttestError, Attester, AttesterKind, BindingError, Claims, DevAttester, Measurements,
    TdxAttester, check_binding, parse_collateral, verify_dev_quote, verify_quote,
};

fn measurements() -> Measurements {
    Measurements {
        mrtd: [7; 48],
        mr_config_id: [4; 48],
        mr_owner: [5; 48],
        mr_owner_config: [6; 48],
        rtmr: [[1; 48], [2; 48], [3; 48], [8; 48]],
        ..Measurements::default()
    }
}

fn claims_for(key: &[u8]) -> Claims {
    Claims {
        public_key: hex::encode(key),
        role: "worker".into(),
        measured: Vec::new(),
        encryption_key: None,
    }
}

#[test]
fn dev_quote_round_trips_and_binds_the_key() {
    let (attester, _pkcs8) = DevAttester::generate(measurements()).unwrap();
    assert_eq!(attester.kind(), AttesterKind::Dev);
    let tls_key = [9u8; 32];
    let claims = claims_for(&tls_key).to_bytes();
    let quote = attester.quote(&Claims::report_data(&claims)).unwrap();
    let m = verify_dev_quote(&quote, &[attester.public_key()]).unwrap();
    assert_eq!(m.mrtd, [7; 48]);
    assert_eq!(m.image_hash(), measurements().image_hash());
    assert_eq!(check_binding(&m, &claims, &tls_key).unwrap().role, "worker");

    // The same quote presented with another key, or with other claims, does not bind.
    assert_eq!(
        check_binding(&m, &claims, &[8u8; 32]),
        Err(BindingError::KeyMismatch)
    );
    let other = claims_for(&[8u8; 32]).to_bytes();
    assert_eq!(
        check_binding(&m, &other, &[8u8; 32]),
        Err(BindingError::ReportDataMismatch)
    );
}

#[test]
fn dev_quotes_need_an_opted_in_key_and_integrity() {
    let (attester, _) = DevAttester::generate(measurements()).unwrap();
    let (stranger, _) = DevAttester::generate(measurements()).unwrap();
    let quote = attester.quote(&[0; 64]).unwrap();
    assert!(matches!(
        verify_dev_quote(&quote, &[]),
        Err(AttestError::Verification(_))
    ));
    assert!(matches!(
        verify_dev_quote(&quote, &[stranger.public_key()]),
        Err(AttestError::Verification(_))
    ));
    let mut tampered = quote.clone();
    tampered[30] ^= 1; // inside MRTD
    assert!(matches!(
        verify_dev_quote(&tampered, &[attester.public_key()]),
        Err(AttestError::Verification(_))
    ));
    // A dev quote is never a DCAP quote.
    let c = parse_collateral(cocoon_testdata::TDX.collateral).unwrap();
    assert!(matches!(
        verify_quote(&quote, &c, cocoon_testdata::TDX.at),
        Err(AttestError::Verification(_))
    ));
}

#[test]
fn real_quote_is_not_bound_to_a_key_it_was_not_made_for() {
    let tdx = cocoon_testdata::TDX;
    let c = parse_collateral(tdx.collateral).unwrap();
    let v = verify_quote(tdx.quote, &c, tdx.at).unwrap();
    let claims = claims_for(&[9u8; 32]).to_bytes();
    assert_eq!(
        check_binding(&v.measurements, &claims, &[9u8; 32]),
        Err(BindingError::ReportDataMismatch)
    );
}

#[test]
fn tdx_attester_says_clearly_when_there_is_no_tdx() {
    let missing = tempfile::tempdir().unwrap().path().join("no-tsm");
    let err = TdxAttester::with_root(&missing).err().unwrap();
    assert!(err.to_string().contains("not inside a TDX guest"), "{err}");
}

#[test]
fn tdx_attester_speaks_the_configfs_protocol() {
    // A plain directory stands in for configfs: the attester must create its own entry, write
    // exactly the report data to its inblob, and fail clearly when no outblob appears (configfs
    // provides it). On configfs, removing the entry also removes its files; a plain directory
    // keeps them, which is how the test can read inblob back.
    let root = tempfile::tempdir().unwrap();
    let attester = TdxAttester::with_root(root.path()).unwrap();
    let err = attester.quote(&[5; 64]).unwrap_err();
    assert!(err.to_string().contains("read outblob"), "{err}");
    let entries: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("cocoon-")
    );
    assert_eq!(
        std::fs::read(entries[0].join("inblob")).unwrap(),
        vec![5u8; 64]
    );
}

/// The TDX attester measures into RTMR3 through the kernel's interface: it writes the event's
/// digest there and keeps the events in a log in the TD's memory. Restarted in the same TD with
/// the same configuration it measures nothing and names the log; another configuration is
/// refused (a TD serves one), and so is an RTMR3 the log does not replay to. Where the
/// interface is missing it fails with a clear error, never silently.
#[test]
fn tdx_measures_into_rtmr3_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let tsm = dir.path().join("tsm");
    std::fs::create_dir(&tsm).unwrap();
    let rtmr3 = dir.path().join("rtmr3:sha384");
    let log = dir.path().join("run/rtmr3-events.json");
    let event = cocoon_attest::MeasuredEvent::config("{\"role\":\"worker\"}".into());
    let attester = TdxAttester::with_root(&tsm)
        .unwrap()
        .with_rtmr3(&rtmr3, &log);
    let missing = attester.measure(&event).unwrap_err().to_string();
    assert!(missing.contains("Linux 6.16+"), "{missing}");
    std::fs::write(&rtmr3, [0u8; 48]).unwrap();
    assert_eq!(attester.measure(&event).unwrap(), vec![event.clone()]);
    assert_eq!(std::fs::read(&rtmr3).unwrap(), event.digest());
    // What the kernel holds after that extend.
    std::fs::write(&rtmr3, cocoon_attest::replay(std::slice::from_ref(&event))).unwrap();
    // Restarted with the same configuration: nothing to extend, the log is named.
    assert_eq!(attester.measure(&event).unwrap(), vec![event.clone()]);
    let other = cocoon_attest::MeasuredEvent::config("{\"role\":\"proxy\"}".into());
    let refused = attester.measure(&other).unwrap_err().to_string();
    assert!(
        refused.contains("measured another configuration"),
        "{refused}"
    );
    // An RTMR3 the log does not explain.
    std::fs::write(&rtmr3, [7u8; 48]).unwrap();
    let unknown = attester.measure(&event).unwrap_err().to_string();
    assert!(unknown.contains("does not replay"), "{unknown}");
}

/// The development attester's RTMR3 moves as a TD's would, and a quote after measuring carries
/// it: replaying the events gives the quote's RTMR3.
#[test]
fn dev_attester_extends_rtmr3_as_a_td_does() {
    let (attester, _) = DevAttester::generate(Measurements::default()).unwrap();
    let events = [
        cocoon_attest::MeasuredEvent {
            label: "boot-step".into(),
            content: "a".into(),
        },
        cocoon_attest::MeasuredEvent::config("b".into()),
    ];
    for e in &events {
        attester.measure(e).unwrap();
    }
    // The same configuration again (a restart) changes nothing; another is refused.
    assert_eq!(attester.measure(&events[1]).unwrap(), events.to_vec());
    let other = cocoon_attest::MeasuredEvent::config("c".into());
    assert!(attester.measure(&other).is_err());
    let quote = attester.quote(&[0; 64]).unwrap();
    let m = verify_dev_quote(&quote, &[attester.public_key()]).unwrap();
    assert_eq!(m.rtmr[3], cocoon_attest::replay(&events));
}
