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
    /// Further proxies served at the same time, each over a connection of its own with the
    /// same `[proxy_policy]`; the backends' capacity is shared by all of them, and each proxy
    /// pays for what it routed here.
    pub more_proxies: Vec<String>,
    /// Where the worker's own key is kept; a fresh key per run when unset.
    pub key_file: Option<PathBuf>,
    /// Longest wait between reconnection attempts, in seconds.
    pub max_reconnect_secs: u64,
    /// How this worker proves what it runs (`tdx` inside a TDX guest).
    pub attester: AttesterConfig,
    /// Where Intel's collateral for verifying peers' TDX quotes comes from (`[collateral]`): a
    /// PCCS or Intel's PCS, and a cache on disk.
    pub collateral: cocoon_collateral::CollateralConfig,
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
    /// The operator's listener (`/healthz`, `/readyz`, `/metrics`, `/status`); off unless
    /// `listen` is set.
    pub admin: cocoon_admin::AdminConfig,
    /// On SIGTERM (or ctrl-c): seconds the answers in flight have to finish before the
    /// connection is closed; new requests are refused meanwhile (the proxy gives them to
    /// another worker). A second signal exits at once.
    pub drain_secs: u64,
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
            more_proxies: Vec::new(),
            key_file: None,
            attester: AttesterConfig::default(),
            collateral: cocoon_collateral::CollateralConfig::default(),
            proxy_policy: PeerPolicy::default(),
            max_reconnect_secs: 5,
            backends: vec![BackendConfig::Llama(LlamaConfig::default())],
            payments: PayoutsConfig::default(),
            prices: PriceConfig::default(),
            admin: cocoon_admin::AdminConfig::default(),
            drain_secs: 30,
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
    /// RTMR3 before it serves: the proxies it serves, and for each backend the weights it runs
    /// (the embedded engine's GGUF by its SHA-256) or where it sends prompts (an upstream's
    /// URL as the client reaches it, the CAs it trusts there by their SHA-256, the models and
    /// the weights' hashes it declares). No secrets: it travels in the worker's certificates, so
    /// an upstream's API key, and credentials or a query in any URL, are left out.
    pub fn measured(&self) -> cocoon_tls::MeasuredEvent {
        let file_hash = |path: &std::path::Path| {
            cocoon_engine::model_file_hash(path).unwrap_or_else(|e| format!("unreadable: {e}"))
        };
        // Read each time (it is small): what is trusted is the file's certificates now.
        let ca_hash = |path: &std::path::Path| match std::fs::read(path) {
            Ok(pem) => hex::encode(ring::digest::digest(&ring::digest::SHA256, &pem)),
            Err(e) => format!("unreadable: {e}"),
        };
        let backends: Vec<serde_json::Value> = self
            .backends
            .iter()
            .map(|b| match b {
                BackendConfig::Llama(l) => serde_json::json!({
                    "kind": "llama",
                    "model_id": l.served_model_id(),
                    "model_file": l.model_path.file_name().map(|f| f.to_string_lossy()),
                    "model_hash": file_hash(&l.model_path),
                }),
                BackendConfig::Upstream(u) => serde_json::json!({
                    "kind": "upstream",
                    "url": cocoon_tls::url_for_measurement(&u.url),
                    "ca_file_sha256": u.ca_file.as_deref().map(ca_hash),
                    "cache_salt": u.cache_salt,
                    "models": u.models.iter().map(|m| serde_json::json!({
                        "id": m.id,
                        "upstream_id": m.upstream_id,
                        "model_hash": m.model_hash,
                    })).collect::<Vec<_>>(),
                }),
            })
            .collect();
        cocoon_tls::MeasuredEvent::config(
            serde_json::json!({
                "role": "worker",
                "proxy_addr": self.proxy_addr,
                "more_proxies": self.more_proxies,
                "proxy_policy": self.proxy_policy.measured(),
                "backends": backends,
                "ledger": self.payments.ledger.as_deref().map(cocoon_tls::ledger_for_measurement),
                "proxy_images_from_registry": self.payments.proxy_images_from_registry,
                "registry_refresh_secs": self.payments.registry_refresh_secs,
            })
            .to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// A worker with one upstream backend at `url` (model `m`), trusting `ca_file` beside the
    /// public roots when given; everything else default.
    fn review_upstream_worker(url: &str, ca_file: Option<&std::path::Path>) -> WorkerConfig {
        let mut backend = serde_json::json!({
            "kind": "upstream",
            "url": url,
            "models": [{"id": "m", "context_length": 4096}],
        });
        if let Some(ca) = ca_file {
            backend["ca_file"] = serde_json::json!(ca);
        }
        serde_json::from_value(serde_json::json!({ "backend": [backend] })).unwrap()
    }

    /// REVIEW, fixed: the measured URL must name the host prompts really go to. reqwest (url crate,
    /// WHATWG) ends the authority of a special scheme at `\`, so
    /// `https://evil.example\@api.openai.com/v1` sends prompts to evil.example; without_secrets
    /// splits at the first `/` and keeps what follows the last `@`, measuring
    /// `https://api.openai.com/v1`: the same config_hash as the honest configuration, so a
    /// proxy listing that hash admits a worker that sends every prompt to evil.example.
    #[test]
    fn review_measured_upstream_host_is_where_prompts_go() {
        let evil = r"https://evil.example\@api.openai.com/v1";
        // Where UpstreamBackend::request_body's URL really leads.
        let runtime = reqwest::Url::parse(&format!("{evil}/chat/completions")).unwrap();
        assert_eq!(runtime.host_str(), Some("evil.example"));
        let honest = review_upstream_worker("https://api.openai.com/v1", None).measured();
        let measured = review_upstream_worker(evil, None).measured();
        assert_ne!(
            measured, honest,
            "a worker sending prompts to evil.example measures as one sending them to \
             api.openai.com"
        );
        assert!(measured.content.contains("evil.example"), "{measured:?}");
    }

    /// REVIEW, fixed: `ca_file` decides who can terminate the TLS connection that carries every
    /// prompt to an https upstream, yet it is not measured. An operator (who controls the
    /// host's network and DNS) adds its own CA and intercepts the prompts, while the worker
    /// measures exactly the configuration the proxy allowed.
    #[test]
    fn review_measured_upstream_names_the_cas_it_trusts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let url = "https://api.openai.com/v1";
        let public_roots = review_upstream_worker(url, None).measured();
        let with_ca = review_upstream_worker(url, Some(ca.as_path())).measured();
        assert_ne!(
            with_ca, public_roots,
            "trusting an extra CA for the upstream measures the same as the public roots only"
        );
        // What is trusted is the file's certificates, not its path.
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let other_ca = review_upstream_worker(url, Some(ca.as_path())).measured();
        assert_ne!(
            other_ca, with_ca,
            "another CA in the same file measures the same"
        );
    }

    /// REVIEW, fixed: the ledger is measured verbatim, so its credentials travel in every certificate
    /// (the proxy's is shown to anyone who connects). reqwest sends a URL's user info as basic
    /// auth, so `https://user:password@ledger…` is a working, secret-bearing setting; the
    /// upstream URL has its credentials stripped, the ledger does not.
    #[test]
    fn review_measured_ledger_carries_no_credentials() {
        for ledger in [
            "https://cocoon:s3cret-ledger@ledger.example:9100",
            "ton:0:0000000000000000000000000000000000000000000000000000000000000000@https://cocoon:s3cret-ledger@toncenter.example",
        ] {
            let mut config = WorkerConfig::default();
            config.payments.ledger = Some(ledger.into());
            let measured = config.measured();
            assert!(!measured.content.contains("s3cret"), "{measured:?}");
        }
    }

    /// REVIEW, fixed: the worker measures `proxy_images_from_registry` but not
    /// `registry_refresh_secs`, which decides how long it keeps serving a proxy whose image the
    /// owner revoked (the proxy measures its own `registry_refresh_secs`). A host sets it to
    /// 2^40 s: the worker never leaves the revoked proxy, with the configuration hash a
    /// `[worker_policy] config_hashes` list admits for 60 s.
    #[test]
    fn review_measured_worker_names_how_often_it_reads_the_registry() {
        let mut config = WorkerConfig::default();
        config.payments.ledger = Some("http://127.0.0.1:9100".into());
        config.payments.proxy_images_from_registry = true;
        let every_minute = config.measured();
        config.payments.registry_refresh_secs = 1 << 40;
        assert_ne!(
            config.measured(),
            every_minute,
            "a worker that never reads the registry again measures as one reading it every minute"
        );
    }

    /// A llama backend without `model_id` is measured under the name it serves (the file's),
    /// so gateways that check the weights a model is served with find it.
    #[test]
    fn a_llama_backend_is_measured_under_the_name_it_serves() {
        let json = r#"{"name":"w","proxy_addr":"proxy:8443","backend":[{"kind":"llama",
            "model_path":"models/SmolLM2-135M-Instruct.Q4_1.gguf"}]}"#;
        let config: WorkerConfig = serde_json::from_str(json).unwrap();
        let measured: serde_json::Value = serde_json::from_str(&config.measured().content).unwrap();
        assert_eq!(
            measured["backends"][0]["model_id"], "SmolLM2-135M-Instruct",
            "{measured}"
        );
    }

    /// The measured configuration names where prompts go, never the keys to get there.
    #[test]
    fn measured_upstream_urls_carry_no_secrets() {
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
