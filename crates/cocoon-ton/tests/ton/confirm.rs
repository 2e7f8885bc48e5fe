//! Confirmation by message hash: an operation counts as done only on the transaction its own
//! message caused at the destination, with the compute and action phases both succeeded. The
//! chain here is served behind a meddling API that lets another transaction land at the
//! destination between sending and confirming, or reports the destination's action phase as
//! failed, which confirming by "the first transaction after" would have taken for success.

use crate::NET;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cocoon_ledger::{Ledger, LedgerError, NetworkParams, Op, PaymentMessage, PublicKey, Tx};
use cocoon_ton::emulator::{Chain, SKIPPED};
use cocoon_ton::toncenter::{self, Client};
use cocoon_ton::wallet::{Outgoing, Wallet};
use cocoon_ton::{TonLedger, layout};
use parking_lot::Mutex;
use ring::signature::Ed25519KeyPair;
use serde_json::{Value, json};
use tonlib_core::TonAddress;
use tycho_types::cell::HashBytes;

const TON: u128 = 1_000_000_000;
const OWNER: [u8; 32] = [1; 32];
const PROXY: [u8; 32] = [2; 32];
const CLIENT: [u8; 32] = [3; 32];
/// Funded, never deployed before the test: its first request deploys it.
const STRANGER: [u8; 32] = [8; 32];
/// Holds less than the gas every message attaches.
const COURIER: [u8; 32] = [9; 32];

fn hash(a: &TonAddress) -> HashBytes {
    HashBytes(a.hash_part.as_slice().try_into().unwrap())
}

fn key(seed: [u8; 32]) -> PublicKey {
    Wallet::from_seed(seed, NET).unwrap().public_key()
}

fn tx(seed: [u8; 32], op: Op) -> Tx {
    Tx {
        sender: key(seed),
        op,
        now: 0,
    }
}

/// The chain's API with a hand on it.
#[derive(Clone)]
struct Meddle {
    chain: Arc<Mutex<Chain>>,
    /// The plain API on the same chain, which the meddling one reads transactions from.
    plain: String,
    /// External messages delivered just before the next one sent through the API.
    first: Arc<Mutex<Vec<Vec<u8>>>>,
    /// An account (raw, upper case) whose transactions read as having failed their action phase.
    fail_action: Arc<Mutex<Option<String>>>,
}

async fn send_boc(State(m): State<Meddle>, Json(req): Json<Value>) -> Json<Value> {
    let boc = B64.decode(req["boc"].as_str().unwrap()).unwrap();
    let mut chain = m.chain.lock();
    for before in m.first.lock().drain(..) {
        chain
            .send_external(&before)
            .expect("the meddler's message lands");
    }
    match chain.send_external(&boc) {
        Ok(_) => Json(json!({ "ok": true, "result": { "@type": "ok" } })),
        Err(e) => Json(json!({ "ok": false, "error": e.to_string(), "code": 400 })),
    }
}

async fn transactions(State(m): State<Meddle>, RawQuery(q): RawQuery) -> Json<Value> {
    let url = format!("{}/api/v3/transactions?{}", m.plain, q.unwrap_or_default());
    let mut v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let failing = m.fail_action.lock().clone();
    if let Some(account) = failing {
        for t in v["transactions"].as_array_mut().unwrap() {
            if t["account"] == account.as_str() && t["description"]["action"].is_object() {
                t["description"]["action"] =
                    json!({ "success": false, "valid": true, "result_code": 37 });
                t["description"]["aborted"] = json!(true);
                t["out_msgs"] = json!([]);
            }
        }
    }
    Json(v)
}

