//! Each API key's use today, kept in a file across restarts (`[access] usage_file`), so a
//! daily limit means a day however often the gateway restarts. Keys are named there by their
//! SHA-256, never written themselves.

use std::collections::BTreeMap;
use std::path::PathBuf;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The file and what it holds.
#[derive(Debug)]
pub(crate) struct UsageFile {
    path: PathBuf,
    kept: Mutex<Kept>,
}

/// The day (days since the Unix epoch, UTC) and each key's tokens used in it, by the key's
/// SHA-256 in hex.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Kept {
    day: u64,
    used: BTreeMap<String, u64>,
}

impl UsageFile {
    /// Reads `path`, or starts empty where it does not exist yet; a file that cannot be read
    /// or parsed is an error (starting afresh would hand every key a new day).
    pub(crate) fn open(path: PathBuf) -> anyhow::Result<Self> {
        let kept = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("[access] usage_file {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Kept::default(),
            Err(e) => anyhow::bail!("[access] usage_file {}: {e}", path.display()),
        };
        Ok(Self {
            path,
            kept: Mutex::new(kept),
        })
    }

    /// What the key with SHA-256 `digest` used on `day`, as last recorded.
    pub(crate) fn used(&self, digest: &[u8; 32], day: u64) -> u64 {
        let kept = self.kept.lock();
        if kept.day != day {
            return 0;
        }
        kept.used.get(&hex::encode(digest)).copied().unwrap_or(0)
    }

    /// Records that the key used `used` tokens on `day` and writes the file (atomically, and
    /// durably). A day's use only grows: an older figure written late changes nothing.
    pub(crate) fn record(&self, digest: &[u8; 32], day: u64, used: u64) -> std::io::Result<()> {
        let mut kept = self.kept.lock();
        if kept.day != day {
            *kept = Kept {
                day,
                used: BTreeMap::new(),
            };
        }
        let entry = kept.used.entry(hex::encode(digest)).or_default();
        *entry = (*entry).max(used);
        let json = serde_json::to_vec(&*kept).expect("plain data serializes");
        cocoon_ledger::write_atomically(&self.path, &json)
    }
}
