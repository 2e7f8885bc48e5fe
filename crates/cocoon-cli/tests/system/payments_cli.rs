//! The money commands, run as the `cocoon` binary against a dev network's ledger service:
//! a client's whole contract life, and the refusals it can run into.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use cocoon_testkit::dev::DevNetwork;
use serde_json::Value;

struct Run {
    ok: bool,
    json: Value,
    stdout: String,
    stderr: String,
}

async fn cocoon(args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    Run {
        ok: out.status.success(),
        json: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `cocoon client ACTION [AMOUNT]` for the client with `key_file`.
async fn client(net: &DevNetwork, key_file: &Path, action: &[&str]) -> Run {
    let proxy = hex::encode(net.proxy_key().unwrap());
    let mut args = vec!["client"];
    args.extend_from_slice(action);
    args.extend_from_slice(&[
        "--ledger",
        net.ledger_url().unwrap(),
        "--key-file",
        key_file.to_str().unwrap(),
        "--proxy-key",
        &proxy,
    ]);
    cocoon(&args).await
}

#[tokio::test]
async fn a_clients_contract_from_deposit_to_close() {
    let net = network(vec![]).await;
    let key = net.dir().join("cli-client.key");
    // The key file is the gateway's; the commands only read it.
    cocoon_testkit::dev::ledger::key_wallet(&key).unwrap();

    let r = client(&net, &key, &["balance"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["exists"], false);

    let r = client(&net, &key, &["deposit", "5"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["balance_ton"], "5.000000000");
    assert_eq!(r.json["deposited_ton"], "5.000000000");
    let r = client(&net, &key, &["stake", "2"]).await;
    assert_eq!(r.json["stake_ton"], "2.000000000", "{}", r.stderr);

    // Not below the stake.
    let r = client(&net, &key, &["withdraw", "4"]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("below the stake"), "{}", r.stderr);
    let r = client(&net, &key, &["withdraw", "1.5"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["balance_ton"], "3.500000000");
    assert_eq!(r.json["paid_out_ton"], "1.500000000");

    // Closing without the proxy: what is above the stake now, the stake after the delay.
    let r = client(&net, &key, &["close", "--unilateral"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["paid_out_ton"], "1.500000000");
    assert_eq!(r.json["balance_ton"], "2.000000000");
    assert_eq!(r.json["state"]["state"], "closing");
    let r = client(&net, &key, &["close", "--unilateral"]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("already closing"), "{}", r.stderr);
    let r = client(&net, &key, &["close", "--finish"]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("unlocks at"), "{}", r.stderr);

    // Malformed amounts never reach the ledger.
    let r = client(&net, &key, &["deposit", "1.0000000001"]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("nine decimals"), "{}", r.stderr);

    // With a config file, the proxy is found in the registry by its address.
    let config = net.write_client_config().unwrap();
    let r = cocoon(&["client", "balance", "-c", config.to_str().unwrap()]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["balance_ton"], "100.000000000");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text
        .lines()
        .filter(|l| !l.starts_with("proxy_key"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, text).unwrap();
    let r = cocoon(&["client", "balance", "-c", config.to_str().unwrap()]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["balance_ton"], "100.000000000");
}

#[tokio::test]
async fn a_cooperative_close_refunds_everything_at_once() {
    let net = network(vec![llama()]).await;
    // Spend a little first, so the refund is what is left after the last charge.
    let http = reqwest::Client::new();
    let answer = post_json(
        &http,
        format!("{}/chat/completions", net.gateway_url()),
        &chat_body("Hi", serde_json::json!({"max_tokens": 3})),
    )
    .await;
    let cost = answer["usage"]["cost"].as_u64().unwrap();
    let config = net.write_client_config().unwrap();
    let config = config.to_str().unwrap();

    let r = cocoon(&["client", "close", "-c", config]).await;
    assert!(r.ok, "{}", r.stderr);
    let left = cocoon_testkit::dev::ledger::CLIENT_DEPOSIT - u128::from(cost);
    assert_eq!(r.json["refunded_ton"], cocoon_cli::money::format_ton(left));
    assert_eq!(r.json["balance_ton"], "0.000000000");
    assert_eq!(r.json["state"]["state"], "closed");
    // The charge was committed before the refund: nothing owed is lost.
    assert_eq!(
        r.json["tokens_used"],
        answer["usage"]["billing"]["tokens_used"]
    );
    // Closed is final: no second close, and no more answers on this contract.
    let r = cocoon(&["client", "close", "-c", config]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("already closing or closed"),
        "{}",
        r.stderr
    );
    assert_eq!(short_chat_status(&net).await, 402);
}

#[tokio::test]
async fn ledger_commands_read_and_refuse() {
    let net = network(vec![]).await;
    let url = net.ledger_url().unwrap();
    let r = cocoon(&["ledger", "show", "--ledger", url]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json["registry"]["params"]["price_per_token"], 20);
    assert_eq!(r.json["registry"]["proxies"].as_object().unwrap().len(), 1);

    // Only the owner changes the registry.
    let stranger = net.dir().join("stranger.key");
    cocoon_testkit::dev::ledger::key_wallet(&stranger).unwrap();
    let owner = net.dir().join("owner.key");
    let exec = |key: &Path, op: &str| {
        let (key, op) = (key.to_str().unwrap().to_owned(), op.to_owned());
        async move { cocoon(&["ledger", "exec", "--ledger", url, "--key-file", &key, &op]).await }
    };
    let op = format!(r#"{{"allow_model":{{"hash":"{}"}}}}"#, "ab".repeat(32));
    let r = exec(&stranger, &op).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("only the registry owner"), "{}", r.stderr);
    let r = exec(&owner, &op).await;
    assert!(r.ok, "{}", r.stderr);
    let r = exec(&owner, "{\"nope\":1}").await;
    assert!(!r.ok);
    assert!(r.stderr.contains("bad operation"), "{}", r.stderr);
}

fn spawn(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The operator's path of docs/ledger.md, process by process: a proxy with payments refuses to
/// start until it is registered and staked, then serves; a client funds its contract and finds
/// the proxy by address.
#[tokio::test]
async fn role_by_role_setup_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let ledger_addr = free_port();
    let url = format!("http://{ledger_addr}");
    let _ledger = spawn(&[
        "ledger",
        "serve",
        "--db",
        &path("ledger.redb"),
        "--owner-key",
        &path("owner.key"),
        "--listen",
        &ledger_addr,
    ]);
    wait_listening(&ledger_addr).await;
    let r = cocoon(&["ledger", "key", &path("proxy.key")]).await;
    assert!(r.ok, "{}", r.stderr);
    let proxy_key = r.stdout.trim().to_owned();
    assert_eq!(proxy_key.len(), 64, "{proxy_key}");

    let proxy_addr = free_port();
    let proxy_config = cocoon_proxy::ProxyConfig {
        listen: proxy_addr.clone(),
        key_file: Some(path("proxy.key").into()),
        payments: cocoon_proxy::PaymentsConfig {
            ledger: Some(url.clone()),
            book: path("proxy-book.redb").into(),
            commit_interval_secs: 1,
            ..Default::default()
        },
        // No worker joins in this test; a real proxy pins its workers or requires attestation.
        worker_policy: cocoon_tls::PeerPolicy {
            insecure_accept_any_peer: true,
            ..Default::default()
        },
        ..Default::default()
    };
    std::fs::write(path("proxy.toml"), toml::to_string(&proxy_config).unwrap()).unwrap();
    // Not registered yet: the proxy says so and does not start.
    let out = spawn(&["proxy", "-c", &path("proxy.toml")])
        .wait_with_output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no contract on the ledger"), "{stderr}");

    let exec = |key: String, op: String| {
        let url = url.clone();
        async move { cocoon(&["ledger", "exec", "--ledger", &url, "--key-file", &key, &op]).await }
    };
    let register =
        format!(r#"{{"register_proxy":{{"key":"{proxy_key}","address":"{proxy_addr}"}}}}"#);
    let r = exec(path("owner.key"), register).await;
    assert!(r.ok, "{}", r.stderr);
    let r = exec(
        path("proxy.key"),
        r#"{"proxy_open":{"stake":10000000000}}"#.into(),
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let _proxy = spawn(&["proxy", "-c", &path("proxy.toml")]);
    wait_listening(&proxy_addr).await;

    let client_config = cocoon_client::ClientConfig {
        proxy_addr: proxy_addr.clone(),
        key_file: Some(path("client.key").into()),
        payments: cocoon_client::ClientPayments {
            ledger: Some(url.clone()),
            proxy_key: None,
            bill_file: path("client-bills.json").into(),
            ..Default::default()
        },
        proxy_policy: cocoon_tls::PeerPolicy {
            insecure_accept_any_peer: true,
            ..Default::default()
        },
        ..Default::default()
    };
    std::fs::write(
        path("client.toml"),
        toml::to_string(&client_config).unwrap(),
    )
    .unwrap();
    cocoon_cli::money::key_wallet(std::path::Path::new(&path("client.key"))).unwrap();
    for action in [&["deposit", "5"][..], &["stake", "1"], &["balance"]] {
        let mut args = vec!["client"];
        args.extend_from_slice(action);
        let config = path("client.toml");
        args.extend_from_slice(&["-c", &config]);
        let r = cocoon(&args).await;
        assert!(r.ok, "{action:?}: {}", r.stderr);
        if action == ["balance"] {
            assert_eq!(r.json["balance_ton"], "5.000000000");
            assert_eq!(r.json["stake_ton"], "1.000000000");
            assert_eq!(r.json["proxy"], proxy_key);
        }
    }
}

/// A gateway is a wallet with an HTTP port: one listening beyond loopback without API keys
/// says so loudly at start (anyone who reaches it spends the client's balance); one on
/// loopback, or with keys, does not.
#[tokio::test]
async fn a_gateway_open_beyond_loopback_without_keys_warns_loudly() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    const WARNING: &str = "BEYOND LOOPBACK WITHOUT API KEYS";
    let keys = "[[access.keys]]\nkey = \"sk-operator-test\"\n";
    for (listen, extra, warns) in [
        ("0.0.0.0:0", "", true),
        ("127.0.0.1:0", "", false),
        ("0.0.0.0:0", keys, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("client.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\nproxy_addr = \"127.0.0.1:1\"\n{extra}\n\
                 [proxy_policy]\ninsecure_accept_any_peer = true\n"
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"))
            .args(["client", "serve", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The banner on stdout comes once the gateway is bound, after its start-up checks.
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let banner = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
            .await
            .expect("the gateway started")
            .unwrap()
            .unwrap_or_default();
        assert!(banner.contains("OpenAI-compatible API"), "{banner}");
        child.kill().await.unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        assert_eq!(
            stderr.contains(WARNING),
            warns,
            "listen {listen} {extra:?}: {stderr}"
        );
    }
}

/// `client.toml` of `net`'s gateway with `[payments] proxy_images_from_registry` on; with
/// `registry_only`, its `[proxy_policy]` lists no image of its own, as the docs now allow.
fn review_registry_client_config(net: &DevNetwork, registry_only: bool) -> std::path::PathBuf {
    let path = net.write_client_config().unwrap();
    let mut config: cocoon_client::ClientConfig =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.payments.proxy_images_from_registry = true;
    config.payments.registry_refresh_secs = 1;
    if registry_only {
        config.proxy_policy.registers.clear();
        config.proxy_policy.image_hashes.clear();
    }
    std::fs::write(&path, toml::to_string_pretty(&config).unwrap()).unwrap();
    path
}

/// REVIEW, fixed: `cocoon client close` (money.rs `close_through_proxy`) builds its own `ProxyLink`
/// with no ledger (`ProxyLink::new`, never `with_registry`), so with `[payments]
/// proxy_images_from_registry` on it still connects to, authenticates to and sends a request
/// (close the contract, commit the last charge, refund) to a proxy whose image the registry
/// does not list or has revoked: the one path of the client's config that reaches a proxy
/// without the registry check. Here the proxy's image was never listed; the gateway with this
/// very config refuses it, the close goes through.
#[tokio::test]
async fn review_a_cooperative_close_goes_only_to_a_proxy_whose_image_the_registry_lists() {
    let net = network(vec![]).await;
    let config = review_registry_client_config(&net, false);
    let config = config.to_str().unwrap();
    let r = cocoon(&["client", "close", "-c", config]).await;
    assert!(
        !r.ok,
        "the close reached a proxy whose image the registry does not list: {}",
        r.stdout
    );
    assert!(
        r.stderr
            .contains("is not among the registry's proxy images"),
        "{}",
        r.stderr
    );
    // Nothing was refunded: the contract is as it was.
    let r = cocoon(&["client", "balance", "-c", config]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        r.json["balance_ton"],
        cocoon_cli::money::format_ton(cocoon_testkit::dev::ledger::CLIENT_DEPOSIT)
    );
}

/// REVIEW, fixed: with `proxy_images_from_registry` the docs now say `[proxy_policy]` may list no
/// image, and the gateway accepts such a config; `close_through_proxy` builds the same policy
/// without setting `images_from_registry`, so `cocoon client close` on that config fails
/// with a config error ("neither image_hashes nor registers are given") instead of asking
/// the registry. The cooperative close is unusable with the configuration the change
/// recommends; the fix is the gateway's: the flag on the policy and the ledger on the link.
#[tokio::test]
async fn review_a_cooperative_close_works_with_a_registry_only_proxy_policy() {
    let net = network(vec![]).await;
    let config = review_registry_client_config(&net, true);
    let r = cocoon(&["client", "close", "-c", config.to_str().unwrap()]).await;
    assert!(
        !r.stderr.contains("neither image_hashes nor registers"),
        "the policy the gateway accepts is refused by `cocoon client close`: {}",
        r.stderr
    );
    // The proxy's image is not listed: the registry, not the config, refuses it.
    assert!(!r.ok, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("is not among the registry's proxy images"),
        "{}",
        r.stderr
    );
}
