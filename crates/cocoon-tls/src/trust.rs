//! The trust settings every role's config file shares: how this node attests itself
//! (`[attester]`) and which peers it admits (`[*_policy]`), turned into an [`Identity`] and a
//! [`PeerVerifier`]. Misconfigurations that would admit nobody, or silently admit everybody,
//! are errors here rather than surprises at the first handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cocoon_attest::{
    Attester, CollateralStore, DevAttester, ImageHash, MeasuredEvent, Policy, TdxAttester,
    dev_image,
};
use serde::{Deserialize, Serialize};

use crate::identity::{Fingerprint, Identity, IdentityError, load_or_create_key};
use crate::ratls::{DEFAULT_CACHE_TTL, RaTlsVerifier};
use crate::verify::{AllOf, AnyPeer, PeerVerifier, PinnedPeers};

/// Why the `[attester]` or a `[*_policy]` section cannot be turned into an identity or a verifier.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A section of the config is inconsistent or invalid.
    #[error("[{section}] {message}")]
    Config {
        /// The config section at fault: `attester` or the `*_policy` section.
        section: String,
        /// What is wrong with it.
        message: String,
    },
    /// The node's key or certificate could not be loaded or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The configured attester cannot produce evidence here (e.g. not inside a TDX guest).
    #[error("cannot attest: {0}")]
    Attest(#[from] cocoon_attest::AttestError),
}

fn config_error(section: &str, message: impl Into<String>) -> TrustError {
    TrustError::Config {
        section: section.to_owned(),
        message: message.into(),
    }
}

/// Which evidence this node puts in its certificates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttesterChoice {
    /// Plain certificates: the node proves its key, nothing about its machine.
    #[default]
    None,
    /// Real Intel TDX quotes through configfs-tsm; only inside a TDX guest.
    Tdx,
    /// DEVELOPMENT: quotes signed by a local key. Proves nothing; peers must opt in by key.
    Dev,
}

impl std::str::FromStr for AttesterChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "tdx" => Ok(Self::Tdx),
            "dev" => Ok(Self::Dev),
            other => Err(format!(
                "unknown attester {other:?}: expected none, tdx or dev"
            )),
        }
    }
}

/// `[attester]` in every role's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttesterConfig {
    /// Which evidence this node's certificates carry: `none` (default), `tdx` or `dev`.
    pub kind: AttesterChoice,
    /// `dev` only: the development attester's signing key (PEM), created if missing. Peers
    /// accept its quotes by listing its public key (`cocoon attest dev-key`) in their policy.
    pub dev_key_file: Option<PathBuf>,
    /// `dev` only: the MRTD to claim, 96 hex digits. Default: the fixed development image.
    pub dev_mrtd: Option<String>,
}

impl AttesterConfig {
    /// The attester configured, or `None` for plain certificates.
    pub fn build(&self) -> Result<Option<Arc<dyn Attester>>, TrustError> {
        let section = "attester";
        match self.kind {
            AttesterChoice::None => {
                if self.dev_key_file.is_some() || self.dev_mrtd.is_some() {
                    return Err(config_error(section, "dev_* settings need kind = \"dev\""));
                }
                Ok(None)
            }
            AttesterChoice::Tdx => Ok(Some(Arc::new(TdxAttester::new()?))),
            AttesterChoice::Dev => {
                let path = self
                    .dev_key_file
                    .as_deref()
                    .ok_or_else(|| config_error(section, "kind = \"dev\" needs dev_key_file"))?;
                let mut image = dev_image();
                if let Some(mrtd) = &self.dev_mrtd {
                    let bytes = hex::decode(mrtd.trim())
                        .ok()
                        .filter(|b| b.len() == 48)
                        .ok_or_else(|| config_error(section, "dev_mrtd must be 96 hex digits"))?;
                    image.mrtd.copy_from_slice(&bytes);
                }
                Ok(Some(Arc::new(dev_attester(path, image)?)))
            }
        }
    }

    /// This node's identity: the key in `key_file` (fresh when unset) with certificates that
    /// carry the configured attestation for `role`, after `measured` (the node's configuration,
    /// if given) is measured into RTMR3.
    pub fn identity(
        &self,
        key_file: Option<&Path>,
        name: &str,
        role: &str,
        measured: Option<MeasuredEvent>,
    ) -> Result<Identity, TrustError> {
        let identity = Identity::from_key_file(key_file, name)?;
        Ok(match self.build()? {
            Some(attester) => {
                if let Some(config) = &measured {
                    tracing::info!(config_hash = %config.config_hash(), "measuring this node's configuration into RTMR3");
                }
                identity.with_measured_attester(role, attester, measured.into_iter().collect())?
            }
            None => identity,
        })
    }
}

