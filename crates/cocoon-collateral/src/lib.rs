//! Intel collateral for a node's quote verification, kept current.
//!
//! This crate owns getting collateral: the v4 API client for a PCCS or Intel's PCS
//! ([`PccsClient`]), the on-disk cache ([`DiskCache`]), and the [`Fetcher`] that fills a node's
//! [`CollateralStore`] (which its RA-TLS verifiers read), fetches a platform's collateral the
//! first time a quote from it arrives, refreshes it well before Intel's next update, keeps
//! verifying from what it holds while the service is unreachable, and warns, then lets
//! verification refuse, once it expires. The verifiers never wait on the network.

mod cache;
mod pccs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cocoon_attest::{AttestError, Offered};
use serde::{Deserialize, Serialize};

pub use cache::DiskCache;
pub use cocoon_attest::{CollateralStore, Platform};
pub use pccs::{FetchError, INTEL_PCS_URL, PccsClient};

/// `[collateral]` in a node's config: where Intel's collateral comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollateralConfig {
    /// A PCCS (`https://pccs.internal:8081`) or Intel's PCS
    /// (`https://api.trustedservices.intel.com`). Unset: no fetching; the policies'
    /// `collateral_files` and the cache folder are all there is.
    pub pccs_url: Option<String>,
    /// Where fetched collateral is kept (one JSON file per platform, as `collateral_files`
    /// reads), so a restart while the service is down still verifies. Read at start even
    /// without `pccs_url`, for collateral fetched by `cocoon attest collateral fetch`.
    pub cache_dir: Option<PathBuf>,
    /// Hours between refreshes of a platform's collateral (Intel issues it for 30 days).
    pub refresh_hours: u64,
    /// Platforms fetched at start, before any quote from them arrives: `FMSPC` or
    /// `FMSPC:processor` / `FMSPC:platform` (`cocoon attest show` prints a quote's).
    pub platforms: Vec<String>,
    /// A PEM file of CAs trusted for the service's TLS certificate, beside the web's roots (a
    /// PCCS usually has a private one). The collateral itself is Intel-signed either way.
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for each answer from the service.
    pub timeout_secs: u64,
}

impl Default for CollateralConfig {
    fn default() -> Self {
        Self {
            pccs_url: None,
            cache_dir: None,
            refresh_hours: 24,
            platforms: Vec::new(),
            ca_file: None,
            timeout_secs: 30,
        }
    }
}

/// Most `refresh_hours` may be: a week, well inside the 30 days Intel issues collateral for.
pub const MAX_REFRESH_HOURS: u64 = 24 * 7;
/// The shortest pause between two fetches of one platform, so a PCCS is never hammered.
const MIN_RETRY_SECS: u64 = 60;
/// Platforms waiting for a first fetch, at most: each is one Intel certified (the store checks
/// a quote's PCK chain before asking), so this bounds only a flood of distinct real platforms.
const MAX_PENDING_PLATFORMS: usize = 32;
/// Fetch failures are warned about loudly once the collateral held expires within this.
const EXPIRY_WARNING_SECS: i64 = 3 * 24 * 3600;

/// The wall clock in Unix seconds; tests move it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where one platform's collateral stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlatformStatus {
    /// `FMSPC-ca`.
    pub platform: String,
    /// When the collateral held expires (its earliest next update), Unix seconds; `None`:
    /// nothing held.
    pub expires: Option<i64>,
    /// The same, as a date.
    pub expires_on: Option<String>,
    /// When it was last fetched (this process), Unix seconds.
    pub fetched_at: Option<u64>,
    /// When the next fetch is due, Unix seconds.
    pub next_fetch: u64,
    /// Fetches that failed in a row.
    pub failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Track {
    fetched_at: Option<u64>,
    next_fetch: u64,
    failures: u32,
    last_error: Option<String>,
}

/// Keeps a [`CollateralStore`] filled and current from a PCCS or Intel's PCS.
pub struct Fetcher {
    store: Arc<CollateralStore>,
    client: Option<PccsClient>,
    cache: Option<DiskCache>,
    refresh_secs: u64,
    clock: Clock,
    tracks: Mutex<HashMap<Platform, Track>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("service", &self.client.as_ref().map(PccsClient::url))
            .field("cache", &self.cache.as_ref().map(DiskCache::dir))
            .field("refresh_secs", &self.refresh_secs)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher for `store` as `config` says, on the system clock; nothing is fetched or read
    /// until [`load_cache`](Self::load_cache) and [`refresh_due`](Self::refresh_due) (or
    /// [`start`](Self::start)).
    pub fn new(
        config: &CollateralConfig,
        store: Arc<CollateralStore>,
    ) -> Result<Arc<Self>, FetchError> {
        Self::with_clock(config, store, Arc::new(system_clock))
    }

