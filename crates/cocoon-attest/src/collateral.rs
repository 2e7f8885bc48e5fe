//! Which collateral verifies which quote, until when, and the set of collateral a verifier
//! holds.
//!
//! Intel signs collateral per platform: TCB info per FMSPC (the platform's family, model and
//! stepping), and a PCK CRL per issuing CA (`processor` or `platform`). Each piece names its
//! next update; past it, Intel no longer vouches for it, so a verifier must refuse, and say in
//! words which piece ran out and what to do. Fetching lives elsewhere (the node crates): this
//! module never reaches the network.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::quote::{AttestError, Collateral, VerifiedQuote, verify_quote};

/// One platform as Intel's collateral is issued for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// The FMSPC, 12 upper-case hex digits.
    pub fmspc: String,
    /// The PCK certificate's issuing CA: `processor` or `platform`.
    pub ca: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FMSPC {} (PCK {} CA)", self.fmspc, self.ca)
    }
}

impl Platform {
    /// Parses `FMSPC` or `FMSPC:ca` (`processor` or `platform`; `platform` when left out, as
    /// on the multi-socket servers TDX runs on).
    pub fn parse(s: &str) -> Result<Self, AttestError> {
        let (fmspc, ca) = s.split_once(':').unwrap_or((s, "platform"));
        let fmspc = fmspc.trim().to_ascii_uppercase();
        let ca = ca.trim().to_ascii_lowercase();
        if fmspc.len() != 12 || hex::decode(&fmspc).is_err() {
            return Err(AttestError::BadCollateral(format!(
                "{s:?} is not a platform: expected 12 hex digits (the FMSPC), optionally \
                 followed by :processor or :platform"
            )));
        }
        if ca != "processor" && ca != "platform" {
            return Err(AttestError::BadCollateral(format!(
                "{s:?}: the PCK CA is `processor` or `platform`, not {ca:?}"
            )));
        }
        Ok(Self { fmspc, ca })
    }

    /// The file name collateral for this platform is cached under.
    pub fn file_name(&self) -> String {
        format!("{}-{}.json", self.fmspc, self.ca)
    }
}

/// The platform a TDX quote was produced on, read from the PCK certificate it carries.
pub fn quote_platform(raw: &[u8]) -> Result<Platform, AttestError> {
    let quote = dcap_qvl::quote::Quote::parse(raw)
        .map_err(|e| AttestError::Verification(format!("not a quote: {e:#}")))?;
    let fmspc = dcap_qvl::intel::quote_fmspc(&quote).map_err(|e| {
        AttestError::Verification(format!("the quote's PCK certificate names no FMSPC: {e:#}"))
    })?;
    let ca = dcap_qvl::intel::quote_ca(&quote).map_err(|e| {
        AttestError::Verification(format!("the quote's PCK certificate names no CA: {e:#}"))
    })?;
    Ok(Platform {
        fmspc: hex::encode_upper(fmspc),
        ca: ca.as_id_str().to_owned(),
    })
}

/// The pieces of collateral that expire, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// The TCB info (per FMSPC): which TCB levels are up to date.
    TcbInfo,
    /// The quoting enclave's identity.
    QeIdentity,
    /// The CRL of the CA that issues PCK certificates.
    PckCrl,
    /// The CRL of Intel's root CA.
    RootCaCrl,
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Piece::TcbInfo => "Intel's TCB info",
            Piece::QeIdentity => "Intel's QE identity",
            Piece::PckCrl => "Intel's PCK CRL",
            Piece::RootCaCrl => "Intel's root CA CRL",
        })
    }
}

/// When one piece of collateral was issued and when Intel's next update of it is due (seconds
/// since the Unix epoch). Intel vouches for a piece only until its next update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dates {
    /// Which piece.
    pub piece: Piece,
    /// When it was issued.
    pub issued: i64,
    /// When it expires.
    pub next_update: i64,
    /// Intel's TCB evaluation data number (TCB info, QE identity): the counter that says which
    /// is newer, since Intel signs every evaluation it still supports afresh, with today's date.
    pub evaluation: Option<u64>,
}

