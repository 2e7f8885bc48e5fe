#![allow(dead_code)]

pub(crate) mod netns;

pub(crate) use cocoon_testkit::backends::MODEL;
pub(crate) use cocoon_testkit::dev::{network, test_options};
pub(crate) use cocoon_testkit::http::*;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_engine::LlamaConfig;
use cocoon_llama::LlamaBackend;
use cocoon_testkit::dev::DevNetwork;
use serde_json::{Value, json};

/// The dev ledger's owner allows the real model's weights, which the worker processes a test
/// spawns serve (the proxy admits only models the registry allows).
pub(crate) async fn allow_the_model(dev: &cocoon_testkit::dev::ledger::DevLedger) {
    let hash = cocoon_engine::model_file_hash(&model_path()).unwrap();
    dev.allow_model(&hash).await.unwrap();
}

pub(crate) fn model_path() -> PathBuf {
    std::env::var_os("COCOON_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

pub(crate) fn llama() -> Arc<LlamaBackend> {
    Arc::new(
        LlamaBackend::load(&LlamaConfig {
            model_path: model_path(),
            threads: 2,
            ..Default::default()
        })
        .expect("model loads; run scripts/fetch-model.sh first"),
    )
}

/// The real model, serving `/v1/embeddings` too.
pub(crate) fn llama_with_embeddings() -> Arc<LlamaBackend> {
    Arc::new(
        LlamaBackend::load(&LlamaConfig {
            model_path: model_path(),
            threads: 2,
            embeddings: true,
            ..Default::default()
        })
        .expect("model loads; run scripts/fetch-model.sh first"),
    )
}

/// Status of a short chat request ("Hi", 2 tokens) through `net`'s gateway.
pub(crate) async fn short_chat_status(net: &DevNetwork) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("Hi", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Runs `cocoon ARGS` to completion and parses its JSON report; the command must succeed.
pub(crate) async fn cocoon_report(args: &[&str]) -> Value {
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
pub(crate) fn dev_worker_config(net: &DevNetwork, ledger: &str) -> PathBuf {
    let config = cocoon_worker::WorkerConfig {
        key_file: Some(net.dir().join("dev-worker-0.key")),
        payments: cocoon_worker::PayoutsConfig {
            ledger: Some(ledger.to_owned()),
            payout_file: net.dir().join("dev-worker-0-payouts.json"),
            claim_interval_secs: 60,
            ..Default::default()
        },
        ..Default::default()
    };
    let path = net.dir().join("worker.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

/// Runs `cocoon ARGS --config CONFIG` as a process of its own (so a test can kill it for
/// real), its log in `log`.
pub(crate) fn spawn_cocoon(
    args: &[&str],
    config: &std::path::Path,
    log: PathBuf,
) -> tokio::process::Child {
    let cocoon = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"));
    spawn_command(cocoon, args, config, log)
}

/// Runs `command ARGS --config CONFIG` (a `cocoon` binary, maybe behind a wrapper), its log
/// in `log`, killed when dropped.
pub(crate) fn spawn_command(
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
pub(crate) struct OwnProxy {
    pub key: cocoon_ledger::PublicKey,
    pub addr: String,
    pub book: PathBuf,
    /// Its `proxy.toml`, for [`spawn_cocoon`].
    pub config: PathBuf,
}

pub(crate) async fn own_proxy(net: &DevNetwork, name: &str) -> OwnProxy {
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
            ..Default::default()
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
pub(crate) async fn stop_gracefully(child: &mut tokio::process::Child) {
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

/// A gateway of a test's own on `net`'s dev attestation (see [`DevNetwork::own_gateway`]).
pub(crate) async fn own_gateway(
    net: &DevNetwork,
    proxies: &[String],
    key_file: PathBuf,
    stop: &tokio_util::sync::CancellationToken,
) -> String {
    net.own_gateway(proxies, key_file, stop).await.unwrap()
}

/// The weighted tokens of an answer's `usage` on the dev network: prompt tokens the worker's
/// prompt cache served weigh the network's cached multiplier, the others ×1.
pub(crate) fn dev_weighted(usage: &Value) -> u64 {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let (prompt, completion) = (n(&usage["prompt_tokens"]), n(&usage["completion_tokens"]));
    let cached = n(&usage["prompt_tokens_details"]["cached_tokens"]);
    let reasoning = n(&usage["completion_tokens_details"]["reasoning_tokens"]);
    cocoon_testkit::dev::ledger::dev_params()
        .weighted_answer(prompt - cached, cached, completion - reasoning, reasoning)
        .unwrap()
}
