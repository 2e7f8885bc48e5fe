//! RA-TLS: certificates that carry a TEE quote bound to their key, and the verifier that checks
//! them. Layout as in COCOON: extension 1.3.6.1.4.1.12345.1 holds the raw quote, .2 the claims;
//! the quote's report data is SHA-512 of the claims, which name the certificate's key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use cocoon_attest::{
    AttesterKind, Collateral, CollateralStore, DEV_QUOTE_MAGIC, Measurements, Policy,
    check_binding, verify_dev_quote,
};
use parking_lot::Mutex;

use crate::verify::{Attested, PeerCertificate, PeerVerifier, Verified, VerifyError};

pub(crate) const OID_QUOTE: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 1];
pub(crate) const OID_CLAIMS: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 2];
pub(crate) const OID_QUOTE_STR: &str = "1.3.6.1.4.1.12345.1";
pub(crate) const OID_CLAIMS_STR: &str = "1.3.6.1.4.1.12345.2";

/// How long a verified quote is trusted without verifying it again, unless configured.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(600);
/// Entries kept at most; beyond this, expired entries are dropped, then everything.
const CACHE_CAPACITY: usize = 4096;

/// Admits a peer only if its certificate carries a valid quote, bound to its key, of an image
/// the policy allows.
#[derive(Debug)]
pub struct RaTlsVerifier {
    policy: Policy,
    /// Intel collateral by platform: from files, or kept fresh by a fetcher the node runs
    /// (the verifier itself never reaches the network).
    collateral: Arc<CollateralStore>,
    /// Development attester keys this verifier opts into. Empty: dev quotes are refused.
    dev_keys: Vec<[u8; 32]>,
    /// Verification time for tests against recorded collateral; `None` is the clock.
    fixed_now: Option<u64>,
    /// The role the peer's claims must name; `None`: any.
    role: Option<String>,
    cache: QuoteCache,
}

/// Counters of a verifier's quote cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Quotes accepted from the cache, without verifying them again.
    pub hits: u64,
    /// Quotes verified in full (signature chain, collateral, TCB, policy).
    pub verifications: u64,
}

/// Verified quotes by SHA-256 of the raw quote. A quote fixes its report data and so the claims
/// (key and role) it vouches for; the binding to the presented key is still checked on every
/// handshake, since it is cheap and is what stops a replayed certificate. A verdict holds for
/// the TTL, but never past the expiry of the collateral it was reached with, nor once the store
/// has taken other collateral (a TCB recovery or a revocation must reach cached verdicts).
#[derive(Debug)]
struct QuoteCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Cached>>,
    hits: AtomicU64,
    verifications: AtomicU64,
}

#[derive(Debug)]
struct Cached {
    attested: Attested,
    measurements: Measurements,
    expires: Instant,
    /// When the collateral used expires, Unix seconds (TDX quotes).
    collateral_expires: Option<i64>,
    /// The store's generation when verified.
    generation: u64,
}

