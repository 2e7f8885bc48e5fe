//! The network across hosts: the proxy and three workers each run as their own `cocoon`
//! process in a network namespace of their own, on one LAN (a bridge) with the test, which
//! runs the ledger, the workers' upstream model server and the client gateway. Under a steady
//! load of streamed requests, a worker is killed, a worker's link is cut, a worker's link is
//! slowed, and the proxy is restarted. Every request must end in an answer or a clean error;
//! traffic must move to the healthy workers; the proxy's measured record must see the slow
//! link and survive the proxy's restart; and in the end the client must have been charged exactly
//! what it was billed (for whole answers and for the delivered part of cut-off ones), each
//! unit owed to exactly one worker.
//!
//! Needs root and iproute2 (`ip netns`, `tc`); where namespaces cannot be made it says so and
//! passes without running. The model server is the bench's synthetic one (deterministic
//! tokens at a fixed pace): what is tested is routing and failover, not inference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::netns::Lan;
use crate::common::*;
use cocoon_cli::bench::synthetic::{MODEL as SYNTHETIC, Synthetic};
use cocoon_engine::{UpstreamConfig, UpstreamModel};
use cocoon_proxy::{AdminConfig, Book, LimitsConfig, PaymentsConfig, ProxyConfig, RoutingConfig};
use cocoon_testkit::dev::ledger::key_wallet;
use cocoon_tls::PeerPolicy;
use cocoon_worker::{BackendConfig, PayoutsConfig, PriceConfig, WorkerConfig};
use serde_json::{Value, json};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
/// What each worker asks per token; the network's floor is 20.
const PRICES: [u64; 3] = [20, 25, 30];
const TOKENS: u32 = 8;
/// The model server's pace: an answer takes about TOKENS × this.
const TOKEN_INTERVAL: Duration = Duration::from_millis(25);
const LOOPS: usize = 3;
/// A request still open after this has hung.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

const PHASES: [&str; 6] = ["warm", "kill", "cut", "slow", "restart", "after"];

#[derive(Debug)]
enum Outcome {
    /// A whole answer and its verified bill.
    Done { billed: u64 },
    /// Ended by the proxy with a clean error after some tokens; what it billed for them.
    CutOff { units: u64 },
    /// Ended with a clean error of another kind after it had started (the proxy went away):
    /// may or may not have been billed.
    Broken { message: String },
    /// Refused with a clean OpenAI error.
    Refused(String),
    /// Anything else: a failure of the network.
    Unclean(String),
}

fn classify(status: u16, text: &str) -> Outcome {
    if status != 200 {
        return match serde_json::from_str::<Value>(text) {
            Ok(v) if v["error"]["message"].is_string() => {
                Outcome::Refused(v["error"]["message"].as_str().unwrap().to_owned())
            }
            _ => Outcome::Unclean(format!("{status} without an OpenAI error: {text}")),
        };
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let parsed: Vec<Value> = events
        .iter()
        .filter(|e| **e != "[DONE]")
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let chunks = parsed
        .iter()
        .filter(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    if let Some(error) = parsed.iter().find(|e| e.get("error").is_some()) {
        let message = error["error"]["message"].as_str().unwrap_or("").to_owned();
        if message.contains("nothing was billed") {
            return Outcome::CutOff { units: 0 };
        }
        if let Some(units) = message
            .split("were billed (")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
        {
            return Outcome::CutOff { units };
        }
        return Outcome::Broken { message };
    }
    let usage = parsed
        .iter()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()));
    match usage {
        Some(u) if events.last() == Some(&"[DONE]") => {
            if chunks != TOKENS as usize || u["completion_tokens"] != TOKENS {
                return Outcome::Unclean(format!("{chunks} chunks, usage {u}"));
            }
            if u["bill_verified"] != true {
                return Outcome::Unclean(format!("bill not verified: {u}"));
            }
            Outcome::Done {
                billed: u["billing"]["billed_tokens"].as_u64().unwrap_or(0),
            }
        }
        _ => Outcome::Unclean(format!("a stream with no end: {text}")),
    }
}

#[derive(Default)]
struct Load {
    phase: AtomicUsize,
    paused: AtomicBool,
    /// Requests open now.
    open: AtomicUsize,
    stop: AtomicBool,
    /// Each request's outcome, with the phase it started in and the one it ended in.
    outcomes: Mutex<Vec<(usize, usize, Outcome)>>,
}

