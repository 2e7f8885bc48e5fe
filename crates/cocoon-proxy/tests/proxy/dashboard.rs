//! The operator's dashboard in a real headless browser (Chromium, from Debian's packages): each
//! role's page, loaded from a running network, shows the figures its `/status` and `/metrics`
//! give, and a screenshot of it is kept (under docs/ when `COCOON_DASHBOARD_SCREENSHOTS`
//! names that folder).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::admin::{admin_get, admin_network, answered, sample};

/// The headless browser: Debian's `chromium-headless-shell` (what scripts/setup.sh installs),
/// or a full Chromium.
fn browser() -> PathBuf {
    ["chromium-headless-shell", "chromium", "chromium-browser"]
        .iter()
        .find_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .expect("no Chromium on the PATH: scripts/setup.sh installs chromium-headless-shell")
}

/// Runs the browser on `url` with `args`, giving the page's scripts `secs` of virtual time
/// (which passes as fast as the page lets it): the dashboard draws at once and again every
/// 2 s, so rates are drawn too.
fn chromium(url: &str, secs: u32, args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(browser())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--virtual-time-budget={}", secs * 1000),
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium failed: {out:?}");
    out
}

/// The page at `url` after its scripts ran: each `data-figure` shown, by name.
fn figures_shown(url: &str) -> HashMap<String, String> {
    let dom = String::from_utf8(chromium(url, 5, &["--dump-dom"]).stdout).unwrap();
    assert!(
        dom.contains("data-loaded=\"yes\""),
        "the page never drew its figures: {dom}"
    );
    let mut figures = HashMap::new();
    let mut rest = dom.as_str();
    while let Some(at) = rest.find("data-figure=\"") {
        rest = &rest[at + "data-figure=\"".len()..];
        let (name, after) = rest.split_once('"').unwrap();
        let value = after[after.find('>').unwrap() + 1..]
            .split('<')
            .next()
            .unwrap();
        figures.insert(name.to_owned(), value.replace(',', ""));
        rest = after;
    }
    figures
}

/// A screenshot of the page at `url` after 20 s of drawing, kept as `name` (a PNG) in `dir`.
fn screenshot(url: &str, dir: &Path, name: &str) {
    let path = dir.join(name);
    chromium(
        url,
        20,
        &[
            "--window-size=1280,860",
            "--hide-scrollbars",
            &format!("--screenshot={}", path.display()),
        ],
    );
    let png = std::fs::read(&path).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{name}: no real picture"
    );
}

async fn status(addr: SocketAddr) -> Value {
    serde_json::from_str(&admin_get(addr, "/status").await.1).unwrap()
}

fn shown<'a>(figures: &'a HashMap<String, String>, name: &str) -> &'a str {
    figures
        .get(name)
        .unwrap_or_else(|| panic!("the page shows no {name}: {figures:?}"))
}

/// Every role's dashboard, in a real browser, shows what its status and metrics say: the
/// proxy its workers, requests served, billing and commission; the worker its requests and
/// what the proxy owes it; the gateway its proxies, answers and the bills it verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_roles_dashboard_shows_its_figures_in_a_browser() {
    use cocoon_testkit::backends::{MODEL, Scripted};
    let net = admin_network(Scripted::new(2048)).await;
    let (proxy, gateway, worker) = (
        net.proxy_admin().unwrap(),
        net.gateway_admin().unwrap(),
        net.worker_admin(0).unwrap(),
    );
    answered(&net, "hello", 3).await;
    // The worker keeps each payout as it comes after its answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let owed = loop {
        let owed: u64 = status(worker).await["payouts"]
            .as_array()
            .map(|p| p.iter().map(|e| e["owed_tokens"].as_u64().unwrap()).sum())
            .unwrap_or(0);
        if owed > 0 {
            break owed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no payout reached the worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let page = |addr: SocketAddr| format!("http://{addr}/");
    // The browser runs beside the network, which answers its page's requests.
    let in_browser = |addr: SocketAddr| async move {
        tokio::task::spawn_blocking(move || figures_shown(&format!("http://{addr}/")))
            .await
            .unwrap()
    };
    let proxy_status = status(proxy).await;
    let payments = &proxy_status["payments"];
    let billed = payments["billed_nanoton"].as_u64().unwrap();
    let commission = payments["commission_nanoton"].as_u64().unwrap();
    assert!(
        billed > 0 && commission > 0 && commission < billed,
        "{payments}"
    );
    let shown_proxy = in_browser(proxy).await;
    assert_eq!(shown(&shown_proxy, "workers"), "1");
    assert_eq!(shown(&shown_proxy, "healthy_workers"), "1");
    assert_eq!(shown(&shown_proxy, "served"), "3");
    let name = proxy_status["workers"][0]["name"].as_str().unwrap();
    assert_eq!(shown(&shown_proxy, &format!("served-{name}")), "3");
    assert_eq!(shown(&shown_proxy, "billed_nanoton"), billed.to_string());
    assert_eq!(
        shown(&shown_proxy, "commission_nanoton"),
        commission.to_string()
    );
    let (_, metrics) = admin_get(proxy, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "cocoon_proxy_commission_nanoton_total",
            &[("model", MODEL)]
        ),
        commission as f64,
        "{metrics}"
    );
    assert!(shown_proxy.contains_key("chart-requests") && shown_proxy.contains_key("chart-ttft"));

    let shown_worker = in_browser(worker).await;
    assert_eq!(shown(&shown_worker, "connected"), "yes");
    assert_eq!(shown(&shown_worker, "served"), "3");
    assert_eq!(shown(&shown_worker, "owed_tokens"), owed.to_string());
    let (_, metrics) = admin_get(worker, "/metrics").await;
    assert_eq!(
        sample(&metrics, "cocoon_worker_owed_tokens", &[]),
        owed as f64,
        "{metrics}"
    );

    let shown_gateway = in_browser(gateway).await;
    let gateway_status = status(gateway).await;
    assert_eq!(gateway_status["bills"]["verified"], 3, "{gateway_status}");
    assert_eq!(shown(&shown_gateway, "proxies_up"), "1");
    assert_eq!(shown(&shown_gateway, "answered"), "3");
    assert_eq!(shown(&shown_gateway, "bills_verified"), "3");
    assert_eq!(shown(&shown_gateway, "bills_bad"), "0");
    // What the gateway paid is what the proxy billed.
    assert_eq!(shown(&shown_gateway, "spent_nanoton"), billed.to_string());
    let addr = gateway_status["proxies"][0]["addr"].as_str().unwrap();
    assert_eq!(shown(&shown_gateway, &format!("answers-{addr}")), "3");

    // Pictured under load, so that the charts have something to draw.
    let load = {
        let url = format!("{}/chat/completions", net.gateway_url());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let body =
                    cocoon_testkit::http::chat_body("hello", serde_json::json!({"max_tokens": 4}));
                let _ = http.post(&url).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let kept = std::env::var_os("COCOON_DASHBOARD_SCREENSHOTS").map(PathBuf::from);
    let scratch = tempfile::tempdir().unwrap();
    let dir = kept.unwrap_or_else(|| scratch.path().to_owned());
    for (role, addr) in [("proxy", proxy), ("worker", worker), ("gateway", gateway)] {
        let (url, dir) = (page(addr), dir.clone());
        tokio::task::spawn_blocking(move || {
            screenshot(&url, &dir, &format!("dashboard-{role}.png"))
        })
        .await
        .unwrap();
    }
    load.abort();
}