/// Collateral read for what matters in keeping it: the platform it is for and its dates.
#[derive(Debug, Clone)]
pub struct Described {
    /// The collateral itself.
    pub collateral: Arc<Collateral>,
    /// The platform it verifies quotes of.
    pub platform: Platform,
    /// Each piece's dates.
    pub dates: Vec<Dates>,
}

impl Described {
    /// Reads `collateral`'s platform and dates; fails if they cannot be read, or if a piece is
    /// not signed by Intel.
    pub fn new(mut collateral: Collateral) -> Result<Self, AttestError> {
        check_signatures(&collateral)?;
        // One machine's PCK chain, which dcap-qvl would use instead of the quote's own: the
        // collateral is the platform's, for every machine of it.
        collateral.pck_certificate_chain = None;
        let (tcb_fmspc, tcb_dates) = signed_json_dates(&collateral.tcb_info, Piece::TcbInfo)?;
        let fmspc = tcb_fmspc
            .ok_or_else(|| AttestError::BadCollateral("the TCB info names no fmspc".into()))?
            .to_ascii_uppercase();
        let (_, qe_dates) = signed_json_dates(&collateral.qe_identity, Piece::QeIdentity)?;
        let (pck_issuer, pck_dates) = crl_dates(&collateral.pck_crl, Piece::PckCrl)?;
        let (_, root_dates) = crl_dates(&collateral.root_ca_crl, Piece::RootCaCrl)?;
        let ca = if pck_issuer.contains("Processor") {
            "processor"
        } else if pck_issuer.contains("Platform") {
            "platform"
        } else {
            return Err(AttestError::BadCollateral(format!(
                "the PCK CRL is issued by {pck_issuer:?}, neither Intel's processor nor its \
                 platform CA"
            )));
        };
        Ok(Self {
            collateral: Arc::new(collateral),
            platform: Platform {
                fmspc,
                ca: ca.into(),
            },
            dates: vec![tcb_dates, qe_dates, pck_dates, root_dates],
        })
    }

    /// The earliest next update of any piece: after it, the collateral no longer verifies.
    pub fn next_update(&self) -> i64 {
        self.dates
            .iter()
            .map(|d| d.next_update)
            .min()
            .unwrap_or(i64::MIN)
    }

    /// How new `piece` is: by Intel's TCB evaluation number first (where it has one), then by
    /// its issue date.
    fn rank(&self, piece: Piece) -> (u64, i64) {
        self.dates
            .iter()
            .find(|d| d.piece == piece)
            .map_or((0, i64::MIN), |d| (d.evaluation.unwrap_or(0), d.issued))
    }

    /// Whether every piece is in force at `now`; the error says which one is not, when, and what
    /// to do about it, in words.
    pub fn check_current(&self, now: u64) -> Result<(), AttestError> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        // The piece that ran out first is the one a person should hear about.
        let mut by_expiry = self.dates.clone();
        by_expiry.sort_by_key(|d| d.next_update);
        for d in &by_expiry {
            if now > d.next_update {
                return Err(AttestError::StaleCollateral(format!(
                    "{} in the collateral for {} expired on {}; refresh it from the PCCS \
                     (`cocoon attest collateral fetch`, or [collateral] pccs_url in the node's \
                     config)",
                    d.piece,
                    self.platform,
                    date(d.next_update)
                )));
            }
            if now < d.issued {
                return Err(AttestError::StaleCollateral(format!(
                    "{} in the collateral for {} is issued on {}, after the time of \
                     verification ({}): is this machine's clock right?",
                    d.piece,
                    self.platform,
                    date(d.issued),
                    date(now)
                )));
            }
        }
        Ok(())
    }

    /// The first piece in which this collateral is older than `held` (a lower TCB evaluation,
    /// or an earlier issue), among the pieces the two share: the QE identity and the root CA's
    /// CRL always, the TCB info for the same FMSPC, the PCK CRL for the same CA. Taking an older
    /// piece, though still in force, could hide a TCB recovery or a revocation Intel has
    /// published since.
    pub fn older_than(&self, held: &Described) -> Option<Piece> {
        [
            Piece::TcbInfo,
            Piece::QeIdentity,
            Piece::PckCrl,
            Piece::RootCaCrl,
        ]
        .into_iter()
        .filter(|p| match p {
            Piece::TcbInfo => self.platform.fmspc == held.platform.fmspc,
            Piece::PckCrl => self.platform.ca == held.platform.ca,
            Piece::QeIdentity | Piece::RootCaCrl => true,
        })
        .find(|&p| self.rank(p) < held.rank(p))
    }
}