    /// [`new`](Self::new) on `clock`.
    pub fn with_clock(
        config: &CollateralConfig,
        store: Arc<CollateralStore>,
        clock: Clock,
    ) -> Result<Arc<Self>, FetchError> {
        if config.refresh_hours == 0 || config.refresh_hours > MAX_REFRESH_HOURS {
            return Err(FetchError::Config(format!(
                "[collateral] refresh_hours is 1 to {MAX_REFRESH_HOURS}, not {}",
                config.refresh_hours
            )));
        }
        if config.timeout_secs == 0 {
            return Err(FetchError::Config(
                "[collateral] timeout_secs must be above 0".into(),
            ));
        }
        let client = config
            .pccs_url
            .as_deref()
            .map(|url| {
                PccsClient::new(
                    url,
                    config.ca_file.as_deref(),
                    Duration::from_secs(config.timeout_secs),
                )
            })
            .transpose()?;
        if client.is_none() && config.ca_file.is_some() {
            return Err(FetchError::Config(
                "[collateral] ca_file is set without a pccs_url".into(),
            ));
        }
        if client.is_none() && !config.platforms.is_empty() {
            return Err(FetchError::Config(
                "[collateral] platforms are listed without a pccs_url to fetch them from".into(),
            ));
        }
        let cache = config
            .cache_dir
            .as_deref()
            .map(|dir| {
                DiskCache::open(dir).map_err(|e| {
                    FetchError::Config(format!("[collateral] cache_dir {}: {e}", dir.display()))
                })
            })
            .transpose()?;
        let now = clock();
        let mut tracks = HashMap::new();
        for p in &config.platforms {
            let platform = Platform::parse(p)
                .map_err(|e| FetchError::Config(format!("[collateral] platforms: {e}")))?;
            tracks.insert(
                platform,
                Track {
                    next_fetch: now,
                    ..Track::default()
                },
            );
        }
        let fetcher = Arc::new(Self {
            store,
            client,
            cache,
            refresh_secs: config.refresh_hours * 3600,
            clock,
            tracks: Mutex::new(tracks),
            wake: tokio::sync::Notify::new(),
        });
        if let Some(client) = &fetcher.client {
            // The store tells of quotes from platforms it holds nothing for; the fetcher fetches
            // them in the background (a verifier never waits on the network).
            let weak: Weak<Fetcher> = Arc::downgrade(&fetcher);
            fetcher
                .store
                .fetch_missing_with(client.url().to_owned(), move |platform, _quote| {
                    if let Some(f) = weak.upgrade() {
                        f.want(platform);
                    }
                });
        }
        Ok(fetcher)
    }

    fn tracks(&self) -> std::sync::MutexGuard<'_, HashMap<Platform, Track>> {
        self.tracks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `platform`'s collateral now, unless it was tried less than a minute ago.
    pub fn want(&self, platform: &Platform) {
        let now = (self.clock)();
        let mut tracks = self.tracks();
        if !tracks.contains_key(platform) {
            let pending = tracks
                .keys()
                .filter(|p| self.store.get(p).is_none())
                .count();
            if pending >= MAX_PENDING_PLATFORMS {
                tracing::warn!(
                    "collateral for {platform} not fetched: {pending} platforms already wait for \
                     their first fetch"
                );
                return;
            }
        }
        let track = tracks.entry(platform.clone()).or_insert_with(|| Track {
            next_fetch: now,
            ..Track::default()
        });
        if self.store.get(platform).is_none() {
            let soonest = track
                .fetched_at
                .map_or(now, |t| t.saturating_add(MIN_RETRY_SECS));
            track.next_fetch = track.next_fetch.min(soonest.max(now));
        }
        drop(tracks);
        self.wake.notify_one();
    }

