//! RA-TLS: certificates that carry a TEE quote bound to their key, and the verifier that checks
//! them. Layout as in COCOON: extension 1.3.6.1.4.1.12345.1 holds the raw quote, .2 the claims;
//! the quote's report data is SHA-512 of the claims, which name the certificate's key.

use std::time::{SystemTime, UNIX_EPOCH};

use cocoon_attest::{
    Collateral, DEV_QUOTE_MAGIC, Measurements, Policy, check_binding, verify_dev_quote,
    verify_quote,
};

use crate::verify::{PeerCertificate, PeerVerifier, VerifyError};

pub(crate) const OID_QUOTE: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 1];
pub(crate) const OID_CLAIMS: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 2];
pub(crate) const OID_QUOTE_STR: &str = "1.3.6.1.4.1.12345.1";
pub(crate) const OID_CLAIMS_STR: &str = "1.3.6.1.4.1.12345.2";

/// Admits a peer only if its certificate carries a valid quote, bound to its key, of an image
/// the policy allows.
#[derive(Debug)]
pub struct RaTlsVerifier {
    policy: Policy,
    /// Intel collateral for the platforms expected (supplied by config; never fetched).
    collateral: Vec<Collateral>,
    /// Development attester keys this verifier opts into. Empty: dev quotes are refused.
    dev_keys: Vec<[u8; 32]>,
    /// Verification time for tests against recorded collateral; `None` is the clock.
    fixed_now: Option<u64>,
}

impl RaTlsVerifier {
    pub fn new(policy: Policy, collateral: Vec<Collateral>) -> Self {
        Self {
            policy,
            collateral,
            dev_keys: Vec::new(),
            fixed_now: None,
        }
    }

    /// Also accept development quotes signed by `key`. Development only.
    pub fn allow_dev_key(mut self, key: [u8; 32]) -> Self {
        tracing::warn!(
            "RA-TLS verifier accepts DEVELOPMENT quotes: peers prove nothing about their machines"
        );
        self.dev_keys.push(key);
        self
    }

    pub fn at_time(mut self, now: u64) -> Self {
        self.fixed_now = Some(now);
        self
    }

    fn measurements(&self, quote: &[u8]) -> Result<Measurements, VerifyError> {
        if quote.starts_with(DEV_QUOTE_MAGIC) {
            if self.dev_keys.is_empty() {
                return Err(VerifyError::Policy(
                    "development quotes are not accepted".into(),
                ));
            }
            let m = verify_dev_quote(quote, &self.dev_keys)
                .map_err(|e| VerifyError::Policy(e.to_string()))?;
            self.policy
                .check_measurements(&m)
                .map_err(|e| VerifyError::Policy(e.to_string()))?;
            return Ok(m);
        }
        let now = self.fixed_now.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        let mut last = VerifyError::Policy("no collateral configured for TDX quotes".into());
        for c in &self.collateral {
            match verify_quote(quote, c, now) {
                Ok(v) => {
                    self.policy
                        .check(&v)
                        .map_err(|e| VerifyError::Policy(e.to_string()))?;
                    return Ok(v.measurements);
                }
                Err(e) => last = VerifyError::Policy(e.to_string()),
            }
        }
        Err(last)
    }
}

impl PeerVerifier for RaTlsVerifier {
    fn verify(&self, peer: &PeerCertificate) -> Result<(), VerifyError> {
        let quote = peer
            .extension(OID_QUOTE_STR)
            .ok_or_else(|| VerifyError::Policy("certificate carries no attestation".into()))?;
        let claims = peer
            .extension(OID_CLAIMS_STR)
            .ok_or_else(|| VerifyError::Policy("certificate carries no claims".into()))?;
        let measurements = self.measurements(quote)?;
        check_binding(&measurements, claims, &peer.public_key)
            .map_err(|e| VerifyError::Policy(e.to_string()))?;
        Ok(())
    }
}
