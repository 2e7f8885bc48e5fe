//! The hash a model is known by on the network: SHA-256 of its weights file, streamed. It is
//! computed from the file at every start and kept in memory only (by path, size and
//! modification time): a cache on disk would be the host's to forge, and the host could then
//! swap the weights under an old hash.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

type Key = (PathBuf, u64, Option<SystemTime>);

fn cache() -> &'static Mutex<HashMap<Key, String>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// SHA-256 (hex) of the file at `path`, read in 1 MiB pieces; computed once per process for a
/// given path, size and modification time.
pub fn model_file_hash(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let key = (path.to_owned(), meta.len(), meta.modified().ok());
    if let Some(hash) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hash.clone());
    }
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => ctx.update(&buf[..n]),
        }
    }
    let hash = hex::encode(ctx.finish());
    cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, hash.clone());
    Ok(hash)
}

/// Whether `hash` is a model hash as the network names them: 64 lowercase hex digits.
pub fn is_model_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is SHA-256 of the bytes, and a changed file is hashed again.
    #[test]
    fn a_model_is_known_by_the_sha256_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(model_file_hash(&path).unwrap(), abc);
        assert_eq!(model_file_hash(&path).unwrap(), abc);
        std::fs::write(&path, b"abcd").unwrap();
        assert_ne!(model_file_hash(&path).unwrap(), abc);
        assert!(is_model_hash(abc));
        assert!(!is_model_hash(&abc.to_uppercase()));
        assert!(model_file_hash(&dir.path().join("missing")).is_err());
    }
}
