//! Intel collateral fetched from a PCCS-shaped server (cocoon-testkit's, serving the real
//! vectors' collateral): fetched on a quote's first arrival, cached on disk, kept while the
//! service is down, refused in words once it expires, replaced when Intel publishes newer, never
//! by older; by the node (the proxy's status shows it) and by `cocoon attest collateral`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cocoon_attest::{CollateralStore, ImageHash, Policy, parse_collateral, quote_platform};
use cocoon_collateral::{CollateralConfig, Fetcher};
use cocoon_proxy::{Proxy, ProxyConfig};
use cocoon_testdata::{TDX, TDX15};
use cocoon_testkit::http::wait_until;
use cocoon_testkit::pccs::PccsServer;
use cocoon_tls::{PeerPolicy, RaTlsVerifier};
use serde_json::Value;

/// 2025-07-19 10:00:35 UTC, when the TDX vector's PCK CRL (its first piece to run out) expires.
const TDX_EXPIRY: u64 = 1_752_919_235;

fn policy_for(quotes: &[&[u8]]) -> Policy {
    let mut policy = Policy::default();
    for q in quotes {
        let (_, m) = cocoon_attest::read_measurements(q).unwrap();
        policy.image_hashes.insert(m.image_hash());
    }
    policy
}

/// The vector's collateral as a PCCS serves it: without the PCK chain (the quotes carry
/// theirs). Compared with `assert!`, since a failing `assert_eq!` on collateral prints
/// megabytes.
fn served(v: cocoon_testdata::Vector) -> cocoon_attest::Collateral {
    cocoon_attest::Collateral {
        pck_certificate_chain: None,
        ..parse_collateral(v.collateral).unwrap()
    }
}

fn verifier(store: &Arc<CollateralStore>, at: u64) -> RaTlsVerifier {
    RaTlsVerifier::with_store(policy_for(&[TDX.quote, TDX15.quote]), store.clone())
        .cache_ttl(Duration::ZERO)
        .at_time(at)
}

