//! The contracts under any order of messages, in tycho-vm: random sequences of charges, claims,
//! deposits and withdrawals, some batched into one wallet request (so a refused claim bounces
//! while a later one is in flight), some with too little value, some from strangers. After
//! every step (the proxy may also add stake): no TON is created or lost on the chain, the client has paid exactly what the
//! proxy contract received and never more than its counter's worth, the worker has been paid
//! exactly its counter's worth (never twice, never short), no claim is left in flight, and no
//! contract keeps more than its books and the storage reserve.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::scenarios::{Scenario, scenario_params};

const TON: i64 = 1_000_000_000;
const STAKE: i64 = 10 * TON;
const LOW: i64 = 5_000_000;
const RESERVE_MTON: i64 = 10;

fn tokens() -> impl Strategy<Value = u64> {
    // Mostly ordinary counters; now and then one far beyond what the proxy could pay.
    prop_oneof![8 => 0..4_000u64, 1 => Just(1_000_000_000u64), 1 => 1_000_000_000..1_000_000_100u64]
}

fn low(step: Value, low: bool, amount: i64) -> Value {
    let mut step = step;
    if low {
        step["value"] = json!(amount + LOW);
    }
    step
}

fn open_proxy() -> Value {
    json!({"do": "open_proxy", "from": "proxy", "proxy": "proxy", "stake": STAKE})
}

fn step() -> impl Strategy<Value = Value> {
    let charge =
        |t: u64, from: &str| json!({"do": "charge", "client": "client", "tokens": t, "from": from});
    let payout = |t: u64| json!({"do": "payout", "worker": "worker", "tokens": t});
    prop_oneof![
        (tokens(), any::<bool>(), prop::bool::weighted(0.1)).prop_map(move |(t, stranger, l)| low(
            charge(t, if stranger { "stranger" } else { "proxy" }),
            l,
            0
        )),
        (tokens(), tokens()).prop_map(move |(a, b)| json!({"do": "batch", "from": "proxy",
            "steps": [charge(a, "proxy"), charge(b, "proxy")]})),
        // The proxy opening between two charges: the first lands on nothing and bounces after
        // the second has landed.
        (tokens(), tokens()).prop_map(move |(a, b)| json!({"do": "batch", "from": "proxy",
            "steps": [charge(a, "proxy"), open_proxy(), charge(b, "proxy")]})),
        (tokens(), prop::bool::weighted(0.1)).prop_map(move |(t, l)| low(payout(t), l, 0)),
        (tokens(), tokens()).prop_map(move |(a, b)| json!({"do": "batch", "from": "worker",
            "steps": [payout(a), payout(b)]})),
        prop::bool::weighted(0.2).prop_map(|l| low(
            json!({"do": "worker_withdraw", "worker": "worker"}),
            l,
            0
        )),
        (0..200_000i64, prop::bool::weighted(0.2)).prop_map(|(a, l)| low(
            json!({"do": "proxy_withdraw", "amount": a}),
            l,
            0
        )),
        (1..3 * TON, prop::bool::weighted(0.2)).prop_map(|(a, l)| low(
            json!({"do": "client_deposit", "client": "client", "amount": a}),
            l,
            a
        )),
        (0..2 * TON)
            .prop_map(|a| json!({"do": "client_withdraw", "client": "client", "amount": a})),
        (0..2 * TON).prop_map(|a| json!({"do": "client_stake", "client": "client", "amount": a})),
        Just(open_proxy()),
        (1..2 * TON, prop::bool::weighted(0.2)).prop_map(|(a, l)| low(
            json!({"do": "proxy_add_stake", "amount": a}),
            l,
            a
        )),
    ]
}

fn figures(record: &Value, who: &str) -> Option<Vec<i64>> {
    record["state"][who]
        .as_array()
        .map(|v| v.iter().map(|x| x.as_i64().unwrap()).collect())
}

fn first_ok(record: &Value) -> bool {
    record["exits"].get(0).and_then(Value::as_i64) == Some(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_message_order_creates_loses_or_double_pays(steps in prop::collection::vec(step(), 1..40)) {
        let params = scenario_params();
        let (price, fee) = (params.price_per_token as i64, params.worker_fee_per_token as i64);
        let mut run = Scenario::new(&params);
        let total = run.total_ton();
        // The proxy opens only in the steps (a charge before it lands on nothing and bounces).
        let start = [
            json!({"do": "deploy_root"}),
            json!({"do": "register_proxy", "from": "owner", "proxy": "proxy"}),
            json!({"do": "client_deposit", "client": "client", "amount": 5 * TON}),
        ];
        for s in &start {
            run.step(s);
        }
        let (mut deposited, mut client_withdrawn) = (5 * TON, 0i64);
        let (mut proxy_withdrawn, mut worker_withdrawn, mut staked) = (0i64, 0i64, 0i64);
        let mut worker_balance = 0i64;
        for step in &steps {
            let record = run.step(step);
            let ok = first_ok(&record);
            match step["do"].as_str().unwrap() {
                "client_deposit" if ok => deposited += step["amount"].as_i64().unwrap(),
                "client_withdraw" if ok => client_withdrawn += step["amount"].as_i64().unwrap(),
                "proxy_withdraw" if ok => proxy_withdrawn += step["amount"].as_i64().unwrap(),
                "proxy_add_stake" if ok => staked += step["amount"].as_i64().unwrap(),
                "worker_withdraw" if ok => worker_withdrawn += worker_balance,
                _ => {}
            }
            prop_assert_eq!(run.total_ton(), total, "TON created or lost at {}", record);
            let client = figures(&record, "client").expect("the client contract exists");
            let (client_balance, tokens_used) = (client[2], client[4]);
            let worker = figures(&record, "worker");
            let (tokens_paid, balance, in_flight) = worker.as_ref().map_or((0, 0, 0), |w| (w[0], w[1], w[2]));
            worker_balance = balance;
            prop_assert_eq!(in_flight, 0, "a claim left in flight at {}", record);
            let paid_to_worker = balance + worker_withdrawn;
            prop_assert_eq!(paid_to_worker, tokens_paid * fee, "worker paid other than its counter at {}", record);
            let client_paid = deposited - client_withdrawn - client_balance;
            let received = match figures(&record, "proxy") {
                Some(p) => p[2] + p[3] + p[4] + proxy_withdrawn + paid_to_worker - STAKE - staked,
                None => 0,
            };
            prop_assert_eq!(client_paid, received, "the client paid other than the proxy received at {}", record);
            prop_assert!(client_paid <= tokens_used * price, "the client paid {} for {} tokens at {}", client_paid, tokens_used, record);
            for who in ["proxy", "client", "worker"] {
                if let Some(f) = figures(&record, who) {
                    prop_assert!(*f.last().unwrap() <= RESERVE_MTON, "{} keeps {} mTON beyond its books at {}", who, f.last().unwrap(), record);
                }
            }
        }
    }
}