async fn listen(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

struct Net {
    chain: Arc<Mutex<Chain>>,
    meddle: Meddle,
    api: Client,
    root: TonAddress,
    proxy: TonLedger,
    client: TonLedger,
}

impl Net {
    /// A root, the proxy registered and open, the client's contract deposited into.
    async fn new() -> Self {
        let chain = Arc::new(Mutex::new(Chain::new(cocoon_ledger::unix_now() as u32)));
        for (seed, amount) in [
            (OWNER, 1000 * TON),
            (PROXY, 1000 * TON),
            (CLIENT, 1000 * TON),
            (STRANGER, 1000 * TON),
            (COURIER, GAS_SHORT),
        ] {
            let w = Wallet::from_seed(seed, NET).unwrap();
            chain.lock().fund(hash(w.address()), amount);
        }
        let plain = listen(toncenter::router(chain.clone())).await;
        let meddle = Meddle {
            chain: chain.clone(),
            plain,
            first: Arc::default(),
            fail_action: Arc::default(),
        };
        let base = listen(
            Router::new()
                .route("/api/v2/sendBoc", post(send_boc))
                .route("/api/v3/transactions", get(transactions))
                .with_state(meddle.clone())
                .fallback_service(toncenter::router(chain.clone())),
        )
        .await;
        let api = Client::new(&base);
        let timeout = Duration::from_secs(5);
        let owner_wallet = Wallet::from_seed(OWNER, NET).unwrap();
        let root = TonLedger::deploy_root(&api, &owner_wallet, &NetworkParams::default(), timeout)
            .await
            .unwrap();
        let net = Self {
            chain,
            meddle,
            api: api.clone(),
            root: root.clone(),
            proxy: Self::ledger(&api, &root, PROXY).await,
            client: Self::ledger(&api, &root, CLIENT).await,
        };
        let owner = net.connect(OWNER).await;
        owner
            .execute(tx(
                OWNER,
                Op::RegisterProxy {
                    key: key(PROXY),
                    address: "proxy.example:8443".into(),
                },
            ))
            .await
            .unwrap();
        net.proxy
            .execute(tx(PROXY, Op::ProxyOpen { stake: 10 * TON }))
            .await
            .unwrap();
        net.client
            .execute(tx(
                CLIENT,
                Op::ClientDeposit {
                    proxy: key(PROXY),
                    amount: 3 * TON,
                },
            ))
            .await
            .unwrap();
        net
    }

    async fn ledger(api: &Client, root: &TonAddress, seed: [u8; 32]) -> TonLedger {
        TonLedger::connect(
            api.clone(),
            Wallet::from_seed(seed, NET).unwrap(),
            root.clone(),
        )
        .await
        .unwrap()
        .with_confirm_timeout(Duration::from_secs(5))
    }

    async fn connect(&self, seed: [u8; 32]) -> TonLedger {
        Self::ledger(&self.api, &self.root, seed).await
    }

    async fn client_contract(&self) -> TonAddress {
        let id = self
            .client
            .client_address(&key(PROXY), &key(CLIENT))
            .await
            .unwrap();
        TonAddress::new(0, id.0.into())
    }

    /// Makes the stranger's plain top-up of `to` land just before the next message sent.
    fn top_up_first(&self, to: &TonAddress) {
        let stranger = Wallet::from_seed(STRANGER, NET).unwrap();
        let out = Outgoing {
            dest: to.clone(),
            value: TON,
            body: layout::empty_cell(),
            state_init: None,
        };
        let boc = stranger.request(0, u32::MAX, &[out], true).unwrap();
        self.meddle.first.lock().push(boc);
    }

    fn charge(&self, tokens_used: u64, contract: cocoon_ledger::Address) -> Op {
        let signing = Ed25519KeyPair::from_seed_unchecked(&PROXY).unwrap();
        Op::Charge {
            proxy: key(PROXY),
            message: PaymentMessage::ChargeClient {
                query_id: tokens_used,
                tokens_used,
                contract,
            }
            .sign(&signing, NET),
        }
    }

    /// Every transaction at `at` so far: (exit code, action result).
    fn history(&self, at: &TonAddress) -> Vec<(i32, Option<i32>)> {
        let at = hash(at);
        self.chain
            .lock()
            .transactions()
            .iter()
            .filter(|t| t.account == at)
            .map(|t| (t.exit_code, t.action_result))
            .collect()
    }
}

/// Less than `GAS_ATTACHED`: the wallet accepts a request, then has too little to send it.
const GAS_SHORT: u128 = 50_000_000;

#[tokio::test]
async fn a_refused_charge_is_not_confirmed_by_a_top_up_landing_first() {
    let net = Net::new().await;
    let at = net.client_contract().await;
    let contract = layout::account_id(&at);
    net.proxy
        .execute(tx(PROXY, net.charge(5000, contract)))
        .await
        .unwrap();
    let landed = net.history(&at).len();
    net.top_up_first(&at);
    let err = net
        .proxy
        .execute(tx(PROXY, net.charge(5000, contract)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::CounterNotIncreasing { .. }),
        "{err:?}"
    );
    // The top-up did land first, and took: what a confirmation by order would have read.
    let after = net.history(&at);
    assert_eq!(after[landed], (0, Some(0)), "{after:?}");
    assert_eq!(after.len(), landed + 2, "{after:?}");
}

#[tokio::test]
async fn a_charge_that_never_left_the_wallet_is_not_confirmed_by_a_top_up() {
    let net = Net::new().await;
    let at = net.client_contract().await;
    let courier = net.connect(COURIER).await;
    net.top_up_first(&at);
    // Anyone may deliver a charge; this courier cannot pay the gas it attaches.
    let err = courier
        .execute(tx(COURIER, net.charge(5000, layout::account_id(&at))))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LedgerError::BadTransaction(m) if m.contains("sent nothing")),
        "{err:?}"
    );
    let c = net
        .client
        .client(key(PROXY), key(CLIENT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.tokens_used, 0);
    assert_eq!(net.history(&at).last(), Some(&(0, Some(0))));
}