impl QuoteCache {
    fn get(&self, key: &[u8; 32], now: u64, generation: u64) -> Option<(Attested, Measurements)> {
        if self.ttl.is_zero() {
            return None;
        }
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let mut entries = self.entries.lock();
        match entries.get(key) {
            Some(c)
                if c.expires > Instant::now()
                    && c.generation == generation
                    && c.collateral_expires.is_none_or(|e| now <= e) =>
            {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some((c.attested.clone(), c.measurements.clone()))
            }
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: [u8; 32], fresh: &Verdict, generation: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= CACHE_CAPACITY {
            entries.retain(|_, c| c.expires > now);
            if entries.len() >= CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(
            key,
            Cached {
                attested: fresh.attested.clone(),
                measurements: fresh.measurements.clone(),
                expires: now + self.ttl,
                collateral_expires: fresh.collateral_expires,
                generation,
            },
        );
    }
}

/// A quote's verdict: what it attests, and until when the collateral behind it holds.
struct Verdict {
    attested: Attested,
    measurements: Measurements,
    collateral_expires: Option<i64>,
}

impl RaTlsVerifier {
    /// A verifier that applies `policy` to TDX quotes checked against `collateral`; it accepts no
    /// development quotes and caches verified quotes for [`DEFAULT_CACHE_TTL`].
    ///
    /// # Panics
    /// If a piece of `collateral` cannot be read (its dates, its platform): use
    /// [`with_store`](Self::with_store) for collateral that is not known to be good.
    pub fn new(policy: Policy, collateral: Vec<Collateral>) -> Self {
        Self::with_store(
            policy,
            CollateralStore::with(collateral).expect("readable collateral"),
        )
    }

    /// A verifier that applies `policy` to TDX quotes checked against the collateral `store`
    /// holds when they arrive (a store a fetcher keeps fresh, shared by a node's verifiers).
    pub fn with_store(policy: Policy, collateral: Arc<CollateralStore>) -> Self {
        Self {
            policy,
            collateral,
            dev_keys: Vec::new(),
            fixed_now: None,
            role: None,
            cache: QuoteCache {
                ttl: DEFAULT_CACHE_TTL,
                entries: Mutex::default(),
                hits: AtomicU64::new(0),
                verifications: AtomicU64::new(0),
            },
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

    /// Admit only peers whose attested claims name `role` (`worker`, `proxy`, `client`): the
    /// role a peer attests is the one its image was told to play, and must be the one it asks
    /// for (by ALPN) where this verifier is used.
    pub fn expect_role(mut self, role: &str) -> Self {
        self.role = Some(role.to_owned());
        self
    }

    /// Verify quotes as if the clock read `now` (seconds since the epoch): for recorded
    /// collateral in tests and in `cocoon attest verify --at`.
    pub fn at_time(mut self, now: u64) -> Self {
        self.fixed_now = Some(now);
        self
    }

    /// How long a verified quote is reused without verifying it again; zero turns the cache
    /// off. Bounded by how stale a verification may be, since collateral and TCB status change.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache.ttl = ttl;
        self
    }

    /// The policy peers' quotes are checked against.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Verifies a bare quote against the policy (no certificate, so no key binding): for
    /// tools that check a quote by itself.
    pub fn verify_quote(&self, quote: &[u8]) -> Result<Verified, VerifyError> {
        self.cached(quote).map(|(attested, _)| Verified {
            attestation: Some(attested),
        })
    }

    fn now(&self) -> u64 {
        self.fixed_now.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
    }

    fn cached(&self, quote: &[u8]) -> Result<(Attested, Measurements), VerifyError> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, quote)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        // Read before verifying: collateral stored meanwhile makes this verdict stale at once.
        let generation = self.collateral.generation();
        if let Some(hit) = self.cache.get(&key, self.now(), generation) {
            return Ok(hit);
        }
        self.cache.verifications.fetch_add(1, Ordering::Relaxed);
        let fresh = self.verify_uncached(quote)?;
        self.cache.put(key, &fresh, generation);
        Ok((fresh.attested, fresh.measurements))
    }

    fn verify_uncached(&self, quote: &[u8]) -> Result<Verdict, VerifyError> {
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
            let attested = Attested {
                kind: AttesterKind::Dev,
                image_hash: m.image_hash(),
                tcb_status: None,
                config_hash: None,
                measured: Vec::new(),
                encryption_key: None,
            };
            return Ok(Verdict {
                attested,
                measurements: m,
                collateral_expires: None,
            });
        }
        let v = self
            .collateral
            .verify(quote, self.now())
            .map_err(|e| VerifyError::Policy(e.to_string()))?;
        self.policy
            .check(&v)
            .map_err(|e| VerifyError::Policy(e.to_string()))?;
        let attested = Attested {
            kind: AttesterKind::Tdx,
            image_hash: v.measurements.image_hash(),
            tcb_status: Some(v.tcb_status),
            config_hash: None,
            measured: Vec::new(),
            encryption_key: None,
        };
        Ok(Verdict {
            attested,
            measurements: v.measurements,
            collateral_expires: v.collateral_next_update,
        })
    }
}