/// The development attester whose key is stored at `path` (created if missing).
pub fn dev_attester(
    path: &Path,
    image: cocoon_attest::Measurements,
) -> Result<DevAttester, TrustError> {
    let key = load_or_create_key(path)?;
    Ok(DevAttester::new(&key.serialize_der(), image)?)
}

/// Which peers of one kind a node admits: `[proxy_policy]`, `[worker_policy]`,
/// `[client_policy]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerPolicy {
    /// Only these keys (SHA-256 fingerprints of the peers' keys, hex). Empty: any key.
    pub fingerprints: Vec<String>,
    /// Require an RA-TLS certificate: a quote that verifies, bound to the peer's key, of an
    /// image listed below.
    pub require_attestation: bool,
    /// Allowed images: COCOON's image hash, hex (`cocoon attest show`; see
    /// [`cocoon_attest::ImageHash`]).
    pub image_hashes: Vec<String>,
    /// Images allowed by their registers instead: `[[*_policy.registers]]` tables, each with
    /// the boot chain `mrtd`, `rtmr0`, `rtmr1`, `rtmr2` and optionally `rtmr3` (96 hex digits
    /// each). For operators who build their own images; RTMR3 is then usually left to
    /// `config_hashes`.
    pub registers: Vec<Registers>,
    /// Allowed measured configurations (hex SHA-256, as `cocoon attest show` prints it);
    /// empty: any configuration (RTMR3 is still replayed from the events the peer names).
    pub config_hashes: Vec<String>,
    /// Intel TCB statuses accepted.
    pub tcb_statuses: Vec<String>,
    /// Admit debug TDs, whose memory the host can read. Never in production.
    pub allow_debug: bool,
    /// Intel collateral (JSON, as a PCCS serves it), one file per platform (FMSPC). Read at
    /// start; the verifier never fetches anything.
    pub collateral_files: Vec<PathBuf>,
    /// Public keys (hex) of development attesters whose quotes are accepted. Development only.
    pub dev_attester_keys: Vec<String>,
    /// Seconds a verified quote is reused without verifying it again (0: verify every time;
    /// at most [`MAX_CACHE_SECS`]).
    pub cache_secs: u64,
    /// Admit any proxy or worker, with neither pinned keys nor attestation. A proxy or worker
    /// policy without either is refused at start unless this is set (development only; logged
    /// loudly). Clients are admitted by key anyway: `[client_policy]` does not need it.
    pub insecure_accept_any_peer: bool,
    /// The oldest a peer's attested certificate may be, in hours (its quote is taken when it is
    /// issued); 0: any age within its validity. At least [`MIN_CERT_AGE_HOURS`]: nodes renew
    /// their 24 h certificates 6 h before they expire.
    pub max_cert_age_hours: u64,
    /// Accept development attester keys in a policy that also verifies real TDX quotes
    /// (collateral files). Refused otherwise: a dev key beside Intel's collateral lets anyone
    /// holding it pass as attested in production.
    pub allow_dev_keys_with_tdx: bool,
    /// Set by the node, not read from the policy table: the node checks peers' images against
    /// the ledger's registry itself (`[payments] worker_images_from_registry` on a proxy,
    /// `proxy_images_from_registry` on a gateway or worker), so `image_hashes` and `registers`
    /// may be left empty: the registry's images are then the allowed ones.
    #[serde(skip)]
    pub images_from_registry: bool,
}

/// One `[[*_policy.registers]]` rule: registers an allowed image holds (hex, 96 digits each).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registers {
    /// MRTD, required: a rule that fixes nothing would admit any image.
    pub mrtd: String,
    /// RTMR0, if fixed.
    pub rtmr0: Option<String>,
    /// RTMR1, if fixed.
    pub rtmr1: Option<String>,
    /// RTMR2, if fixed.
    pub rtmr2: Option<String>,
    /// RTMR3, if fixed.
    pub rtmr3: Option<String>,
}

