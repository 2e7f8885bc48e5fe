use std::collections::HashSet;

use crate::measurements::ImageHash;
use crate::quote::VerifiedQuote;

/// Which attested machines may join: allowed images, acceptable TCB statuses, no debug TDs.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Images allowed to run (later: read from the root registry).
    pub image_hashes: HashSet<ImageHash>,
    /// Intel TCB statuses accepted. Default: `UpToDate` only.
    pub tcb_statuses: Vec<String>,
    /// Debug TDs expose their memory to the host; only for local experiments.
    pub allow_debug: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            image_hashes: HashSet::new(),
            tcb_statuses: vec!["UpToDate".into()],
            allow_debug: false,
        }
    }
}

/// Why an attested machine is refused by a [`Policy`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The TD is a debug TD and the policy does not allow debug TDs.
    #[error("TD runs in debug mode; its memory is readable by the host")]
    DebugTd,
    /// The platform's Intel TCB status is not in the policy's accepted list.
    #[error("TCB status {0} is not accepted")]
    TcbStatus(String),
    /// The image hash is not in the allowed set; carries the image hash and the MRTD in hex.
    #[error("image {0} is not allowed (MRTD {1})")]
    ImageNotAllowed(ImageHash, String),
}

impl Policy {
    /// Checks a verified quote: no debug TD unless allowed, an accepted TCB status, an allowed
    /// image.
    pub fn check(&self, quote: &VerifiedQuote) -> Result<(), PolicyError> {
        if quote.measurements.is_debug() && !self.allow_debug {
            return Err(PolicyError::DebugTd);
        }
        if !self.tcb_statuses.iter().any(|s| s == &quote.tcb_status) {
            return Err(PolicyError::TcbStatus(quote.tcb_status.clone()));
        }
        self.check_measurements(&quote.measurements)
    }

    /// The checks that need no TCB status (development quotes have none).
    pub fn check_measurements(&self, m: &crate::Measurements) -> Result<(), PolicyError> {
        if m.is_debug() && !self.allow_debug {
            return Err(PolicyError::DebugTd);
        }
        let image = m.image_hash();
        if !self.image_hashes.contains(&image) {
            return Err(PolicyError::ImageNotAllowed(image, hex::encode(m.mrtd)));
        }
        Ok(())
    }
}
