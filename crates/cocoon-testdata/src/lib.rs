//! The test vectors every cocoon test, fuzz target and bench reads, in one place.
//!
//! The files live in this crate's `tdx/` folder with their upstream license (dcap-qvl's
//! samples, MIT). The bytes are compiled in, so a test needs no path and a fuzz target built in
//! another workspace finds them the same way; [`tdx_dir`] gives the folder for the tests that
//! hand a path to the `cocoon` binary.

use std::path::PathBuf;

/// A real quote, its collateral and the time at which the collateral is valid.
#[derive(Debug, Clone, Copy)]
pub struct Vector {
    /// The file name of the quote in [`tdx_dir`].
    pub quote_file: &'static str,
    /// The file name of its collateral (PCK CRL, TCB info, QE identity) in [`tdx_dir`].
    pub collateral_file: &'static str,
    /// The quote's bytes.
    pub quote: &'static [u8],
    /// The collateral's JSON.
    pub collateral: &'static [u8],
    /// Unix seconds at which the quote verifies against the collateral.
    pub at: u64,
}

/// TDX, quote v4, TD 1.0, FMSPC b0c06f000000: UpToDate, no advisories. Its MRTD starts with
/// `91eb2b44` and its RTMR3 is all zeros.
pub const TDX: Vector = Vector {
    quote_file: "tdx_quote",
    collateral_file: "tdx_quote_collateral.json",
    quote: include_bytes!("../tdx/tdx_quote"),
    collateral: include_bytes!("../tdx/tdx_quote_collateral.json"),
    at: 1_750_332_747,
};

/// TDX 1.5, quote v5: UpToDate.
pub const TDX15: Vector = Vector {
    quote_file: "tdx_quote_td15ex",
    collateral_file: "tdx_quote_td15ex_collateral.json",
    quote: include_bytes!("../tdx/tdx_quote_td15ex"),
    collateral: include_bytes!("../tdx/tdx_quote_td15ex_collateral.json"),
    at: 1_791_421_786,
};

/// An SGX quote: ConfigurationAndSWHardeningNeeded with INTEL-SA-00289 and INTEL-SA-00615.
/// `at` is inside its collateral's validity, the same moment as [`TDX`]'s.
pub const SGX: Vector = Vector {
    quote_file: "sgx_quote",
    collateral_file: "sgx_quote_collateral.json",
    quote: include_bytes!("../tdx/sgx_quote"),
    collateral: include_bytes!("../tdx/sgx_quote_collateral.json"),
    at: 1_750_332_747,
};

/// The folder holding the vector files, for tests that pass paths to a program.
pub fn tdx_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tdx")
}
