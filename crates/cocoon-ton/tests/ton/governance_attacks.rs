//! Adversarial review of the governance commit (ad77177) on the TON backend: operations that
//! take more than one hop (wallet -> contract -> another contract) and the per-proxy cache of
//! the terms client and worker contracts are named from. Tests named `finding_*` state the safe
//! outcome and failed on ad77177; all pass since the backend follows each operation's chain of
//! messages to its end (the first refusal anywhere is the operation's), re-reads a proxy's
//! terms after a minute and at once after its own close or open, and the root refuses a second
//! open of an open contract.

use crate::NET;
use cocoon_ledger::{Ledger, NetworkParams, Op, PaymentMessage, Tx};

use crate::ledger::Network;
use cocoon_ton::wallet::Wallet;
use ring::signature::Ed25519KeyPair;

const TON: u128 = 1_000_000_000;
/// owner, proxy, client, worker, a second client.
const SEEDS: [[u8; 32]; 5] = [[41; 32], [42; 32], [43; 32], [44; 32], [45; 32]];

fn key(i: usize) -> [u8; 32] {
    Wallet::from_seed(SEEDS[i], NET).unwrap().public_key()
}

fn tx(i: usize, op: Op) -> Tx {
    Tx {
        sender: key(i),
        op,
        now: 0,
    }
}

fn signing() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&SEEDS[1]).unwrap()
}

/// FINDING (refused operation looks confirmed): a payout is confirmed on the worker contract's
/// transaction, but the money comes from the proxy contract one hop further. When the proxy
/// contract refuses the RequestPayout (here: more than owed + balance + stake; equally a proxy
/// contract that has closed), the request bounces and the worker contract puts its counter
/// back, yet `execute` returns Ok. The worker's PayoutStore takes Ok as claimed
/// (cocoon-worker/src/payouts.rs `claim`: `Ok(_) => claimed += 1` then `mark_claimed`) and never
/// claims that payout again. Safe outcome: an error (the claim was refused).
#[tokio::test]
async fn finding_a_payout_the_proxy_contract_refuses_is_not_confirmed() {
    let net = Network::open(&NetworkParams::default(), &SEEDS).await;
    let worker = net.connect(3).await;
    let contract = worker.worker_address(&key(1), &key(3)).await.unwrap();
    // 1e9 tokens at 16 nanoton: 16 TON, more than the proxy contract's 10 TON stake.
    let message = PaymentMessage::PayWorker {
        query_id: 1,
        tokens: 1_000_000_000,
        contract,
    }
    .sign(&signing(), NET);
    let got = worker
        .execute(tx(
            3,
            Op::Payout {
                proxy: key(1),
                message,
            },
        ))
        .await;
    // The refusal did happen on chain: the worker contract's counter is back at 0, nothing paid.
    assert_eq!(
        worker.worker(&key(1), &key(3)).await.unwrap(),
        Some((0, 0)),
        "the proxy contract refused the payout"
    );
    assert!(
        got.is_err(),
        "a payout the proxy contract refused was confirmed: {got:?}"
    );
}

/// FINDING (refused operation looks confirmed, stake stuck): after the owner unregisters and
/// re-registers a proxy whose contract is still open, the root lets it open again (its entry
/// says not opened) and forwards the stake to the existing contract, which refuses it (103,
/// already open) without a bounce. `execute(ProxyOpen)` is confirmed on the root's transaction
/// and returns a receipt with the stake deposited; the stake is in fact held, unbooked, by the
/// proxy contract until its final close. Safe outcome: an error, the stake not booked.
#[tokio::test]
async fn finding_an_open_the_proxy_contract_refuses_is_not_confirmed() {
    let net = Network::open(&NetworkParams::default(), &SEEDS).await;
    let (owner, proxy) = (net.connect(0).await, net.connect(1).await);
    owner
        .execute(tx(0, Op::UnregisterProxy { key: key(1) }))
        .await
        .unwrap();
    owner
        .execute(tx(
            0,
            Op::RegisterProxy {
                key: key(1),
                address: "proxy.example:8443".into(),
            },
        ))
        .await
        .unwrap();
    let got = proxy
        .execute(tx(1, Op::ProxyOpen { stake: 10 * TON }))
        .await;
    let view = proxy.proxy_view(key(1), &[], &[]).await.unwrap();
    assert_eq!(
        view.proxies.values().next().unwrap().stake,
        10 * TON,
        "the second stake is not booked"
    );
    assert!(
        got.is_err(),
        "an open the proxy contract refused was confirmed: {got:?}"
    );
}

