//! `cocoon attest`: make RA-TLS certificates, show what a certificate or quote measures, and
//! verify a quote or certificate against a policy at a chosen time. Offline, from files: the
//! operator's tool for finding an image hash to allow and for checking why a peer is refused.

use std::path::{Path, PathBuf};

use cocoon_attest::{AttesterKind, Measurements, Policy, check_binding, read_measurements};
use cocoon_tls::{
    AttesterConfig, PeerCertificate, PeerVerifier, RaTlsVerifier, attestation_extensions,
};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

/// A file given to `show` or `verify`: an RA-TLS certificate (PEM or DER) or a raw quote.
pub enum Evidence {
    /// An RA-TLS certificate, carrying the quote in its attestation extension.
    Certificate(PeerCertificate),
    /// A raw quote: an Intel TDX quote or a development quote.
    Quote(Vec<u8>),
}

impl Evidence {
    /// Reads and parses the evidence in the file at `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(&bytes)
    }

    /// Tells a PEM or DER certificate from a raw quote by its first bytes and parses it.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.starts_with(b"-----BEGIN") {
            let pem = pem::parse(bytes).map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?;
            anyhow::ensure!(
                pem.tag() == "CERTIFICATE",
                "PEM holds a {}, not a CERTIFICATE",
                pem.tag()
            );
            let cert = PeerCertificate::parse_any_time(&CertificateDer::from(pem.contents()))?;
            return Ok(Self::Certificate(cert));
        }
        // A DER certificate starts with a SEQUENCE; a quote starts with its version (4 or 5)
        // or the development magic, so the two cannot be confused.
        if bytes.first() == Some(&0x30) {
            let cert = PeerCertificate::parse_any_time(&CertificateDer::from(bytes))?;
            return Ok(Self::Certificate(cert));
        }
        Ok(Self::Quote(bytes.to_vec()))
    }

    /// The quote: the file itself, or the one the certificate carries.
    pub fn quote(&self) -> anyhow::Result<&[u8]> {
        match self {
            Self::Quote(q) => Ok(q),
            Self::Certificate(c) => attestation_extensions(c)
                .map(|(quote, _)| quote)
                .ok_or_else(|| anyhow::anyhow!("the certificate carries no attestation")),
        }
    }
}

fn quote_json(raw: &[u8]) -> anyhow::Result<Value> {
    let (kind, m) = read_measurements(raw)?;
    let mut out = measurements_json(kind, &m);
    // What `[collateral] platforms` and `cocoon attest collateral fetch --platform` take.
    if kind == AttesterKind::Tdx {
        out["platform"] = match cocoon_attest::quote_platform(raw) {
            Ok(p) => json!(format!("{}:{}", p.fmspc, p.ca)),
            Err(e) => json!(format!("unreadable: {e}")),
        };
    }
    Ok(out)
}

fn measurements_json(kind: AttesterKind, m: &Measurements) -> Value {
    json!({
        "kind": kind.as_str(),
        "mrtd": hex::encode(m.mrtd),
        "mrconfigid": hex::encode(m.mr_config_id),
        "mrowner": hex::encode(m.mr_owner),
        "mrownerconfig": hex::encode(m.mr_owner_config),
        "rtmr0": hex::encode(m.rtmr[0]),
        "rtmr1": hex::encode(m.rtmr[1]),
        "rtmr2": hex::encode(m.rtmr[2]),
        "rtmr3": hex::encode(m.rtmr[3]),
        "report_data": hex::encode(m.report_data),
        "td_attributes": hex::encode(m.td_attributes),
        "debug": m.is_debug(),
        "image_hash": m.image_hash().to_string(),
    })
}