#[tokio::test]
async fn a_message_to_an_account_without_code_is_not_a_success() {
    let net = Net::new().await;
    // The stranger has no contract with the proxy: its stake message finds no code to run.
    let stranger = net.connect(STRANGER).await;
    let err = stranger
        .execute(tx(
            STRANGER,
            Op::ClientStake {
                proxy: key(PROXY),
                amount: TON,
            },
        ))
        .await
        .unwrap_err();
    let at = stranger
        .client_address(&key(PROXY), &key(STRANGER))
        .await
        .unwrap();
    assert_eq!(err, LedgerError::NoContract(at));
    // The emulator reports it as a chain would: skipped, no action phase, and the bounce it
    // sent is what the wallet's next transaction received.
    let chain = net.chain.lock();
    let wallet = hash(Wallet::from_seed(STRANGER, NET).unwrap().address());
    let txs = chain.transactions();
    let skipped = txs
        .iter()
        .rev()
        .find(|t| t.account == HashBytes(at.0))
        .unwrap();
    assert_eq!((skipped.exit_code, skipped.action_result), (SKIPPED, None));
    let back = txs.last().unwrap();
    assert_eq!((back.account, back.bounced), (wallet, true));
    assert_eq!(skipped.out_msgs.len(), 1);
    assert_eq!(
        (skipped.out_msgs[0].dst, skipped.out_msgs[0].hash),
        (wallet, back.in_msg_hash)
    );
}

#[tokio::test]
async fn a_failed_action_phase_at_the_destination_is_an_error() {
    let net = Net::new().await;
    let at = net.client_contract().await;
    *net.meddle.fail_action.lock() =
        Some(format!("0:{}", hex::encode_upper(at.hash_part.as_slice())));
    let err = net
        .client
        .execute(tx(
            CLIENT,
            Op::ClientStake {
                proxy: key(PROXY),
                amount: TON,
            },
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LedgerError::BadTransaction(m) if m.contains("action phase") && m.contains("37")),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_api_links_each_message_to_the_transaction_it_caused() {
    let net = Net::new().await;
    let wallet = Wallet::from_seed(CLIENT, NET).unwrap();
    let at = net.client_contract().await;
    let sent = net.api.transactions(wallet.address(), 0).await.unwrap();
    let landed = net.api.transactions(&at, 0).await.unwrap();
    // The deposit (the wallet's only request; the excess came back after it): its one message
    // is the client contract's first transaction.
    let deposit = sent.iter().find(|t| !t.out_msgs.is_empty()).unwrap();
    assert_eq!(deposit.out_msgs.len(), 1);
    assert_eq!(deposit.out_msgs[0].destination.as_ref(), Some(&at));
    assert_eq!(landed[0].in_msg_hash, Some(deposit.out_msgs[0].hash));
    assert_eq!(landed[0].compute, toncenter::Compute::Ran(0));
    assert_eq!(landed[0].action_result, Some(0));
    // Newest first and at most one: how the ledger finds where to start looking.
    assert_eq!(
        net.api.last_lt(&at).await.unwrap(),
        Some(landed.last().unwrap().lt)
    );
}
