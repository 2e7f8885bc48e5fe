use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `client.toml`. Every field has a default; `cocoon config client` prints them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Where the OpenAI-compatible API listens. Keep it on loopback: prompts arrive here in
    /// clear text.
    pub listen: String,
    /// The proxy, `host:port`.
    pub proxy_addr: String,
    /// SHA-256 fingerprint of the proxy's key (printed by `cocoon proxy` at start). Without it
    /// the gateway talks to any proxy at that address.
    pub proxy_fingerprint: Option<String>,
    /// The client's key: its identity towards the proxy. A fresh key per run when unset.
    pub key_file: Option<PathBuf>,
    /// Largest request body accepted from apps, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:10000".into(),
            proxy_addr: "127.0.0.1:10443".into(),
            proxy_fingerprint: None,
            key_file: None,
            max_body_bytes: 4 << 20,
        }
    }
}