    /// Puts the cached collateral into the store and tracks its platforms for refresh. A file
    /// that cannot be used is reported and skipped. Returns the platforms loaded.
    pub fn load_cache(&self) -> Vec<Platform> {
        let Some(cache) = &self.cache else {
            return Vec::new();
        };
        let files = match cache.load() {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!("collateral cache {}: {e}", cache.dir().display());
                return Vec::new();
            }
        };
        let now = (self.clock)();
        let mut loaded = Vec::new();
        for (path, parsed) in files {
            let offered = parsed.and_then(|c| self.store.offer(c).map_err(|e| e.to_string()));
            match offered {
                Ok(Offered::Stored(p) | Offered::Unchanged(p)) => {
                    if let Some(held) = self.store.get(&p)
                        && let Err(e) = held.check_current(now)
                    {
                        tracing::warn!("collateral cache {}: {e}", path.display());
                    }
                    self.tracks().entry(p.clone()).or_insert_with(|| Track {
                        next_fetch: now,
                        ..Track::default()
                    });
                    loaded.push(p);
                }
                Err(e) => tracing::warn!("collateral cache {}: skipped: {e}", path.display()),
            }
        }
        loaded
    }

    /// Fetches `platform`'s collateral once, and keeps it (store and cache) if it is Intel's,
    /// in force now, and no older than what is held.
    pub async fn fetch(&self, platform: &Platform) -> Result<Offered, String> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| "no pccs_url to fetch collateral from".to_owned())?;
        let collateral = client.fetch(platform).await.map_err(|e| e.to_string())?;
        let described =
            cocoon_attest::Described::new(collateral.clone()).map_err(|e| e.to_string())?;
        if described.platform != *platform {
            return Err(format!(
                "{} answered with collateral for {}, not {platform}",
                client.url(),
                described.platform
            ));
        }
        // A service answering with collateral already out of force is as good as down; keep
        // what is held rather than trade it for something that verifies nothing.
        described
            .check_current((self.clock)())
            .map_err(|e| format!("{} serves stale collateral: {e}", client.url()))?;
        let offered = self.store.offer(collateral.clone()).map_err(|e| match e {
            AttestError::OlderCollateral(m) => {
                format!("{} serves older collateral: {m}", client.url())
            }
            e => e.to_string(),
        })?;
        if let (Offered::Stored(_), Some(cache)) = (&offered, &self.cache) {
            cache
                .save(platform, &collateral)
                .map_err(|e| format!("collateral cache {}: {e}", cache.dir().display()))?;
        }
        Ok(offered)
    }

    /// Fetches every platform whose refresh is due at the clock's time, one after another;
    /// returns how many fetches succeeded and how many failed.
    pub async fn refresh_due(&self) -> (usize, usize) {
        let now = (self.clock)();
        let due: Vec<Platform> = self
            .tracks()
            .iter()
            .filter(|(_, t)| t.next_fetch <= now)
            .map(|(p, _)| p.clone())
            .collect();
        self.refresh(due).await
    }

    /// Fetches `platforms` now, due or not, one after another, noting each outcome (when to
    /// fetch next, the error) and warning as the collateral held nears its expiry; returns how
    /// many fetches succeeded and how many failed.
    pub async fn refresh(&self, platforms: Vec<Platform>) -> (usize, usize) {
        let (mut ok, mut failed) = (0, 0);
        for platform in platforms {
            let result = self.fetch(&platform).await;
            let now = (self.clock)();
            let expires = self.store.get(&platform).map(|d| d.next_update());
            let now_i = i64::try_from(now).unwrap_or(i64::MAX);
            let mut tracks = self.tracks();
            let track = tracks.entry(platform.clone()).or_default();
            track.fetched_at = Some(now);
            match result {
                Ok(offered) => {
                    ok += 1;
                    if matches!(offered, Offered::Stored(_)) {
                        tracing::info!(
                            "collateral for {platform} fetched; in force until {}",
                            expires.map_or_else(|| "?".into(), cocoon_attest::date)
                        );
                    }
                    track.failures = 0;
                    track.last_error = None;
                    track.next_fetch = next_after_success(now, self.refresh_secs, expires);
                }
                Err(e) => {
                    failed += 1;
                    track.failures = track.failures.saturating_add(1);
                    track.next_fetch = next_after_failure(now, self.refresh_secs, track.failures);
                    match expires {
                        None => tracing::warn!(
                            "collateral for {platform}: {e}; quotes from it are refused until a \
                             fetch succeeds"
                        ),
                        Some(at) if at < now_i => tracing::error!(
                            "collateral for {platform} EXPIRED on {} and cannot be refreshed: \
                             {e}. Quotes from it are refused",
                            cocoon_attest::date(at)
                        ),
                        Some(at) if at.saturating_sub(now_i) < EXPIRY_WARNING_SECS => {
                            tracing::error!(
                                "collateral for {platform} expires on {} and cannot be refreshed: \
                             {e}",
                                cocoon_attest::date(at)
                            )
                        }
                        Some(at) => tracing::warn!(
                            "collateral for {platform} could not be refreshed (the one held is \
                             in force until {}): {e}",
                            cocoon_attest::date(at)
                        ),
                    }
                    track.last_error = Some(e);
                }
            }
        }
        (ok, failed)
    }

    /// Each tracked platform's state, sorted.
    pub fn status(&self) -> Vec<PlatformStatus> {
        let mut out: Vec<PlatformStatus> = self
            .tracks()
            .iter()
            .map(|(p, t)| {
                let expires = self.store.get(p).map(|d| d.next_update());
                PlatformStatus {
                    platform: format!("{}-{}", p.fmspc, p.ca),
                    expires,
                    expires_on: expires.map(cocoon_attest::date),
                    fetched_at: t.fetched_at,
                    next_fetch: t.next_fetch,
                    failures: t.failures,
                    last_error: t.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.platform.cmp(&b.platform));
        out
    }

    /// Refreshes as fetches fall due, and fetches platforms the store asks for, until dropped
    /// or aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.refresh_due().await;
            let now = (self.clock)();
            let next = self
                .tracks()
                .values()
                .map(|t| t.next_fetch)
                .min()
                .unwrap_or(u64::MAX);
            // Capped, so a clock that jumps (a suspended VM) is noticed within minutes.
            let pause = next.saturating_sub(now).clamp(1, 300);
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(pause)) => {}
            }
        }
    }
}