/// The proxy's commit lag (how long the oldest charge not yet on the ledger has waited) grows
/// while charges wait, and is 0 again once a commit round leaves none behind; `/metrics`
/// shows the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_lag_grows_while_charges_wait_and_clears_once_committed() {
    use cocoon_testkit::backends::Scripted;
    let lag = |status: &Value| {
        let p = &status["payments"];
        (
            p["uncommitted_tokens"].as_u64().unwrap(),
            p["commit_lag_secs"].as_u64().unwrap(),
        )
    };
    for commit_every in [3600, 1] {
        let net = cocoon_testkit::dev::DevNetwork::start(
            cocoon_testkit::dev::DevOptions {
                admin: true,
                commit_interval_secs: commit_every,
                ..cocoon_testkit::dev::test_options()
            },
            vec![Scripted::new(2048) as std::sync::Arc<dyn cocoon_engine::Backend>],
        )
        .await
        .unwrap();
        net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
        let proxy = net.proxy_admin().unwrap();
        assert_eq!(lag(&status(proxy).await), (0, 0));
        answered(&net, "hello", 1).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (uncommitted, secs) = lag(&status(proxy).await);
            let (_, metrics) = admin_get(proxy, "/metrics").await;
            let shown = sample(
                &metrics,
                "cocoon_proxy_ledger",
                &[("figure", "commit_lag_seconds")],
            );
            let done = match commit_every {
                // Never committed while the test runs: the charge waits, and the lag says so.
                3600 => uncommitted > 0 && secs >= 2 && shown >= 2.0,
                // Committed within a second or two: nothing waits any more.
                _ => uncommitted == 0 && secs == 0 && shown == 0.0,
            };
            if done {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "commit every {commit_every} s: {uncommitted} tokens uncommitted, lag {secs} s, shown {shown}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// REVIEW, fixed: the page takes a token from its address (`/#token=…`, kept in the tab's session
/// storage) and then calls `history.replaceState` to take it out of the address, but the
/// script declares its own `const history = {}` (the charts' points) further down: in the
/// script's first lines that name is the constant, not yet initialised, so the call throws a
/// `ReferenceError` and the whole script stops. A dashboard opened with its token in the
/// address (the way the page offers to pass it) never draws a figure, and the bearer token
/// stays in the address bar and in the browser's history, where replaceState was meant to
/// remove it from. (Checked in Chromium: without the fragment the page runs; with it, it stays
/// at "loading…".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_token_in_the_pages_address_stops_the_dashboard() {
    use cocoon_testkit::backends::Scripted;
    let net = admin_network(Scripted::new(2048)).await;
    let proxy = net.proxy_admin().unwrap();
    // This listener has no token, so any token passes: the page must draw as it does without.
    let figures = tokio::task::spawn_blocking(move || {
        figures_shown(&format!("http://{proxy}/#token=the-operators-token"))
    })
    .await
    .unwrap();
    assert_eq!(shown(&figures, "workers"), "1");
}
