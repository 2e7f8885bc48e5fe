//! Every fuzz target's committed seeds, a local corpus when `fuzz/corpus/` has one, and a
//! fixed set of mutations of each seed (truncations, flipped bits) through the target's body:
//! the same property checks libFuzzer runs, on every test run and without sanitizers.

use std::path::{Path, PathBuf};

use cocoon_fuzzing::{TARGETS, Target};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The seed folders of a target: `fuzz/seeds/NAME`, and the TDX vectors for `quote`.
fn seed_dirs(target: &Target) -> Vec<PathBuf> {
    let mut dirs = vec![repo().join("fuzz/seeds").join(target.name)];
    if target.name == "quote" {
        dirs.push(cocoon_testdata::tdx_dir());
    }
    dirs
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Deterministic neighbours of a seed: prefixes at a few lengths and single flipped bits
/// spread over the input, at most `limit` of them.
fn mutations(seed: &[u8], limit: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if seed.is_empty() {
        return out;
    }
    for cut in [0, 1, seed.len() / 3, seed.len() / 2, seed.len() - 1] {
        out.push(seed[..cut].to_vec());
    }
    let flips = limit.saturating_sub(out.len()).max(1);
    let step = (seed.len() / flips).max(1);
    for (n, at) in (0..seed.len()).step_by(step).take(flips).enumerate() {
        let mut bad = seed.to_vec();
        bad[at] ^= 1 << (n % 8);
        out.push(bad);
    }
    out
}

fn replay(target: &Target, mutations_per_seed: usize) -> usize {
    let mut seeds = Vec::new();
    for dir in seed_dirs(target) {
        seeds.extend(files(&dir));
    }
    assert!(
        !seeds.is_empty(),
        "{}: no committed seeds in {:?}",
        target.name,
        seed_dirs(target)
    );
    let mut runs = 0;
    for (path, seed) in &seeds {
        let inputs = std::iter::once(seed.clone()).chain(mutations(seed, mutations_per_seed));
        for input in inputs {
            let result = std::panic::catch_unwind(|| (target.check)(&input));
            assert!(
                result.is_ok(),
                "{}: property broken by {} (or a mutation of it: {} bytes)",
                target.name,
                path.display(),
                input.len()
            );
            runs += 1;
        }
    }
    // A corpus that `scripts/fuzz.sh` grew here is replayed whole.
    for (path, input) in files(&repo().join("fuzz/corpus").join(target.name)) {
        let result = std::panic::catch_unwind(|| (target.check)(&input));
        assert!(
            result.is_ok(),
            "{}: property broken by {}",
            target.name,
            path.display()
        );
        runs += 1;
    }
    runs
}

#[test]
fn frames_seeds_hold() {
    assert!(replay(&TARGETS[0], 256) > 2);
}

#[test]
fn openai_request_seeds_hold() {
    assert!(replay(&TARGETS[1], 256) > 2);
}

#[test]
fn certificate_seeds_hold() {
    assert!(replay(&TARGETS[2], 256) > 1);
}

#[test]
fn quote_seeds_hold() {
    // Each run verifies a quote (milliseconds), so fewer mutations.
    assert!(replay(&TARGETS[3], 48) > 3);
}

#[test]
fn payment_message_seeds_hold() {
    assert!(replay(&TARGETS[4], 256) > 2);
}

#[test]
fn every_target_is_replayed() {
    let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
    let fuzz_targets: Vec<String> = files(&repo().join("fuzz/fuzz_targets"))
        .into_iter()
        .map(|(p, _)| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for t in &fuzz_targets {
        assert!(names.contains(&t.as_str()), "fuzz target {t} has no replay");
    }
    assert_eq!(fuzz_targets.len(), names.len());
}

#[test]
fn the_genuine_quote_reaches_the_verified_branch() {
    // The quote property only compares measurements for quotes that verify: the genuine vector
    // must, or the seed replay would check nothing but the absence of a panic.
    let c = cocoon_attest::parse_collateral(cocoon_testdata::TDX.collateral).unwrap();
    assert!(
        cocoon_attest::verify_quote(cocoon_testdata::TDX.quote, &c, cocoon_testdata::TDX.at)
            .is_ok()
    );
}

#[test]
fn a_broken_property_is_caught() {
    // The replay harness itself: a check that fails on some input must fail the replay.
    let failing = Target {
        name: "frames",
        check: |data| assert!(data.len() < 3, "long input"),
    };
    let result = std::panic::catch_unwind(|| replay(&failing, 8));
    assert!(result.is_err());
}