impl Load {
    /// Stops new requests and waits until the open ones are done.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        while self.open.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn request_loop(load: Arc<Load>, url: String) {
    let http = reqwest::Client::new();
    let body = json!({
        "model": SYNTHETIC, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": TOKENS, "stream": true, "stream_options": {"include_usage": true},
    });
    while !load.stop.load(Ordering::SeqCst) {
        // Counted open before the pause is checked: a pause either is seen here or waits for
        // this request.
        load.open.fetch_add(1, Ordering::SeqCst);
        if load.paused.load(Ordering::SeqCst) {
            load.open.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let phase = load.phase.load(Ordering::SeqCst);
        let send = async {
            let r = http.post(&url).json(&body).send().await?;
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, r.text().await?))
        };
        let outcome = match tokio::time::timeout(REQUEST_DEADLINE, send).await {
            Err(_) => Outcome::Unclean("hung past the deadline".into()),
            Ok(Err(e)) => Outcome::Unclean(format!("the gateway failed: {e}")),
            Ok(Ok((status, text))) => classify(status, &text),
        };
        if matches!(outcome, Outcome::Refused(_)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ended = load.phase.load(Ordering::SeqCst);
        load.outcomes.lock().unwrap().push((phase, ended, outcome));
        load.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The bearer token of the proxy's operator listener in this test.
const ADMIN_TOKEN: &str = "lan-operator-token";

/// The workers the proxy lists on its operator's listener (`GET /status`; clients see only
/// aggregates), by name; none while the proxy is down.
async fn workers(http: &reqwest::Client, admin: &str) -> HashMap<String, Value> {
    let view: Value = match http
        .get(format!("{admin}/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    };
    view["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| (w["name"].as_str().unwrap_or("").to_owned(), w.clone()))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for(
    http: &reqwest::Client,
    admin: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&HashMap<String, Value>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if f(&workers(http, admin).await) {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn served(view: &HashMap<String, Value>, name: &str) -> u64 {
    view.get(name)
        .and_then(|w| w["served"].as_u64())
        .unwrap_or(0)
}

/// Seconds the proxy expects an answer of TOKENS tokens to take on `name`, from its record.
fn expected_secs(view: &HashMap<String, Value>, name: &str) -> f64 {
    let r = &view[name]["reputation"];
    r["ttft_secs"].as_f64().unwrap() + f64::from(TOKENS) / r["tokens_per_sec"].as_f64().unwrap()
}

/// `cocoon ROLE --config CONFIG` on `host`.
fn spawn(lan: &Lan, host: &str, role: &str, config: &Path, log: PathBuf) -> Child {
    let cocoon = lan.command(host, Path::new(env!("CARGO_BIN_EXE_cocoon")));
    spawn_command(cocoon, &[role], config, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_hosts_kills_cuts_slow_links_and_restarts_end_cleanly_and_charge_once() {
    let hosts = ["proxy", WORKERS[0], WORKERS[1], WORKERS[2]];
    let Some(lan) = Lan::new_or_skip(&hosts) else {
        return;
    };
    let net = network(vec![]).await;
    let dir = net.dir().to_owned();
    let dev = net.dev_ledger().unwrap();
    dev.allow_model(&cocoon_testkit::backends::scripted_model_hash())
        .await
        .unwrap();
    let stop = CancellationToken::new();

    // The ledger and the model server, on the test's own address on the LAN.
    let listener = tokio::net::TcpListener::bind(format!("{}:0", lan.root_addr()))
        .await
        .unwrap();
    let ledger_url = format!("http://{}", listener.local_addr().unwrap());
    let token = stop.clone();
    tokio::spawn(cocoon_ledger::service::serve(
        dev.ledger.clone(),
        listener,
        async move { token.cancelled().await },
    ));
    let model_server = Synthetic::start_on(&format!("{}:0", lan.root_addr()), TOKEN_INTERVAL)
        .await
        .unwrap();

    // The proxy: quick to give up on a silent worker, so that the test is short.
    let proxy_addr = format!("{}:10443", lan.addr("proxy"));
    let proxy_key_file = dir.join("lan-proxy.key");
    let proxy_key = key_wallet(&proxy_key_file).unwrap().public_key();
    dev.open_proxy(proxy_key, &proxy_addr).await.unwrap();
    let book = dir.join("lan-book.redb");
    let proxy_config = dir.join("lan-proxy.toml");
    let admin_token = dir.join("lan-admin.token");
    std::fs::write(&admin_token, format!("{ADMIN_TOKEN}\n")).unwrap();
    // The workers' configurations, written first: the proxy admits exactly these, by the
    // hash of what each measures into RTMR3 (the `cocoon worker` binary measures its config).
    let mut worker_configs = Vec::new();
    let mut config_hashes = Vec::new();
    let mut worker_keys = Vec::new();
    for (i, name) in WORKERS.iter().enumerate() {
        let key_file = dir.join(format!("lan-{name}.key"));
        worker_keys.push(key_wallet(&key_file).unwrap().public_key());
        let config = WorkerConfig {
            name: (*name).into(),
            proxy_addr: proxy_addr.clone(),
            more_proxies: Vec::new(),
            key_file: Some(key_file),
            max_reconnect_secs: 1,
            attester: net.dev_attester(),
            proxy_policy: net.dev_policy(),
            admin: Default::default(),
            // Killed with SIGKILL here; a graceful stop is tested apart.
            drain_secs: 0,
            collateral: Default::default(),
            prices: PriceConfig {
                default: PRICES[i],
                ..PriceConfig::default()
            },
            backends: vec![BackendConfig::Upstream(UpstreamConfig {
                url: model_server.url(),
                ca_file: None,
                api_key: None,
                models: vec![UpstreamModel {
                    id: SYNTHETIC.into(),
                    upstream_id: None,
                    context_length: 4096,
                    model_hash: Some(cocoon_testkit::backends::scripted_model_hash()),
                }],
                parallel: 8,
                timeout_secs: 10,
                idle_timeout_secs: 120,
                cache_salt: true,
            })],
            payments: PayoutsConfig {
                ledger: Some(ledger_url.clone()),
                payout_file: dir.join(format!("lan-{name}-payouts.json")),
                claim_interval_secs: 1,
                // The real path of trust read from the registry: each worker process serves
                // the proxy only while the registry lists the proxy's image.
                proxy_images_from_registry: true,
                registry_refresh_secs: 1,
            },
        };
        config_hashes.push(config.measured().config_hash());
        let path = dir.join(format!("lan-{name}.toml"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        worker_configs.push(path);
    }

    let config = ProxyConfig {
        listen: proxy_addr.clone(),
        key_file: Some(proxy_key_file),
        attester: net.dev_attester(),
        worker_policy: PeerPolicy {
            config_hashes: config_hashes.clone(),
            ..net.dev_policy()
        },
        payments: PaymentsConfig {
            ledger: Some(ledger_url.clone()),
            book: book.clone(),
            commit_interval_secs: 1,
            ..Default::default()
        },
        limits: LimitsConfig {
            worker_timeout_secs: 4,
            ..LimitsConfig::default()
        },
        routing: RoutingConfig {
            first_token_timeout_secs: 2,
            start_deadline_secs: 8,
            health_interval_secs: 1,
            health_timeout_secs: 2,
            evict_after_failed_checks: 2,
            ..RoutingConfig::default()
        },
        // The operator's listener, on the proxy's host address: beyond loopback, so with a
        // token.
        admin: AdminConfig {
            listen: Some(format!("{}:10444", lan.addr("proxy"))),
            token_file: Some(admin_token.clone()),
        },
        ..ProxyConfig::default()
    };
    std::fs::write(&proxy_config, toml::to_string(&config).unwrap()).unwrap();
    // The proxy's image (the dev firmware, its configuration in RTMR3) goes into the
    // registry, which the workers read before serving it.
    let proxy_image = {
        let mut m = cocoon_attest::dev_image();
        m.rtmr[3] = cocoon_attest::replay(&[config.measured()]);
        m.image_hash().to_string()
    };
    let owner = key_wallet(&dir.join("owner.key")).unwrap().public_key();
    dev.exec(
        owner,
        cocoon_ledger::Op::AllowImage {
            role: cocoon_ledger::ImageRole::Proxy,
            hash: proxy_image,
        },
    )
    .await
    .unwrap();
    let admin = format!("http://{}:10444", lan.addr("proxy"));
    let mut proxy = spawn(
        &lan,
        "proxy",
        "proxy",
        &proxy_config,
        dir.join("lan-proxy-1.log"),
    );

    let mut children: Vec<Child> = WORKERS
        .iter()
        .zip(&worker_configs)
        .map(|(name, config)| {
            spawn(
                &lan,
                name,
                "worker",
                config,
                dir.join(format!("lan-{name}-1.log")),
            )
        })
        .collect();

    // The client, in the test's namespace.
    let client_key_file = dir.join("lan-client.key");
    let client = key_wallet(&client_key_file).unwrap().public_key();
    dev.fund_client(client, proxy_key).await.unwrap();
    let gw = own_gateway(
        &net,
        std::slice::from_ref(&proxy_addr),
        client_key_file,
        &stop,
    )
    .await;
    let http = reqwest::Client::new();
    wait_for(
        &http,
        &admin,
        "three workers",
        Duration::from_secs(30),
        |w| w.len() == 3,
    )
    .await;

    let load = Arc::new(Load::default());
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| tokio::spawn(request_loop(load.clone(), format!("{gw}/chat/completions"))))
        .collect();
    let phase = |p: usize| {
        load.phase.store(p, Ordering::SeqCst);
        eprintln!("phase {}", PHASES[p]);
    };

    // Warm: the cheapest worker takes the most.
    phase(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s0 = workers(&http, &admin).await;
    assert!(served(&s0, "w0") > served(&s0, "w2"), "{s0:?}");
    // Each worker process measured its configuration into RTMR3, and the proxy across the
    // LAN admitted it by that hash.
    for (i, name) in WORKERS.iter().enumerate() {
        assert_eq!(
            s0[*name]["config_hash"],
            config_hashes[i].as_str(),
            "{s0:?}"
        );
    }

    // Kill w0: the others take over.
    phase(1);
    children[0].start_kill().unwrap();
    children[0].wait().await.unwrap();
    let gone = wait_for(&http, &admin, "w0 to leave", Duration::from_secs(10), |w| {
        !w.contains_key("w0")
    })
    .await;
    eprintln!("killed worker gone from the proxy after {gone:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s1 = workers(&http, &admin).await;
    let others = |s: &HashMap<String, Value>| served(s, "w1") + served(s, "w2");
    assert!(others(&s1) > others(&s0) + 5, "{s0:?} → {s1:?}");
    children[0] = spawn(
        &lan,
        "w0",
        "worker",
        &worker_configs[0],
        dir.join("lan-w0-2.log"),
    );
    wait_for(
        &http,
        &admin,
        "w0 to rejoin",
        Duration::from_secs(15),
        |w| w.contains_key("w0"),
    )
    .await;

    // Cut w1's link: no reset, no answer; health checks find it and the proxy drops it.
    phase(2);
    lan.cut("w1");
    let evicted = wait_for(
        &http,
        &admin,
        "w1 to be evicted",
        Duration::from_secs(15),
        |w| !w.contains_key("w1"),
    )
    .await;
    eprintln!("cut-off worker evicted after {evicted:?}");
    let s2a = workers(&http, &admin).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s2 = workers(&http, &admin).await;
    assert!(!s2.contains_key("w1"));
    assert!(
        served(&s2, "w0") + served(&s2, "w2") > served(&s2a, "w0") + served(&s2a, "w2"),
        "{s2a:?} → {s2:?}"
    );
    lan.mend("w1");

    // Slow the link of the busiest worker (w0, the cheapest): its record shows it.
    phase(3);
    let s3a = workers(&http, &admin).await;
    let how = lan.slow("w0", 300);
    eprintln!("w0's link slowed: {how}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The records as they stand once the requests in flight are done.
    load.pause().await;
    let s3 = workers(&http, &admin).await;
    lan.unslow("w0");
    let (before, after) = (expected_secs(&s3a, "w0"), expected_secs(&s3, "w0"));
    eprintln!("w0's expected answer time: {before:.3} s before the slow link, {after:.3} s after");
    assert!(after > before * 1.05, "the slow link shows in the record");

    // Restart the proxy: requests while it is down are refused cleanly; the records come back.
    phase(4);
    stop_gracefully(&mut proxy).await;
    load.paused.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.pause().await;
    proxy = spawn(
        &lan,
        "proxy",
        "proxy",
        &proxy_config,
        dir.join("lan-proxy-2.log"),
    );
    wait_for(
        &http,
        &admin,
        "w0 and w2 to rejoin",
        Duration::from_secs(20),
        |w| w.contains_key("w0") && w.contains_key("w2"),
    )
    .await;
    // Nothing was served since the records were read: the new proxy has them from disk.
    let s4 = workers(&http, &admin).await;
    for (name, w) in &s4 {
        assert_eq!(w["served"], 0, "a fresh proxy: {s4:?}");
        let Some(then) = s3.get(name) else { continue };
        let (then, now) = (&then["reputation"], &w["reputation"]);
        let samples = |r: &Value| r["samples"].as_f64().unwrap();
        // A missed health check or two around the restart may count.
        assert!(
            samples(now) > 0.99 * samples(then) && samples(now) <= samples(then) + 6.0,
            "{name}'s record survived the restart: {then} then, {now} now"
        );
    }
    let remembered = expected_secs(&s4, "w0");
    assert!(
        (remembered - after).abs() < 0.01 * after,
        "the slow link is remembered: {after:.3} s then, {remembered:.3} s now"
    );

    // And serving goes on.
    phase(5);
    load.paused.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.stop.store(true, Ordering::SeqCst);
    for l in loops {
        l.await.unwrap();
    }
    stop_gracefully(&mut proxy).await;

    let outcomes = std::mem::take(&mut *load.outcomes.lock().unwrap());
    // A request counts for the phase it ran in from start to end; one that spans a change of
    // phase counts for the later one (the fault that met it).
    let mut per_phase = vec![HashMap::<&str, usize>::new(); PHASES.len()];
    for (_, ended, o) in &outcomes {
        let kind = match o {
            Outcome::Done { .. } => "done",
            Outcome::CutOff { .. } => "cut-off",
            Outcome::Broken { .. } => "broken",
            Outcome::Refused(_) => "refused",
            Outcome::Unclean(_) => "unclean",
        };
        *per_phase[*ended].entry(kind).or_default() += 1;
    }
    for (p, counts) in per_phase.iter().enumerate() {
        eprintln!("{}: {counts:?}", PHASES[p]);
    }
    for (started, ended, o) in &outcomes {
        match o {
            Outcome::Broken { message } | Outcome::Refused(message) if *ended != 4 => {
                eprintln!("{} → {}: {message}", PHASES[*started], PHASES[*ended])
            }
            _ => {}
        }
    }
    let unclean: Vec<&String> = outcomes
        .iter()
        .filter_map(|(_, _, o)| match o {
            Outcome::Unclean(why) => Some(why),
            _ => None,
        })
        .collect();
    assert!(
        unclean.is_empty(),
        "requests that did not end cleanly: {unclean:?}"
    );
    for p in [0, 1, 2, 3, 5] {
        let counts = &per_phase[p];
        assert!(
            counts.get("done").copied().unwrap_or(0) > 5,
            "{}: {counts:?}",
            PHASES[p]
        );
        // With two workers or more up, nothing is refused; only the proxy's downtime is.
        assert_eq!(counts.get("refused"), None, "{}: {counts:?}", PHASES[p]);
    }

    // Money: charged exactly what was billed, owed once.
    let book = Book::open(&book, proxy_key).unwrap();
    let charged = book.client(&client).charged;
    let billed: u64 = outcomes
        .iter()
        .map(|(_, _, o)| match o {
            Outcome::Done { billed } => *billed,
            Outcome::CutOff { units, .. } => *units,
            _ => 0,
        })
        .sum();
    let largest = outcomes
        .iter()
        .filter_map(|(_, _, o)| match o {
            Outcome::Done { billed } => Some(*billed),
            _ => None,
        })
        .max()
        .unwrap();
    let broken = outcomes
        .iter()
        .filter(|(_, _, o)| matches!(o, Outcome::Broken { .. }))
        .count() as u64;
    assert!(
        billed <= charged && charged <= billed + broken * largest,
        "charged {charged}, billed {billed}, {broken} answers broken off by the restart"
    );
    let owed: u64 = worker_keys.iter().map(|k| book.worker(k).owed).sum();
    assert_eq!(
        owed, charged,
        "every unit charged is owed to one worker, once"
    );
    for child in &mut children {
        let _ = child.start_kill();
    }
    stop.cancel();
}
