//! Producing evidence: a quote over 64 bytes of report data chosen by the caller.

use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::measurements::Measurements;
use crate::quote::AttestError;

/// Where the Linux configfs-tsm interface lives inside a confidential VM.
pub const TSM_REPORT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// Magic that starts every development quote, so one can never be mistaken for a DCAP quote.
pub const DEV_QUOTE_MAGIC: &[u8; 24] = b"COCOON-DEV2-QUOTE-UNSAFE";

/// Which kind of evidence an attester produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttesterKind {
    /// A real Intel TDX quote.
    Tdx,
    /// A development "quote" signed by a local key. Proves nothing about the machine.
    Dev,
}

impl AttesterKind {
    /// The lowercase name used in configuration and output: `tdx` or `dev`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttesterKind::Tdx => "tdx",
            AttesterKind::Dev => "dev",
        }
    }
}

impl std::fmt::Display for AttesterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that can produce a quote binding `report_data`.
pub trait Attester: Send + Sync {
    /// Which kind of evidence this attester produces.
    fn kind(&self) -> AttesterKind;
    /// A quote whose report data is exactly `report_data`.
    fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError>;
    /// Extends RTMR3 with `event`'s digest: later quotes carry the new value. Returns every
    /// event measured since the TD booted, ending with `event`: what certificates name. A
    /// node restarted in the same TD finds its configuration measured already and measures
    /// nothing; another configuration is refused (the TD would then hold two). Fails where
    /// RTMR3 cannot be extended, or was extended by something whose events are not known (a
    /// verifier could not replay it).
    fn measure(
        &self,
        event: &crate::MeasuredEvent,
    ) -> Result<Vec<crate::MeasuredEvent>, AttestError>;
}

/// What `measure` does with the events measured since boot (`log`): `Ok(None)` when `event`
/// is the configuration already measured (nothing to extend), `Ok(Some(log + event))` to
/// extend, or the refusal of a second configuration.
fn next_log(
    log: &[crate::MeasuredEvent],
    event: &crate::MeasuredEvent,
) -> Result<Option<Vec<crate::MeasuredEvent>>, AttestError> {
    let config = |e: &&crate::MeasuredEvent| e.label == crate::CONFIG_EVENT;
    match log.iter().rev().find(config) {
        Some(measured) if measured == event => Ok(None),
        Some(measured) if event.label == crate::CONFIG_EVENT => Err(AttestError::NoTee(format!(
            "this TD measured another configuration ({}) since it booted; a TD serves one \
             configuration: restart the TD to change it (this one is {})",
            measured.config_hash(),
            event.config_hash()
        ))),
        _ => Ok(Some(log.iter().cloned().chain([event.clone()]).collect())),
    }
}

/// Where a TDX node keeps the events it measured into RTMR3 since boot: the TD's own memory
/// (tmpfs), cleared when it boots again as RTMR3 is. Only a hint: verifiers replay it to RTMR3.
pub const RTMR3_EVENT_LOG: &str = "/run/cocoon/rtmr3-events.json";

/// Real TDX quotes through configfs-tsm: create a report entry, write the report data to
/// `inblob`, read the quote from `outblob`, remove the entry.
pub struct TdxAttester {
    root: PathBuf,
    rtmr3: PathBuf,
    log: PathBuf,
}

impl TdxAttester {
    /// Fails clearly when not running inside a TDX guest with configfs-tsm.
    pub fn new() -> Result<Self, AttestError> {
        Self::with_root(Path::new(TSM_REPORT_ROOT))
    }

