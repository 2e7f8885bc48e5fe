//! The official `openai` Python package works against the gateway unchanged.
//! Needs `python3 -m pip install openai` (done by .ci/run).

use crate::common::*;

#[tokio::test]
async fn official_openai_python_sdk_works_unchanged() {
    let net = network(vec![llama_with_embeddings()]).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/openai_sdk.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .arg(net.gateway_url())
        .arg(MODEL)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SDK checks failed (is the openai package installed? python3 -m pip install openai)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
