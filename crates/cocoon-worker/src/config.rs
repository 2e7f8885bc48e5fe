use std::collections::BTreeMap;
use std::path::PathBuf;

use cocoon_engine::{LlamaConfig, UpstreamConfig};
use cocoon_tls::{AttesterConfig, PeerPolicy};
use serde::{Deserialize, Serialize};

use crate::payouts::PayoutsConfig;

/// `worker.toml`. Every field has a default; `cocoon config worker` prints them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Name shown in the proxy's status.
    pub name: String,
    /// Proxy to serve, `host:port`.
    pub proxy_addr: String,
    /// Where the worker's own key is kept; a fresh key per run when unset.
    pub key_file: Option<PathBuf>,
    /// Longest wait between reconnection attempts, in seconds.
    pub max_reconnect_secs: u64,
    /// How this worker proves what it runs (`tdx` inside a TDX guest).
    pub attester: AttesterConfig,
    /// Which proxies this worker serves: a pinned key (the fingerprint `cocoon proxy` prints)
    /// and/or an attested image.
    pub proxy_policy: PeerPolicy,
    /// Backends to serve; one embedded SmolLM2 by default.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Where payouts are kept and the ledger they are claimed on.
    pub payments: PayoutsConfig,
    /// The least this worker takes per weighted token, per model.
    pub prices: PriceConfig,
}

/// `[prices]` in `worker.toml`: the least this worker takes per weighted token, in nanoton.
/// Proxies route a request here only if the client's `max_price` allows it, and bill it at
/// this price (or at the network's floor, if that is higher).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceConfig {
    /// For every model not listed below; 0: the network's floor.
    pub default: u64,
    /// Per model id.
    pub models: BTreeMap<String, u64>,
}

impl PriceConfig {
    /// The least this worker takes for `model`, in nanoton per weighted token: its entry in
    /// `models`, else `default` (0: the network's floor).
    pub fn price(&self, model: &str) -> u64 {
        self.models.get(model).copied().unwrap_or(self.default)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: "worker".into(),
            proxy_addr: "127.0.0.1:10443".into(),
            key_file: None,
            attester: AttesterConfig::default(),
            proxy_policy: PeerPolicy::default(),
            max_reconnect_secs: 5,
            backends: vec![BackendConfig::Llama(LlamaConfig::default())],
            payments: PayoutsConfig::default(),
            prices: PriceConfig::default(),
        }
    }
}

/// One `[[backend]]` table. Only data: the binary that starts the worker builds the backends
/// from it (the worker takes them built), so the worker crate does not link their engines.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendConfig {
    /// A GGUF model run in-process by llama.cpp.
    Llama(LlamaConfig),
    /// An OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, Ollama).
    Upstream(UpstreamConfig),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_backend_parses() {
        let json = r#"{"backend":[{"kind":"upstream","url":"http://127.0.0.1:8000/v1","models":[{"id":"m","context_length":4096}]}]}"#;
        let c: WorkerConfig = serde_json::from_str(json).unwrap();
        assert!(matches!(c.backends[0], BackendConfig::Upstream(_)));
        assert_eq!(c.proxy_addr, "127.0.0.1:10443");
    }

    /// The embedded engine's table is plain data here: it parses without llama.cpp linked.
    #[test]
    fn llama_backend_parses() {
        let json = r#"{"backend":[{"kind":"llama","model_path":"m.gguf","parallel":2}]}"#;
        let c: WorkerConfig = serde_json::from_str(json).unwrap();
        let BackendConfig::Llama(llama) = &c.backends[0] else {
            panic!("not a llama backend: {:?}", c.backends[0]);
        };
        assert_eq!(llama.model_path, PathBuf::from("m.gguf"));
        assert_eq!((llama.parallel, llama.threads), (2, 0));
    }
}