/// The raw quote and claims an RA-TLS certificate carries, if it carries them.
pub fn attestation_extensions(peer: &PeerCertificate) -> Option<(&[u8], &[u8])> {
    Some((
        peer.extension(OID_QUOTE_STR)?,
        peer.extension(OID_CLAIMS_STR)?,
    ))
}

impl PeerVerifier for RaTlsVerifier {
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        let quote = peer
            .extension(OID_QUOTE_STR)
            .ok_or_else(|| VerifyError::Policy("certificate carries no attestation".into()))?;
        let claims = peer
            .extension(OID_CLAIMS_STR)
            .ok_or_else(|| VerifyError::Policy("certificate carries no claims".into()))?;
        let (attested, measurements) = self.cached(quote)?;
        let claims = check_binding(&measurements, claims, &peer.public_key)
            .map_err(|e| VerifyError::Policy(e.to_string()))?;
        if let Some(role) = &self.role
            && claims.role != *role
        {
            return Err(VerifyError::Policy(format!(
                "the peer is attested as a {:?}, not a {role:?}",
                claims.role
            )));
        }
        let config_hash = self
            .policy
            .check_measured(&measurements, &claims.measured)
            .map_err(|e| VerifyError::Policy(e.to_string()))?;
        let encryption_key = match &claims.encryption_key {
            None => None,
            Some(k) => Some(
                hex::decode(k)
                    .ok()
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    .ok_or_else(|| {
                        VerifyError::Policy("the claims' encryption key is not 32 hex bytes".into())
                    })?,
            ),
        };
        Ok(Verified {
            attestation: Some(Attested {
                config_hash,
                measured: claims.measured,
                encryption_key,
                ..attested
            }),
        })
    }

    fn cache_stats(&self) -> Option<CacheStats> {
        Some(CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            verifications: self.cache.verifications.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// REVIEW, fixed: the quote cache keeps a verdict for `cache_secs` (600 s by default, up to an
    /// hour) whatever the collateral it was reached with: a quote verified a minute before the
    /// PCK CRL's next update is still accepted after it, when a fresh verification refuses
    /// ("expired on ..."); and collateral replaced in the store (a TCB recovery rating the
    /// platform OutOfDate, a PCK CRL revoking it) does not reach verdicts already cached. The
    /// docs own the first, but the fix is cheap: keep with each entry the next update of the
    /// collateral used and expire the entry at the earlier of the two, and drop the cache (or
    /// key it by a store generation) when the store takes new collateral.
    #[test]
    fn review_a_cached_quote_is_accepted_after_its_collateral_expired() {
        let tdx = cocoon_testdata::TDX;
        let store = CollateralStore::with(vec![
            cocoon_attest::parse_collateral(tdx.collateral).unwrap(),
        ])
        .unwrap();
        let platform = cocoon_attest::quote_platform(tdx.quote).unwrap();
        let expires = u64::try_from(store.get(&platform).unwrap().next_update()).unwrap();
        let image = store
            .verify(tdx.quote, tdx.at)
            .unwrap()
            .measurements
            .image_hash();
        let mut policy = Policy::default();
        policy.image_hashes.insert(image);
        // The default cache; verified a minute before the collateral runs out.
        let mut verifier = RaTlsVerifier::with_store(policy, store.clone()).at_time(expires - 60);
        verifier.verify_quote(tdx.quote).unwrap();
        // A minute after it ran out, the store refuses in words...
        let after = expires + 60;
        assert!(matches!(
            store.verify(tdx.quote, after),
            Err(cocoon_attest::AttestError::StaleCollateral(_))
        ));
        // ...and the verifier should too.
        verifier.fixed_now = Some(after);
        let late = verifier.verify_quote(tdx.quote);
        assert!(
            late.is_err(),
            "accepted from the cache after the collateral expired: {late:?}"
        );
    }
}