/// The whole life of a platform's collateral in a node, on a clock the test moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collateral_is_fetched_on_demand_cached_refreshed_and_refused_once_expired() {
    let pccs = PccsServer::start(vec![parse_collateral(TDX.collateral).unwrap()]).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(TDX.at));
    let config = CollateralConfig {
        pccs_url: Some(pccs.url()),
        cache_dir: Some(dir.path().join("collateral")),
        ..CollateralConfig::default()
    };
    let node = |store: &Arc<CollateralStore>| {
        let clock = clock.clone();
        Fetcher::with_clock(
            &config,
            store.clone(),
            Arc::new(move || clock.load(Ordering::SeqCst)),
        )
        .unwrap()
    };
    let store = CollateralStore::new();
    let fetcher = node(&store);
    let running = fetcher.start().await;
    let platform = quote_platform(TDX.quote).unwrap();

    // A quote from a platform nothing is held for: refused with the reason, and fetched in the
    // background; the retry verifies.
    let first = verifier(&store, TDX.at)
        .verify_quote(TDX.quote)
        .unwrap_err()
        .to_string();
    assert!(first.contains("being fetched from"), "{first}");
    // Fetched, stored and written to the cache: the fetch is done when its time is noted.
    wait_until("the collateral fetched", Duration::from_secs(10), || {
        fetcher.status().iter().any(|s| s.fetched_at.is_some())
    })
    .await;
    let ok = verifier(&store, TDX.at).verify_quote(TDX.quote).unwrap();
    assert_eq!(
        ok.attestation.unwrap().tcb_status.as_deref(),
        Some("UpToDate")
    );
    let cached = dir.path().join("collateral").join(platform.file_name());
    assert!(parse_collateral(&std::fs::read(&cached).unwrap()).unwrap() == served(TDX));
    drop(running);

    // The service goes down: refreshing fails, and says so, but what is held still verifies.
    pccs.down();
    clock.store(TDX.at + 86_400, Ordering::SeqCst);
    let (ok, failed) = fetcher.refresh_due().await;
    assert_eq!((ok, failed), (0, 1));
    let status = &fetcher.status()[0];
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot reach the collateral service"),
        "{status:?}"
    );
    assert_eq!(
        status.expires_on.as_deref(),
        Some("2025-07-19 10:00:35 UTC")
    );
    verifier(&store, TDX.at + 86_400)
        .verify_quote(TDX.quote)
        .unwrap();

    // A restart while it is down starts at once on the disk cache and verifies.
    let restarted = CollateralStore::new();
    let fetcher2 = node(&restarted);
    let _running2 = fetcher2.start().await;
    verifier(&restarted, TDX.at + 86_400)
        .verify_quote(TDX.quote)
        .unwrap();

    // Past the expiry, still down: refused, in words a person can act on.
    let expired = verifier(&restarted, TDX_EXPIRY + 1)
        .verify_quote(TDX.quote)
        .unwrap_err()
        .to_string();
    assert!(
        expired.contains(&format!(
            "Intel's PCK CRL in the collateral for {platform} expired on 2025-07-19 10:00:35 \
             UTC; refresh it from the PCCS"
        )),
        "{expired}"
    );

    // Intel publishes newer collateral and the service is back: the next refresh takes it, and
    // the cache holds it.
    pccs.serve(vec![parse_collateral(TDX15.collateral).unwrap()]);
    pccs.up().await;
    clock.store(TDX15.at, Ordering::SeqCst);
    assert_eq!(fetcher.refresh_due().await, (1, 0));
    verifier(&store, TDX15.at)
        .verify_quote(TDX15.quote)
        .unwrap();
    assert!(parse_collateral(&std::fs::read(&cached).unwrap()).unwrap() == served(TDX15));
    assert_eq!(
        fetcher.status()[0].expires_on.as_deref(),
        Some("2026-11-06 23:45:11 UTC")
    );

    // A service that goes back to the older collateral (in force at its own time) is refused:
    // going back could hide a TCB update; the newer stays.
    pccs.serve(vec![parse_collateral(TDX.collateral).unwrap()]);
    clock.store(TDX.at, Ordering::SeqCst);
    assert_eq!(fetcher.refresh(vec![platform.clone()]).await, (0, 1));
    let e = fetcher.status()[0].last_error.clone().unwrap();
    assert!(e.contains("serves older collateral"), "{e}");
    assert!(*store.get(&platform).unwrap().collateral == served(TDX15));

    // A service serving collateral already out of force is as good as down.
    clock.store(TDX15.at, Ordering::SeqCst);
    assert_eq!(fetcher.refresh(vec![platform.clone()]).await, (0, 1));
    let e = fetcher.status()[0].last_error.clone().unwrap();
    assert!(e.contains("serves stale collateral"), "{e}");
}

/// A proxy with `[collateral]` fetches the platforms it is told of at start, and its status
/// says what it holds and why a fetch failed, on the system clock (where the vectors'
/// collateral has long expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fetches_its_platforms_at_start_and_reports_them() {
    let pccs = PccsServer::start(vec![parse_collateral(TDX15.collateral).unwrap()]).await;
    let platform = quote_platform(TDX15.quote).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, m) = cocoon_attest::read_measurements(TDX15.quote).unwrap();
    let proxy = Proxy::bind(
        &ProxyConfig {
            listen: "127.0.0.1:0".into(),
            worker_policy: PeerPolicy {
                require_attestation: true,
                image_hashes: vec![ImageHash::to_string(&m.image_hash())],
                ..PeerPolicy::default()
            },
            collateral: CollateralConfig {
                pccs_url: Some(pccs.url()),
                cache_dir: Some(dir.path().to_path_buf()),
                platforms: vec![format!("{}:{}", platform.fmspc, platform.ca)],
                ..CollateralConfig::default()
            },
            ..ProxyConfig::default()
        },
        cocoon_cli::money::LEDGERS,
    )
    .await
    .unwrap();
    assert!(pccs.requests() >= 4, "the four v4 endpoints were asked");
    let status = proxy.status_handle().status();
    assert_eq!(status.collateral.len(), 1, "{:?}", status.collateral);
    let c = &status.collateral[0];
    assert_eq!(c.platform, format!("{}-{}", platform.fmspc, platform.ca));
    assert_eq!(c.expires, None, "stale collateral is not taken");
    let e = c.last_error.as_deref().unwrap();
    assert!(e.contains("serves stale collateral"), "{e}");
    assert!(e.contains("expired on 2026-11-0"), "{e}");

    // Without a service, collateral_files, or dev keys, a policy requiring attestation is
    // refused at start; a pccs_url is enough.
    let e = Proxy::bind(
        &ProxyConfig {
            listen: "127.0.0.1:0".into(),
            worker_policy: PeerPolicy {
                require_attestation: true,
                image_hashes: vec![ImageHash::to_string(&m.image_hash())],
                ..PeerPolicy::default()
            },
            ..ProxyConfig::default()
        },
        cocoon_cli::money::LEDGERS,
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("pccs_url"), "{e}");
}

