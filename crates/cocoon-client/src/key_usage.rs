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
        // A late record of a day gone by (an answer that ended just before midnight, written
        // after one of the new day's) must not wipe the new day's.
        if day < kept.day {
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// ATTACK (a race at midnight UTC, no attacker needed): `KeyHold::spend` reads its day
    /// under the key's lock and records it after, so key A's spend stamped day D can reach
    /// the file after key B's first spend of day D+1. `record` then started the file over at
    /// day D, dropping B's use of D+1: a restart before B spent again handed B a fresh day.
    /// Now: a record for a day older than the file's changes nothing ("an older figure
    /// written late changes nothing" holds for days too).
    #[test]
    fn review_a_late_record_of_yesterday_keeps_today() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let file = UsageFile::open(path.clone()).unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        file.record(&b, 20_001, 90).unwrap();
        file.record(&a, 20_000, 70).unwrap();
        assert_eq!(file.used(&b, 20_001), 90);
        let restarted = UsageFile::open(path).unwrap();
        assert_eq!(restarted.used(&b, 20_001), 90, "B's day was forgotten");
    }
}