impl Registers {
    fn rule(&self, section: &str) -> Result<cocoon_attest::RegisterRule, TrustError> {
        let register = |name: &str, hex_value: &str| -> Result<[u8; 48], TrustError> {
            hex::decode(hex_value.trim())
                .ok()
                .and_then(|b| <[u8; 48]>::try_from(b).ok())
                .ok_or_else(|| {
                    config_error(
                        section,
                        format!("registers: {name} must be 96 hex digits, not {hex_value:?}"),
                    )
                })
        };
        let optional =
            |name: &str, v: &Option<String>| v.as_deref().map(|h| register(name, h)).transpose();
        // MRTD is only the firmware, which every TD built with it shares; the kernel and its
        // command line are in RTMR1 and RTMR2. A rule must fix the whole boot chain, or any
        // software on that firmware could join (and measure whatever configuration it likes).
        let boot = |name: &str, v: &Option<String>| -> Result<[u8; 48], TrustError> {
            let v = v.as_deref().ok_or_else(|| {
                config_error(
                    section,
                    format!(
                        "registers: a rule must fix mrtd, rtmr0, rtmr1 and rtmr2 (the boot \
                         chain); {name} is missing"
                    ),
                )
            })?;
            register(name, v)
        };
        Ok(cocoon_attest::RegisterRule {
            mrtd: register("mrtd", &self.mrtd)?,
            rtmr: [
                Some(boot("rtmr0", &self.rtmr0)?),
                Some(boot("rtmr1", &self.rtmr1)?),
                Some(boot("rtmr2", &self.rtmr2)?),
                optional("rtmr3", &self.rtmr3)?,
            ],
        })
    }

    /// A rule for the registers of `m`: MRTD and RTMR0..2 (the boot chain), RTMR3 left open.
    pub fn boot_of(m: &cocoon_attest::Measurements) -> Self {
        Self {
            mrtd: hex::encode(m.mrtd),
            rtmr0: Some(hex::encode(m.rtmr[0])),
            rtmr1: Some(hex::encode(m.rtmr[1])),
            rtmr2: Some(hex::encode(m.rtmr[2])),
            rtmr3: None,
        }
    }
}

/// The least `max_cert_age_hours` may be (other than 0): a node's certificate is renewed
/// 18 h after it is issued (5 minutes' clock skew included in its start).
pub const MIN_CERT_AGE_HOURS: u64 = 19;

/// The most `cache_secs` may be: a verified quote is not reused for longer than an hour, so a
/// change of policy or collateral takes effect within it.
pub const MAX_CACHE_SECS: u64 = 3600;

impl Default for PeerPolicy {
    fn default() -> Self {
        Self {
            fingerprints: Vec::new(),
            require_attestation: false,
            image_hashes: Vec::new(),
            registers: Vec::new(),
            config_hashes: Vec::new(),
            tcb_statuses: vec!["UpToDate".into()],
            allow_debug: false,
            collateral_files: Vec::new(),
            dev_attester_keys: Vec::new(),
            cache_secs: DEFAULT_CACHE_TTL.as_secs(),
            insecure_accept_any_peer: false,
            max_cert_age_hours: 0,
            allow_dev_keys_with_tdx: false,
            images_from_registry: false,
        }
    }
}

impl PeerPolicy {
    /// What of this policy decides which peers get prompts, as a node measures it into its
    /// configuration: everything but where collateral files lie and how long quotes are
    /// cached.
    pub fn measured(&self) -> serde_json::Value {
        serde_json::json!({
            "fingerprints": self.fingerprints,
            "require_attestation": self.require_attestation,
            "image_hashes": self.image_hashes,
            "registers": self.registers,
            "config_hashes": self.config_hashes,
            "tcb_statuses": self.tcb_statuses,
            "allow_debug": self.allow_debug,
            "dev_attester_keys": self.dev_attester_keys,
            "insecure_accept_any_peer": self.insecure_accept_any_peer,
            "max_cert_age_hours": self.max_cert_age_hours,
            "allow_dev_keys_with_tdx": self.allow_dev_keys_with_tdx,
        })
    }

    /// This policy, its images taken from the ledger's registry when `on` (the node checks the
    /// registry itself: `[payments] *_images_from_registry`).
    pub fn registry_images(&self, on: bool) -> Self {
        Self {
            images_from_registry: on,
            ..self.clone()
        }
    }

