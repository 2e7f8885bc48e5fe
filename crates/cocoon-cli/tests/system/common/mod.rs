#![allow(dead_code)]

pub mod netns;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_cli::dev::{DevNetwork, DevOptions};
use cocoon_engine::{Backend, LlamaConfig};
use cocoon_llama::LlamaBackend;
use serde_json::{Value, json};

pub const MODEL: &str = "SmolLM2-135M-Instruct";

pub fn model_path() -> PathBuf {
    std::env::var_os("COCOON_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

pub fn llama() -> Arc<LlamaBackend> {
    Arc::new(
        LlamaBackend::load(&LlamaConfig {
            model_path: model_path(),
            threads: 2,
            ..Default::default()
        })
        .expect("model loads; run scripts/fetch-model.sh first"),
    )
}

pub fn test_options() -> DevOptions {
    DevOptions {
        gateway_listen: "127.0.0.1:0".into(),
        ..Default::default()
    }
}

pub async fn network(backends: Vec<Arc<dyn Backend>>) -> DevNetwork {
    let n = backends.len() as u32;
    let net = DevNetwork::start(test_options(), backends).await.unwrap();
    net.wait_ready(n, Duration::from_secs(20)).await.unwrap();
    net
}

pub fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Parsed SSE `data:` payloads of a streamed answer, `[DONE]` kept as a string.
pub async fn sse_events(response: reqwest::Response) -> Vec<Value> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).unwrap()
            }
        })
        .collect()
}

pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs `body` as JSON and parses the JSON answer, whatever its status.
pub async fn post_json(http: &reqwest::Client, url: impl reqwest::IntoUrl, body: &Value) -> Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// GETs `url` and parses the JSON answer.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Status of a short chat request ("Hi", 2 tokens) through `net`'s gateway.
pub async fn short_chat_status(net: &DevNetwork) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The token counts of an OpenAI `usage` object, without the bill (whose counter and signed
/// message differ from one request to the next).
pub fn token_counts(usage: &Value) -> (u64, u64, u64) {
    let n = |k: &str| {
        usage[k]
            .as_u64()
            .unwrap_or_else(|| panic!("usage lacks {k}: {usage}"))
    };
    (
        n("prompt_tokens"),
        n("completion_tokens"),
        n("total_tokens"),
    )
}

/// A loopback address with a port free right now.
pub fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `cocoon ARGS` to completion and parses its JSON report; the command must succeed.
pub async fn cocoon_report(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "cocoon {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `worker.toml` with dev worker 0's key and payouts, claiming on `ledger`, for
/// `cocoon worker withdraw`; returns its path.
pub fn dev_worker_config(net: &DevNetwork, ledger: &str) -> PathBuf {
    let config = cocoon_worker::WorkerConfig {
        key_file: Some(net.dir().join("dev-worker-0.key")),
        payments: cocoon_worker::PayoutsConfig {
            ledger: Some(ledger.to_owned()),
            payout_file: net.dir().join("dev-worker-0-payouts.json"),
            claim_interval_secs: 60,
        },
        ..Default::default()
    };
    let path = net.dir().join("worker.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

/// Runs `cocoon ARGS --config CONFIG` as a process of its own (so a test can kill it for
/// real), its log in `log`.
pub fn spawn_cocoon(
    args: &[&str],
    config: &std::path::Path,
    log: PathBuf,
) -> tokio::process::Child {
    let cocoon = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"));
    spawn_command(cocoon, args, config, log)
}

/// Runs `command ARGS --config CONFIG` (a `cocoon` binary, maybe behind a wrapper), its log
/// in `log`, killed when dropped.
pub fn spawn_command(
    mut command: tokio::process::Command,
    args: &[&str],
    config: &std::path::Path,
    log: PathBuf,
) -> tokio::process::Child {
    let log = std::fs::File::create(log).unwrap();
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A proxy of a test's own beside `net`'s: registered and staked on `net`'s ledger, taking
/// workers attested by `net`'s dev attester, committing every second.
pub struct OwnProxy {
    pub key: cocoon_ledger::PublicKey,
    pub addr: String,
    pub book: PathBuf,
    /// Its `proxy.toml`, for [`spawn_cocoon`].
    pub config: PathBuf,
}

pub async fn own_proxy(net: &DevNetwork, name: &str) -> OwnProxy {
    let dir = net.dir();
    let key_file = dir.join(format!("{name}-proxy.key"));
    let key = cocoon_cli::money::key_wallet(&key_file)
        .unwrap()
        .public_key();
    let addr = free_port();
    net.dev_ledger()
        .unwrap()
        .open_proxy(key, &addr)
        .await
        .unwrap();
    let book = dir.join(format!("{name}-book.redb"));
    let config = cocoon_proxy::ProxyConfig {
        listen: addr.clone(),
        key_file: Some(key_file),
        attester: net.dev_attester(),
        worker_policy: net.dev_policy(),
        payments: cocoon_proxy::PaymentsConfig {
            ledger: Some(net.ledger_url().unwrap().to_owned()),
            book: book.clone(),
            commit_interval_secs: 1,
        },
        ..cocoon_proxy::ProxyConfig::default()
    };
    let path = dir.join(format!("{name}-proxy.toml"));
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    OwnProxy {
        key,
        addr,
        book,
        config: path,
    }
}

/// Stops a `cocoon` process with SIGTERM and checks it exits cleanly (a proxy makes its last
/// commit and releases its book).
pub async fn stop_gracefully(child: &mut tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the process stops on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A gateway of a test's own on `net`'s dev attestation, with the key in `key_file`, trying
/// `proxies` in order; serves until `stop`. Its API's base URL.
pub async fn own_gateway(
    net: &DevNetwork,
    proxies: &[String],
    key_file: PathBuf,
    stop: &tokio_util::sync::CancellationToken,
) -> String {
    let gateway = cocoon_client::Gateway::bind(
        &cocoon_client::ClientConfig {
            listen: "127.0.0.1:0".into(),
            proxy_addr: proxies[0].clone(),
            fallback_proxies: proxies[1..].to_vec(),
            key_file: Some(key_file),
            attester: net.dev_attester(),
            proxy_policy: net.dev_policy(),
            ..cocoon_client::ClientConfig::default()
        },
        cocoon_cli::money::LEDGERS,
    )
    .await
    .unwrap();
    let url = format!("http://{}/v1", gateway.local_addr());
    tokio::spawn(gateway.run(stop.clone()));
    url
}

/// The one model test doubles serve, with a context of `context_length`.
pub fn model_card(context_length: u32) -> Vec<cocoon_protocol::ModelCard> {
    vec![cocoon_protocol::ModelCard {
        id: MODEL.into(),
        context_length,
        min_price: 0,
    }]
}
