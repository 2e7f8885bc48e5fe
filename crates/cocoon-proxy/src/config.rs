use std::path::PathBuf;

use cocoon_tls::{AttesterConfig, PeerPolicy};

pub use crate::billing::PaymentsConfig;
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
    /// Open connections at most; further ones wait to be accepted.
    pub max_connections: usize,
    /// How this proxy proves what it runs (`tdx` inside a TDX guest).
    pub attester: AttesterConfig,
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:10443".into(),
            key_file: None,
            max_request_bytes: 8 << 20,
            max_connections: 4096,
            attester: AttesterConfig::default(),
            worker_policy: PeerPolicy::default(),
            client_policy: PeerPolicy::default(),
            payments: PaymentsConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}
