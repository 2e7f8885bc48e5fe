//! Soak under faults: two clients send mixed requests (chat and legacy completions, streamed
//! and not, several lengths) for a while, through a proxy and two workers that run as their
//! own processes, while the proxy and the workers are killed with SIGKILL and restarted at
//! random. Then every client's charges and every worker's earnings are reconciled with what
//! was served, to the token.
//!
//! What "served" means, exactly: an answer whose bill reached the client, or one whose worker
//! died mid-way and whose error said what the tokens delivered were billed. The one charge a
//! client may not have seen is an answer the proxy settled (its book is written before the
//! answer is acknowledged) and was killed before sending on; such an answer was generated in
//! full, so every token above the acknowledged ones must be the exact bill of interrupted
//! requests that had been generated in full. Nothing else is allowed, in either direction.
//!
//! `COCOON_SOAK_SECS` sets the length of the faulty phase (default 60), `COCOON_SOAK_SEED`
//! the schedule of faults (printed at start, so a failure can be replayed).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use cocoon_client::{ClientConfig, ClientPayments, Gateway};
use cocoon_engine::LlamaConfig;
use cocoon_ledger::{Address, Ledger, PublicKey};
use cocoon_proxy::Book;
use cocoon_testkit::dev::ledger::{CLIENT_DEPOSIT, dev_params, key_wallet};
use cocoon_worker::{BackendConfig, PayoutsConfig, WorkerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 2;

/// Every answered request's bill the gateway did not verify, with its reason: an honest proxy's
/// bills must all verify, through kills and restarts.
static BAD_BILLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps `usage`'s bill verdict when it is not a verified one.
fn note_verdict(usage: &Value) {
    if usage["bill_verified"] != json!(true) {
        BAD_BILLS.lock().unwrap().push(format!(
            "{}: {}",
            usage["bill_verified"], usage["bill_error"]
        ));
    }
}
const WORKERS: usize = 2;
/// Request loops per client.
const LOOPS: usize = 2;
/// A request that takes longer than this has hung: a failure of its own.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

const PROMPTS: [&str; 3] = [
    "Count to three.",
    "Name a colour.",
    "Say hello to the team.",
];

/// Which answer a request asks for (its full answers are kept per key to reconcile bills).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    chat: bool,
    prompt: usize,
    max_tokens: u32,
}

#[derive(Debug)]
enum Outcome {
    /// Answered, with its bill.
    Acked {
        key: Key,
        billed: u64,
        counter: u64,
        content: String,
        /// Its prompt tokens (cached ones included) and completion tokens.
        tokens: (u64, u64),
    },
    /// Refused with a clean OpenAI error (the proxy or a worker was down, or died under it).
    Refused { key: Key, status: u16 },
    /// A worker died mid-answer and the proxy said what it billed for the tokens delivered.
    CutOff { billed: u64 },
    /// Cut off: the text received so far (`None` when not streamed).
    Interrupted { key: Key, content: Option<String> },
}

#[derive(Default)]
struct Tally {
    /// Each request's outcome, and whether a proxy kill fell while it was open.
    outcomes: Vec<(Outcome, bool)>,
    /// Anything that is not a clean answer or a clean failure.
    unclean: Vec<String>,
}

type Shared = Arc<Mutex<Tally>>;

