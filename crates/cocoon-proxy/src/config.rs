use std::path::PathBuf;

use cocoon_tls::{AttesterConfig, PeerPolicy};

use crate::admin::AdminConfig;
pub(crate) use crate::billing::PaymentsConfig;
pub use crate::limits::LimitsConfig;
use serde::{Deserialize, Serialize};

/// `proxy.toml`. Every field has a default; `cocoon config proxy` prints them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address clients and workers connect to.
    pub listen: String,
    /// The proxy's key; its fingerprint is what clients and workers pin. Created if missing.
    /// A fresh key per run when unset.
    pub key_file: Option<PathBuf>,
    /// Largest generation request accepted from a client, in bytes.
    pub max_request_bytes: usize,
    /// Open client connections at most (counted once their TLS handshake is done); a further
    /// one is closed. Workers have their own share ([limits] worker_connections), and
    /// connections still in their handshake theirs (handshaking_connections), so clients
    /// filling theirs cannot keep a worker out.
    pub max_connections: usize,
    /// On SIGTERM (or ctrl-c): seconds the answers in flight have to finish before their
    /// streams are cut. New requests are refused from the first signal (clients go to another
    /// proxy); a second signal exits at once.
    pub drain_secs: u64,
    /// How this proxy proves what it runs (`tdx` inside a TDX guest).
    pub attester: AttesterConfig,
    /// Where Intel's collateral for verifying peers' TDX quotes comes from (`[collateral]`): a
    /// PCCS or Intel's PCS, and a cache on disk.
    pub collateral: cocoon_collateral::CollateralConfig,
    /// Which workers may serve: pinned keys and/or attested images. Prompts go only to them.
    pub worker_policy: PeerPolicy,
    /// Which clients may connect. Default: any key (clients are known by key and pay from
    /// contracts bound to it).
    pub client_policy: PeerPolicy,
    /// The ledger clients pay through and the proxy's record of charges. Without a ledger
    /// the proxy serves for free (and says so at start).
    pub payments: PaymentsConfig,
    /// What one client key or address may ask and hold, and the timeouts on silent peers.
    pub limits: LimitsConfig,
    /// Failover, health checks and the record of each worker's performance.
    pub routing: RoutingConfig,
    /// The operator's listener: the whole status (every worker, refusal and the ledger),
    /// which clients do not see. Off unless `[admin] listen` is set.
    pub admin: AdminConfig,
}

/// `[routing]` in `proxy.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Where each worker's measured performance (its reputation) is kept across restarts.
    /// Unset: beside the payments book (`<book>.reputation.redb`) when payments are on, else in
    /// memory only.
    pub reputation_file: Option<PathBuf>,
    /// Workers tried for one request before the client is told none could serve it.
    pub max_attempts: u32,
    /// A worker must send the first token within this time, or the next worker is tried.
    pub first_token_timeout_secs: u64,
    /// All attempts together must produce a first token within this time.
    pub start_deadline_secs: u64,
    /// How often each worker is asked whether it is alive and serving.
    pub health_interval_secs: u64,
    /// How long a health check may take.
    pub health_timeout_secs: u64,
    /// Failed health checks in a row after which a worker is disconnected (after the first
    /// it gets no new requests).
    pub evict_after_failed_checks: u32,
    /// Answers whose token counts broke the proxy's bounds (each billed at the bound) after
    /// which a worker is disconnected.
    pub evict_after_overreports: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            reputation_file: None,
            max_attempts: 3,
            first_token_timeout_secs: 30,
            start_deadline_secs: 60,
            health_interval_secs: 10,
            health_timeout_secs: 5,
            evict_after_failed_checks: 3,
            evict_after_overreports: 3,
        }
    }
}

impl RoutingConfig {
    /// Refuses a configuration with any count or timeout at 0.
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("max_attempts", u64::from(self.max_attempts)),
            ("first_token_timeout_secs", self.first_token_timeout_secs),
            ("start_deadline_secs", self.start_deadline_secs),
            ("health_interval_secs", self.health_interval_secs),
            ("health_timeout_secs", self.health_timeout_secs),
            (
                "evict_after_failed_checks",
                u64::from(self.evict_after_failed_checks),
            ),
            (
                "evict_after_overreports",
                u64::from(self.evict_after_overreports),
            ),
        ] {
            anyhow::ensure!(value > 0, "[routing] {name} must be at least 1");
        }
        Ok(())
    }

    /// The reputation file in use: the configured one, or one beside `book` when payments
    /// are on.
    pub fn reputation_path(&self, payments: &PaymentsConfig) -> Option<PathBuf> {
        self.reputation_file.clone().or_else(|| {
            payments
                .ledger
                .as_ref()
                .map(|_| payments.book.with_extension("reputation.redb"))
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:10443".into(),
            key_file: None,
            max_request_bytes: 8 << 20,
            max_connections: 4096,
            drain_secs: 30,
            attester: AttesterConfig::default(),
            collateral: cocoon_collateral::CollateralConfig::default(),
            worker_policy: PeerPolicy::default(),
            client_policy: PeerPolicy::default(),
            payments: PaymentsConfig::default(),
            limits: LimitsConfig::default(),
            routing: RoutingConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

impl ProxyConfig {
    /// What of this configuration decides where prompts go, as the proxy measures it into
    /// RTMR3 before it serves (no secrets: it travels in the proxy's certificates).
    pub fn measured(&self) -> cocoon_tls::MeasuredEvent {
        cocoon_tls::MeasuredEvent::config(
            serde_json::json!({
                "role": "proxy",
                "worker_policy": self.worker_policy.measured(),
                "client_policy": self.client_policy.measured(),
                "ledger": self.payments.ledger.as_deref().map(cocoon_tls::ledger_for_measurement),
                "registry_refresh_secs": self.payments.registry_refresh_secs,
                "worker_images_from_registry": self.payments.worker_images_from_registry,
            })
            .to_string(),
        )
    }
}