/// After a success: the regular refresh, but sooner when what the service has is nearer its
/// expiry (a PCCS that lags Intel), halving the time left down to a few minutes.
fn next_after_success(now: u64, refresh_secs: u64, expires: Option<i64>) -> u64 {
    let left = expires.map_or(0, |e| u64::try_from(e).unwrap_or(0).saturating_sub(now));
    now.saturating_add(refresh_secs.min((left / 2).max(5 * MIN_RETRY_SECS)))
}

/// After failures in a row: a minute, doubling, at most an hour (or the refresh interval).
fn next_after_failure(now: u64, refresh_secs: u64, failures: u32) -> u64 {
    let backoff = MIN_RETRY_SECS
        .saturating_mul(1u64 << failures.saturating_sub(1).min(16))
        .min(3600)
        .min(refresh_secs);
    now.saturating_add(backoff)
}

/// A node's collateral: the store its verifiers read, and the fetcher `[collateral]` asks for
/// (none when it names neither a service nor a cache). Build the node's policies on
/// [`store`](Self::store), then [`start`](Self::start) it.
#[derive(Debug)]
pub struct NodeCollateral {
    /// What the node's verifiers verify TDX quotes with.
    pub store: Arc<CollateralStore>,
    fetcher: Option<Arc<Fetcher>>,
}

impl NodeCollateral {
    /// The store, with the fetcher attached (so its verifiers know collateral can arrive).
    pub fn prepare(config: &CollateralConfig) -> Result<Self, FetchError> {
        let store = CollateralStore::new();
        let fetcher = if config.pccs_url.is_none() && config.cache_dir.is_none() {
            None
        } else {
            Some(Fetcher::new(config, store.clone())?)
        };
        Ok(Self { store, fetcher })
    }

    /// Starts the fetcher, if there is one ([`Fetcher::start`]); keep what it returns for as
    /// long as the node runs.
    pub async fn start(self) -> Option<Running> {
        match &self.fetcher {
            Some(f) => Some(f.start().await),
            None => None,
        }
    }
}