    /// Like [`TdxAttester::new`], with configfs-tsm's report directory at `root` (for tests).
    pub fn with_root(root: &Path) -> Result<Self, AttestError> {
        if !root.is_dir() {
            return Err(AttestError::NoTee(format!(
                "{} does not exist: not inside a TDX guest with configfs-tsm (mount configfs, Linux 6.7+)",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_owned(),
            rtmr3: PathBuf::from(crate::RTMR3_SYSFS),
            log: PathBuf::from(RTMR3_EVENT_LOG),
        })
    }

    /// Extends RTMR3 through the file at `path` instead of the kernel's, keeping the event log
    /// at `log` (for tests).
    pub fn with_rtmr3(mut self, path: &Path, log: &Path) -> Self {
        self.rtmr3 = path.to_owned();
        self.log = log.to_owned();
        self
    }
}

impl Attester for TdxAttester {
    fn kind(&self) -> AttesterKind {
        AttesterKind::Tdx
    }

    fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        let io =
            |what: &str, e: std::io::Error| AttestError::NoTee(format!("configfs-tsm {what}: {e}"));
        // A unique entry per request: concurrent requests must not read each other's quotes.
        let entry = self
            .root
            .join(format!("cocoon-{}-{:016x}", std::process::id(), rand_u64()));
        std::fs::create_dir(&entry).map_err(|e| io("mkdir", e))?;
        let result = (|| {
            let generation = || std::fs::read_to_string(entry.join("generation")).ok();
            let before = generation();
            std::fs::write(entry.join("inblob"), report_data).map_err(|e| io("write inblob", e))?;
            let quote = std::fs::read(entry.join("outblob")).map_err(|e| io("read outblob", e))?;
            // The generation counter moves on every write; if it moved by more than ours,
            // someone else wrote in between and the quote may not be over our data.
            if let (Some(b), Some(a)) = (before, generation())
                && let (Ok(b), Ok(a)) = (b.trim().parse::<u64>(), a.trim().parse::<u64>())
                && a != b + 1
            {
                return Err(AttestError::NoTee(
                    "configfs-tsm entry was written concurrently".into(),
                ));
            }
            Ok(quote)
        })();
        let _ = std::fs::remove_dir(&entry);
        result
    }

    fn measure(
        &self,
        event: &crate::MeasuredEvent,
    ) -> Result<Vec<crate::MeasuredEvent>, AttestError> {
        let shown = self.rtmr3.display();
        let now = std::fs::read(&self.rtmr3).map_err(|e| {
            AttestError::NoTee(format!(
                "cannot read RTMR3 at {shown}: {e} (measuring the configuration needs a TDX \
                 guest kernel with the measurement interface, Linux 6.16+)"
            ))
        })?;
        let log: Vec<crate::MeasuredEvent> = match std::fs::read(&self.log) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        if now.as_slice() != crate::replay(&log) {
            return Err(AttestError::NoTee(format!(
                "RTMR3 ({shown}) was extended since the TD booted by something whose events \
                 this node does not know (its log {} does not replay to it), so peers could \
                 not replay it: start cocoon in a freshly booted TD",
                self.log.display()
            )));
        }
        let Some(next) = next_log(&log, event)? else {
            return Ok(log);
        };
        // The log first: a crash between the two leaves a log ahead of RTMR3, which the next
        // start refuses clearly, never an RTMR3 no log explains.
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let bytes = serde_json::to_vec(&next).expect("events serialize");
        std::fs::write(&self.log, bytes).map_err(|e| {
            AttestError::NoTee(format!(
                "cannot keep the RTMR3 event log {}: {e}",
                self.log.display()
            ))
        })?;
        std::fs::write(&self.rtmr3, event.digest())
            .map_err(|e| AttestError::NoTee(format!("cannot extend RTMR3 at {shown}: {e}")))?;
        Ok(next)
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system RNG works");
    u64::from_le_bytes(b)
}

/// DEVELOPMENT ONLY. Signs a structure with the same fields as a TD quote (MRTD, MRCONFIGID,
/// MROWNER, MROWNERCONFIG, RTMR0-3,
/// report data, TD attributes) with a local Ed25519 key. It proves nothing about the machine;
/// policies refuse it unless they name its key explicitly.
pub struct DevAttester {
    key: Ed25519KeyPair,
    /// RTMR3 moves as events are measured, as a TD's would.
    measurements: std::sync::Mutex<Measurements>,
    /// The events measured, as a TD's log would keep them.
    log: std::sync::Mutex<Vec<crate::MeasuredEvent>>,
}

impl DevAttester {
    /// `measurements.report_data` is ignored: each quote carries the data it is asked for.
    /// `pkcs8` may be v1 (no public key inside, as many tools write it) or v2.
    pub fn new(pkcs8: &[u8], measurements: Measurements) -> Result<Self, AttestError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| AttestError::NoTee(format!("dev attester key: {e}")))?;
        Ok(Self {
            key,
            measurements: std::sync::Mutex::new(measurements),
            log: std::sync::Mutex::default(),
        })
    }

