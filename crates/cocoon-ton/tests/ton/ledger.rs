//! The TON ledger backend end to end against the local emulated chain served in the toncenter
//! shape: every operation goes out as a wallet v5 request over HTTP, is executed by the
//! committed contracts in tycho-vm, and comes back confirmed or refused with the ledger's error.

use crate::NET;
use std::sync::Arc;
use std::time::Duration;

use cocoon_ledger::{ContractState, Ledger, LedgerError, NetworkParams, Op, PaymentMessage, Tx};
use cocoon_ton::TonLedger;
use cocoon_ton::emulator::Chain;
use cocoon_ton::toncenter::{self, Client};
use cocoon_ton::wallet::Wallet;
use parking_lot::Mutex;
use ring::signature::Ed25519KeyPair;
use tycho_types::cell::HashBytes;

const TON: u128 = 1_000_000_000;

fn hash(w: &Wallet) -> HashBytes {
    HashBytes(w.address().hash_part.as_slice().try_into().unwrap())
}

async fn serve(chain: Arc<Mutex<Chain>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, toncenter::router(chain))
            .await
            .unwrap()
    });
    format!("http://{addr}")
}

fn tx(ledger_key: [u8; 32], op: Op) -> Tx {
    Tx {
        sender: ledger_key,
        op,
        now: 0,
    }
}

