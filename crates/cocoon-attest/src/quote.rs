use dcap_qvl::QuoteCollateralV3;

use crate::measurements::Measurements;

/// Intel's signed collateral for one platform (PCK CRL, TCB info, QE identity), in the JSON
/// layout that PCCS serves and `dcap-qvl` reads.
pub type Collateral = QuoteCollateralV3;

/// Why evidence could not be produced, parsed or verified.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    /// The collateral could not be parsed as PCCS-style JSON collateral.
    #[error("collateral is not valid JSON collateral: {0}")]
    BadCollateral(String),
    /// The quote's signatures, certificate chain, CRLs or TCB matching failed, or the time is
    /// outside the collateral's or certificates' validity. The message is `dcap-qvl`'s.
    #[error("quote verification failed: {0}")]
    Verification(String),
    /// The quote is an SGX enclave quote, not a TD quote.
    #[error("quote is an SGX enclave quote, not a TDX quote")]
    NotTdx,
    /// No collateral is held for the quote's platform; says where it may come from.
    #[error("{0}")]
    NoCollateral(String),
    /// A piece of the collateral has expired or is not yet in force; says which, when, and what
    /// to do.
    #[error("{0}")]
    StaleCollateral(String),
    /// Collateral older than the collateral held for its platform: kept out, since going back
    /// could hide a TCB update Intel has published since.
    #[error("{0}")]
    OlderCollateral(String),
    /// No TEE to attest with, or it failed (configfs-tsm missing or broken, bad dev key).
    #[error("cannot attest: {0}")]
    NoTee(String),
}

/// A quote whose signature chain verified to Intel's root at a given time.
#[derive(Debug, Clone)]
pub struct VerifiedQuote {
    /// Intel's TCB status for the platform, e.g. `UpToDate`, `OutOfDate`, `SWHardeningNeeded`.
    pub tcb_status: String,
    /// Intel security advisory IDs (e.g. `INTEL-SA-00837`) that apply to the platform's TCB.
    pub advisory_ids: Vec<String>,
    /// The TD's measured registers and report data, from the verified quote.
    pub measurements: Measurements,
    /// When the collateral it was verified with expires (Unix seconds), where a store knew: a
    /// verdict kept for later holds no longer than that.
    pub collateral_next_update: Option<i64>,
}

/// The measurements a quote claims, read WITHOUT verifying anything: for showing a quote to a
/// person (`cocoon attest show`), never for a decision. Development quotes are read too.
pub fn read_measurements(raw: &[u8]) -> Result<(crate::AttesterKind, Measurements), AttestError> {
    if raw.starts_with(crate::DEV_QUOTE_MAGIC) {
        let m = crate::attester::read_dev_quote(raw)?;
        return Ok((crate::AttesterKind::Dev, m));
    }
    let quote = dcap_qvl::quote::Quote::parse(raw)
        .map_err(|e| AttestError::Verification(format!("not a quote: {e:#}")))?;
    let td = quote.report.as_td10().ok_or(AttestError::NotTdx)?;
    Ok((crate::AttesterKind::Tdx, measurements_of(td)))
}

fn measurements_of(td: &dcap_qvl::quote::TDReport10) -> Measurements {
    Measurements {
        mrtd: td.mr_td,
        mr_config_id: td.mr_config_id,
        mr_owner: td.mr_owner,
        mr_owner_config: td.mr_owner_config,
        rtmr: [td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3],
        report_data: td.report_data,
        td_attributes: td.td_attributes,
    }
}

/// Parses collateral JSON as PCCS serves it.
pub fn parse_collateral(json: &[u8]) -> Result<Collateral, AttestError> {
    serde_json::from_slice(json).map_err(|e| AttestError::BadCollateral(e.to_string()))
}

/// Verifies a raw TDX quote against `collateral` at `now` (seconds since the Unix epoch).
/// Offline: nothing is fetched.
pub fn verify_quote(
    raw: &[u8],
    collateral: &Collateral,
    now: u64,
) -> Result<VerifiedQuote, AttestError> {
    let verified = dcap_qvl::verify::ring::verify(raw, collateral, now)
        .map_err(|e| AttestError::Verification(format!("{e:#}")))?;
    let td = verified.report.as_td10().ok_or(AttestError::NotTdx)?;
    Ok(VerifiedQuote {
        tcb_status: verified.status,
        advisory_ids: verified.advisory_ids,
        measurements: measurements_of(td),
        collateral_next_update: None,
    })
}
