use std::fmt;

/// SHA-256 over the registers that describe a TD's image: MRTD (the initial TD memory: firmware)
/// and RTMR0..2 (firmware configuration, kernel and command line, as measured at boot). RTMR3
/// is left out on purpose: it is extended at run time by the guest itself, so it describes what
/// the guest did after boot, not what was booted.
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
    /// RTMR0..3: runtime measurement registers (firmware config, kernel, command line; RTMR3 for
    /// the guest's own use).
    pub rtmr: [[u8; 48]; 4],
    /// 64 bytes chosen by the TD when it asked for the quote; RA-TLS binds the TLS key here.
    pub report_data: [u8; 64],
    /// TDATTRIBUTES, as in the TD report; bit 0 is debug mode.
    pub td_attributes: [u8; 8],
}

impl Measurements {
    /// TDATTRIBUTES bit 0: the TD runs in debug mode, so the host can read and change its memory.
    pub fn is_debug(&self) -> bool {
        self.td_attributes[0] & 0x01 != 0
    }

    /// The [`ImageHash`] of these registers: SHA-256 of MRTD and RTMR0..2.
    pub fn image_hash(&self) -> ImageHash {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.mrtd);
        for r in &self.rtmr[..3] {
            ctx.update(r);
        }
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
