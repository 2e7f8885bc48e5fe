//! Across any sequence of operations, valid or not: no TON is created or lost (what the
//! contracts hold always equals what came in minus what went out), no counter goes back, no
//! client pays twice for a token nor a worker is paid twice for one, and the workers' share of
//! every charge stays out of the proxy's withdrawals. Charges and payouts the proxy signed for
//! another network are refused, whatever else holds.

use std::collections::BTreeMap;

use crate::common::*;
use cocoon_ledger::{LedgerState, Op, PaymentMessage, Touched, Tx};
use proptest::prelude::*;

const CLIENTS: [[u8; 32]; 3] = [[2; 32], [4; 32], [6; 32]];
const WORKERS: [[u8; 32]; 2] = [[3; 32], [5; 32]];

#[derive(Debug, Clone)]
enum Step {
    Deposit(usize, u128),
    Stake(usize, u128),
    Withdraw(usize, u128),
    Close(usize),
    FinishClose(usize),
    Refund(usize),
    Charge(usize, u64),
    Payout(usize, u64),
    /// A charge (`true`) or payout the proxy signed for another network.
    Elsewhere(bool, usize, u64),
    WorkerWithdraw(usize),
    ProxyWithdraw(u128),
    ProxyAddStake(u128),
    ProxyClose,
    ProxyFinishClose,
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let who = 0..CLIENTS.len();
    let worker = 0..WORKERS.len();
    let amount = prop_oneof![1..100 * TON, Just(0u128), Just(u128::MAX)];
    let tokens = prop_oneof![0..2_000_000u64, Just(u64::MAX)];
    prop_oneof![
        (who.clone(), amount.clone()).prop_map(|(c, a)| Step::Deposit(c, a)),
        (who.clone(), amount.clone()).prop_map(|(c, a)| Step::Stake(c, a)),
        (who.clone(), amount.clone()).prop_map(|(c, a)| Step::Withdraw(c, a)),
        who.clone().prop_map(Step::Close),
        who.clone().prop_map(Step::FinishClose),
        who.clone().prop_map(Step::Refund),
        (who, tokens.clone()).prop_map(|(c, t)| Step::Charge(c, t)),
        (worker.clone(), tokens.clone()).prop_map(|(w, t)| Step::Payout(w, t)),
        (any::<bool>(), 0..WORKERS.len(), tokens).prop_map(|(c, i, t)| Step::Elsewhere(c, i, t)),
        worker.prop_map(Step::WorkerWithdraw),
        amount.clone().prop_map(Step::ProxyWithdraw),
        amount.prop_map(Step::ProxyAddStake),
        Just(Step::ProxyClose),
        Just(Step::ProxyFinishClose),
        (0..10_000u64).prop_map(Step::Wait),
    ]
}