/// What a certificate or quote claims, read without verifying the quote (`verify` does that).
pub fn show(evidence: &Evidence) -> anyhow::Result<Value> {
    match evidence {
        Evidence::Quote(raw) => Ok(json!({"quote": quote_json(raw)?, "verified": false})),
        Evidence::Certificate(cert) => {
            let mut out = json!({
                "certificate": {
                    "fingerprint": cert.fingerprint.to_string(),
                    "common_name": cert.common_name,
                    "not_before": cert.not_before,
                    "not_after": cert.not_after,
                },
                "verified": false,
            });
            match attestation_extensions(cert) {
                None => out["attestation"] = Value::Null,
                Some((quote, claims)) => {
                    let (_, m) = read_measurements(quote)?;
                    let binding = check_binding(&m, claims, &cert.public_key);
                    out["claims"] = serde_json::from_slice(claims)
                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(claims)));
                    out["quote"] = quote_json(quote)?;
                    out["bound_to_key"] = json!(binding.is_ok());
                    match binding {
                        // What the node measured into RTMR3, and whether it replays there.
                        Ok(claims) if !claims.measured.is_empty() => {
                            out["config_hash"] =
                                json!(cocoon_attest::config_hash(&claims.measured));
                            out["rtmr3_replays"] =
                                json!(cocoon_attest::replay(&claims.measured) == m.rtmr[3]);
                        }
                        Ok(_) => {}
                        Err(e) => out["binding_error"] = json!(e.to_string()),
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The policy `verify` checks against.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VerifyOptions {
    /// Intel collateral JSON (as a PCCS serves it), or a folder of it (a node's cache_dir, what
    /// `cocoon attest collateral fetch` writes); repeat for several.
    #[arg(long)]
    pub collateral: Vec<PathBuf>,
    /// Verify as if the clock read this (seconds since the Unix epoch). Default: now.
    #[arg(long)]
    pub at: Option<u64>,
    /// Allowed image hash; repeat for several. None: the image is reported, not checked.
    #[arg(long = "image-hash")]
    pub image_hashes: Vec<String>,
    /// Accepted TCB status; repeat for several. Default: UpToDate.
    #[arg(long = "tcb-status")]
    pub tcb_statuses: Vec<String>,
    /// Accept quotes from a TD in debug mode, whose memory the host can read. Development only.
    #[arg(long)]
    pub allow_debug: bool,
    /// Accept development quotes signed by this key (hex). Development only.
    #[arg(long = "dev-key")]
    pub dev_keys: Vec<String>,
}

/// Verifies a quote (signature chain to Intel, collateral, TCB status) or a certificate (the
/// same, plus the quote's binding to the certificate's key) against the policy, at `at`.
pub fn verify(evidence: &Evidence, options: &VerifyOptions) -> anyhow::Result<Value> {
    let (kind, claimed) = read_measurements(evidence.quote()?)?;
    let image_checked = !options.image_hashes.is_empty();
    let mut policy = Policy {
        tcb_statuses: if options.tcb_statuses.is_empty() {
            Policy::default().tcb_statuses
        } else {
            options.tcb_statuses.clone()
        },
        allow_debug: options.allow_debug,
        ..Policy::default()
    };
    for h in &options.image_hashes {
        policy.image_hashes.insert(
            cocoon_attest::ImageHash::from_hex(h)
                .ok_or_else(|| anyhow::anyhow!("bad image hash {h:?}: expected 64 hex digits"))?,
        );
    }
    if !image_checked {
        // Only the quote itself is being checked; its own image passes, and says so below.
        policy.image_hashes.insert(claimed.image_hash());
    }
    let collateral = crate::collateral::files(&options.collateral)?
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            cocoon_attest::parse_collateral(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = cocoon_attest::CollateralStore::with(collateral)?;
    let now = options.at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let mut verifier = RaTlsVerifier::with_store(policy, store).at_time(now);
    for key in &options.dev_keys {
        let key: [u8; 32] = hex::decode(key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("bad dev key {key:?}: expected 64 hex digits"))?;
        verifier = verifier.allow_dev_key(key);
    }
    let verified = match evidence {
        Evidence::Certificate(cert) => verifier.verify(cert)?,
        Evidence::Quote(raw) => verifier.verify_quote(raw)?,
    };
    let attested = verified
        .attestation
        .ok_or_else(|| anyhow::anyhow!("nothing was attested"))?;
    Ok(json!({
        "verified": true,
        "at": now,
        "kind": kind.as_str(),
        "tcb_status": attested.tcb_status,
        "image_hash": attested.image_hash.to_string(),
        "image_checked": image_checked,
        "bound_to_key": matches!(evidence, Evidence::Certificate(_)),
    }))
}

/// The development attester key at `path` (created if missing): its public key, which peers
/// list in `dev_attester_keys`, and the image hash it attests by default.
pub fn dev_key(path: &Path) -> anyhow::Result<Value> {
    let attester = cocoon_tls::dev_attester(path, cocoon_attest::dev_image())?;
    Ok(json!({
        "dev_attester_key": hex::encode(attester.public_key()),
        "dev_image_hash": cocoon_attest::dev_image().image_hash().to_string(),
        "warning": "development attestation proves nothing about a machine",
    }))
}

/// A certificate for the key in `key_file` (created if missing) carrying the configured
/// attestation, as PEM.
pub fn make_certificate(
    attester: &AttesterConfig,
    key_file: &Path,
    role: &str,
) -> anyhow::Result<(String, cocoon_tls::Fingerprint)> {
    let identity = attester.identity(Some(key_file), &format!("cocoon-{role}"), role, None)?;
    let der = identity.certified_key().cert[0].to_vec();
    Ok((
        pem::encode(&pem::Pem::new("CERTIFICATE", der)),
        identity.fingerprint(),
    ))
}
