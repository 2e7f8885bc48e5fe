//! The hash a model is known by on the network: SHA-256 of its weights file, streamed. It is
//! computed from the file at every start and kept in memory only, by path, size, modification
//! and change times and inode: a cache on disk would be the host's to forge, and the change
//! time, unlike the modification time, cannot be set back. Split models (a GGUF in shards
//! `-NNNNN-of-NNNNN.gguf`, which llama.cpp loads together) are refused: one file's hash would
//! not cover the other shards' tensors.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

type Key = (PathBuf, u64, Option<SystemTime>, (i64, i64, u64, u64));

fn cache() -> &'static Mutex<HashMap<Key, String>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// SHA-256 (hex) of the file at `path`, read in 1 MiB pieces; computed once per process for a
/// given path, size and modification time.
pub fn model_file_hash(path: &Path) -> std::io::Result<String> {
    if is_split(path) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is one shard of a split model, which llama.cpp loads with its other \
                 shards: its hash would not cover them. Merge the model into one file \
                 (llama-gguf-split --merge)",
                path.display()
            ),
        ));
    }
    let meta = std::fs::metadata(path)?;
    let key = (
        path.to_owned(),
        meta.len(),
        meta.modified().ok(),
        changed(&meta),
    );
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

/// The file's change time, inode and device: what no one can set back.
#[cfg(unix)]
fn changed(meta: &std::fs::Metadata) -> (i64, i64, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.ctime(), meta.ctime_nsec(), meta.ino(), meta.dev())
}

#[cfg(not(unix))]
fn changed(_meta: &std::fs::Metadata) -> (i64, i64, u64, u64) {
    (0, 0, 0, 0)
}

/// Whether `path` names a shard of a split GGUF (`<name>-00001-of-00003.gguf`).
fn is_split(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    match stem.rsplit_once("-of-") {
        Some((head, total)) => {
            digits(total) && head.rsplit_once('-').is_some_and(|(_, no)| digits(no))
        }
        None => false,
    }
}

pub use cocoon_protocol::is_model_hash;

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

    /// REVIEW, fixed: the cache is keyed by path, size and modification time, but whoever can write
    /// the weights (the host, which the module doc says must not be able to forge the hash) can
    /// also put the old modification time back (`utimensat`). Weights swapped for bytes of the
    /// same length under the old time keep the old hash for the life of the process: the
    /// worker's measured configuration (`WorkerConfig::measured`, computed after
    /// `LlamaBackend::load` hashed the file, so from this cache) then names the allowed
    /// weights while llama.cpp read the swapped ones.
    #[test]
    fn review_weights_swapped_under_the_same_size_and_time_are_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let (allowed, swapped) = (b"allowed weights!", b"swapped weights!");
        std::fs::write(&path, allowed).unwrap();
        let when = std::fs::metadata(&path).unwrap().modified().unwrap();
        let first = model_file_hash(&path).unwrap();
        assert_eq!(
            first,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, allowed))
        );
        std::fs::write(&path, swapped).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        // What the host can do: same length, same time, other bytes.
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.len(), meta.modified().unwrap()), (16, when));
        assert_eq!(
            model_file_hash(&path).unwrap(),
            hex::encode(ring::digest::digest(&ring::digest::SHA256, swapped)),
            "the hash still names the weights that were swapped out"
        );
    }

    /// A GGUF (version 3) with no tensors, `kv` as its u16 metadata, then `tail`.
    fn review_gguf(kv: &[(&str, u16)], tail: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        for (key, value) in kv {
            b.extend((key.len() as u64).to_le_bytes());
            b.extend(key.as_bytes());
            b.extend(2u32.to_le_bytes()); // GGUF_TYPE_UINT16
            b.extend(value.to_le_bytes());
        }
        b.extend(tail);
        b
    }

    /// REVIEW, fixed: llama.cpp loads split models: a first file `<name>-00001-of-0000N.gguf` whose
    /// metadata says `split.count = N` makes `llama_model_load_from_file` open
    /// `<name>-00002-of-0000N.gguf` .. too and take their tensors (llama-model-loader.cpp,
    /// `llama_get_list_splits`). `model_file_hash` hashes only the file it is given, so once
    /// the registry allows a split model (the hash of its first file, the only one a worker
    /// announces or measures), whoever places the files can swap every other shard for any
    /// tensors and keep the allowed hash. Refusing split models is a fix too.
    #[test]
    fn review_a_split_model_is_known_by_all_its_shards() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("m-00001-of-00002.gguf");
        let second = dir.path().join("m-00002-of-00002.gguf");
        let head = review_gguf(&[("split.no", 0), ("split.count", 2)], b"");
        let shard = |tensors: &[u8]| review_gguf(&[("split.no", 1), ("split.count", 2)], tensors);
        std::fs::write(&first, head).unwrap();
        std::fs::write(&second, shard(&b"allowed tensors"[..])).unwrap();
        let Ok(allowed) = model_file_hash(&first) else {
            return;
        };
        std::fs::write(&second, shard(&b"other tensors, not allowed"[..])).unwrap();
        assert!(
            !model_file_hash(&first).is_ok_and(|h| h == allowed),
            "the second shard's tensors changed and the model's hash did not"
        );
    }
}