fn counters(s: &LedgerState) -> BTreeMap<String, u64> {
    let clients = s
        .clients
        .iter()
        .map(|(a, c)| (format!("c{a}"), c.tokens_used));
    let workers = s
        .workers
        .iter()
        .map(|(a, w)| (format!("w{a}"), w.tokens_paid));
    clients.chain(workers).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_ton_created_or_lost_and_no_counter_goes_back(steps in proptest::collection::vec(step(), 1..60)) {
        let (mut s, proxy) = with_proxy();
        let p = public(&proxy);
        let mut now = 1_000;
        let prices = params();
        // What each contract was charged or earned over the run, from the receipts.
        let mut charged: BTreeMap<cocoon_ledger::Address, u128> = BTreeMap::new();
        let mut earned: BTreeMap<cocoon_ledger::Address, u128> = BTreeMap::new();
        for st in steps {
            let (sender, op) = match st {
                Step::Deposit(c, amount) => (CLIENTS[c], Op::ClientDeposit { proxy: p, amount }),
                Step::Stake(c, amount) => (CLIENTS[c], Op::ClientStake { proxy: p, amount }),
                Step::Withdraw(c, amount) => (CLIENTS[c], Op::ClientWithdraw { proxy: p, amount }),
                Step::Close(c) => (CLIENTS[c], Op::ClientClose { proxy: p }),
                Step::FinishClose(c) => (CLIENTS[c], Op::ClientFinishClose { proxy: p }),
                Step::Refund(c) => (p, Op::ProxyRefundClient { client: CLIENTS[c] }),
                Step::Charge(c, t) => (p, charge(&proxy, CLIENTS[c], t)),
                Step::Payout(w, t) => (WORKERS[w], payout(&proxy, WORKERS[w], t)),
                Step::Elsewhere(charge, i, t) => {
                    let elsewhere = cocoon_ledger::Network::basechain(NET.id.wrapping_add(1));
                    let (sender, message) = if charge {
                        let contract = cocoon_ledger::Address::client(&p, &CLIENTS[i]);
                        (p, PaymentMessage::ChargeClient { query_id: t, tokens_used: t, contract })
                    } else {
                        let contract = cocoon_ledger::Address::worker(&p, &WORKERS[i]);
                        (WORKERS[i], PaymentMessage::PayWorker { query_id: t, tokens: t, contract })
                    };
                    let message = message.sign(&proxy, elsewhere);
                    let op = if charge {
                        Op::Charge { proxy: p, message }
                    } else {
                        Op::Payout { proxy: p, message }
                    };
                    let before = s.clone();
                    let refused = s.apply(&Tx { sender, op, now });
                    prop_assert!(refused.is_err(), "a message signed for another network applied");
                    prop_assert_eq!(&s, &before);
                    continue;
                }
                Step::WorkerWithdraw(w) => (WORKERS[w], Op::WorkerWithdraw { proxy: p }),
                Step::ProxyWithdraw(amount) => (p, Op::ProxyWithdraw { amount }),
                Step::ProxyAddStake(amount) => (p, Op::ProxyAddStake { amount }),
                Step::ProxyClose => (p, Op::ProxyClose),
                Step::ProxyFinishClose => (p, Op::ProxyFinishClose),
                Step::Wait(secs) => {
                    now += secs;
                    continue;
                }
            };
            let before = s.clone();
            let withdraw = matches!(op, Op::ProxyWithdraw { .. });
            let result = s.apply(&Tx { sender, op, now });
            match result {
                Ok((receipt, touched)) => {
                    prop_assert_eq!(s.deposited - before.deposited, receipt.deposited);
                    prop_assert_eq!(s.paid_out - before.paid_out, receipt.paid_out);
                    for t in touched {
                        match t {
                            Touched::Client(at) => *charged.entry(at).or_default() += receipt.charged,
                            Touched::Worker(at) => *earned.entry(at).or_default() += receipt.earned,
                            _ => {}
                        }
                    }
                    if withdraw {
                        let (was, now) = (&before.proxies, &s.proxies);
                        for (at, proxy) in now {
                            prop_assert_eq!(proxy.owed, was[at].owed, "a withdrawal took the workers' share");
                        }
                    }
                }
                Err(_) => prop_assert_eq!(&s, &before, "a refusal changed the state"),
            }
            for (at, c) in &s.clients {
                let paid = charged.get(at).copied().unwrap_or(0);
                prop_assert_eq!(paid, prices.cost(c.tokens_used).unwrap(), "client {} paid other than its counter", at);
            }
            for (at, w) in &s.workers {
                let got = earned.get(at).copied().unwrap_or(0);
                prop_assert_eq!(got, prices.worker_earnings(w.tokens_paid).unwrap(), "worker {} earned other than its counter", at);
            }
            prop_assert_eq!(s.held(), s.deposited - s.paid_out);
            for c in s.clients.values() {
                prop_assert!(c.stake <= c.balance);
            }
            let (old, new) = (counters(&before), counters(&s));
            for (k, v) in &old {
                prop_assert!(new[k] >= *v, "counter {} went back", k);
            }
        }
    }
}