#[tokio::test]
async fn operations_settle_on_the_emulated_chain() {
    let chain = Arc::new(Mutex::new(Chain::new(cocoon_ledger::unix_now() as u32)));
    let seeds = [[1u8; 32], [2u8; 32], [3u8; 32], [5u8; 32]];
    for seed in seeds {
        let w = Wallet::from_seed(seed, NET).unwrap();
        chain.lock().fund(hash(&w), 1000 * TON);
    }
    let base = serve(chain.clone()).await;
    let api = Client::new(&base);
    let timeout = Duration::from_secs(10);
    let params = NetworkParams::default();
    let owner = Wallet::from_seed(seeds[0], NET).unwrap();
    let root = TonLedger::deploy_root(&api, &owner, &params, timeout)
        .await
        .unwrap();

    let connect = |seed: [u8; 32]| {
        let api = api.clone();
        let root = root.clone();
        async move {
            TonLedger::connect(api, Wallet::from_seed(seed, NET).unwrap(), root)
                .await
                .unwrap()
                .with_confirm_timeout(timeout)
        }
    };
    let owner = connect(seeds[0]).await;
    let proxy = connect(seeds[1]).await;
    let client = connect(seeds[2]).await;
    let worker = connect(seeds[3]).await;
    assert_eq!(owner.params().await.unwrap(), params);
    let key = |s: [u8; 32]| Wallet::from_seed(s, NET).unwrap().public_key();
    let (owner_key, proxy_key, client_key, worker_key) =
        (key(seeds[0]), key(seeds[1]), key(seeds[2]), key(seeds[3]));

    // Only the owner changes the root; a proxy must be registered before it opens.
    let err = proxy
        .execute(tx(proxy_key, Op::AllowModel { hash: "ab".into() }))
        .await
        .unwrap_err();
    assert_eq!(err, LedgerError::NotOwner);
    let err = proxy
        .execute(tx(proxy_key, Op::ProxyOpen { stake: 10 * TON }))
        .await
        .unwrap_err();
    assert_eq!(err, LedgerError::UnknownProxy);
    owner
        .execute(tx(
            owner_key,
            Op::RegisterProxy {
                key: proxy_key,
                address: "proxy.example:8443".into(),
            },
        ))
        .await
        .unwrap();
    let receipt = proxy
        .execute(tx(proxy_key, Op::ProxyOpen { stake: 10 * TON }))
        .await
        .unwrap();
    assert_eq!(receipt.deposited, 10 * TON);

    // A client deposits and stakes; its contract reads back through the backend.
    client
        .execute(tx(
            client_key,
            Op::ClientDeposit {
                proxy: proxy_key,
                amount: 3 * TON,
            },
        ))
        .await
        .unwrap();
    client
        .execute(tx(
            client_key,
            Op::ClientStake {
                proxy: proxy_key,
                amount: TON,
            },
        ))
        .await
        .unwrap();
    let c = client.client(proxy_key, client_key).await.unwrap().unwrap();
    assert_eq!(
        (c.balance, c.stake, c.tokens_used, c.state),
        (3 * TON, TON, 0, ContractState::Normal)
    );

    // The proxy signs a cumulative charge naming the client's contract; anyone may deliver it.
    let signing = Ed25519KeyPair::from_seed_unchecked(&seeds[1]).unwrap();
    let contract = proxy.client_address(&proxy_key, &client_key).await.unwrap();
    let charge = PaymentMessage::ChargeClient {
        query_id: 1,
        tokens_used: 5000,
        contract,
    }
    .sign(&signing, NET);
    let receipt = proxy
        .execute(tx(
            proxy_key,
            Op::Charge {
                proxy: proxy_key,
                message: charge.clone(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(receipt.charged, 5000 * params.price_per_token);
    let err = proxy
        .execute(tx(
            proxy_key,
            Op::Charge {
                proxy: proxy_key,
                message: charge,
            },
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::CounterNotIncreasing { .. }),
        "{err:?}"
    );
    let c = client.client(proxy_key, client_key).await.unwrap().unwrap();
    assert_eq!(
        (c.balance, c.tokens_used),
        (3 * TON - 5000 * params.price_per_token, 5000)
    );

    // A forged charge is refused before it costs gas: the backend checks the signature too.
    let forged = PaymentMessage::ChargeClient {
        query_id: 2,
        tokens_used: 9000,
        contract,
    }
    .sign(
        &Ed25519KeyPair::from_seed_unchecked(&seeds[3]).unwrap(),
        NET,
    );
    let err = proxy
        .execute(tx(
            proxy_key,
            Op::Charge {
                proxy: proxy_key,
                message: forged,
            },
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::BadMessage(_)), "{err:?}");

    // The worker claims its pay with the proxy's payout message, then withdraws it.
    let named = worker
        .worker_address(&proxy_key, &worker_key)
        .await
        .unwrap();
    let payout = PaymentMessage::PayWorker {
        query_id: 1,
        tokens: 4000,
        contract: named,
    }
    .sign(&signing, NET);
    worker
        .execute(tx(
            worker_key,
            Op::Payout {
                proxy: proxy_key,
                message: payout,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        worker.worker(&proxy_key, &worker_key).await.unwrap(),
        Some((4000, 4000 * params.worker_fee_per_token))
    );
    // What a restarting proxy checks its record against: its own contract and those it knows.
    let view = proxy
        .proxy_view(proxy_key, &[client_key, [7; 32]], &[worker_key])
        .await
        .unwrap();
    let mine = view.proxies.values().next().unwrap();
    assert_eq!((mine.key, mine.state), (proxy_key, ContractState::Normal));
    // 5,000 tokens charged, 4,000 paid to the worker: the proxy owns its commission on all of
    // them, and the workers' share of the other 1,000 is held for their claims.
    let (price, fee) = (params.price_per_token, params.worker_fee_per_token);
    assert_eq!(
        (mine.balance, mine.owed),
        (5000 * (price - fee), 1000 * fee)
    );
    assert_eq!(view.clients[&contract].tokens_used, 5000);
    assert_eq!(
        view.clients.len(),
        1,
        "a client without a contract is absent"
    );
    assert_eq!(view.workers[&named].tokens_paid, 4000);
    let receipt = worker
        .execute(tx(worker_key, Op::WorkerWithdraw { proxy: proxy_key }))
        .await
        .unwrap();
    assert_eq!(receipt.paid_out, 4000 * params.worker_fee_per_token);
    assert_eq!(
        worker.worker(&proxy_key, &worker_key).await.unwrap(),
        Some((4000, 0))
    );

    // Withdrawing into the stake is refused with the embedded ledger's error; above it is paid.
    let err = client
        .execute(tx(
            client_key,
            Op::ClientWithdraw {
                proxy: proxy_key,
                amount: 3 * TON,
            },
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::BelowStake { .. }), "{err:?}");
    let receipt = client
        .execute(tx(
            client_key,
            Op::ClientWithdraw {
                proxy: proxy_key,
                amount: TON,
            },
        ))
        .await
        .unwrap();
    assert_eq!(receipt.paid_out, TON);

    // The cooperating proxy refunds and closes the client's contract at once.
    proxy
        .execute(tx(proxy_key, Op::ProxyRefundClient { client: client_key }))
        .await
        .unwrap();
    let c = client.client(proxy_key, client_key).await.unwrap().unwrap();
    assert_eq!((c.balance, c.state), (0, ContractState::Closed));

    // The backend signs only as its own wallet.
    let err = client
        .execute(tx(proxy_key, Op::ProxyClose))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::BadTransaction(_)), "{err:?}");
}

/// The wallets' seeds: owner, proxy, client, worker.
const SEEDS: [[u8; 32]; 4] = [[1; 32], [2; 32], [3; 32], [5; 32]];

/// A local chain served in the toncenter shape, the wallets of `seeds` funded (the owner's
/// first, the proxy's second), a root deployed, and the proxy registered and opened with a
/// 10 TON stake.
pub(crate) struct Network {
    api: Client,
    root: tonlib_core::TonAddress,
    seeds: Vec<[u8; 32]>,
}

impl Network {
    async fn with_open_proxy() -> Self {
        Self::open(&NetworkParams::default(), &SEEDS).await
    }

    pub(crate) async fn open(params: &NetworkParams, seeds: &[[u8; 32]]) -> Self {
        let chain = Arc::new(Mutex::new(Chain::new(cocoon_ledger::unix_now() as u32)));
        for seed in seeds {
            chain
                .lock()
                .fund(hash(&Wallet::from_seed(*seed, NET).unwrap()), 1000 * TON);
        }
        let api = Client::new(&serve(chain).await);
        let owner = Wallet::from_seed(seeds[0], NET).unwrap();
        let root = TonLedger::deploy_root(&api, &owner, params, TIMEOUT)
            .await
            .unwrap();
        let net = Self {
            api,
            root,
            seeds: seeds.to_vec(),
        };
        let (owner_key, proxy_key) = (net.key(0), net.key(1));
        net.connect(0)
            .await
            .execute(tx(
                owner_key,
                Op::RegisterProxy {
                    key: proxy_key,
                    address: "proxy.example:8443".into(),
                },
            ))
            .await
            .unwrap();
        net.connect(1)
            .await
            .execute(tx(proxy_key, Op::ProxyOpen { stake: 10 * TON }))
            .await
            .unwrap();
        net
    }

    fn key(&self, i: usize) -> [u8; 32] {
        Wallet::from_seed(self.seeds[i], NET).unwrap().public_key()
    }

    fn keys(&self) -> [[u8; 32]; 4] {
        std::array::from_fn(|i| self.key(i))
    }

    /// The TON ledger as the party with the `i`th seed opens it.
    pub(crate) async fn connect(&self, i: usize) -> TonLedger {
        TonLedger::connect(
            self.api.clone(),
            Wallet::from_seed(self.seeds[i], NET).unwrap(),
            self.root.clone(),
        )
        .await
        .unwrap()
        .with_confirm_timeout(TIMEOUT)
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Client and worker contracts are bound to the parameters the proxy's contract was opened with.
/// After the owner changes the root's parameters, a client and a worker that join later must
/// still name (and deploy) their contracts from the proxy contract's terms, or every new
/// client's charge would bounce and every payout would be refused.
#[tokio::test]
async fn contracts_are_named_from_the_proxy_contract_after_the_root_changes_parameters() {
    let net = Network::with_open_proxy().await;
    let params = NetworkParams::default();
    let [owner_key, proxy_key, client_key, worker_key] = net.keys();
    let (owner, proxy) = (net.connect(0).await, net.connect(1).await);
    let changed = NetworkParams {
        price_per_token: params.price_per_token * 2,
        worker_fee_per_token: params.worker_fee_per_token * 2,
        min_client_stake: params.min_client_stake / 2,
        ..params.clone()
    };
    owner
        .execute(tx(
            owner_key,
            Op::SetParams {
                params: changed.clone(),
            },
        ))
        .await
        .unwrap();

    // Both join after the change: the root now says `changed`.
    let client = net.connect(2).await;
    let worker = net.connect(3).await;
    assert_eq!(client.params().await.unwrap(), changed);
    client
        .execute(tx(
            client_key,
            Op::ClientDeposit {
                proxy: proxy_key,
                amount: 3 * TON,
            },
        ))
        .await
        .unwrap();
    let contract = proxy.client_address(&proxy_key, &client_key).await.unwrap();
    assert_eq!(
        contract,
        client
            .client_address(&proxy_key, &client_key)
            .await
            .unwrap(),
        "the proxy and the client name the same contract"
    );
    let signing = Ed25519KeyPair::from_seed_unchecked(&SEEDS[1]).unwrap();
    let charge = PaymentMessage::ChargeClient {
        query_id: 1,
        tokens_used: 1000,
        contract,
    }
    .sign(&signing, NET);
    let receipt = proxy
        .execute(tx(
            proxy_key,
            Op::Charge {
                proxy: proxy_key,
                message: charge,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        receipt.charged,
        1000 * params.price_per_token,
        "charged at the proxy's terms"
    );

    let payout = PaymentMessage::PayWorker {
        query_id: 1,
        tokens: 1000,
        contract: worker
            .worker_address(&proxy_key, &worker_key)
            .await
            .unwrap(),
    }
    .sign(&signing, NET);
    worker
        .execute(tx(
            worker_key,
            Op::Payout {
                proxy: proxy_key,
                message: payout,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        worker.worker(&proxy_key, &worker_key).await.unwrap(),
        Some((1000, 1000 * params.worker_fee_per_token)),
        "paid at the proxy's terms"
    );
}

/// The governance operations through the TON backend: a two-step owner change, model removal,
/// a proxy's stake top-up, and unregistering a proxy whose open contract keeps settling.
#[tokio::test]
async fn governance_operations_go_through_the_ton_backend() {
    let net = Network::with_open_proxy().await;
    let [owner_key, proxy_key, client_key, _] = net.keys();
    let (owner, proxy, next) = (
        net.connect(0).await,
        net.connect(1).await,
        net.connect(2).await,
    );
    owner
        .execute(tx(owner_key, Op::ProposeOwner { owner: client_key }))
        .await
        .unwrap();
    let err = proxy
        .execute(tx(proxy_key, Op::AcceptOwner))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        LedgerError::NotOwner,
        "only the proposed owner accepts"
    );
    next.execute(tx(client_key, Op::AcceptOwner)).await.unwrap();
    let err = owner
        .execute(tx(owner_key, Op::AllowModel { hash: "ab".into() }))
        .await
        .unwrap_err();
    assert_eq!(err, LedgerError::NotOwner, "the old owner no longer rules");
    next.execute(tx(client_key, Op::AllowModel { hash: "ab".into() }))
        .await
        .unwrap();
    next.execute(tx(client_key, Op::RevokeModel { hash: "ab".into() }))
        .await
        .unwrap();

    let receipt = proxy
        .execute(tx(proxy_key, Op::ProxyAddStake { amount: 5 * TON }))
        .await
        .unwrap();
    assert_eq!(receipt.deposited, 5 * TON);
    let view = proxy.proxy_view(proxy_key, &[], &[]).await.unwrap();
    assert_eq!(view.proxies.values().next().unwrap().stake, 15 * TON);
    next.execute(tx(client_key, Op::UnregisterProxy { key: proxy_key }))
        .await
        .unwrap();
    let err = next
        .execute(tx(client_key, Op::UnregisterProxy { key: proxy_key }))
        .await
        .unwrap_err();
    assert_eq!(err, LedgerError::UnknownProxy);
    // Its open contract keeps settling: a client deposits and is charged.
    let client = net.connect(3).await;
    let [.., worker_key] = net.keys();
    client
        .execute(tx(
            worker_key,
            Op::ClientDeposit {
                proxy: proxy_key,
                amount: TON,
            },
        ))
        .await
        .unwrap();
    let contract = proxy.client_address(&proxy_key, &worker_key).await.unwrap();
    let charge = PaymentMessage::ChargeClient {
        query_id: 1,
        tokens_used: 10,
        contract,
    }
    .sign(
        &Ed25519KeyPair::from_seed_unchecked(&SEEDS[1]).unwrap(),
        NET,
    );
    let receipt = proxy
        .execute(tx(
            proxy_key,
            Op::Charge {
                proxy: proxy_key,
                message: charge,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        receipt.charged,
        10 * NetworkParams::default().price_per_token
    );
}

impl Network {
    /// Sends `body` to the root from the `i`th party's wallet, as a raw message (for root
    /// operations no ledger `Op` stands for, such as the owner's code upgrades). The emulated
    /// chain has executed it when this returns.
    async fn send_to_root(&self, i: usize, body: tonlib_core::cell::ArcCell) {
        let wallet = Wallet::from_seed(self.seeds[i], NET).unwrap();
        let seqno = self.api.seqno(wallet.address()).await.unwrap();
        let out = cocoon_ton::wallet::Outgoing {
            dest: self.root.clone(),
            value: cocoon_ton::GAS_ATTACHED,
            body,
            state_init: None,
        };
        let valid_until = cocoon_ledger::unix_now() as u32 + 60;
        let boc = wallet
            .request(seqno.unwrap_or(0), valid_until, &[out], seqno.is_none())
            .unwrap();
        self.api.send_boc(&boc).await.unwrap();
    }
}

/// The same key has another wallet on each network (its id is part of the address), and a
/// ledger refuses to connect with a wallet of another network than its root's.
#[tokio::test]
async fn a_wallet_of_another_network_cannot_connect() {
    let net = Network::with_open_proxy().await;
    let on = |network| Wallet::from_seed(SEEDS[2], network).unwrap();
    assert_ne!(
        on(NET).address(),
        on(cocoon_ledger::Network::TON_MAINNET).address()
    );
    assert_eq!(
        TonLedger::network_of(&net.api, &net.root).await.unwrap(),
        NET
    );
    let refused = TonLedger::connect(
        net.api.clone(),
        on(cocoon_ledger::Network::TON_MAINNET),
        net.root.clone(),
    )
    .await
    .err()
    .expect("a mainnet wallet connected to a local chain's root");
    assert!(
        matches!(&refused, LedgerError::BadTransaction(m) if m.contains("network -239")),
        "{refused:?}"
    );
}

/// After the owner upgrades the code the root hands new proxies, a proxy contract opened with
/// code this build does not know is refused with a clear error (addresses derived from the
/// committed code would name no contract of it), while a proxy opened before keeps working.
#[tokio::test]
async fn a_proxy_opened_with_code_this_build_does_not_know_is_refused_clearly() {
    use cocoon_ton::code::Contract;
    // owner, proxy, client, worker, a second proxy.
    let seeds = [[61; 32], [62; 32], [63; 32], [64; 32], [65; 32]];
    let net = Network::open(&NetworkParams::default(), &seeds).await;
    let [owner_key, proxy_key, client_key, ..] = net.keys();
    let proxy2_key = net.key(4);
    // Client code this build does not have (any cell will do: nothing deploys it here), set
    // through the TON backend's own SetCodes (what `cocoon ledger upgrade` sends). Only the
    // root's owner may: a proxy's wallet is refused, and nothing changes.
    let (proxy_code, unknown, worker_code) = (
        Contract::Proxy.code(),
        Contract::Wallet.code(),
        Contract::Worker.code(),
    );
    let stranger = net.connect(1).await;
    let refused = stranger
        .set_codes(&proxy_code, &unknown, &worker_code)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("only the registry owner"),
        "{refused}"
    );
    let owner = net.connect(0).await;
    owner
        .set_codes(&proxy_code, &unknown, &worker_code)
        .await
        .unwrap();
    owner
        .execute(tx(
            owner_key,
            Op::RegisterProxy {
                key: proxy2_key,
                address: "proxy2.example:8443".into(),
            },
        ))
        .await
        .unwrap();
    net.connect(4)
        .await
        .execute(tx(proxy2_key, Op::ProxyOpen { stake: 10 * TON }))
        .await
        .unwrap();

    let client = net.connect(2).await;
    let deposit = |proxy| {
        tx(
            client_key,
            Op::ClientDeposit {
                proxy,
                amount: 2 * TON,
            },
        )
    };
    let refused = client.execute(deposit(proxy2_key)).await.unwrap_err();
    assert!(
        matches!(&refused, LedgerError::Unreachable(m) if m.contains("client code") && m.contains("does not know")),
        "{refused:?}"
    );
    // The proxy opened before the upgrade holds the committed code: business as usual.
    client.execute(deposit(proxy_key)).await.unwrap();
    assert_eq!(
        client
            .client(proxy_key, client_key)
            .await
            .unwrap()
            .unwrap()
            .balance,
        2 * TON
    );
}

/// The owner's `UpgradeRoot` through the TON backend: anyone else is refused; the owner's
/// upgrade (here to the committed code again) lands, and the root keeps its registry and
/// serves on.
#[tokio::test]
async fn only_the_owner_upgrades_the_root_and_the_registry_stays() {
    use cocoon_ton::code::Contract;
    let seeds = [[71; 32], [72; 32], [73; 32], [74; 32]];
    let net = Network::open(&NetworkParams::default(), &seeds).await;
    let [owner_key, proxy_key, client_key, _] = net.keys();
    let root_code = Contract::Root.code();
    let refused = net
        .connect(2)
        .await
        .upgrade_root(&root_code)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("only the registry owner"),
        "{refused}"
    );
    let owner = net.connect(0).await;
    let before = owner.params().await.unwrap();
    owner.upgrade_root(&root_code).await.unwrap();
    assert_eq!(owner.params().await.unwrap(), before);
    owner
        .execute(tx(owner_key, Op::AllowModel { hash: "ab".into() }))
        .await
        .unwrap();
    // The registered proxy's contract still takes deposits.
    net.connect(2)
        .await
        .execute(tx(
            client_key,
            Op::ClientDeposit {
                proxy: proxy_key,
                amount: TON,
            },
        ))
        .await
        .unwrap();
}

/// REVIEW, threat 4 (stale names after a proxy moves under new code): `TonLedger::name` keeps a
/// contract's account id for as long as the proxy contract's *terms* are unchanged, but since
/// SetCodes a proxy that closes and opens again gets the new proxy code, hence a new address,
/// hence new client and worker contracts, under the very same terms. After the one-minute
/// caches of the proxy's address and terms expire, a long-running client's or worker's ledger
/// re-reads both (the new address, the same terms) and still hands out the names derived from
/// the old, closed contract: the worker's PayoutStore then refuses every genuine payout ("for
/// another worker's contract") and the gateway every genuine bill ("for another contract") until
/// the process restarts. Safe outcome: a long-running ledger names what a fresh one names.
/// (Waits out a one-second cache.)
#[tokio::test]
async fn names_follow_a_proxy_that_reopened_under_new_code() {
    use cocoon_ton::layout;
    let params = NetworkParams {
        proxy_close_delay: 0,
        ..NetworkParams::default()
    };
    // owner, proxy, client, worker, a fresh observer.
    let seeds = [[71; 32], [72; 32], [73; 32], [74; 32], [75; 32]];
    let net = Network::open(&params, &seeds).await;
    let [_, proxy_key, client_key, worker_key] = net.keys();
    // Long-running ledgers whose caches last a second, not a minute (the test waits them out).
    let ttl = Duration::from_secs(1);
    let (client, worker) = (
        net.connect(2).await.with_terms_ttl(ttl),
        net.connect(3).await.with_terms_ttl(ttl),
    );
    let client_before = client
        .client_address(&proxy_key, &client_key)
        .await
        .unwrap();
    let worker_before = worker
        .worker_address(&proxy_key, &worker_key)
        .await
        .unwrap();
    let started = std::time::Instant::now();

    // The owner upgrades the proxy code (the committed code plus a `version` getter; client and
    // worker code unchanged, so this build knows every contract); the proxy closes and reopens.
    let v2 = cocoon_ton::code::parse_boc(include_bytes!(
        "../../../../contracts/build/fixtures/proxy-v2.boc"
    ))
    .unwrap();
    let codes = layout::codes(
        &v2,
        &cocoon_ton::code::Contract::Client.code(),
        &cocoon_ton::code::Contract::Worker.code(),
    )
    .unwrap();
    net.send_to_root(
        0,
        layout::body(layout::op::SET_CODES, 0, |b| {
            b.store_reference(&codes).map(|_| ())
        })
        .unwrap(),
    )
    .await;
    let proxy = net.connect(1).await;
    let old_contract = proxy.proxy_contract(&proxy_key).await.unwrap();
    proxy.execute(tx(proxy_key, Op::ProxyClose)).await.unwrap();
    proxy
        .execute(tx(proxy_key, Op::ProxyFinishClose))
        .await
        .unwrap();
    proxy
        .execute(tx(proxy_key, Op::ProxyOpen { stake: 10 * TON }))
        .await
        .unwrap();
    let new_contract = proxy.proxy_contract(&proxy_key).await.unwrap();
    assert_ne!(
        old_contract, new_contract,
        "the reopen deployed the new code"
    );
    let fresh = net.connect(4).await;
    let client_now = fresh.client_address(&proxy_key, &client_key).await.unwrap();
    let worker_now = fresh.worker_address(&proxy_key, &worker_key).await.unwrap();
    assert_ne!(client_now, client_before);
    assert_ne!(worker_now, worker_before);
    assert_eq!(
        proxy.client_address(&proxy_key, &client_key).await.unwrap(),
        client_now,
        "the proxy's own process names afresh after its open"
    );

    // Wait out the caches: the long-running ledgers re-read the proxy's address.
    if let Some(left) = (ttl + Duration::from_millis(100)).checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    assert_eq!(
        client.proxy_contract(&proxy_key).await.unwrap(),
        new_contract,
        "the client's ledger re-read the proxy's address"
    );
    let (worker_named, client_named) = (
        worker
            .worker_address(&proxy_key, &worker_key)
            .await
            .unwrap(),
        client
            .client_address(&proxy_key, &client_key)
            .await
            .unwrap(),
    );
    assert_eq!(
        (worker_named, client_named),
        (worker_now, client_now),
        "the long-running worker's and client's ledgers still name their contracts with the \
         closed proxy (the names from before the reopen: {}, {})",
        worker_named == worker_before,
        client_named == client_before
    );
}