    /// The verifier for peers of kind `what` (`worker`, `proxy`, `client`), configured under
    /// `[section]`, with only the policy's `collateral_files` for TDX quotes.
    pub fn build(&self, section: &str, what: &str) -> Result<Arc<dyn PeerVerifier>, TrustError> {
        self.build_with(section, what, &CollateralStore::new())
    }

    /// [`build`](Self::build), verifying TDX quotes with the collateral `store` holds (the node's,
    /// kept fresh by its fetcher); the policy's `collateral_files` are added to it.
    pub fn build_with(
        &self,
        section: &str,
        what: &str,
        store: &Arc<CollateralStore>,
    ) -> Result<Arc<dyn PeerVerifier>, TrustError> {
        if self.images_from_registry && !self.require_attestation {
            return Err(config_error(
                section,
                format!(
                    "the registry's {what} images are required ([payments]), but \
                     require_attestation is false: an unattested {what} has no image to check"
                ),
            ));
        }
        let mut parts: Vec<Arc<dyn PeerVerifier>> = Vec::new();
        if !self.fingerprints.is_empty() {
            let pins = self
                .fingerprints
                .iter()
                .map(|f| {
                    Fingerprint::from_hex(f).ok_or_else(|| {
                        config_error(
                            section,
                            format!("bad fingerprint {f:?}: expected 64 hex digits"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            parts.push(Arc::new(PinnedPeers::new(pins)));
        }
        if self.require_attestation {
            parts.push(Arc::new(self.ratls(section, store)?.expect_role(what)));
            if self.max_cert_age_hours > 0 {
                if self.max_cert_age_hours < MIN_CERT_AGE_HOURS {
                    return Err(config_error(
                        section,
                        format!(
                            "max_cert_age_hours is at least {MIN_CERT_AGE_HOURS}: nodes renew \
                             their certificates 18 h after issuing them"
                        ),
                    ));
                }
                parts.push(Arc::new(crate::verify::FreshCertificates {
                    max_age: Duration::from_secs(self.max_cert_age_hours * 3600),
                }));
            }
        } else if !self.image_hashes.is_empty()
            || !self.registers.is_empty()
            || !self.config_hashes.is_empty()
            || self.max_cert_age_hours > 0
            || !self.collateral_files.is_empty()
            || !self.dev_attester_keys.is_empty()
        {
            return Err(config_error(
                section,
                "attestation settings are given but require_attestation is false",
            ));
        }
        if self.insecure_accept_any_peer && !parts.is_empty() {
            return Err(config_error(
                section,
                "insecure_accept_any_peer is set beside pinned keys or attestation: remove it",
            ));
        }
        match parts.len() {
            0 => {
                // Clients are known by their key and pay from contracts bound to it, so
                // admitting any client is the normal setting; any worker or proxy is not,
                // unless the config says so in as many words.
                if what == "client" {
                    tracing::info!("[{section}] admits any {what} key");
                } else if self.insecure_accept_any_peer {
                    tracing::warn!(
                        "[{section}] insecure_accept_any_peer: ANY {what} is trusted, attested or not (development only)"
                    );
                } else {
                    return Err(config_error(
                        section,
                        format!(
                            "pins no {what} key (fingerprints) and requires no attestation \
                             (require_attestation): any {what} could connect. Configure one, or \
                             set insecure_accept_any_peer = true for development"
                        ),
                    ));
                }
                Ok(Arc::new(AnyPeer))
            }
            1 => Ok(parts.pop().expect("one part")),
            _ => Ok(Arc::new(AllOf(parts))),
        }
    }

    fn ratls(
        &self,
        section: &str,
        store: &Arc<CollateralStore>,
    ) -> Result<RaTlsVerifier, TrustError> {
        // Real TDX quotes are expected: collateral is given, or fetched for the node.
        let tdx = !self.collateral_files.is_empty() || store.fetches();
        let image_hashes = self
            .image_hashes
            .iter()
            .map(|h| {
                ImageHash::from_hex(h).ok_or_else(|| {
                    config_error(
                        section,
                        format!("bad image hash {h:?}: expected 64 hex digits"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let registers = self
            .registers
            .iter()
            .map(|r| r.rule(section))
            .collect::<Result<_, _>>()?;
        let config_hashes = self
            .config_hashes
            .iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                match hex::decode(&h).map(|b| b.len()) {
                    Ok(32) => Ok(h),
                    _ => Err(config_error(
                        section,
                        format!("bad config hash {h:?}: expected 64 hex digits"),
                    )),
                }
            })
            .collect::<Result<_, _>>()?;
        let policy = Policy {
            image_hashes,
            registers,
            config_hashes,
            tcb_statuses: self.tcb_statuses.clone(),
            allow_debug: self.allow_debug,
            images_from_registry: self.images_from_registry,
        };
        if policy.image_hashes.is_empty()
            && policy.registers.is_empty()
            && !self.images_from_registry
        {
            return Err(config_error(
                section,
                "require_attestation is set but neither image_hashes nor registers are given \
                 (nor are images taken from the registry): no peer could connect",
            ));
        }
        if !tdx && self.dev_attester_keys.is_empty() {
            return Err(config_error(
                section,
                "require_attestation is set but there are neither collateral_files nor a \
                 [collateral] pccs_url (for TDX quotes) nor dev_attester_keys: no quote could \
                 verify",
            ));
        }
        if self.tcb_statuses.is_empty() && tdx {
            return Err(config_error(
                section,
                "tcb_statuses is empty: no TDX platform could connect",
            ));
        }
        if self.allow_debug {
            tracing::warn!("[{section}] admits DEBUG TDs: their memory is readable by the host");
        }
        if self.cache_secs > MAX_CACHE_SECS {
            return Err(config_error(
                section,
                format!("cache_secs is at most {MAX_CACHE_SECS}"),
            ));
        }
        if tdx && !self.dev_attester_keys.is_empty() {
            if !self.allow_dev_keys_with_tdx {
                return Err(config_error(
                    section,
                    "dev_attester_keys beside Intel collateral (collateral_files or a [collateral] \
                     pccs_url): anyone holding a development \
                     key would pass as attested where real TDX quotes are required. Remove the \
                     dev keys, or set allow_dev_keys_with_tdx = true for a test network",
                ));
            }
            tracing::warn!("[{section}] accepts DEVELOPMENT attester keys beside real TDX quotes");
        }
        for path in &self.collateral_files {
            let bytes = std::fs::read(path).map_err(|e| {
                config_error(section, format!("collateral {}: {e}", path.display()))
            })?;
            match cocoon_attest::parse_collateral(&bytes).and_then(|c| store.offer(c)) {
                Ok(_) => {}
                // Fresher collateral for the platform is already held (fetched, or another
                // file): keep it.
                Err(cocoon_attest::AttestError::OlderCollateral(e)) => {
                    tracing::info!("[{section}] collateral {}: {e}", path.display());
                }
                Err(e) => {
                    return Err(config_error(
                        section,
                        format!("collateral {}: {e}", path.display()),
                    ));
                }
            }
        }
        let mut verifier = RaTlsVerifier::with_store(policy, store.clone())
            .cache_ttl(Duration::from_secs(self.cache_secs));
        for key in &self.dev_attester_keys {
            let bytes = hex::decode(key.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    config_error(
                        section,
                        format!("bad dev attester key {key:?}: expected 64 hex digits"),
                    )
                })?;
            verifier = verifier.allow_dev_key(bytes);
        }
        Ok(verifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: &PeerPolicy) -> String {
        p.build("worker_policy", "worker").unwrap_err().to_string()
    }

    /// A node that checks peers' images against the registry may list none in its policy; one
    /// that does not may not, since no peer could connect.
    #[test]
    fn images_may_come_from_the_registry_instead_of_the_policy() {
        let registry_only = PeerPolicy {
            require_attestation: true,
            dev_attester_keys: vec!["11".repeat(32)],
            images_from_registry: true,
            ..PeerPolicy::default()
        };
        registry_only.build("worker_policy", "worker").unwrap();
        let e = err(&PeerPolicy {
            images_from_registry: false,
            ..registry_only
        });
        assert!(e.contains("neither image_hashes nor registers"), "{e}");
    }

    #[test]
    fn policies_that_admit_nobody_or_ignore_settings_are_errors() {
        let dev_key = "11".repeat(32);
        let image = dev_image().image_hash().to_string();
        let no_images = PeerPolicy {
            require_attestation: true,
            dev_attester_keys: vec![dev_key.clone()],
            ..PeerPolicy::default()
        };
        assert!(err(&no_images).contains("neither image_hashes nor registers"));
        let nothing_verifies = PeerPolicy {
            require_attestation: true,
            image_hashes: vec![image.clone()],
            ..PeerPolicy::default()
        };
        assert!(err(&nothing_verifies).contains("no quote could verify"));
        let ignored = PeerPolicy {
            image_hashes: vec![image.clone()],
            ..PeerPolicy::default()
        };
        assert!(err(&ignored).contains("require_attestation is false"));
        // A freshness demand on quotes that are not required would be silently ignored.
        let fresh_without_quotes = PeerPolicy {
            max_cert_age_hours: 24,
            ..PeerPolicy::default()
        };
        assert!(err(&fresh_without_quotes).contains("require_attestation is false"));
        let bad_hash = PeerPolicy {
            require_attestation: true,
            image_hashes: vec!["xyz".into()],
            dev_attester_keys: vec![dev_key.clone()],
            ..PeerPolicy::default()
        };
        assert!(err(&bad_hash).contains("bad image hash"));
        let missing_collateral = PeerPolicy {
            require_attestation: true,
            image_hashes: vec![image],
            collateral_files: vec!["/nonexistent/collateral.json".into()],
            ..PeerPolicy::default()
        };
        assert!(err(&missing_collateral).contains("/nonexistent/collateral.json"));
        let bad_pin = PeerPolicy {
            fingerprints: vec!["abc".into()],
            ..PeerPolicy::default()
        };
        assert!(err(&bad_pin).starts_with("[worker_policy] bad fingerprint"));
    }

    /// Fail closed: a proxy or worker policy that pins nothing and requires no attestation
    /// is refused unless it says insecure_accept_any_peer (and then only alone); clients are
    /// admitted by key anyway. Dev keys beside Intel collateral need their own opt-in, and a
    /// verified quote is not cached beyond an hour.
    #[test]
    fn policies_fail_closed() {
        let open = PeerPolicy::default();
        let e = err(&open);
        assert!(e.contains("set insecure_accept_any_peer = true"), "{e}");
        let e = open.build("proxy_policy", "proxy").unwrap_err().to_string();
        assert!(e.starts_with("[proxy_policy] pins no proxy key"), "{e}");
        open.build("client_policy", "client").unwrap();
        let insecure = PeerPolicy {
            insecure_accept_any_peer: true,
            ..PeerPolicy::default()
        };
        insecure.build("worker_policy", "worker").unwrap();
        let both = PeerPolicy {
            fingerprints: vec!["ab".repeat(32)],
            ..insecure.clone()
        };
        assert!(err(&both).contains("insecure_accept_any_peer is set beside"));

        let dir = tempfile::tempdir().unwrap();
        let collateral = dir.path().join("collateral.json");
        std::fs::write(&collateral, cocoon_testdata::TDX.collateral).unwrap();
        let tdx = PeerPolicy {
            require_attestation: true,
            image_hashes: vec![dev_image().image_hash().to_string()],
            collateral_files: vec![collateral],
            ..PeerPolicy::default()
        };
        tdx.build("worker_policy", "worker").unwrap();
        let mixed = PeerPolicy {
            dev_attester_keys: vec!["11".repeat(32)],
            ..tdx.clone()
        };
        assert!(err(&mixed).contains("allow_dev_keys_with_tdx"));
        PeerPolicy {
            allow_dev_keys_with_tdx: true,
            ..mixed
        }
        .build("worker_policy", "worker")
        .unwrap();
        let long_cache = PeerPolicy {
            cache_secs: MAX_CACHE_SECS + 1,
            ..tdx.clone()
        };
        assert!(err(&long_cache).contains("cache_secs is at most 3600"));
        let too_fresh = PeerPolicy {
            max_cert_age_hours: MIN_CERT_AGE_HOURS - 1,
            ..tdx.clone()
        };
        assert!(err(&too_fresh).contains("max_cert_age_hours is at least 19"));
        PeerPolicy {
            max_cert_age_hours: 24,
            ..tdx
        }
        .build("worker_policy", "worker")
        .unwrap();
    }

    #[test]
    fn dev_attester_needs_a_key_file_and_keeps_its_key() {
        let missing = AttesterConfig {
            kind: AttesterChoice::Dev,
            ..AttesterConfig::default()
        };
        assert!(
            missing
                .build()
                .err()
                .unwrap()
                .to_string()
                .contains("needs dev_key_file")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.key");
        let a = dev_attester(&path, dev_image()).unwrap();
        let b = dev_attester(&path, dev_image()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
    }
}
