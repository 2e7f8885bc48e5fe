//! Collateral kept on disk, one file per platform (`<FMSPC>-<ca>.json`, the JSON a PCCS client
//! writes and `collateral_files` reads), so a node restarted while the service is down still
//! verifies quotes until the collateral expires.

use std::io::Write;
use std::path::{Path, PathBuf};

use cocoon_attest::{Collateral, Platform};

/// A folder of collateral files.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// The cache in `dir`, created if missing.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every collateral file in the folder, read; a file that cannot be read or parsed is
    /// returned with its error, for the caller to report, and does not stop the others.
    pub fn load(&self) -> std::io::Result<Vec<(PathBuf, Result<Collateral, String>)>> {
        let mut out = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        for path in names {
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| cocoon_attest::parse_collateral(&b).map_err(|e| e.to_string()));
            out.push((path, parsed));
        }
        Ok(out)
    }

    /// Writes `collateral` as `platform`'s file, durably and atomically: a crash leaves the old
    /// file or the new one, never half of one.
    pub fn save(&self, platform: &Platform, collateral: &Collateral) -> std::io::Result<PathBuf> {
        let path = self.dir.join(platform.file_name());
        let json = serde_json::to_vec_pretty(collateral).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!(".{}.tmp", platform.file_name()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_collateral_loads_back_the_same_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(&dir.path().join("collateral")).unwrap();
        let c = cocoon_attest::parse_collateral(cocoon_testdata::TDX.collateral).unwrap();
        let platform = cocoon_attest::quote_platform(cocoon_testdata::TDX.quote).unwrap();
        let path = cache.save(&platform, &c).unwrap();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            platform.file_name()
        );
        std::fs::write(cache.dir().join("broken.json"), b"{").unwrap();
        std::fs::write(cache.dir().join("notes.txt"), b"ignored").unwrap();
        let loaded = cache.load().unwrap();
        assert_eq!(loaded.len(), 2);
        let good = loaded.iter().find(|(p, _)| *p == path).unwrap();
        assert_eq!(good.1.as_ref().unwrap(), &c);
        let bad = loaded
            .iter()
            .find(|(p, _)| p.ends_with("broken.json"))
            .unwrap();
        assert!(bad.1.is_err());
        // No temporary file is left behind.
        assert!(
            std::fs::read_dir(cache.dir()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
        );
    }
}
