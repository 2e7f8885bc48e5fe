#![allow(dead_code)]

use cocoon_ledger::{
    Address, LedgerError, LedgerState, NetworkParams, Op, PaymentMessage, PublicKey, Receipt, Tx,
};
use ring::signature::{Ed25519KeyPair, KeyPair};

pub(crate) const OWNER: PublicKey = [1; 32];
pub(crate) const CLIENT: PublicKey = [2; 32];
pub(crate) const WORKER: PublicKey = [3; 32];
pub(crate) const TON: u128 = 1_000_000_000;
/// The network the test ledgers are on.
pub(crate) const NET: cocoon_ledger::Network = cocoon_ledger::Network::basechain(7);

pub(crate) fn keypair(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

pub(crate) fn public(k: &Ed25519KeyPair) -> PublicKey {
    k.public_key().as_ref().try_into().unwrap()
}

pub(crate) fn params() -> NetworkParams {
    NetworkParams {
        price_per_token: 100,
        worker_fee_per_token: 80,
        min_client_stake: 10 * TON,
        min_proxy_stake: 100 * TON,
        client_close_delay: 3600,
        proxy_close_delay: 7200,
        ..NetworkParams::default()
    }
}

pub(crate) fn tx(sender: PublicKey, op: Op) -> Tx {
    Tx {
        sender,
        op,
        now: 1_000,
    }
}

/// A state with the test params, one registered and opened proxy (key seed 9).
pub(crate) fn with_proxy() -> (LedgerState, Ed25519KeyPair) {
    let proxy = keypair(9);
    let mut s = LedgerState::new(OWNER, NET);
    s.apply(&tx(OWNER, Op::SetParams { params: params() }))
        .unwrap();
    s.apply(&tx(
        OWNER,
        Op::RegisterProxy {
            key: public(&proxy),
            address: "127.0.0.1:10443".into(),
        },
    ))
    .unwrap();
    s.apply(&tx(public(&proxy), Op::ProxyOpen { stake: 100 * TON }))
        .unwrap();
    (s, proxy)
}

pub(crate) fn charge(proxy: &Ed25519KeyPair, client: PublicKey, tokens_used: u64) -> Op {
    Op::Charge {
        proxy: public(proxy),
        message: PaymentMessage::ChargeClient {
            query_id: tokens_used,
            tokens_used,
            contract: Address::client(&public(proxy), &client),
        }
        .sign(proxy, NET),
    }
}

pub(crate) fn payout(proxy: &Ed25519KeyPair, worker: PublicKey, tokens: u64) -> Op {
    Op::Payout {
        proxy: public(proxy),
        message: PaymentMessage::PayWorker {
            query_id: tokens,
            tokens,
            contract: Address::worker(&public(proxy), &worker),
        }
        .sign(proxy, NET),
    }
}

/// Applies and checks the refusal changed nothing.
pub(crate) fn refused(s: &mut LedgerState, t: Tx) -> LedgerError {
    let before = s.clone();
    let e = s.apply(&t).unwrap_err();
    assert_eq!(*s, before, "a refused {t:?} changed the state");
    e
}

pub(crate) fn ok(s: &mut LedgerState, t: Tx) -> Receipt {
    s.apply(&t).unwrap().0
}

/// CLIENT deposits `amount` on `proxy`'s contract.
pub(crate) fn deposit(proxy: PublicKey, amount: u128) -> Tx {
    tx(CLIENT, Op::ClientDeposit { proxy, amount })
}

/// CLIENT raises its stake with `proxy` by `amount`.
pub(crate) fn stake(proxy: PublicKey, amount: u128) -> Tx {
    tx(CLIENT, Op::ClientStake { proxy, amount })
}
