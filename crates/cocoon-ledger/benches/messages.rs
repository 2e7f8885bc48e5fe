//! Signed payment messages: created and verified per second, and what applying a charge costs
//! in memory and with a durable commit. `cargo bench -p cocoon-ledger --bench messages`.

use cocoon_ledger::{
    Address, EmbeddedLedger, Ledger, LedgerState, NetworkParams, Op, PaymentMessage, Tx,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ring::signature::{Ed25519KeyPair, KeyPair};

const OWNER: [u8; 32] = [1; 32];
const CLIENT: [u8; 32] = [2; 32];
const TON: u128 = 1_000_000_000;
const NET: cocoon_ledger::Network = cocoon_ledger::Network::basechain(7);

fn setup_ops(p: [u8; 32]) -> Vec<Tx> {
    let tx = |sender, op| Tx { sender, op, now: 1 };
    vec![
        tx(
            OWNER,
            Op::RegisterProxy {
                key: p,
                address: "p".into(),
            },
        ),
        tx(
            p,
            Op::ProxyOpen {
                stake: NetworkParams::default().min_proxy_stake,
            },
        ),
        tx(
            CLIENT,
            Op::ClientDeposit {
                proxy: p,
                amount: 1_000_000 * TON,
            },
        ),
    ]
}

fn messages(c: &mut Criterion) {
    let proxy = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
    let p: [u8; 32] = proxy.public_key().as_ref().try_into().unwrap();
    let contract = Address::client(&p, &CLIENT);
    let msg = |n: u64| PaymentMessage::ChargeClient {
        query_id: n,
        tokens_used: n,
        contract,
    };
    let mut group = c.benchmark_group("payment_message");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| b.iter(|| msg(42).sign(&proxy, NET)));
    let signed = msg(42).sign(&proxy, NET);
    group.bench_function("verify", |b| b.iter(|| signed.verify(&p, NET).unwrap()));

    let mut state = LedgerState::new(OWNER, NET);
    for t in setup_ops(p) {
        state.apply(&t).unwrap();
    }
    let mut n = 0;
    group.bench_function("apply_charge_in_memory", |b| {
        b.iter(|| {
            n += 1;
            let op = Op::Charge {
                proxy: p,
                message: msg(n).sign(&proxy, NET),
            };
            state
                .apply(&Tx {
                    sender: p,
                    op,
                    now: 2,
                })
                .unwrap()
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(&dir.path().join("bench.redb"), OWNER).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for t in setup_ops(p) {
        rt.block_on(ledger.execute(t)).unwrap();
    }
    let mut n = 0;
    group.bench_function("execute_charge_durable", |b| {
        b.iter(|| {
            n += 1;
            let op = Op::Charge {
                proxy: p,
                message: msg(n).sign(&proxy, NET),
            };
            rt.block_on(ledger.execute(Tx {
                sender: p,
                op,
                now: 2,
            }))
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, messages);
criterion_main!(benches);
