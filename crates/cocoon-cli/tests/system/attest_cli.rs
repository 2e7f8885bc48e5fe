//! `cocoon attest`, run as the binary operators use, on the real quotes in cocoon-testdata.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const TDX_TIME: &str = "1750332747";
const TDX_IMAGE: &str = "b260fa9168ca9f28e7f15f128a45ac31c419705b31a60feac30b322ee06bc752";

fn vectors() -> PathBuf {
    cocoon_testdata::tdx_dir()
}

/// Runs `cocoon attest ARGS`: Ok(JSON report) on success, Err(stderr) on failure.
pub(crate) fn attest(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .arg("attest")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn real_tdx_quote_shows_and_verifies_at_its_time_only() {
    let v = vectors();
    let quote = v.join("tdx_quote");
    let collateral = v.join("tdx_quote_collateral.json");
    let shown = attest(&["show", path(&quote)]).unwrap();
    assert_eq!(shown["quote"]["kind"], "tdx");
    assert_eq!(shown["quote"]["image_hash"], TDX_IMAGE);
    assert_eq!(shown["verified"], false);

    let ok = attest(&[
        "verify",
        path(&quote),
        "--collateral",
        path(&collateral),
        "--at",
        TDX_TIME,
        "--image-hash",
        TDX_IMAGE,
    ])
    .unwrap();
    assert_eq!(ok["verified"], true);
    assert_eq!(ok["tcb_status"], "UpToDate");
    assert_eq!(ok["image_checked"], true);

    let refused = |extra: &[&str], collateral: &Path, why: &str| {
        let mut args = vec!["verify", path(&quote), "--collateral", path(collateral)];
        args.extend_from_slice(extra);
        let err = attest(&args).unwrap_err();
        assert!(err.contains(why), "{args:?}: {err}");
    };
    // Today the recorded collateral has expired, and the error says which piece and when.
    refused(
        &[],
        &collateral,
        "Intel's PCK CRL in the collateral for FMSPC B0C06F000000",
    );
    refused(&[], &collateral, "expired on 2025-07-19 10:00:35 UTC");
    // Collateral for the same platform issued after the time of verification (the td15ex
    // vector's, a year later).
    refused(
        &["--at", TDX_TIME],
        &v.join("tdx_quote_td15ex_collateral.json"),
        "after the time of verification",
    );
    refused(
        &["--at", TDX_TIME, "--image-hash", &"ab".repeat(32)],
        &collateral,
        "is not allowed",
    );
    refused(
        &["--at", TDX_TIME, "--tcb-status", "OutOfDate"],
        &collateral,
        "TCB status UpToDate is not accepted",
    );

    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(&quote).unwrap();
    bytes[48 + 136] ^= 1;
    let flipped = dir.path().join("flipped");
    std::fs::write(&flipped, bytes).unwrap();
    let err = attest(&[
        "verify",
        path(&flipped),
        "--collateral",
        path(&collateral),
        "--at",
        TDX_TIME,
    ])
    .unwrap_err();
    assert!(err.contains("quote verification failed"), "{err}");
}

#[test]
fn dev_certificate_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let dev_key = dir.path().join("dev.key");
    let key = dir.path().join("worker.key");
    let pem = dir.path().join("worker.pem");
    let info = attest(&["dev-key", path(&dev_key)]).unwrap();
    let dev_pub = info["dev_attester_key"].as_str().unwrap().to_owned();
    let status = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(["attest", "cert", "--attester", "dev", "--role", "worker"])
        .args(["--key-file", path(&key), "--dev-key-file", path(&dev_key)])
        .args(["--out", path(&pem)])
        .env("RUST_LOG", "error")
        .status()
        .unwrap();
    assert!(status.success());

    let shown = attest(&["show", path(&pem)]).unwrap();
    assert_eq!(shown["claims"]["role"], "worker");
    assert_eq!(shown["bound_to_key"], true);
    assert_eq!(shown["quote"]["kind"], "dev");
    assert_eq!(shown["quote"]["image_hash"], info["dev_image_hash"]);

    let ok = attest(&["verify", path(&pem), "--dev-key", &dev_pub]).unwrap();
    assert_eq!(
        (&ok["kind"], &ok["bound_to_key"]),
        (&"dev".into(), &true.into())
    );
    let err = attest(&["verify", path(&pem)]).unwrap_err();
    assert!(err.contains("development quotes are not accepted"), "{err}");
    let err = attest(&["verify", path(&pem), "--dev-key", &"11".repeat(32)]).unwrap_err();
    assert!(err.contains("not signed by a trusted dev key"), "{err}");

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\x30\x03\x01\x02\x03").unwrap();
    let err = attest(&["show", path(&garbage)]).unwrap_err();
    assert!(err.contains("not valid DER X.509"), "{err}");
}

/// `cocoon attest config-hash` prints what a node measures into RTMR3 and its hash, the
/// value peers list in `config_hashes`: the same the library measures at start, with no
/// upstream API key in it.
#[test]
fn config_hash_prints_what_a_worker_measures() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(
        &file,
        "proxy_addr = \"proxy.example:8443\"\n\
         [[backend]]\nkind = \"upstream\"\nurl = \"https://vllm.local/v1\"\napi_key = \"sk-secret\"\n\
         [[backend.models]]\nid = \"m\"\ncontext_length = 4096\n",
    )
    .unwrap();
    let shown = attest(&["config-hash", "worker", "--config", path(&file)]).unwrap();
    let config: cocoon_worker::WorkerConfig =
        toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let measured = config.measured();
    assert_eq!(shown["config_hash"], measured.config_hash());
    assert_eq!(shown["measured"], measured.content);
    assert!(!measured.content.contains("sk-secret"));
    let err = attest(&["config-hash", "gateway", "--config", path(&file)]).unwrap_err();
    assert!(err.contains("unknown role"), "{err}");
}
