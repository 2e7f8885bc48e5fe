//! The collateral store on the real vectors: which platform a quote and its collateral are for,
//! their dates, expiry in words, rollback refused, and collateral replaced in place.

use std::sync::{Arc, Mutex};

use cocoon_attest::{
    AttestError, CollateralStore, Described, Offered, Piece, Platform, parse_collateral,
    quote_platform,
};
use cocoon_testdata::{TDX, TDX15};

fn described(v: cocoon_testdata::Vector) -> Described {
    Described::new(parse_collateral(v.collateral).unwrap()).unwrap()
}

/// 2025-07-19 10:00:35 UTC: the PCK CRL of the TDX vector's collateral is due then, before its
/// TCB info (10:16:03) and QE identity (10:32:27).
const TDX_PCK_CRL_NEXT_UPDATE: i64 = 1_752_919_235;

#[test]
fn quotes_and_collateral_name_the_same_platform() {
    let tdx = quote_platform(TDX.quote).unwrap();
    assert_eq!(tdx.fmspc, "B0C06F000000");
    assert_eq!(described(TDX).platform, tdx);
    assert_eq!(
        described(TDX15).platform,
        quote_platform(TDX15.quote).unwrap()
    );
    assert_eq!(tdx.file_name(), format!("B0C06F000000-{}.json", tdx.ca));
}

#[test]
fn dates_are_read_from_each_piece() {
    let d = described(TDX);
    let root = d
        .dates
        .iter()
        .find(|d| d.piece == Piece::RootCaCrl)
        .unwrap();
    assert_eq!(
        cocoon_attest::date(root.next_update),
        "2026-04-03 11:21:57 UTC"
    );
    assert_eq!(d.next_update(), TDX_PCK_CRL_NEXT_UPDATE);
    d.check_current(TDX.at).unwrap();
}

#[test]
fn expired_collateral_is_refused_in_words() {
    let d = described(TDX);
    let after = u64::try_from(TDX_PCK_CRL_NEXT_UPDATE).unwrap() + 1;
    let e = d.check_current(after).unwrap_err().to_string();
    assert_eq!(
        e,
        "Intel's PCK CRL in the collateral for FMSPC B0C06F000000 (PCK platform CA) expired on \
         2025-07-19 10:00:35 UTC; refresh it from the PCCS (`cocoon attest collateral fetch`, \
         or [collateral] pccs_url in the node's config)"
            .replace("platform CA", &format!("{} CA", d.platform.ca)),
    );
    // Long after: the first piece to run out is still the one named.
    let later = d.check_current(1_800_000_000).unwrap_err().to_string();
    assert!(later.starts_with("Intel's PCK CRL"), "{later}");
    let early = d.check_current(1_700_000_000).unwrap_err().to_string();
    assert!(early.contains("after the time of verification"), "{early}");
    assert!(early.contains("clock"), "{early}");
}

#[test]
fn the_store_verifies_by_platform_and_refuses_expired_collateral() {
    let store = CollateralStore::with(vec![parse_collateral(TDX.collateral).unwrap()]).unwrap();
    let v = store.verify(TDX.quote, TDX.at).unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
    let after = u64::try_from(TDX_PCK_CRL_NEXT_UPDATE).unwrap() + 1;
    assert!(matches!(
        store.verify(TDX.quote, after),
        Err(AttestError::StaleCollateral(m)) if m.contains("expired on 2025-07-19")
    ));
}

#[test]
fn a_platform_without_collateral_is_asked_for_once_per_quote_and_named() {
    let store = CollateralStore::new();
    let e = store.verify(TDX.quote, TDX.at).unwrap_err().to_string();
    assert!(
        e.contains("no Intel collateral for FMSPC B0C06F000000"),
        "{e}"
    );
    assert!(e.contains("collateral_files"), "{e}");
    let asked: Arc<Mutex<Vec<(Platform, usize)>>> = Arc::default();
    let seen = asked.clone();
    store.fetch_missing_with("https://pccs.example", move |p, quote| {
        seen.lock().unwrap().push((p.clone(), quote.len()));
    });
    let e = store.verify(TDX.quote, TDX.at).unwrap_err().to_string();
    assert!(e.contains("being fetched from https://pccs.example"), "{e}");
    assert_eq!(
        *asked.lock().unwrap(),
        vec![(quote_platform(TDX.quote).unwrap(), TDX.quote.len())]
    );
}