/// Intel's SGX root CA (DER; SHA-256 fingerprint `44a0196b2b99f889b8e149e95b807a35
/// 0e7424964399e885a7cbb8ccfab674d3`), the root every piece of collateral chains to. The same
/// certificate dcap-qvl pins for quotes, as Intel publishes it.
const INTEL_ROOT_CA: &[u8] = include_bytes!("intel_sgx_root_ca.der");

/// Checks that every piece of `c` is signed by Intel: the TCB info and QE identity by Intel's
/// TCB signing key, the root CA's CRL by the root, the PCK CRL by the PCK CA; each signer
/// certified by the root. Quote verification checks all of this again; checking it here keeps a
/// forged piece (with dates far ahead, say) out of the store, where it would block genuine
/// collateral as "older".
fn check_signatures(c: &Collateral) -> Result<(), AttestError> {
    use x509_parser::prelude::FromDer;
    let (_, root) = x509_parser::certificate::X509Certificate::from_der(INTEL_ROOT_CA)
        .map_err(|e| AttestError::BadCollateral(format!("Intel's root certificate: {e}")))?;
    let bad = |what: &str| AttestError::BadCollateral(format!("{what} is not signed by Intel"));
    // The first certificate of an issuer chain, checked to be signed by Intel's root.
    let signer = |chain: &str, what: &str| -> Result<Vec<u8>, AttestError> {
        let pem = x509_parser::pem::Pem::iter_from_buffer(chain.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| bad(what))?;
        let cert = pem.parse_x509().map_err(|_| bad(what))?;
        cert.verify_signature(Some(root.public_key()))
            .map_err(|_| bad(what))?;
        Ok(pem.contents)
    };
    let signed_json = |chain: &str, body: &str, signature: &[u8], what: &str| {
        let der = signer(chain, what)?;
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(&der).map_err(|_| bad(what))?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &cert.public_key().subject_public_key.data,
        )
        .verify(body.as_bytes(), signature)
        .map_err(|_| bad(what))
    };
    signed_json(
        &c.tcb_info_issuer_chain,
        &c.tcb_info,
        &c.tcb_info_signature,
        "Intel's TCB info",
    )?;
    signed_json(
        &c.qe_identity_issuer_chain,
        &c.qe_identity,
        &c.qe_identity_signature,
        "Intel's QE identity",
    )?;
    use x509_parser::revocation_list::CertificateRevocationList as Crl;
    let (_, root_crl) = Crl::from_der(&c.root_ca_crl).map_err(|_| bad("Intel's root CA CRL"))?;
    root_crl
        .verify_signature(root.public_key())
        .map_err(|_| bad("Intel's root CA CRL"))?;
    let pck_ca = signer(&c.pck_crl_issuer_chain, "Intel's PCK CRL")?;
    let (_, pck_ca) = x509_parser::certificate::X509Certificate::from_der(&pck_ca)
        .map_err(|_| bad("Intel's PCK CRL"))?;
    let (_, pck_crl) = Crl::from_der(&c.pck_crl).map_err(|_| bad("Intel's PCK CRL"))?;
    pck_crl
        .verify_signature(pck_ca.public_key())
        .map_err(|_| bad("Intel's PCK CRL"))
}

/// Intel's SGX root CA certificate (DER), which all collateral and every PCK chain lead to.
pub fn intel_root_ca() -> &'static [u8] {
    INTEL_ROOT_CA
}