/// Runs `cocoon attest ARGS` off the runtime (the PCCS-shaped server runs on it).
async fn attest(args: Vec<String>) -> Result<Value, String> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::attest_cli::attest(&args)
    })
    .await
    .unwrap()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cocoon_attest_collateral_fetch_writes_what_verify_reads() {
    let pccs = PccsServer::start(vec![parse_collateral(TDX.collateral).unwrap()]).await;
    let vectors = cocoon_testdata::tdx_dir();
    let quote = s(&vectors.join("tdx_quote"));
    let dir = tempfile::tempdir().unwrap();
    let out = s(dir.path());
    let at = TDX.at.to_string();
    let fetch = |extra: &[&str]| {
        let mut args: Vec<String> = ["collateral", "fetch", "--pccs", &pccs.url(), "--out", &out]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        attest(args)
    };
    let fetched = fetch(&["--quote", &quote, "--at", &at]).await.unwrap();
    let report = &fetched["fetched"][0];
    assert_eq!(report["fmspc"], "B0C06F000000");
    assert_eq!(report["in_force"], true);
    assert_eq!(report["changed"], true);
    assert_eq!(report["expires_on"], "2025-07-19 10:00:35 UTC");

    // `verify` reads the folder as it reads collateral files.
    let verified = attest(
        ["verify", &quote, "--collateral", &out, "--at", &at]
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(verified["verified"], true);

    // `show` says, for a later time, that it expired and what to do.
    let later = (TDX_EXPIRY + 1).to_string();
    let shown = attest(
        ["collateral", "show", &out, "--at", &later]
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
    )
    .await
    .unwrap();
    let c = &shown["collateral"][0];
    assert_eq!(c["in_force"], false);
    assert!(
        c["problem"]
            .as_str()
            .unwrap()
            .contains("expired on 2025-07-19"),
        "{c}"
    );
    // `attest show` names the platform to list in [collateral] platforms.
    let shown = attest(vec!["show".into(), quote.clone()]).await.unwrap();
    assert_eq!(
        shown["quote"]["platform"].as_str().unwrap(),
        format!("B0C06F000000:{}", report["ca"].as_str().unwrap())
    );

    // By platform name, again: nothing new.
    let platform = format!("B0C06F000000:{}", report["ca"].as_str().unwrap());
    let again = fetch(&["--platform", &platform, "--at", &at])
        .await
        .unwrap();
    assert_eq!(again["fetched"][0]["changed"], false);

    // The service down: a clear error naming where it tried.
    pccs.down();
    let e = fetch(&["--platform", &platform, "--at", &at])
        .await
        .unwrap_err();
    assert!(e.contains("cannot reach the collateral service at"), "{e}");
    assert!(e.contains(&pccs.url()), "{e}");
    // An unknown platform: the service's 404, said plainly.
    pccs.up().await;
    let e = fetch(&["--platform", "00906ED50000", "--at", &at])
        .await
        .unwrap_err();
    assert!(e.contains("404"), "{e}");
}