impl Running {
    /// Registers `collateral_expiry_timestamp_seconds{platform}` (when the collateral held
    /// for each platform expires, Unix seconds: alert well before it) and
    /// `collateral_fetch_failures{platform}` (fetches failed in a row) in a node's metrics;
    /// returns what sets them before each scrape ([`cocoon_admin::Metrics::with`]).
    pub fn register_metrics(
        &self,
        registry: &mut cocoon_admin::Registry,
    ) -> impl Fn() + Send + Sync + use<> {
        use cocoon_admin::prometheus_client::metrics::{family::Family, gauge::Gauge};
        type ByPlatform = Family<Vec<(&'static str, String)>, Gauge>;
        let (expiry, failures) = (ByPlatform::default(), ByPlatform::default());
        registry.register(
            "collateral_expiry_timestamp_seconds",
            "When the Intel collateral held for each platform (FMSPC-CA) expires, Unix seconds",
            expiry.clone(),
        );
        registry.register(
            "collateral_fetch_failures",
            "Fetches of each platform's collateral that failed in a row",
            failures.clone(),
        );
        let fetcher = self.fetcher.clone();
        move || {
            for s in fetcher.status() {
                let labels = vec![("platform", s.platform)];
                if let Some(at) = s.expires {
                    expiry.get_or_create(&labels).set(at);
                }
                failures.get_or_create(&labels).set(i64::from(s.failures));
            }
        }
    }
}

/// A started fetcher's background task, stopped when this is dropped (with the node).
#[derive(Debug)]
pub struct Running {
    /// The fetcher, for its status.
    pub fetcher: Arc<Fetcher>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Fetcher {
    /// Reads the cache into the store, fetches (and waits for) the platforms configured that
    /// nothing is held for, and with a service to fetch from keeps refreshing in a background
    /// task.
    pub async fn start(self: &Arc<Self>) -> Running {
        let loaded = self.load_cache();
        if !loaded.is_empty() {
            tracing::info!("collateral from the cache for {} platform(s)", loaded.len());
        }
        let Some(client) = &self.client else {
            return Running {
                fetcher: self.clone(),
                task: None,
            };
        };
        if self.cache.is_none() {
            tracing::warn!(
                "[collateral] has no cache_dir: a restart while {} is down verifies no TDX quote",
                client.url()
            );
        }
        // Only platforms with nothing held are waited for; the rest refresh in the background,
        // so a node restarted while the service is down starts at once on its cache.
        let missing: Vec<Platform> = self
            .tracks()
            .keys()
            .filter(|p| self.store.get(p).is_none())
            .cloned()
            .collect();
        self.refresh(missing).await;
        Running {
            fetcher: self.clone(),
            task: Some(tokio::spawn(self.clone().run())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_come_daily_and_sooner_near_expiry() {
        let day = 24 * 3600;
        // Thirty days left: the regular day.
        assert_eq!(next_after_success(0, day, Some(30 * 24 * 3600)), day);
        // Ten hours left: in five.
        assert_eq!(next_after_success(0, day, Some(10 * 3600)), 5 * 3600);
        // Expired or unknown: in five minutes, never sooner.
        assert_eq!(next_after_success(1000, day, Some(10)), 1300);
        assert_eq!(next_after_success(1000, day, None), 1300);
    }

    #[test]
    fn failures_back_off_to_an_hour() {
        let day = 24 * 3600;
        assert_eq!(next_after_failure(0, day, 1), 60);
        assert_eq!(next_after_failure(0, day, 2), 120);
        assert_eq!(next_after_failure(0, day, 7), 3600);
        assert_eq!(next_after_failure(0, day, u32::MAX), 3600);
        // Never later than the regular refresh.
        assert_eq!(next_after_failure(0, 1800, 10), 1800);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let store = CollateralStore::new();
        let err = |c: CollateralConfig| Fetcher::new(&c, store.clone()).unwrap_err().to_string();
        let e = err(CollateralConfig {
            refresh_hours: 0,
            ..CollateralConfig::default()
        });
        assert!(e.contains("refresh_hours"), "{e}");
        let e = err(CollateralConfig {
            platforms: vec!["B0C06F000000".into()],
            ..CollateralConfig::default()
        });
        assert!(e.contains("without a pccs_url"), "{e}");
        let e = err(CollateralConfig {
            pccs_url: Some("https://pccs.example".into()),
            platforms: vec!["nope".into()],
            ..CollateralConfig::default()
        });
        assert!(e.contains("platforms"), "{e}");
    }

    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    fn b64_decode(text: &[u8]) -> Vec<u8> {
        let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
        for c in text {
            let Some(v) = B64.iter().position(|b| b == c) else {
                continue;
            };
            acc = ((acc << 6) | u32::try_from(v).unwrap()) & 0xffff;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push(((acc >> bits) & 0xff) as u8);
            }
        }
        out
    }

    fn b64_encode(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
            for i in 0..4usize {
                out.push(if i <= chunk.len() {
                    B64[((n >> (18 - 6 * i)) & 63) as usize]
                } else {
                    b'='
                });
            }
        }
        out
    }

    fn find(hay: &[u8], needle: &[u8], from: usize) -> usize {
        from + hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("found")
    }

    /// `quote` with the FMSPC in its PCK certificate replaced: what anyone can put in an RA-TLS
    /// certificate, since nothing checks that certificate's signature before the platform is
    /// read from it.
    fn with_fmspc(quote: &[u8], fmspc: [u8; 6]) -> Vec<u8> {
        let begin = find(quote, b"-----BEGIN CERTIFICATE-----", 0) + 27;
        let end = find(quote, b"-----END CERTIFICATE-----", begin);
        let mut der = b64_decode(&quote[begin..end]);
        // The FMSPC's OID (1.2.840.113741.1.13.1.4), then its OCTET STRING of 6 bytes.
        let oid: &[u8] = &[
            0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x01, 0x0D, 0x01, 0x04, 0x04, 0x06,
        ];
        let at = find(&der, oid, 0) + oid.len();
        der[at..at + 6].copy_from_slice(&fmspc);
        let mut encoded = b64_encode(&der).into_iter();
        let mut out = quote.to_vec();
        for c in &mut out[begin..end] {
            let v = *c;
            if B64.contains(&v) || v == b'=' {
                *c = encoded.next().expect("the same length");
            }
        }
        assert!(encoded.next().is_none());
        out
    }

    /// REVIEW, fixed: the platform a quote names was read from its PCK certificate before anything was
    /// verified, and every platform the store is asked for becomes a track kept forever: fetched
    /// at once, one after another (at least two requests each, up to `timeout_secs` apiece),
    /// retried after a minute doubling to an hour, and brought back to a minute by the next
    /// quote naming it (`want`). A peer that makes up FMSPCs in its handshakes (no Intel key
    /// needed: the certificate is not checked) grows `tracks` and the status without bound,
    /// turns the fetcher into a request storm against the PCCS (against Intel's PCS, which
    /// rate-limits, genuine fetches then get 429), and queues a real platform's on-demand fetch,
    /// and every refresh, behind thousands of hopeless ones. Verify the quote's PCK chain up to
    /// Intel's root (signatures only) before calling the hook, cap the platforms pending with
    /// nothing held, and forget a track the service answers 404 for.
    #[test]
    fn review_handshakes_naming_made_up_platforms_queue_fetches_without_bound() {
        let tdx = cocoon_testdata::TDX;
        let at = tdx.at;
        let store = CollateralStore::new();
        let config = CollateralConfig {
            pccs_url: Some("https://pccs.example".into()),
            ..CollateralConfig::default()
        };
        let fetcher = Fetcher::with_clock(&config, store.clone(), Arc::new(move || at)).unwrap();
        for i in 0..1000u16 {
            let [hi, lo] = i.to_be_bytes();
            let fmspc = [0x10, 0, 0, 0, hi, lo];
            let quote = with_fmspc(tdx.quote, fmspc);
            assert_eq!(
                cocoon_attest::quote_platform(&quote).unwrap().fmspc,
                hex::encode_upper(fmspc)
            );
            // REVIEW, fixed: a PCK certificate Intel did not sign names no platform worth
            // fetching for.
            assert!(matches!(
                store.verify(&quote, at),
                Err(AttestError::Verification(m)) if m.contains("not Intel's")
            ));
        }
        let status = fetcher.status();
        let due = status.iter().filter(|s| s.next_fetch <= at).count();
        assert!(
            status.len() <= 64,
            "{} made-up platforms tracked for good, {due} of them to be fetched right now",
            status.len()
        );
        // And real platforms that all wait for a first fetch are bounded too.
        for i in 0..100u32 {
            fetcher.want(&cocoon_attest::Platform::parse(&format!("{i:012X}")).unwrap());
        }
        assert_eq!(fetcher.status().len(), MAX_PENDING_PLATFORMS);
    }
}