/// One request of the mix; what came of it.
async fn request(http: &reqwest::Client, gateway: &str, rng: &mut StdRng) -> Outcome {
    let key = Key {
        chat: rng.gen_bool(0.7),
        prompt: rng.gen_range(0..PROMPTS.len()),
        max_tokens: [2, 4, 6][rng.gen_range(0..3)],
    };
    let stream = rng.gen_bool(0.5);
    let params = json!({"max_tokens": key.max_tokens, "temperature": 0, "stream": stream,
                        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }});
    let (url, body) = if key.chat {
        (
            format!("{gateway}/chat/completions"),
            chat_body(PROMPTS[key.prompt], params),
        )
    } else {
        let mut body = json!({"model": MODEL, "prompt": PROMPTS[key.prompt]});
        for (k, v) in params.as_object().unwrap() {
            body[k] = v.clone();
        }
        (format!("{gateway}/completions"), body)
    };
    let response = match http.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => panic!("the gateway itself failed: {e}"),
    };
    let status = response.status().as_u16();
    if status != 200 {
        let body: Value = response.json().await.unwrap_or(Value::Null);
        return match body["error"]["message"].as_str() {
            Some(m) => cut_off_bill(m).map_or(Outcome::Refused { key, status }, |billed| {
                Outcome::CutOff { billed }
            }),
            None => Outcome::Interrupted { key, content: None },
        };
    }
    if !stream {
        let Ok(answer) = response.json::<Value>().await else {
            return Outcome::Interrupted { key, content: None };
        };
        let content = if key.chat {
            &answer["choices"][0]["message"]["content"]
        } else {
            &answer["choices"][0]["text"]
        };
        return match (
            answer["usage"]["billing"]["billed_tokens"].as_u64(),
            answer["usage"]["billing"]["tokens_used"].as_u64(),
            tokens_of(&answer["usage"]),
        ) {
            (Some(billed), Some(counter), Some(tokens)) => {
                note_verdict(&answer["usage"]);
                Outcome::Acked {
                    key,
                    billed,
                    counter,
                    content: content.as_str().unwrap_or_default().to_owned(),
                    tokens,
                }
            }
            _ => Outcome::Interrupted { key, content: None },
        };
    }
    // Streamed: the text as it came, then the usage chunk with the bill.
    let text = response.text().await.unwrap_or_default();
    let mut content = String::new();
    let mut bill = None;
    for data in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        let choice = &chunk["choices"][0];
        let piece = if key.chat {
            &choice["delta"]["content"]
        } else {
            &choice["text"]
        };
        content.push_str(piece.as_str().unwrap_or_default());
        if let Some(billed) = chunk["error"]["message"].as_str().and_then(cut_off_bill) {
            return Outcome::CutOff { billed };
        }
        if let (Some(billed), Some(counter), Some(tokens)) = (
            chunk["usage"]["billing"]["billed_tokens"].as_u64(),
            chunk["usage"]["billing"]["tokens_used"].as_u64(),
            tokens_of(&chunk["usage"]),
        ) {
            note_verdict(&chunk["usage"]);
            bill = Some((billed, counter, tokens));
        }
    }
    match bill {
        Some((billed, counter, tokens)) => Outcome::Acked {
            key,
            billed,
            counter,
            content,
            tokens,
        },
        None => Outcome::Interrupted {
            key,
            content: Some(content),
        },
    }
}

/// An answer's prompt tokens (cached ones included) and completion tokens, from its usage.
fn tokens_of(usage: &Value) -> Option<(u64, u64)> {
    Some((
        usage["prompt_tokens"].as_u64()?,
        usage["completion_tokens"].as_u64()?,
    ))
}