/// FINDING (stale names after a re-open): `TonLedger` caches each proxy contract's terms
/// forever. A proxy that closes and opens again takes the root's parameters then in force, but
/// a ledger that read the terms before (the proxy's own long-running process, a worker's)
/// keeps naming client and worker contracts from the old terms: the proxy signs charges and
/// payouts for contracts that either do not exist or that its re-opened contract refuses
/// (every payout for a stale worker contract bounces forever: the worker's share stays with
/// the proxy). Safe outcome: a long-running ledger names the same contracts as a fresh one.
#[tokio::test]
async fn finding_terms_cached_before_a_reopen_name_stale_contracts() {
    let params = NetworkParams {
        proxy_close_delay: 0,
        ..NetworkParams::default()
    };
    let net = Network::open(&params, &SEEDS).await;
    let (owner, proxy) = (net.connect(0).await, net.connect(1).await);
    // The proxy's process names a worker's contract (it signs its payouts): terms cached.
    let before = proxy.worker_address(&key(1), &key(3)).await.unwrap();
    proxy.execute(tx(1, Op::ProxyClose)).await.unwrap();
    proxy.execute(tx(1, Op::ProxyFinishClose)).await.unwrap();
    let changed = NetworkParams {
        price_per_token: params.price_per_token * 2,
        worker_fee_per_token: params.worker_fee_per_token * 2,
        ..params.clone()
    };
    owner
        .execute(tx(
            0,
            Op::SetParams {
                params: changed.clone(),
            },
        ))
        .await
        .unwrap();
    proxy
        .execute(tx(1, Op::ProxyOpen { stake: 10 * TON }))
        .await
        .unwrap();
    let fresh = net.connect(4).await;
    let now_worker = fresh.worker_address(&key(1), &key(3)).await.unwrap();
    assert_ne!(
        before, now_worker,
        "the re-opened contract binds other terms"
    );
    // A client joining after the re-open, as the proxy's process and a fresh one name it.
    let by_proxy = proxy.client_address(&key(1), &key(4)).await.unwrap();
    let by_fresh = fresh.client_address(&key(1), &key(4)).await.unwrap();
    assert_eq!(
        proxy.worker_address(&key(1), &key(3)).await.unwrap(),
        now_worker,
        "the proxy's process still names the worker contract of the old terms"
    );
    assert_eq!(
        by_proxy, by_fresh,
        "the proxy's process names the new client's contract from the old terms"
    );
}

/// FINDING (refused operation looks confirmed, charge variant): a charge is confirmed on the
/// client contract's transaction, but the proxy contract books it one hop further. After a
/// re-open under a new price, the proxy contract refuses the Charged of a client contract bound
/// to the old price (101); it bounces and the client contract gives the money back, yet
/// `execute(Charge)` returns Ok (on a real chain, where the bounce lands blocks later, its
/// receipt even reports the cost as charged). Safe outcome: an error.
#[tokio::test]
async fn finding_a_charge_the_proxy_contract_refuses_is_not_confirmed() {
    let params = NetworkParams {
        proxy_close_delay: 0,
        ..NetworkParams::default()
    };
    let net = Network::open(&params, &SEEDS).await;
    let (owner, client) = (net.connect(0).await, net.connect(2).await);
    client
        .execute(tx(
            2,
            Op::ClientDeposit {
                proxy: key(1),
                amount: 3 * TON,
            },
        ))
        .await
        .unwrap();
    let contract = client.client_address(&key(1), &key(2)).await.unwrap();
    let proxy = net.connect(1).await;
    proxy.execute(tx(1, Op::ProxyClose)).await.unwrap();
    proxy.execute(tx(1, Op::ProxyFinishClose)).await.unwrap();
    owner
        .execute(tx(
            0,
            Op::SetParams {
                params: NetworkParams {
                    price_per_token: params.price_per_token * 2,
                    ..params.clone()
                },
            },
        ))
        .await
        .unwrap();
    proxy
        .execute(tx(1, Op::ProxyOpen { stake: 10 * TON }))
        .await
        .unwrap();
    let message = PaymentMessage::ChargeClient {
        query_id: 1,
        tokens_used: 1000,
        contract,
    }
    .sign(&signing(), NET);
    let got = net
        .connect(1)
        .await
        .execute(tx(
            1,
            Op::Charge {
                proxy: key(1),
                message,
            },
        ))
        .await;
    let c = client.client(key(1), key(2)).await.unwrap().unwrap();
    assert_eq!(
        (c.balance, c.tokens_used),
        (3 * TON, 0),
        "the proxy contract refused the charge and the client contract took it back"
    );
    assert!(
        got.is_err(),
        "a charge the proxy contract refused was confirmed: {got:?}"
    );
}
