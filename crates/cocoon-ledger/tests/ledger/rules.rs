//! The contracts' rules, one refusal at a time: each bad operation gets its specific error
//! and leaves the state unchanged.

use crate::common::*;
use cocoon_ledger::{Address, ContractState, LedgerError, Op, PaymentMessage, Tx};

#[test]
fn a_client_pays_per_token_and_the_worker_earns_its_fee() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    ok(&mut s, deposit(p, 50 * TON));
    ok(&mut s, stake(p, 10 * TON));
    let r = ok(&mut s, tx(p, charge(&proxy, CLIENT, 1_000)));
    assert_eq!(r.charged, 100_000);
    let r = ok(&mut s, tx(p, charge(&proxy, CLIENT, 1_500)));
    assert_eq!(r.charged, 50_000, "cumulative: only the 500 new tokens");
    let r = ok(&mut s, tx(WORKER, payout(&proxy, WORKER, 1_500)));
    assert_eq!(r.earned, 120_000);
    let client = &s.clients[&Address::client(&p, &CLIENT)];
    assert_eq!(
        (client.balance, client.tokens_used),
        (50 * TON - 150_000, 1_500)
    );
    // The proxy keeps price - worker_fee per token.
    assert_eq!(s.proxies[&Address::proxy(&p)].balance, 150_000 - 120_000);
    let r = ok(&mut s, tx(WORKER, Op::WorkerWithdraw { proxy: p }));
    assert_eq!(r.paid_out, 120_000);
    assert_eq!(s.held(), s.deposited - s.paid_out);
}

#[test]
fn replayed_backwards_forged_and_misaddressed_messages_are_refused() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    ok(&mut s, deposit(p, 50 * TON));
    ok(&mut s, tx(p, charge(&proxy, CLIENT, 1_000)));
    assert_eq!(
        refused(&mut s, tx(p, charge(&proxy, CLIENT, 1_000))),
        LedgerError::CounterNotIncreasing {
            stored: 1_000,
            got: 1_000
        }
    );
    assert_eq!(
        refused(&mut s, tx(p, charge(&proxy, CLIENT, 999))),
        LedgerError::CounterNotIncreasing {
            stored: 1_000,
            got: 999
        }
    );
    // Signed by another key than the proxy's.
    let impostor = keypair(42);
    let forged = Op::Charge {
        proxy: p,
        message: PaymentMessage::ChargeClient {
            query_id: 1,
            tokens_used: 5_000,
            contract: Address::client(&p, &CLIENT),
        }
        .sign(&impostor, NET),
    };
    assert!(
        matches!(refused(&mut s, tx(p, forged)), LedgerError::BadMessage(m) if m.contains("signature"))
    );
    // A worker submitting a payout addressed to another worker's contract.
    let other = [77; 32];
    assert!(matches!(
        refused(&mut s, tx(WORKER, payout(&proxy, other, 10))),
        LedgerError::WrongContract { .. }
    ));
    // A charge message used as a payout.
    let Op::Charge { message, .. } = charge(&proxy, CLIENT, 2_000) else {
        unreachable!()
    };
    assert!(matches!(
        refused(&mut s, tx(WORKER, Op::Payout { proxy: p, message })),
        LedgerError::BadMessage(_) | LedgerError::WrongContract { .. }
    ));
    // A charge for a client with no contract.
    assert_eq!(
        refused(&mut s, tx(p, charge(&proxy, [55; 32], 10))),
        LedgerError::NoContract(Address::client(&p, &[55; 32]))
    );
}

#[test]
fn balances_stakes_and_limits() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    assert_eq!(refused(&mut s, deposit(p, 0)), LedgerError::ZeroAmount);
    assert_eq!(
        refused(&mut s, deposit([8; 32], TON)),
        LedgerError::UnknownProxy
    );
    ok(&mut s, deposit(p, 20 * TON));
    assert_eq!(
        refused(&mut s, stake(p, 5 * TON)),
        LedgerError::StakeTooLow {
            stake: 5 * TON,
            min: 10 * TON
        }
    );
    assert!(matches!(
        refused(&mut s, stake(p, 30 * TON)),
        LedgerError::InsufficientBalance { .. }
    ));
    ok(&mut s, stake(p, 15 * TON));
    assert_eq!(
        refused(
            &mut s,
            tx(
                CLIENT,
                Op::ClientWithdraw {
                    proxy: p,
                    amount: 6 * TON
                }
            )
        ),
        LedgerError::BelowStake {
            amount: 6 * TON,
            left: 14 * TON,
            stake: 15 * TON
        }
    );
    ok(
        &mut s,
        tx(
            CLIENT,
            Op::ClientWithdraw {
                proxy: p,
                amount: 5 * TON,
            },
        ),
    );
    // A charge the balance cannot cover.
    assert!(matches!(
        refused(&mut s, tx(p, charge(&proxy, CLIENT, u64::MAX / 1_000))),
        LedgerError::InsufficientBalance { .. }
    ));
    // Counter overflow of the cost.
    assert!(matches!(
        refused(&mut s, tx(p, charge(&proxy, CLIENT, u64::MAX))),
        LedgerError::InsufficientBalance { .. } | LedgerError::Overflow
    ));
    // A deposit that would overflow the ledger's totals.
    assert_eq!(
        refused(&mut s, deposit(p, u128::MAX)),
        LedgerError::Overflow
    );
    assert_eq!(
        refused(&mut s, tx(CLIENT, Op::SetParams { params: params() })),
        LedgerError::NotOwner
    );
    let mut bad = params();
    bad.worker_fee_per_token = bad.price_per_token + 1;
    assert!(matches!(
        refused(&mut s, tx(OWNER, Op::SetParams { params: bad })),
        LedgerError::BadParams(_)
    ));
}