#[test]
fn newer_collateral_replaces_older_in_place_and_older_is_refused() {
    let store = CollateralStore::new();
    let old = parse_collateral(TDX.collateral).unwrap();
    let new = parse_collateral(TDX15.collateral).unwrap();
    let platform = described(TDX15).platform;
    if described(TDX).platform != platform {
        // The vectors are for the same FMSPC; both CAs would make this test vacuous.
        panic!("the vectors' collateral is for different platforms");
    }
    assert_eq!(
        store.offer(old.clone()).unwrap(),
        Offered::Stored(platform.clone())
    );
    assert_eq!(
        store.offer(old.clone()).unwrap(),
        Offered::Unchanged(platform.clone())
    );
    assert_eq!(
        store.offer(new.clone()).unwrap(),
        Offered::Stored(platform.clone())
    );
    let rollback = store.offer(old).unwrap_err().to_string();
    assert!(rollback.contains("older than the one held"), "{rollback}");
    // Held without the one machine's PCK chain the vector's file carries.
    assert!(
        *store.get(&platform).unwrap().collateral
            == cocoon_attest::Collateral {
                pck_certificate_chain: None,
                ..new
            }
    );
    // The newer collateral verifies the newer quote at its time.
    store.verify(TDX15.quote, TDX15.at).unwrap();
}

#[test]
fn platforms_parse_from_config() {
    assert_eq!(
        Platform::parse("b0c06f000000").unwrap(),
        Platform {
            fmspc: "B0C06F000000".into(),
            ca: "platform".into()
        }
    );
    assert_eq!(
        Platform::parse("B0C06F000000:processor").unwrap().ca,
        "processor"
    );
    assert!(Platform::parse("B0C06F").is_err());
    assert!(Platform::parse("B0C06F000000:root").is_err());
}

/// REVIEW-style attack: a PCCS (or a file) with a piece whose dates are pushed far ahead would,
/// unsigned, win every later comparison and lock genuine collateral out as "older". Every
/// piece must be Intel's.
#[test]
fn attack_collateral_not_signed_by_intel_is_refused() {
    let good = parse_collateral(TDX.collateral).unwrap();
    let far = |json: &str| json.replace("\"issueDate\":\"2025", "\"issueDate\":\"2030");
    let mut tcb = good.clone();
    tcb.tcb_info = far(&tcb.tcb_info);
    let mut qe = good.clone();
    qe.qe_identity = far(&qe.qe_identity);
    let mut root_crl = good.clone();
    *root_crl.root_ca_crl.last_mut().unwrap() ^= 1;
    let mut pck_crl = good.clone();
    *pck_crl.pck_crl.last_mut().unwrap() ^= 1;
    let mut chain = good.clone();
    chain.tcb_info_issuer_chain = good.pck_crl_issuer_chain.clone();
    for (what, forged) in [
        ("Intel's TCB info", tcb),
        ("Intel's QE identity", qe),
        ("Intel's root CA CRL", root_crl),
        ("Intel's PCK CRL", pck_crl),
        ("Intel's TCB info", chain),
    ] {
        let e = Described::new(forged).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{what} is not signed by Intel")),
            "{what}: {e}"
        );
    }
    Described::new(good).unwrap();
}

/// REVIEW, fixed: rollback is judged by issue dates alone, but Intel's PCS signs the TCB info and QE
/// identity of every TCB evaluation it still supports afresh (`tcbEvaluationDataNumber=N`,
/// `update=standard`): the TDX vector is evaluation 17 issued on 2025-06-19, months after
/// evaluation 18 came out. A PCCS that answers with an older evaluation, issued today, is
/// "newer" here and replaces the evaluation held, and machines Intel's later TCB recoveries rate
/// OutOfDate pass as UpToDate again: the TCB downgrade the rollback check is there to stop.
/// The monotonic counter is `tcbEvaluationDataNumber`; compare it first, dates second.
#[test]
fn review_an_older_tcb_evaluation_issued_later_is_taken_as_newer() {
    let held = described(TDX15);
    let mut reissued = described(TDX);
    assert!(
        held.collateral
            .tcb_info
            .contains("\"tcbEvaluationDataNumber\":20")
    );
    assert!(
        reissued
            .collateral
            .tcb_info
            .contains("\"tcbEvaluationDataNumber\":17")
    );
    // Evaluation 17 as Intel serves it a day after the collateral held was issued: every piece
    // carries a later date than the one held.
    let latest_held = held.dates.iter().map(|d| d.issued).max().unwrap();
    let earliest = reissued.dates.iter().map(|d| d.issued).min().unwrap();
    let shift = latest_held - earliest + 86_400;
    for d in &mut reissued.dates {
        d.issued += shift;
        d.next_update += shift;
    }
    let verdict = reissued.older_than(&held);
    assert!(
        matches!(verdict, Some(Piece::TcbInfo | Piece::QeIdentity)),
        "TCB evaluation 17 would replace evaluation 20: older_than = {verdict:?}"
    );
}