/// Checks that the quote's PCK certificate is signed by a CA that Intel's root signed: the
/// platform the quote names is then one Intel certified.
fn check_pck_chain(raw: &[u8]) -> Result<(), AttestError> {
    use x509_parser::prelude::FromDer;
    let bad =
        || AttestError::Verification("the quote's PCK certificate chain is not Intel's".into());
    let quote = dcap_qvl::quote::Quote::parse(raw).map_err(|_| bad())?;
    let chain = dcap_qvl::intel::extract_cert_chain(&quote).map_err(|_| bad())?;
    let (_, root) =
        x509_parser::certificate::X509Certificate::from_der(INTEL_ROOT_CA).map_err(|_| bad())?;
    let [leaf, ca, ..] = chain.as_slice() else {
        return Err(bad());
    };
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(ca).map_err(|_| bad())?;
    ca.verify_signature(Some(root.public_key()))
        .map_err(|_| bad())?;
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(leaf).map_err(|_| bad())?;
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|_| bad())
}

/// A date as people read it: `2026-04-03 11:21:57 UTC`.
pub fn date(unix: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}

fn rfc3339(s: &str, what: &str) -> Result<i64, AttestError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| AttestError::BadCollateral(format!("{what} {s:?}: {e}")))
}

/// The `fmspc` (TCB info only) and dates of a signed JSON body (TCB info, QE identity), which
/// must be the TDX one: Intel signs SGX's with the same key, and those verify no TD quote.
fn signed_json_dates(json: &str, piece: Piece) -> Result<(Option<String>, Dates), AttestError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        id: Option<String>,
        version: Option<u64>,
        issue_date: String,
        next_update: String,
        fmspc: Option<String>,
        tcb_evaluation_data_number: Option<u64>,
    }
    let body: Body = serde_json::from_str(json)
        .map_err(|e| AttestError::BadCollateral(format!("{piece}: {e}")))?;
    // What dcap-qvl accepts for TDX: TCB info v3 with id TDX, QE identity v2 with id TD_QE.
    let (id, version) = match piece {
        Piece::TcbInfo => ("TDX", 3),
        _ => ("TD_QE", 2),
    };
    if body.id.as_deref() != Some(id) || body.version != Some(version) {
        return Err(AttestError::BadCollateral(format!(
            "{piece} is {:?} version {:?}, not the TDX one ({id:?} version {version})",
            body.id.unwrap_or_default(),
            body.version
        )));
    }
    Ok((
        body.fmspc,
        Dates {
            piece,
            issued: rfc3339(&body.issue_date, "issueDate")?,
            next_update: rfc3339(&body.next_update, "nextUpdate")?,
            evaluation: body.tcb_evaluation_data_number,
        },
    ))
}

/// The issuer's common name and dates of a DER CRL.
fn crl_dates(der: &[u8], piece: Piece) -> Result<(String, Dates), AttestError> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| AttestError::BadCollateral(format!("{piece} is not a DER CRL: {e}")))?;
    let issuer = crl
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let next_update = crl
        .next_update()
        .ok_or_else(|| AttestError::BadCollateral(format!("{piece} has no nextUpdate")))?;
    Ok((
        issuer,
        Dates {
            piece,
            issued: crl.last_update().timestamp(),
            next_update: next_update.timestamp(),
            evaluation: None,
        },
    ))
}

type MissingHook = Box<dyn Fn(&Platform, &[u8]) + Send + Sync>;

/// The collateral a node verifies quotes with, one entry per platform, shared by its verifiers
/// and replaced in place when fresher collateral arrives (from a fetch, without a restart).
pub struct CollateralStore {
    entries: RwLock<HashMap<Platform, Described>>,
    /// Where missing collateral comes from, for messages; `None`: nowhere (files only).
    source: RwLock<Option<String>>,
    /// Told of a quote from a platform the store has nothing for, so it can be fetched.
    on_missing: Mutex<Option<MissingHook>>,
    /// Incremented whenever collateral is stored.
    generation: AtomicU64,
}

impl fmt::Debug for CollateralStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CollateralStore")
            .field("platforms", &self.platforms())
            .field(
                "source",
                &*self.source.read().unwrap_or_else(|e| e.into_inner()),
            )
            .finish()
    }
}

