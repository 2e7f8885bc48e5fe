use std::path::PathBuf;

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
    /// Fingerprints of the workers allowed to serve. Empty: any worker (development only).
    pub worker_fingerprints: Vec<String>,
    /// Largest generation request accepted from a client, in bytes.
    pub max_request_bytes: usize,
    /// Open connections at most; further ones wait to be accepted.
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:10443".into(),
            key_file: None,
            worker_fingerprints: Vec::new(),
            max_request_bytes: 8 << 20,
            max_connections: 4096,
        }
    }
}