/// What the proxy says it billed for the delivered part of an answer its worker failed
/// ("… the 3 tokens delivered were billed (3 units of 20 nanoton) …").
fn cut_off_bill(message: &str) -> Option<u64> {
    message
        .split("were billed (")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// The short request that shows the network serves; its bill counts like any other.
async fn probe(http: &reqwest::Client, gateway: &str, tally: &Shared) -> bool {
    let answer = http
        .post(format!("{gateway}/chat/completions"))
        .json(&chat_body("Hi", json!({"max_tokens": 1, "temperature": 0})))
        .send()
        .await;
    let Ok(answer) = answer else { return false };
    if answer.status() != 200 {
        return false;
    }
    let answer: Value = answer.json().await.unwrap();
    note_verdict(&answer["usage"]);
    let bill = &answer["usage"]["billing"];
    let acked = Outcome::Acked {
        key: Key {
            chat: true,
            prompt: PROMPTS.len(),
            max_tokens: 1,
        },
        billed: bill["billed_tokens"].as_u64().unwrap(),
        counter: bill["tokens_used"].as_u64().unwrap(),
        content: answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        tokens: tokens_of(&answer["usage"]).unwrap(),
    };
    tally.lock().unwrap().outcomes.push((acked, false));
    true
}

/// Proxy kills so far, counted twice each (before the signal and once the process is gone),
/// so a request that saw the count move was open while a proxy died.
type Kills = Arc<AtomicU64>;

fn load(
    gateway: String,
    tally: Shared,
    stop: Arc<AtomicBool>,
    kills: Kills,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut rng = StdRng::seed_from_u64(seed);
        while !stop.load(Ordering::SeqCst) {
            let before = kills.load(Ordering::SeqCst);
            let outcome =
                match tokio::time::timeout(REQUEST_DEADLINE, request(&http, &gateway, &mut rng))
                    .await
                {
                    Ok(o) => o,
                    Err(_) => {
                        tally
                            .lock()
                            .unwrap()
                            .unclean
                            .push(format!("a request hung for {REQUEST_DEADLINE:?}"));
                        continue;
                    }
                };
            // 503: the proxy or every worker is down; 502: a worker died under the request;
            // 404: the proxy restarted and no worker serving the model has rejoined yet.
            if let Outcome::Refused { status, .. } = &outcome
                && ![404, 502, 503].contains(status)
            {
                tally
                    .lock()
                    .unwrap()
                    .unclean
                    .push(format!("refused with status {status}"));
            }
            let pause = !matches!(outcome, Outcome::Acked { .. });
            let straddled = kills.load(Ordering::SeqCst) != before;
            tally.lock().unwrap().outcomes.push((outcome, straddled));
            if pause {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
}

/// Whether `target` is a sum of one choice from each of some of `groups` (each group used at
/// most once, one of its values).
fn subset_sum(groups: &[Vec<u64>], target: u64) -> bool {
    let target = target as usize;
    let mut reachable = vec![false; target + 1];
    reachable[0] = true;
    for group in groups {
        let before = reachable.clone();
        for &c in group {
            let c = c as usize;
            for t in c..=target {
                reachable[t] |= before[t - c];
            }
        }
    }
    reachable[target]
}

/// Checks one client's charge against its outcomes; returns (acknowledged, lost) tokens.
fn reconcile(client: usize, tally: &Tally, charged: u64) -> (u64, u64) {
    // Greedy decoding is not batch-invariant in llama.cpp: the same request batched with
    // different neighbours can take another token and so end differently. So each request
    // may have several full answers, each with its own token counts.
    let mut answers: HashMap<&Key, BTreeMap<&str, (u64, u64)>> = HashMap::new();
    let mut counters = Vec::new();
    let mut acked = 0;
    for (o, _) in &tally.outcomes {
        if let Outcome::Acked {
            key,
            billed,
            counter,
            content,
            tokens,
        } = o
        {
            answers
                .entry(key)
                .or_default()
                .insert(content.as_str(), *tokens);
            counters.push(*counter);
            acked += billed;
        }
        // Billed for what it delivered, and told so.
        if let Outcome::CutOff { billed } = o {
            acked += billed;
        }
    }
    let varied = answers.values().filter(|a| a.len() > 1).count();
    if varied > 0 {
        eprintln!("client {client}: {varied} requests got more than one full answer");
    }
    // Every bill moved the counter to a value of its own: nothing was charged twice.
    counters.sort_unstable();
    let n = counters.len();
    counters.dedup();
    assert_eq!(
        counters.len(),
        n,
        "client {client}: two bills share a counter"
    );
    assert!(counters.last().is_none_or(|c| *c <= charged));
    assert!(
        charged >= acked,
        "client {client}: charged {charged} < acknowledged {acked}"
    );
    let lost = charged - acked;
    // The only charge a client may not have seen: an answer generated in full, settled, and
    // cut off on its way back by a proxy kill. Each such request contributes the bill of one
    // of its full answers; a streamed one only of the answer it had begun to show. How much
    // of its prompt the worker's prompt cache held is unknown (it depends on what ran before
    // on that worker), so each full answer may have cost any split of its prompt into
    // computed and cached tokens, each at its multiplier.
    let params = &dev_params();
    let splits = |&(prompt, completion): &(u64, u64)| {
        (0..=prompt).map(move |cached| {
            params
                .weighted_answer(prompt - cached, cached, completion, 0)
                .unwrap()
        })
    };
    let bills_of = |key: &Key, shown: Option<&str>| -> Vec<u64> {
        let Some(full) = answers.get(key) else {
            return Vec::new();
        };
        let mut bills: Vec<u64> = match shown {
            Some(c) => full.get(c).into_iter().flat_map(splits).collect(),
            None => full.values().flat_map(splits).collect(),
        };
        bills.sort_unstable();
        bills.dedup();
        bills
    };
    let candidates: Vec<Vec<u64>> = tally
        .outcomes
        .iter()
        .filter(|(_, straddled)| *straddled)
        .filter_map(|(o, _)| match o {
            // A refusal may come after the proxy settled the answer and died before sending
            // it on; only a streamed answer shows how much of it arrived.
            Outcome::Refused { key, .. } => Some(bills_of(key, None)),
            Outcome::Interrupted { key, content } => Some(bills_of(key, content.as_deref())),
            Outcome::Acked { .. } | Outcome::CutOff { .. } => None,
        })
        .filter(|bills| !bills.is_empty())
        .collect();
    assert!(
        subset_sum(&candidates, lost),
        "client {client}: {lost} tokens charged above the acknowledged {acked}, not the bill of \
         any set of full answers cut off by a proxy kill {candidates:?}"
    );
    (acked, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_under_mixed_load_lose_and_double_nothing() {
    let secs: u64 = std::env::var("COCOON_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("COCOON_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    eprintln!("soak: {secs} s of faults, COCOON_SOAK_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    // The dev network lends its ledger service and dev attester; its own proxy stays idle.
    let net = network(vec![]).await;
    let dir: PathBuf = net.dir().to_owned();
    let dev = net.dev_ledger().unwrap();
    allow_the_model(dev).await;
    let own = own_proxy(&net, "soak").await;
    let (proxy, addr, book, proxy_config) = (own.key, own.addr, own.book, own.config);
    let mut proxy_runs = 1;
    let mut proxy_child = spawn_cocoon(&["proxy"], &proxy_config, dir.join("proxy-1.log"));
    wait_listening(&addr).await;

    let mut workers = Vec::new();
    let mut worker_keys = Vec::new();
    for i in 0..WORKERS {
        let key_file = dir.join(format!("soak-worker-{i}.key"));
        worker_keys.push(key_wallet(&key_file).unwrap().public_key());
        let config = WorkerConfig {
            name: format!("soak-worker-{i}"),
            proxy_addr: addr.clone(),
            more_proxies: Vec::new(),
            key_file: Some(key_file),
            max_reconnect_secs: 1,
            attester: net.dev_attester(),
            proxy_policy: net.dev_policy(),
            admin: Default::default(),
            // Killed with SIGKILL here; a graceful stop is tested apart.
            drain_secs: 0,
            collateral: Default::default(),
            prices: Default::default(),
            backends: vec![BackendConfig::Llama(LlamaConfig {
                model_path: model_path(),
                threads: 1,
                parallel: 2,
                ..LlamaConfig::default()
            })],
            payments: PayoutsConfig {
                ledger: Some(net.ledger_url().unwrap().to_owned()),
                payout_file: dir.join(format!("soak-worker-{i}-payouts.json")),
                claim_interval_secs: 1,
                ..Default::default()
            },
        };
        let path = dir.join(format!("soak-worker-{i}.toml"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        let child = spawn_cocoon(&["worker"], &path, dir.join(format!("worker-{i}-1.log")));
        workers.push((path, child, 1));
    }

    let stop = CancellationToken::new();
    let mut gateways = Vec::new();
    let mut clients: Vec<PublicKey> = Vec::new();
    for c in 0..CLIENTS {
        let key_file = dir.join(format!("soak-client-{c}.key"));
        let client = key_wallet(&key_file).unwrap().public_key();
        dev.fund_client(client, proxy).await.unwrap();
        clients.push(client);
        let gateway = Gateway::bind(
            &ClientConfig {
                listen: "127.0.0.1:0".into(),
                proxy_addr: addr.clone(),
                key_file: Some(key_file),
                attester: net.dev_attester(),
                proxy_policy: net.dev_policy(),
                // Sealed to the workers, as a gateway with a worker policy runs: the proxy
                // relays and bills what it cannot read, through every kill.
                worker_policy: Some(net.dev_policy()),
                // On the ledger, as a paying gateway runs: every bill is held to the counters
                // its bills claimed, across every kill.
                payments: ClientPayments {
                    ledger: Some(net.ledger_url().unwrap().to_owned()),
                    bill_file: dir.join(format!("soak-client-{c}-bills.json")),
                    ..ClientPayments::default()
                },
                ..ClientConfig::default()
            },
            cocoon_cli::money::LEDGERS,
        )
        .await
        .unwrap();
        gateways.push(format!("http://{}/v1", gateway.local_addr()));
        tokio::spawn(gateway.run(stop.clone()));
    }
    // Everyone is up before the faults begin.
    let http = reqwest::Client::new();
    let tallies: Vec<Shared> = (0..CLIENTS).map(|_| Shared::default()).collect();
    for (g, tally) in gateways.iter().zip(&tallies) {
        wait_until_async("the workers to join", || probe(&http, g, tally)).await;
    }
    let kills = Kills::default();
    let loops_stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..CLIENTS * LOOPS)
        .map(|i| {
            load(
                gateways[i % CLIENTS].clone(),
                tallies[i % CLIENTS].clone(),
                loops_stop.clone(),
                kills.clone(),
                seed ^ (i as u64 + 1),
            )
        })
        .collect();

    // The faults: every 1.5 to 4 s, kill -9 the proxy, a worker, or both, and start them again
    // after a moment.
    let (mut proxy_kills, mut worker_kills) = (0, 0);
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..4000))).await;
        let what = rng.gen_range(0..4);
        let down = Duration::from_millis(rng.gen_range(0..800));
        if what == 0 || what == 3 {
            kills.fetch_add(1, Ordering::SeqCst);
            proxy_child.start_kill().unwrap();
            proxy_child.wait().await.unwrap();
            kills.fetch_add(1, Ordering::SeqCst);
            proxy_kills += 1;
        }
        let victim = rng.gen_range(0..WORKERS);
        if what >= 1 {
            let (_, child, _) = &mut workers[victim];
            child.start_kill().unwrap();
            child.wait().await.unwrap();
            worker_kills += 1;
        }
        tokio::time::sleep(down).await;
        if what == 0 || what == 3 {
            proxy_runs += 1;
            proxy_child = spawn_cocoon(
                &["proxy"],
                &proxy_config,
                dir.join(format!("proxy-{proxy_runs}.log")),
            );
        }
        if what >= 1 {
            let (path, child, runs) = &mut workers[victim];
            *runs += 1;
            *child = spawn_cocoon(
                &["worker"],
                path,
                dir.join(format!("worker-{victim}-{runs}.log")),
            );
        }
    }

    // Quiet again: the network recovers and serves every client.
    wait_listening(&addr).await;
    for (g, tally) in gateways.iter().zip(&tallies) {
        wait_until_async("the network to serve again", || probe(&http, g, tally)).await;
    }
    loops_stop.store(true, Ordering::SeqCst);
    for l in loops {
        l.await.unwrap();
    }
    // Every answer that ended without its bill (cut off by a kill) had it asked for, from the
    // proxy that came back, and it checked out: no request is left explaining counter gaps.
    for g in &gateways {
        wait_until_async("the late bills to be settled", || {
            late_bills_settled(&http, g)
        })
        .await;
    }
    // With nothing in flight, a bill is judged against every counter below it: any the late
    // bills left unclaimed would fail it.
    for (g, tally) in gateways.iter().zip(&tallies) {
        wait_until_async("a quiet answer", || probe(&http, g, tally)).await;
    }
    // Payouts reach rejoined workers; then a graceful stop commits what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_gracefully(&mut proxy_child).await;

    let record = Book::open(&book, proxy).unwrap();
    let state = net.ledger().unwrap().snapshot().await.unwrap();
    let price = dev_params().price_per_token;
    let mut total_charged = 0;
    for (c, client) in clients.iter().enumerate() {
        let tally = tallies[c].lock().unwrap();
        assert!(tally.unclean.is_empty(), "client {c}: {:?}", tally.unclean);
        let charged = record.client(client);
        let contract = &state.clients[&Address::client(&proxy, client)];
        // The ledger holds exactly the book's counter, all of it committed, and the balance
        // moved by exactly that.
        assert_eq!(charged.committed, charged.charged);
        assert_eq!(contract.tokens_used, charged.charged);
        assert_eq!(
            contract.balance,
            CLIENT_DEPOSIT - u128::from(charged.charged) * price
        );
        let (acked, lost) = reconcile(c, &tally, charged.charged);
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for (o, _) in &tally.outcomes {
            *by_kind
                .entry(match o {
                    Outcome::Acked { .. } => "answered",
                    Outcome::Refused { .. } => "refused cleanly",
                    Outcome::CutOff { .. } => "cut off, delivered part billed",
                    Outcome::Interrupted { .. } => "interrupted",
                })
                .or_default() += 1;
        }
        eprintln!(
            "client {c}: {by_kind:?}; charged {} = acknowledged {acked} + unacknowledged full answers {lost}",
            charged.charged
        );
        assert!(by_kind.get("answered").copied().unwrap_or(0) > 0);
        total_charged += charged.charged;
    }
    // Workers: each is owed what the book says, has claimed all of it, and all of them
    // together earned exactly what the clients paid.
    let mut owed_total = 0;
    for (i, worker) in worker_keys.iter().enumerate() {
        let owed = record.worker(worker).owed;
        owed_total += owed;
        let at = Address::worker(&proxy, worker);
        wait_until_async("the worker to claim its payouts", || async {
            let state = net.ledger().unwrap().snapshot().await.unwrap();
            state.workers.get(&at).map_or(0, |w| w.tokens_paid) == owed
        })
        .await;
        eprintln!("worker {i}: earned {owed} tokens, all claimed");
    }
    assert_eq!(
        owed_total, total_charged,
        "the workers earned what the clients paid"
    );
    let state = net.ledger().unwrap().snapshot().await.unwrap();
    assert_eq!(state.held(), state.deposited - state.paid_out);
    let bad = BAD_BILLS.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} answers' bills were not verified by the gateway: {bad:?}",
        bad.len()
    );
    eprintln!(
        "{proxy_kills} proxy kills, {worker_kills} worker kills in {secs} s; {total_charged} tokens charged and earned"
    );
    stop.cancel();
}