#[test]
fn closing_without_the_proxy_releases_the_stake_after_the_delay() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    ok(&mut s, deposit(p, 30 * TON));
    ok(&mut s, stake(p, 10 * TON));
    let r = ok(&mut s, tx(CLIENT, Op::ClientClose { proxy: p }));
    assert_eq!(
        r.paid_out,
        20 * TON,
        "what is above the stake comes back at once"
    );
    assert_eq!(
        refused(&mut s, tx(CLIENT, Op::ClientClose { proxy: p })),
        LedgerError::AlreadyClosing(Address::client(&p, &CLIENT))
    );
    assert_eq!(
        refused(&mut s, deposit(p, TON)),
        LedgerError::NotOpen(Address::client(&p, &CLIENT))
    );
    // The proxy may still charge for work done before the close.
    ok(&mut s, tx(p, charge(&proxy, CLIENT, 100)));
    let early = Tx {
        now: 1_000 + 3_599,
        ..tx(CLIENT, Op::ClientFinishClose { proxy: p })
    };
    assert!(matches!(
        refused(&mut s, early),
        LedgerError::StillLocked { .. }
    ));
    let r = ok(
        &mut s,
        Tx {
            now: 1_000 + 3_600,
            ..tx(CLIENT, Op::ClientFinishClose { proxy: p })
        },
    );
    assert_eq!(r.paid_out, 10 * TON - 10_000);
    let c = &s.clients[&Address::client(&p, &CLIENT)];
    assert_eq!((c.balance, c.state), (0, ContractState::Closed));
    assert!(matches!(
        refused(&mut s, tx(CLIENT, Op::ClientFinishClose { proxy: p })),
        LedgerError::NotClosing(_)
    ));
}

#[test]
fn the_proxy_refunds_at_once_and_its_stake_pays_workers() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    ok(&mut s, deposit(p, 30 * TON));
    let r = ok(&mut s, tx(p, Op::ProxyRefundClient { client: CLIENT }));
    assert_eq!(r.paid_out, 30 * TON);
    // Nothing was earned, yet a worker's payout is covered by the proxy's stake.
    ok(&mut s, tx(WORKER, payout(&proxy, WORKER, 1_000)));
    assert_eq!(s.proxies[&Address::proxy(&p)].stake, 100 * TON - 80_000);
    ok(&mut s, tx(p, Op::ProxyClose));
    assert!(matches!(
        refused(&mut s, tx(p, Op::ProxyClose)),
        LedgerError::AlreadyClosing(_)
    ));
    // During the close delay workers can still claim.
    ok(&mut s, tx(WORKER, payout(&proxy, WORKER, 2_000)));
    assert!(matches!(
        refused(&mut s, tx(p, Op::ProxyFinishClose)),
        LedgerError::StillLocked { .. }
    ));
    let r = ok(
        &mut s,
        Tx {
            now: 1_000 + 7_200,
            ..tx(p, Op::ProxyFinishClose)
        },
    );
    assert_eq!(r.paid_out, 100 * TON - 160_000);
    assert!(matches!(
        refused(&mut s, tx(WORKER, payout(&proxy, WORKER, 3_000))),
        LedgerError::NotOpen(_)
    ));
    assert_eq!(s.held(), s.deposited - s.paid_out);
}

