//! `cocoon attest collateral`: fetch Intel's collateral for platforms into a folder (the one a
//! node's `[collateral] cache_dir` names, or files for `collateral_files`), and show what a
//! collateral file covers and until when. For operators who fetch by hand or by cron, and for
//! checking why a node says its collateral expired.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cocoon_attest::{CollateralStore, Described, Platform};
use cocoon_collateral::{CollateralConfig, Fetcher};
use serde_json::{Value, json};

use crate::attest::Evidence;

/// What `fetch` is asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchOptions {
    /// The PCCS (`https://pccs.internal:8081`) or Intel's PCS
    /// (`https://api.trustedservices.intel.com`).
    #[arg(long)]
    pub pccs: String,
    /// A quote or RA-TLS certificate whose platform to fetch for; repeat for several.
    #[arg(long)]
    pub quote: Vec<PathBuf>,
    /// A platform to fetch for, `FMSPC` or `FMSPC:processor|platform`; repeat for several.
    #[arg(long)]
    pub platform: Vec<String>,
    /// The folder to write to (one `<FMSPC>-<ca>.json` per platform): a node's cache_dir.
    #[arg(long)]
    pub out: PathBuf,
    /// PEM CAs trusted for the service's TLS certificate, beside the web's roots.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Check the fetched collateral is in force at this time (Unix seconds) instead of now.
    #[arg(long)]
    pub at: Option<u64>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn described_json(d: &Described, at: u64) -> Value {
    json!({
        "platform": d.platform.to_string(),
        "fmspc": d.platform.fmspc,
        "ca": d.platform.ca,
        "expires_on": cocoon_attest::date(d.next_update()),
        "in_force": d.check_current(at).is_ok(),
        "problem": d.check_current(at).err().map(|e| e.to_string()),
        "pieces": d.dates.iter().map(|p| json!({
            "piece": p.piece.to_string(),
            "issued": cocoon_attest::date(p.issued),
            "next_update": cocoon_attest::date(p.next_update),
        })).collect::<Vec<_>>(),
    })
}

/// Fetches each platform asked for (by quote or by name) into `out`, keeping what is there if
/// it is newer; fails, naming the platform, if any fetch fails.
pub async fn fetch(options: &FetchOptions) -> anyhow::Result<Value> {
    let mut platforms = Vec::new();
    for path in &options.quote {
        let evidence = Evidence::read(path)?;
        let quote = evidence.quote()?;
        platforms.push(
            cocoon_attest::quote_platform(quote)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        );
    }
    for p in &options.platform {
        platforms.push(Platform::parse(p)?);
    }
    anyhow::ensure!(
        !platforms.is_empty(),
        "name what to fetch for: --quote FILE or --platform FMSPC"
    );
    platforms.sort();
    platforms.dedup();
    let at = options.at.unwrap_or_else(now);
    let config = CollateralConfig {
        pccs_url: Some(options.pccs.clone()),
        cache_dir: Some(options.out.clone()),
        ca_file: options.ca_file.clone(),
        ..CollateralConfig::default()
    };
    let store = CollateralStore::new();
    let fetcher = Fetcher::with_clock(&config, store.clone(), Arc::new(move || at))?;
    // What the folder holds already: an older answer does not replace it.
    fetcher.load_cache();
    let mut fetched = Vec::new();
    for platform in &platforms {
        let outcome = fetcher
            .fetch(platform)
            .await
            .map_err(|e| anyhow::anyhow!("{platform}: {e}"))?;
        let held = store.get(platform).expect("fetched collateral is held");
        let mut report = described_json(&held, at);
        report["file"] = json!(options.out.join(platform.file_name()));
        report["changed"] = json!(matches!(outcome, cocoon_attest::Offered::Stored(_)));
        fetched.push(report);
    }
    Ok(json!({"fetched": fetched}))
}

/// What each collateral file (or each file in a folder) covers, and whether it is in force at
/// `at` (default: now).
pub fn show(path: &Path, at: Option<u64>) -> anyhow::Result<Value> {
    let at = at.unwrap_or_else(now);
    let files = files(&[path.to_path_buf()])?;
    let mut out = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        let described = cocoon_attest::parse_collateral(&bytes)
            .and_then(Described::new)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let mut report = described_json(&described, at);
        report["file"] = json!(file);
        out.push(report);
    }
    Ok(json!({"collateral": out}))
}

/// Collateral files given to `verify`: each path a file, or a folder of them (a cache_dir).
pub fn files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "json"))
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}
