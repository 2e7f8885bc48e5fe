//! Reputation on disk: each worker's [`Performance`] by key, so that a proxy restart does not
//! hand a stalling worker a clean slate. Written in batches (and at once after a penalty);
//! losing the last few seconds of it costs a little routing quality, never money.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::perf::Performance;

const REPUTATION: TableDefinition<'static, &[u8; 32], &[u8]> = TableDefinition::new("reputation");

/// The reputation file: a redb database of JSON [`Performance`] records by worker key.
pub struct ReputationStore {
    db: Database,
    path: String,
}

impl ReputationStore {
    /// Opens (or creates) the store and reads every record, times in unix seconds.
    pub fn open(path: &Path) -> anyhow::Result<(Self, HashMap<[u8; 32], Performance>)> {
        let name = path.display().to_string();
        let context = |e: &dyn std::fmt::Display| anyhow::anyhow!("reputation file {name}: {e}");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| context(&e))?;
        }
        let db = Database::create(path).map_err(|e| context(&e))?;
        let txn = db.begin_write().map_err(|e| context(&e))?;
        txn.open_table(REPUTATION).map_err(|e| context(&e))?;
        txn.commit().map_err(|e| context(&e))?;
        let mut records = HashMap::new();
        {
            let txn = db.begin_read().map_err(|e| context(&e))?;
            let table = txn.open_table(REPUTATION).map_err(|e| context(&e))?;
            for row in table.iter().map_err(|e| context(&e))? {
                let (k, v) = row.map_err(|e| context(&e))?;
                // A record that does not parse is only a worker starting over.
                match serde_json::from_slice::<Performance>(v.value()) {
                    Ok(p) => {
                        records.insert(*k.value(), p);
                    }
                    Err(e) => {
                        tracing::warn!(file = %name, error = %e, "skipping a bad reputation record")
                    }
                }
            }
        }
        Ok((Self { db, path: name }, records))
    }

    /// Writes `records` (unix times) in one durable transaction.
    pub fn save(&self, records: &[([u8; 32], Performance)]) -> anyhow::Result<()> {
        let context =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("reputation file {}: {e}", self.path);
        let txn = self.db.begin_write().map_err(|e| context(&e))?;
        {
            let mut table = txn.open_table(REPUTATION).map_err(|e| context(&e))?;
            for (key, perf) in records {
                let bytes = serde_json::to_vec(perf).map_err(|e| context(&e))?;
                table
                    .insert(key, bytes.as_slice())
                    .map_err(|e| context(&e))?;
            }
        }
        txn.commit().map_err(|e| context(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::perf::Outcome;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rep.redb");
        let mut p = Performance::default();
        p.record(Outcome::Stalled, 1_000.0);
        {
            let (store, found) = ReputationStore::open(&path).unwrap();
            assert!(found.is_empty());
            store.save(&[([7; 32], p)]).unwrap();
        }
        let (_, found) = ReputationStore::open(&path).unwrap();
        assert_eq!(found.get(&[7; 32]), Some(&p));
    }
}