/// What became of collateral offered to a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// Stored: the first for its platform, or newer than what was held.
    Stored(Platform),
    /// The same as (or no newer than) what is held: nothing changed.
    Unchanged(Platform),
}

impl CollateralStore {
    /// An empty store: every TDX quote is refused until collateral is added.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            entries: RwLock::default(),
            source: RwLock::default(),
            on_missing: Mutex::default(),
            generation: AtomicU64::new(0),
        })
    }

    /// A store holding the newest of `collateral` for each platform; fails if a piece cannot
    /// be read or is not Intel's.
    pub fn with(collateral: Vec<Collateral>) -> Result<Arc<Self>, AttestError> {
        let store = Self::new();
        for c in collateral {
            match store.offer(c) {
                Ok(_) | Err(AttestError::OlderCollateral(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(store)
    }

    /// Counts the times collateral was stored: a verdict reached before it changed may not
    /// hold after.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Adds `collateral` unless what is held for its platform is newer; refuses collateral whose
    /// dates cannot be read, and collateral older than what is held in any piece (a rollback).
    pub fn offer(&self, collateral: Collateral) -> Result<Offered, AttestError> {
        let described = Described::new(collateral)?;
        let platform = described.platform.clone();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries
            .get(&platform)
            .is_some_and(|held| *held.collateral == *described.collateral)
        {
            return Ok(Offered::Unchanged(platform));
        }
        // Pieces are shared between platforms (the TCB info by FMSPC, the PCK CRL by CA, the
        // rest by all): none may go back, whichever platform's collateral brings it.
        for held in entries.values() {
            if let Some(piece) = described.older_than(held) {
                return Err(AttestError::OlderCollateral(format!(
                    "{piece} offered for {platform} is older than the one held for {}: refused, \
                     since going back could hide a TCB update or a revocation Intel has \
                     published",
                    held.platform
                )));
            }
        }
        entries.insert(platform.clone(), described);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(Offered::Stored(platform))
    }

    /// The collateral held for `platform`.
    pub fn get(&self, platform: &Platform) -> Option<Described> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(platform)
            .cloned()
    }

    /// The platforms collateral is held for, sorted.
    pub fn platforms(&self) -> Vec<Platform> {
        let mut p: Vec<Platform> = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        p.sort();
        p
    }

    /// Names where missing collateral is fetched from, and what to tell when a quote's platform
    /// has none: `hook` gets the platform and the quote (whose PCK chain a fetch may need).
    pub fn fetch_missing_with(
        &self,
        source: impl Into<String>,
        hook: impl Fn(&Platform, &[u8]) + Send + Sync + 'static,
    ) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = Some(source.into());
        *self.on_missing.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
    }

    /// Whether collateral can arrive other than at start (a fetcher is attached).
    pub fn fetches(&self) -> bool {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Verifies a raw TDX quote with the collateral for its platform at `now`: refused with a
    /// plain reason when there is none, or when a piece of it has expired.
    pub fn verify(&self, raw: &[u8], now: u64) -> Result<VerifiedQuote, AttestError> {
        let platform = quote_platform(raw)?;
        let Some(held) = self.get(&platform) else {
            // Only a platform Intel certified is worth fetching for: anyone can write any
            // FMSPC into a certificate that nothing has checked yet.
            check_pck_chain(raw)?;
            let source = self
                .source
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(hook) = &*self.on_missing.lock().unwrap_or_else(|e| e.into_inner()) {
                hook(&platform, raw);
            }
            return Err(AttestError::NoCollateral(match source {
                Some(source) => format!(
                    "no Intel collateral for {platform} yet: it is being fetched from {source}; \
                     retry shortly"
                ),
                None => format!(
                    "no Intel collateral for {platform}: add it to collateral_files \
                     (`cocoon attest collateral fetch`), or set [collateral] pccs_url"
                ),
            }));
        };
        held.check_current(now)?;
        let mut verified = verify_quote(raw, &held.collateral, now)?;
        verified.collateral_next_update = Some(held.next_update());
        Ok(verified)
    }
}
