//! The OpenAI API through the whole network with llama.cpp's own server (`llama-server
//! --jinja`) as the worker's upstream: JSON mode and schemas, log-probabilities, `n` and
//! penalties reach a real server and come back, checked by the official `openai` SDK
//! (tests/openai_sdk_upstream.py), and so does a tool-call round trip. For tools the server
//! renders chats with tests/chatml-tools.jinja, ChatML with Hermes-style `<tool_call>`s:
//! llama-server offers a model no tools when its template has no place for them, and
//! SmolLM2's has none.
//!
//! Ignored by default: llama-server takes minutes to build, which CI does not spend. Run it
//! with `scripts/build-llama-server.sh`, then
//! `cargo nextest run -p cocoon-cli --run-ignored only -E 'test(llama_server)'`.

use std::process::Stdio;
use std::sync::Arc;

use crate::common::*;
use cocoon_engine::{Backend, UpstreamBackend, UpstreamConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs llama-server: run scripts/build-llama-server.sh first"]
async fn the_api_passes_through_to_llama_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = root.join("target/llama-server/bin/llama-server");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/build-llama-server.sh",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new(&bin)
        .args(["-m", &model_path().display().to_string()])
        .args([
            "--jinja",
            "--chat-template-file",
            &root.join("tests/chatml-tools.jinja").display().to_string(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["-c", "8192", "-np", "4", "-t", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("llama-server starts");
    let http = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{port}/health");
    cocoon_testkit::http::wait_until_async("llama-server to load its model", || {
        let (http, health) = (http.clone(), health.clone());
        async move {
            http.get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    let hash = cocoon_engine::model_file_hash(&model_path()).unwrap();
    let relay: Arc<dyn Backend> = Arc::new(
        UpstreamBackend::new(UpstreamConfig {
            url: format!("http://127.0.0.1:{port}/v1"),
            ca_file: None,
            api_key: None,
            models: vec![
                serde_json::from_value(
                    json!({"id": MODEL, "model_hash": hash, "context_length": 2048}),
                )
                .unwrap(),
            ],
            parallel: 4,
            timeout_secs: 60,
            idle_timeout_secs: 60,
            cache_salt: false,
        })
        .unwrap(),
    );
    let net = network(vec![relay]).await;
    let output = tokio::process::Command::new("python3")
        .arg(root.join("tests/openai_sdk_upstream.py"))
        .arg(net.gateway_url())
        .arg(MODEL)
        .output()
        .await
        .expect("python3 runs");
    let _ = server.kill().await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("all checks passed"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
}