    /// A fresh key; returns its PKCS#8 too so it can be saved.
    pub fn generate(measurements: Measurements) -> Result<(Self, Vec<u8>), AttestError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| AttestError::NoTee("cannot generate dev key".into()))?;
        Ok((
            Self::new(pkcs8.as_ref(), measurements)?,
            pkcs8.as_ref().to_vec(),
        ))
    }

    /// The Ed25519 public key that signs this attester's quotes; dev policies name it to accept
    /// them.
    pub fn public_key(&self) -> [u8; 32] {
        self.key
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes")
    }
}

/// The measurements a development attester claims unless told otherwise: a fixed, recognisable
/// "image" (MRTD = SHA-384 of a label, RTMRs zero), so dev policies can name it by hash.
pub fn dev_image() -> Measurements {
    let mut mrtd = [0u8; 48];
    mrtd.copy_from_slice(
        ring::digest::digest(&ring::digest::SHA384, b"cocoon development image v1").as_ref(),
    );
    Measurements {
        mrtd,
        ..Measurements::default()
    }
}

/// Layout: magic(24) mrtd, mrconfigid, mrowner, mrownerconfig, rtmr0..3 (8*48)
/// report_data(64) td_attributes(8) signature(64).
const DEV_BODY: usize = 24 + 8 * 48 + 64 + 8;
pub(crate) const DEV_QUOTE_LEN: usize = DEV_BODY + 64;

impl Attester for DevAttester {
    fn kind(&self) -> AttesterKind {
        AttesterKind::Dev
    }

    fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        let m = self
            .measurements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Vec::with_capacity(DEV_QUOTE_LEN);
        out.extend_from_slice(DEV_QUOTE_MAGIC);
        for r in [&m.mrtd, &m.mr_config_id, &m.mr_owner, &m.mr_owner_config] {
            out.extend_from_slice(r);
        }
        for r in &m.rtmr {
            out.extend_from_slice(r);
        }
        out.extend_from_slice(report_data);
        out.extend_from_slice(&m.td_attributes);
        let sig = self.key.sign(&out);
        out.extend_from_slice(sig.as_ref());
        Ok(out)
    }

    fn measure(
        &self,
        event: &crate::MeasuredEvent,
    ) -> Result<Vec<crate::MeasuredEvent>, AttestError> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(next) = next_log(&log, event)? {
            let mut m = self.measurements.lock().unwrap_or_else(|e| e.into_inner());
            m.rtmr[3] = crate::extend(&m.rtmr[3], &event.digest());
            *log = next;
        }
        Ok(log.clone())
    }
}

/// Verifies a development quote against the dev keys a policy opted into.
pub fn verify_dev_quote(
    raw: &[u8],
    trusted_keys: &[[u8; 32]],
) -> Result<Measurements, AttestError> {
    if raw.len() != DEV_QUOTE_LEN || !raw.starts_with(DEV_QUOTE_MAGIC) {
        return Err(AttestError::Verification("not a development quote".into()));
    }
    let (body, sig) = raw.split_at(DEV_BODY);
    let trusted = trusted_keys.iter().any(|k| {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
            .verify(body, sig)
            .is_ok()
    });
    if !trusted {
        return Err(AttestError::Verification(
            "development quote not signed by a trusted dev key".into(),
        ));
    }
    read_dev_quote(raw)
}

/// The fields of a development quote, signature NOT checked.
pub(crate) fn read_dev_quote(raw: &[u8]) -> Result<Measurements, AttestError> {
    if raw.len() != DEV_QUOTE_LEN || !raw.starts_with(DEV_QUOTE_MAGIC) {
        return Err(AttestError::Verification("not a development quote".into()));
    }
    let mut registers = raw[24..24 + 8 * 48].chunks_exact(48);
    let mut next = || -> [u8; 48] {
        registers
            .next()
            .expect("eight registers")
            .try_into()
            .expect("48 bytes")
    };
    let mut m = Measurements {
        mrtd: next(),
        mr_config_id: next(),
        mr_owner: next(),
        mr_owner_config: next(),
        rtmr: [next(), next(), next(), next()],
        ..Measurements::default()
    };
    let at = 24 + 8 * 48;
    m.report_data.copy_from_slice(&raw[at..at + 64]);
    m.td_attributes.copy_from_slice(&raw[at + 64..at + 72]);
    Ok(m)
}