/// REVIEW, fixed: `Described::new` checks who signed each piece, not what it is. Intel signs the SGX
/// TCB info (`"id":"SGX"`, which a TDX FMSPC has too) and the SGX QE identity (`"id":"QE"`) with
/// the same key as TDX's, so a PCCS answering the TDX endpoints with them gets them stored and
/// cached: every TDX quote from the platform is refused, and as long as their issue dates are
/// later than Intel's next TDX pieces, the genuine ones are refused as "older". A lock-out that
/// outlives the PCCS being fixed, and a restart (the cache holds it). Check `id` (`TDX`,
/// `TD_QE`) and `version` as dcap-qvl does, before anything is stored.
#[test]
fn review_sgx_pieces_are_kept_as_a_tdx_platforms_collateral() {
    let tdx = parse_collateral(TDX.collateral).unwrap();
    let sgx = parse_collateral(cocoon_testdata::SGX.collateral).unwrap();
    let sgx_qe = cocoon_attest::Collateral {
        qe_identity_issuer_chain: sgx.qe_identity_issuer_chain.clone(),
        qe_identity: sgx.qe_identity.clone(),
        qe_identity_signature: sgx.qe_identity_signature.clone(),
        ..tdx
    };
    // Intel-signed, for the TDX quote's platform, in force at its time: and it verifies no TDX
    // quote.
    assert!(cocoon_attest::verify_quote(TDX.quote, &sgx_qe, TDX.at).is_err());
    let store = CollateralStore::new();
    let offered = store.offer(sgx_qe);
    assert!(
        offered.is_err(),
        "the SGX QE identity is kept as a TDX platform's: {offered:?}"
    );
    let whole = Described::new(sgx).map(|d| d.platform);
    assert!(
        whole.is_err(),
        "SGX TCB info taken as a TDX platform's collateral: {whole:?}"
    );
}

/// REVIEW, fixed: rollback is checked per (FMSPC, PCK CA) entry, yet the TCB info is one per FMSPC,
/// the QE identity and the root CA CRL one for all, the PCK CRL one per CA. A platform's first
/// collateral is compared with nothing: holding TCB evaluation 20 for B0C06F000000, the store
/// takes, for the same FMSPC under the processor CA, a TCB info 16 months older (evaluation 17)
/// and a root CA CRL a year older. A PCCS can so hide a TCB recovery, a PCK revocation or a
/// revoked CA from every quote of a platform the node meets later. Keep the newest of each
/// shared piece store-wide (TCB info by FMSPC, PCK CRL by CA, QE identity, root CRL) and
/// refuse older ones whatever entry they come with.
#[test]
fn review_older_pieces_come_back_with_a_platform_first_seen() {
    let held = described(TDX15);
    let store = CollateralStore::with(vec![parse_collateral(TDX15.collateral).unwrap()]).unwrap();
    let old = parse_collateral(TDX.collateral).unwrap();
    // The SGX vector's PCK CRL is the processor CA's.
    let processor = parse_collateral(cocoon_testdata::SGX.collateral).unwrap();
    let other_ca = cocoon_attest::Collateral {
        pck_crl_issuer_chain: processor.pck_crl_issuer_chain,
        pck_crl: processor.pck_crl,
        ..old
    };
    let platform = Described::new(other_ca.clone()).unwrap().platform;
    assert_eq!(platform.fmspc, held.platform.fmspc);
    assert_ne!(platform.ca, held.platform.ca);
    let offered = store.offer(other_ca);
    assert!(
        matches!(offered, Err(AttestError::OlderCollateral(_))),
        "TCB info of 2025-06 for {platform} taken beside that of 2026-10 held for {}: \
         {offered:?}",
        held.platform
    );
}
