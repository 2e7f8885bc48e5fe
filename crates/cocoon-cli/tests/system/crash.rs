//! kill -9 of a proxy process under load, three times: after each restart on the same record,
//! no acknowledged charge is lost, none is counted twice, and the ledger ends exactly at the
//! proxy's record.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use cocoon_ledger::{Address, Ledger};
use cocoon_proxy::Book;
use cocoon_testkit::dev::ledger::{CLIENT_DEPOSIT, dev_params, key_wallet};
use cocoon_worker::{PayoutStore, Worker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Concurrent request loops: at most this many answers are in flight at the kill.
const LOOPS: usize = 3;
/// How many times the proxy is killed.
const KILLS: u64 = 3;

/// Acknowledged answers' billed tokens, in order.
type Acked = Arc<Mutex<Vec<u64>>>;

fn load(gateway: String, acked: Acked, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let url = format!("{gateway}/chat/completions");
        while !stop.load(Ordering::SeqCst) {
            let body = chat_body(
                "Count to three.",
                json!({"max_tokens": 4, "temperature": 0}),
            );
            let answer = match http.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                _ => None,
            };
            match answer.and_then(|a| a["usage"]["billing"]["billed_tokens"].as_u64()) {
                Some(billed) => acked.lock().unwrap().push(billed),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
}

async fn wait_acked(acked: &Acked, at_least: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} answers acknowledged",
            acked.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_and_doubles_no_charge() {
    // The dev network lends its ledger service and dev attester; its own proxy stays idle.
    let net = network(vec![]).await;
    let dir: PathBuf = net.dir().to_owned();
    let dev = net.dev_ledger().unwrap();
    allow_the_model(dev).await;
    let own = own_proxy(&net, "crash").await;
    let (proxy, addr, book) = (own.key, own.addr.clone(), own.book.clone());
    let client_key_file = dir.join("crash-client.key");
    let client = key_wallet(&client_key_file).unwrap().public_key();
    dev.fund_client(client, proxy).await.unwrap();
    let mut child = spawn_cocoon(&["proxy"], &own.config, dir.join("proxy-1.log"));
    wait_listening(&addr).await;

    let stop = CancellationToken::new();
    let worker_attester = net.dev_attester();
    // As `cocoon worker` makes it: with the key sealed requests are opened with.
    let (identity, sealing) = cocoon_worker::with_sealing_key(
        worker_attester
            .identity(
                Some(&dir.join("crash-worker.key")),
                "cocoon-worker",
                "worker",
                None,
            )
            .unwrap(),
    )
    .unwrap();
    let identity = Arc::new(identity);
    let worker_key: [u8; 32] = identity.public_key().try_into().unwrap();
    let payouts =
        Arc::new(PayoutStore::open(&dir.join("crash-worker-payouts.json"), worker_key).unwrap());
    let worker = Worker::new(
        "crash-worker",
        addr.clone(),
        llama(),
        identity,
        net.dev_policy().build("proxy_policy", "proxy").unwrap(),
        Duration::from_millis(200),
    )
    .with_payouts(payouts)
    .with_sealing(sealing.map(Arc::new));
    tokio::spawn(worker.run(stop.clone()));
    let gateway_url = own_gateway(&net, std::slice::from_ref(&addr), client_key_file, &stop).await;

    let acked: Acked = Arc::default();
    let loops_stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| load(gateway_url.clone(), acked.clone(), loops_stop.clone()))
        .collect();

    // Under load: kill -9, then the same proxy again on the same record; three times.
    wait_acked(&acked, 6).await;
    for round in 2..=KILLS + 1 {
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let at_kill = acked.lock().unwrap().len();
        child = spawn_cocoon(
            &["proxy"],
            &own.config,
            dir.join(format!("proxy-{round}.log")),
        );
        wait_acked(&acked, at_kill + 6).await;
    }

    loops_stop.store(true, Ordering::SeqCst);
    for l in loops {
        l.await.unwrap();
    }
    // A graceful stop commits what is left and releases the record.
    stop_gracefully(&mut child).await;
    stop.cancel();

    let acked = acked.lock().unwrap().clone();
    let acked_sum: u64 = acked.iter().sum();
    let largest = *acked.iter().max().unwrap();
    let record = Book::open(&book, proxy).unwrap();
    let charged = record.client(&client);
    let state = net.ledger().unwrap().snapshot().await.unwrap();
    let contract = &state.clients[&Address::client(&proxy, &client)];

    eprintln!(
        "acknowledged {} answers ({acked_sum} tokens) across {KILLS} kills; charged {}",
        acked.len(),
        charged.charged
    );
    // Nothing doubled: the ledger holds exactly the record's counter, all committed.
    assert_eq!(charged.committed, charged.charged);
    assert_eq!(contract.tokens_used, charged.charged);
    assert_eq!(
        contract.balance,
        CLIENT_DEPOSIT - u128::from(charged.charged) * dev_params().price_per_token
    );
    // Nothing lost: every acknowledged answer is charged. At most the answers in flight at
    // each kill were charged without their client seeing the bill.
    assert!(
        charged.charged >= acked_sum,
        "charged {} < acknowledged {acked_sum}",
        charged.charged
    );
    assert!(
        charged.charged - acked_sum <= KILLS * LOOPS as u64 * largest,
        "charged {} is more than the in-flight answers above acknowledged {acked_sum}",
        charged.charged
    );
    // The worker is owed exactly what the client was charged.
    assert_eq!(record.worker(&worker_key).owed, charged.charged);
    assert_eq!(state.held(), state.deposited - state.paid_out);
}

/// SIGTERM on a proxy process under streamed load: it refuses new requests at once, lets every
/// answer in flight finish (not one stream is cut), makes its last commit and exits cleanly;
/// the ledger then holds exactly what the client's bills say, and the worker is owed the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_stream_in_flight_finish_and_the_book_reconciles() {
    use cocoon_testkit::backends::{Scripted, scripted_model_hash};
    const STREAMS: usize = 3;
    let net = network(vec![]).await;
    let dir: PathBuf = net.dir().to_owned();
    let dev = net.dev_ledger().unwrap();
    dev.allow_model(&scripted_model_hash()).await.unwrap();
    let own = own_proxy(&net, "drain").await;
    let (proxy, addr, book) = (own.key, own.addr.clone(), own.book.clone());
    let client_key_file = dir.join("drain-client.key");
    let client = key_wallet(&client_key_file).unwrap().public_key();
    dev.fund_client(client, proxy).await.unwrap();
    // Logs as a collector takes them: one JSON object a line.
    let log = dir.join("drain-proxy.log");
    let mut child = spawn_cocoon(&["--log-format", "json", "proxy"], &own.config, log.clone());
    wait_listening(&addr).await;

    // A worker whose answers take a while: 12 tokens, 100 ms apart.
    let backend = Scripted::new(2048);
    backend.pace(Duration::from_millis(100));
    let stop = CancellationToken::new();
    let (identity, sealing) = cocoon_worker::with_sealing_key(
        net.dev_attester()
            .identity(Some(&dir.join("drain-worker.key")), "w", "worker", None)
            .unwrap(),
    )
    .unwrap();
    let worker_key: [u8; 32] = identity.public_key().try_into().unwrap();
    let worker = Worker::new(
        "drain-worker",
        addr.clone(),
        backend.clone(),
        Arc::new(identity),
        net.dev_policy().build("proxy_policy", "proxy").unwrap(),
        Duration::from_millis(200),
    )
    .with_sealing(sealing.map(Arc::new));
    tokio::spawn(worker.run(stop.clone()));
    let gateway = own_gateway(&net, std::slice::from_ref(&addr), client_key_file, &stop).await;

    let http = reqwest::Client::new();
    let url = format!("{gateway}/chat/completions");
    let body = chat_body(
        "Count to three.",
        json!({"max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}}),
    );
    // The worker may not have joined yet: a first answer shows it has.
    wait_until_async("the worker serves", || async {
        http.post(&url)
            .json(&chat_body("hi", json!({"max_tokens": 1})))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let answer = http.post(&url).json(&body).send().await.unwrap();
                sse_data(&answer.text().await.unwrap())
            })
        })
        .collect();
    // Every stream has begun on the worker (the first answer was one too).
    wait_until("the streams begin", Duration::from_secs(20), || {
        backend.served() == 1 + STREAMS as u64
    })
    .await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    // A new request is refused (the gateway has no other proxy), not queued behind the drain.
    let refused = http
        .post(&url)
        .json(&chat_body("hi", json!({"max_tokens": 1})))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    // Every stream ends with its answer and its bill, none with an error.
    let mut acked = 0;
    for stream in streams {
        let events = stream.await.unwrap();
        assert!(
            events.iter().all(|e| e.get("error").is_none()),
            "a stream was cut: {events:?}"
        );
        let usage = events
            .iter()
            .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
            .unwrap_or_else(|| panic!("no usage: {events:?}"));
        assert_eq!(usage["completion_tokens"], 12, "{usage}");
        assert_eq!(usage["bill_verified"], json!(true), "{usage}");
        acked += usage["billing"]["billed_tokens"].as_u64().unwrap();
    }
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the proxy exits once its answers are done")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    stop.cancel();

    // The book, committed in full, and the ledger agree with what the client was billed (the
    // first answer's bill included).
    let record = Book::open(&book, proxy).unwrap();
    let charged = record.client(&client);
    assert_eq!(charged.committed, charged.charged);
    assert!(charged.charged > acked, "{} <= {acked}", charged.charged);
    let state = net.ledger().unwrap().snapshot().await.unwrap();
    let contract = &state.clients[&Address::client(&proxy, &client)];
    assert_eq!(contract.tokens_used, charged.charged);
    assert_eq!(record.worker(&worker_key).owed, charged.charged);

    // Every log line is a JSON object; each answer has its one access line, with its counts
    // and no prompt text.
    let log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "cocoon::access")
        .collect();
    assert_eq!(access.len(), 1 + STREAMS, "{log}");
    assert!(access.iter().all(|l| l["outcome"] == "Served"), "{log}");
    assert!(
        access
            .iter()
            .filter(|l| l["completion_tokens"] == 12)
            .count()
            == STREAMS,
        "{log}"
    );
    assert!(!log.contains("Count to three"), "{log}");
}