#[test]
fn the_workers_share_of_a_charge_is_held_for_them_not_withdrawable() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    let at = Address::proxy(&p);
    ok(&mut s, deposit(p, 50 * TON));
    ok(&mut s, tx(p, charge(&proxy, CLIENT, 1_000)));
    // 1,000 tokens at 100 charged, 80 of each held for workers: the proxy owns 20,000.
    assert_eq!(
        (s.proxies[&at].balance, s.proxies[&at].owed),
        (20_000, 80_000)
    );
    assert!(matches!(
        refused(&mut s, tx(p, Op::ProxyWithdraw { amount: 20_001 })),
        LedgerError::InsufficientBalance { .. }
    ));
    ok(&mut s, tx(p, Op::ProxyWithdraw { amount: 20_000 }));
    // The worker is paid from what was held, and the stake is untouched.
    ok(&mut s, tx(WORKER, payout(&proxy, WORKER, 1_000)));
    assert_eq!(s.proxies[&at].owed, 0);
    assert_eq!(s.proxies[&at].stake, 100 * TON);
    // Workers left something unclaimed: the proxy's final close, after the delay, releases it.
    ok(&mut s, tx(p, charge(&proxy, CLIENT, 2_000)));
    ok(&mut s, tx(p, Op::ProxyClose));
    let r = ok(
        &mut s,
        Tx {
            now: 1_000 + 7_200,
            ..tx(p, Op::ProxyFinishClose)
        },
    );
    assert_eq!(r.paid_out, 100 * TON + 100_000);
    assert_eq!(s.held(), s.deposited - s.paid_out);
}

#[test]
fn governance_hands_over_the_registry_in_two_steps_and_prunes_it() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    let next = [7u8; 32];
    // Only the owner proposes; only the proposed key accepts; until then the owner rules.
    assert_eq!(
        refused(&mut s, tx(next, Op::ProposeOwner { owner: next })),
        LedgerError::NotOwner
    );
    ok(&mut s, tx(OWNER, Op::ProposeOwner { owner: [8; 32] }));
    ok(&mut s, tx(OWNER, Op::ProposeOwner { owner: next }));
    assert_eq!(
        refused(&mut s, tx([8; 32], Op::AcceptOwner)),
        LedgerError::NotOwner
    );
    ok(&mut s, tx(OWNER, Op::AllowModel { hash: "AB".into() }));
    ok(&mut s, tx(next, Op::AcceptOwner));
    assert_eq!(s.registry.owner, next);
    assert_eq!(
        refused(&mut s, tx(next, Op::AcceptOwner)),
        LedgerError::NotOwner
    );
    assert_eq!(
        refused(&mut s, tx(OWNER, Op::RevokeModel { hash: "ab".into() })),
        LedgerError::NotOwner,
        "the old owner no longer rules"
    );
    ok(&mut s, tx(next, Op::RevokeModel { hash: "ab".into() }));
    assert!(s.registry.models.is_empty());

    // A proxy adds stake while open; unregistered, its open contract keeps settling.
    let at = Address::proxy(&p);
    assert_eq!(
        refused(&mut s, tx(p, Op::ProxyAddStake { amount: 0 })),
        LedgerError::ZeroAmount
    );
    let r = ok(&mut s, tx(p, Op::ProxyAddStake { amount: 5 * TON }));
    assert_eq!(r.deposited, 5 * TON);
    assert_eq!(s.proxies[&at].stake, 105 * TON);
    ok(&mut s, tx(next, Op::UnregisterProxy { key: p }));
    assert_eq!(
        refused(&mut s, tx(next, Op::UnregisterProxy { key: p })),
        LedgerError::UnknownProxy
    );
    assert!(!s.registry.is_proxy(&p));
    ok(&mut s, deposit(p, 20 * TON));
    ok(&mut s, tx(p, charge(&proxy, CLIENT, 1_000)));
    ok(&mut s, tx(p, Op::ProxyClose));
    assert!(matches!(
        refused(&mut s, tx(p, Op::ProxyAddStake { amount: TON })),
        LedgerError::NotOpen(_)
    ));
    assert_eq!(s.held(), s.deposited - s.paid_out);
}

#[test]
fn a_proxy_that_finished_closing_opens_again_under_the_parameters_in_force() {
    let (mut s, proxy) = with_proxy();
    let p = public(&proxy);
    let at = Address::proxy(&p);
    assert!(matches!(
        refused(&mut s, tx(p, Op::ProxyOpen { stake: 100 * TON })),
        LedgerError::AlreadyExists(_)
    ));
    ok(&mut s, tx(p, Op::ProxyClose));
    assert!(matches!(
        refused(&mut s, tx(p, Op::ProxyOpen { stake: 100 * TON })),
        LedgerError::AlreadyExists(_)
    ));
    ok(
        &mut s,
        Tx {
            now: 1_000 + 7_200,
            ..tx(p, Op::ProxyFinishClose)
        },
    );
    let r = ok(&mut s, tx(p, Op::ProxyOpen { stake: 100 * TON }));
    assert_eq!(r.deposited, 100 * TON);
    assert_eq!(s.proxies[&at].state, ContractState::Normal);
    assert_eq!(s.held(), s.deposited - s.paid_out);
}
