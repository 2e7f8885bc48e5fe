use std::fmt;

/// A TD's image hash as COCOON defines it: SHA-256 over the TD's attestation data with the
/// report data zeroed, `MRTD ‖ MRCONFIGID ‖ MROWNER ‖ MROWNERCONFIG ‖ RTMR0 ‖ RTMR1 ‖ RTMR2 ‖
/// RTMR3 ‖ 64 zero bytes`. It covers the firmware (MRTD), the host-chosen configuration ids,
/// the boot chain (RTMR0..2: firmware configuration, kernel, command line) and RTMR3, which
/// the guest extends with what it was told to do: so a registry listing it names one image
/// run one way, as a COCOON registry does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageHash(pub [u8; 32]);

impl ImageHash {
    /// Parses 64 hex digits (surrounding whitespace ignored); `None` if not exactly 32 bytes of
    /// hex.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageHash({self})")
    }
}

/// The measured registers of a TD, as signed in its quote.
#[derive(Clone, PartialEq, Eq)]
pub struct Measurements {
    /// MRTD: SHA-384 of the TD's initial memory (the firmware) as built by the TDX module.
    pub mrtd: [u8; 48],
    /// MRCONFIGID: set by the host when the TD is created (e.g. a hash of its configuration).
    pub mr_config_id: [u8; 48],
    /// MROWNER: set by the host at creation; the TD's owner.
    pub mr_owner: [u8; 48],
    /// MROWNERCONFIG: set by the host at creation; owner-defined configuration.
    pub mr_owner_config: [u8; 48],
    /// RTMR0..3: runtime measurement registers (firmware config, kernel, command line; RTMR3 for
    /// the guest's own use).
    pub rtmr: [[u8; 48]; 4],
    /// 64 bytes chosen by the TD when it asked for the quote; RA-TLS binds the TLS key here.
    pub report_data: [u8; 64],
    /// TDATTRIBUTES, as in the TD report; bit 0 is debug mode.
    pub td_attributes: [u8; 8],
}

impl Default for Measurements {
    /// Every register zero.
    fn default() -> Self {
        Self {
            mrtd: [0; 48],
            mr_config_id: [0; 48],
            mr_owner: [0; 48],
            mr_owner_config: [0; 48],
            rtmr: [[0; 48]; 4],
            report_data: [0; 64],
            td_attributes: [0; 8],
        }
    }
}

impl Measurements {
    /// TDATTRIBUTES bit 0: the TD runs in debug mode, so the host can read and change its memory.
    pub fn is_debug(&self) -> bool {
        self.td_attributes[0] & 0x01 != 0
    }

    /// The [`ImageHash`] of these registers.
    pub fn image_hash(&self) -> ImageHash {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for r in [
            &self.mrtd,
            &self.mr_config_id,
            &self.mr_owner,
            &self.mr_owner_config,
        ] {
            ctx.update(r);
        }
        for r in &self.rtmr {
            ctx.update(r);
        }
        ctx.update(&[0; 64]);
        ImageHash(
            ctx.finish()
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes"),
        )
    }
}

impl fmt::Debug for Measurements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Measurements")
            .field("mrtd", &hex::encode(self.mrtd))
            .field("mr_config_id", &hex::encode(self.mr_config_id))
            .field("mr_owner", &hex::encode(self.mr_owner))
            .field("mr_owner_config", &hex::encode(self.mr_owner_config))
            .field("rtmr0", &hex::encode(self.rtmr[0]))
            .field("rtmr1", &hex::encode(self.rtmr[1]))
            .field("rtmr2", &hex::encode(self.rtmr[2]))
            .field("rtmr3", &hex::encode(self.rtmr[3]))
            .field("report_data", &hex::encode(self.report_data))
            .field("td_attributes", &hex::encode(self.td_attributes))
            .field("image_hash", &self.image_hash())
            .finish()
    }
}
