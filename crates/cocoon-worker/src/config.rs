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

impl WorkerConfig {
    /// What of this configuration decides where prompts go, as the worker measures it into
    /// RTMR3 before it serves: the proxies it serves, and where each backend runs or sends
    /// prompts. No secrets (it travels in the worker's certificates): an upstream's API key is
    /// left out, and so are credentials and a query in its URL.
    pub fn measured(&self) -> cocoon_tls::MeasuredEvent {
        let backends: Vec<serde_json::Value> = self
            .backends
            .iter()
            .map(|b| match b {
                BackendConfig::Llama(l) => serde_json::json!({
                    "kind": "llama",
                    "model_id": l.model_id,
                    "model_file": l.model_path.file_name().map(|f| f.to_string_lossy()),
                }),
                BackendConfig::Upstream(u) => serde_json::json!({
                    "kind": "upstream",
                    "url": without_secrets(&u.url),
                    "models": u.models.iter().map(|m| &m.id).collect::<Vec<_>>(),
                }),
            })
            .collect();
        cocoon_tls::MeasuredEvent::config(
            serde_json::json!({
                "role": "worker",
                "proxy_addr": self.proxy_addr,
                "proxy_policy": self.proxy_policy.measured(),
                "backends": backends,
                "ledger": self.payments.ledger,
            })
            .to_string(),
        )
    }
}

/// `url` without user info, query and fragment: where prompts go, not the keys to get there.
fn without_secrets(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().unwrap_or(authority);
    match scheme {
        "" => format!("{host}{path}"),
        _ => format!("{scheme}://{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measured configuration names where prompts go, never the keys to get there.
    #[test]
    fn measured_upstream_urls_carry_no_secrets() {
        assert_eq!(
            without_secrets("https://user:pw@api.example:8443/v1?key=s3cret#x"),
            "https://api.example:8443/v1"
        );
        assert_eq!(
            without_secrets("http://127.0.0.1:8000"),
            "http://127.0.0.1:8000"
        );
        let json = r#"{"name":"w","proxy_addr":"proxy:8443","backend":[{"kind":"upstream",
            "url":"https://k:v@vllm.local/v1?token=t","api_key":"sk-secret",
            "models":[{"id":"m","context_length":4096}]}]}"#;
        let config: WorkerConfig = serde_json::from_str(json).unwrap();
        let measured = config.measured();
        assert!(
            measured.content.contains("https://vllm.local/v1"),
            "{measured:?}"
        );
        for secret in ["sk-secret", "token", "k:v"] {
            assert!(!measured.content.contains(secret), "{measured:?}");
        }
    }

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
