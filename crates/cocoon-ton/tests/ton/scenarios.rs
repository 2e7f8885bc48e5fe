//! The settlement scenarios (contracts/test/scenarios.json) in tycho-vm, on the committed
//! contract code, each step sent from the acting party's wallet as a tonlib-core-signed wallet
//! v5 request. Exit codes and book-kept balances after every step must equal
//! contracts/test/expected.json, which the reference emulator (@ton/sandbox) produced and is
//! held to as well.

use crate::NET;
use std::collections::{BTreeMap, HashSet};

use cocoon_ledger::{NetworkParams, PaymentMessage};
use cocoon_ton::code::Contract;
use cocoon_ton::emulator::{Chain, SKIPPED};
use cocoon_ton::layout::{self, Deployable, account_id, coins, op};
use cocoon_ton::wallet::{Outgoing, Wallet};
use num_bigint::BigInt;
use ring::signature::Ed25519KeyPair;
use serde_json::{Value, json};
use tonlib_core::TonAddress;
use tonlib_core::cell::ArcCell;
use tycho_types::cell::HashBytes;

const START: u32 = 1_700_000_000;
const GAS: u128 = 100_000_000;
const NAMES: [&str; 6] = ["owner", "proxy", "client", "client2", "worker", "stranger"];

fn contracts_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contracts")
}

fn read_json(rel: &str) -> Value {
    let text = std::fs::read_to_string(contracts_dir().join(rel)).expect(rel);
    serde_json::from_str(&text).expect(rel)
}

fn hash(a: &TonAddress) -> HashBytes {
    HashBytes(a.hash_part.as_slice().try_into().unwrap())
}

struct Party {
    wallet: Wallet,
    seed: [u8; 32],
    seqno: u32,
}

struct Run {
    chain: Chain,
    parties: BTreeMap<&'static str, Party>,
    params: NetworkParams,
    /// What the proxy contract holds (its get_params) once open: client and worker contracts
    /// are bound to these, as the TON backend reads them; the scenario's parameters before.
    terms: NetworkParams,
    root: Deployable,
    proxy: TonAddress,
    /// The client and worker code the proxy contract was opened with (its get_terms hashes):
    /// the committed code, or an upgrade's.
    client_code: ArcCell,
    worker_code: ArcCell,
}

impl Run {
    fn new(params: NetworkParams) -> Self {
        let mut chain = Chain::new(START);
        let parties: BTreeMap<_, _> = NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let seed = [i as u8 + 1; 32];
                let wallet = Wallet::from_seed(seed, NET).unwrap();
                chain.fund(hash(wallet.address()), 100_000 * 1_000_000_000);
                (
                    *n,
                    Party {
                        wallet,
                        seed,
                        seqno: 0,
                    },
                )
            })
            .collect();
        let root = layout::root(parties["owner"].wallet.address(), &params, NET).unwrap();
        let proxy_party = &parties["proxy"].wallet;
        let proxy = layout::proxy_address(
            &root.address,
            proxy_party.address(),
            &proxy_party.public_key(),
        )
        .unwrap();
        Self {
            chain,
            parties,
            terms: params.clone(),
            params,
            root,
            proxy,
            client_code: Contract::Client.code(),
            worker_code: Contract::Worker.code(),
        }
    }

    fn client(&self, name: &str) -> Deployable {
        let p = &self.parties["proxy"].wallet;
        layout::client_of(
            self.client_code.clone(),
            &self.proxy,
            self.parties[name].wallet.address(),
            &p.public_key(),
            NET,
            &self.terms,
        )
        .unwrap()
    }

    fn worker(&self, name: &str) -> Deployable {
        let p = &self.parties["proxy"].wallet;
        layout::worker_of(
            self.worker_code.clone(),
            &self.proxy,
            self.parties[name].wallet.address(),
            &p.public_key(),
            NET,
            &self.terms,
        )
        .unwrap()
    }

    /// The proxy contract as the root reports it (`proxy_account`), as the TON backend reads
    /// it: after a code upgrade a proxy re-opens at another address.
    fn read_proxy(&mut self) {
        let key = self.parties["proxy"].wallet.public_key();
        let key = BigInt::from_bytes_be(num_bigint::Sign::Plus, &key);
        if let Ok(v) = self
            .chain
            .get(&hash(&self.root.address), "proxy_account", &[key])
            && let [account] = v.as_slice()
        {
            let (_, bytes) = account.to_bytes_be();
            let mut id = [0u8; 32];
            id[32 - bytes.len()..].copy_from_slice(&bytes);
            self.proxy = TonAddress::new(0, id.into());
        }
    }

    fn read_terms(&mut self) {
        let names = [
            "price_per_token",
            "worker_fee_per_token",
            "prompt_multiplier",
            "cached_multiplier",
            "completion_multiplier",
            "reasoning_multiplier",
            "min_client_stake",
            "min_proxy_stake",
            "client_close_delay",
            "proxy_close_delay",
        ];
        self.terms = match self.chain.get(&hash(&self.proxy), "get_params", &[]) {
            Ok(v) if v.len() == names.len() => {
                let map: serde_json::Map<_, _> = names
                    .iter()
                    .zip(&v)
                    .map(|(n, x)| ((*n).to_owned(), json!(u64::try_from(x).unwrap())))
                    .collect();
                serde_json::from_value(Value::Object(map)).unwrap()
            }
            _ => self.params.clone(),
        };
    }

    fn read_codes(&mut self) {
        let Ok(v) = self.chain.get(&hash(&self.proxy), "get_terms", &[]) else {
            return; // not open, or not a proxy contract of ours
        };
        let known = |contract: Contract, held: &BigInt, now: &ArcCell| {
            ["committed", "v2"]
                .into_iter()
                .map(|n| code(n, contract))
                .find(|c| {
                    BigInt::from_bytes_be(num_bigint::Sign::Plus, c.cell_hash().as_slice()) == *held
                })
                .unwrap_or_else(|| now.clone())
        };
        self.client_code = known(Contract::Client, &v[0], &self.client_code);
        self.worker_code = known(Contract::Worker, &v[1], &self.worker_code);
    }

    fn send(&mut self, from: &str, messages: Vec<Outgoing>) -> Vec<cocoon_ton::emulator::Tx> {
        let party = self.parties.get_mut(from).unwrap();
        let boc = party
            .wallet
            .request(
                party.seqno,
                self.chain.now + 60,
                &messages,
                party.seqno == 0,
            )
            .unwrap();
        party.seqno += 1;
        self.chain
            .send_external(&boc)
            .expect("the wallet accepts its own request")
    }

    /// Signs for the scenario's network, or for the network id or workchain the step names
    /// (a message signed elsewhere, replayed here).
    fn sign(&self, step: &Value, message: PaymentMessage) -> Vec<u8> {
        let signer = step["signer"].as_str().unwrap_or("proxy");
        let key = Ed25519KeyPair::from_seed_unchecked(&self.parties[signer].seed).unwrap();
        let network = cocoon_ledger::Network {
            id: step["network_id"].as_i64().map_or(NET.id, |id| id as i32),
            workchain: step["workchain"]
                .as_i64()
                .map_or(NET.workchain, |w| w as i8),
        };
        message.sign(&key, network).0
    }

    fn ints(&self, at: &TonAddress, method: &str, args: &[BigInt]) -> Value {
        let values = self.chain.get(&hash(at), method, args).unwrap();
        Value::Array(
            values
                .iter()
                .map(|v| json!(i64::try_from(v).unwrap()))
                .collect(),
        )
    }

    fn state(&self) -> Value {
        let mut out = serde_json::Map::new();
        let key = BigInt::from_bytes_be(
            num_bigint::Sign::Plus,
            &self.parties["proxy"].wallet.public_key(),
        );
        if self.chain.is_active(&hash(&self.root.address)) {
            // The proxy's status, whether model 33 is allowed, and who owns the root and who is
            // proposed (as indexes into NAMES, -1 for nobody).
            let mut root = self.ints(&self.root.address, "proxy_status", &[key]);
            let model = self.ints(&self.root.address, "model_allowed", &[BigInt::from(0x33)]);
            let owners = self
                .chain
                .get(&hash(&self.root.address), "get_owner", &[])
                .unwrap();
            let who = |h: &BigInt| {
                NAMES
                    .iter()
                    .position(|n| {
                        let w = hash(self.parties[n].wallet.address());
                        BigInt::from_bytes_be(num_bigint::Sign::Plus, w.as_slice()) == *h
                    })
                    .map_or(-1, |i| i64::try_from(i).unwrap())
            };
            let figures = root.as_array_mut().unwrap();
            figures.extend(model.as_array().unwrap().iter().cloned());
            figures.push(json!(who(&owners[0])));
            figures.push(json!(who(&owners[1])));
            out.insert("root".into(), root);
        }
        // Each contract's figures, then what it holds beyond the ones it books (balance, stake,
        // owed), in milliton: only the storage reserve once every message's excess goes back.
        let with_spare = |at: &TonAddress, method: &str, booked: &[usize]| {
            let mut v = self.ints(at, method, &[]);
            let figures = v.as_array_mut().unwrap();
            let books: i64 = booked.iter().map(|i| figures[*i].as_i64().unwrap()).sum();
            let held = self.chain.account(&hash(at)).map_or(0, |a| a.balance) as i64;
            figures.push(json!(((held - books) as f64 / 1e6).round() as i64));
            v
        };
        // A contract whose code has no `get_proxy` (one that refuses every message) is not a
        // proxy contract to report.
        if self.chain.is_active(&hash(&self.proxy))
            && self.chain.get(&hash(&self.proxy), "get_proxy", &[]).is_ok()
        {
            out.insert(
                "proxy".into(),
                with_spare(&self.proxy, "get_proxy", &[2, 3, 4]),
            );
        }
        // A contract of upgraded code answers `version`: its figures end with the version.
        let versioned = |at: &TonAddress, mut v: Value| {
            if let Ok(version) = self.chain.get(&hash(at), "version", &[]) {
                let version = i64::try_from(&version[0]).unwrap();
                v.as_array_mut().unwrap().push(json!(version));
            }
            v
        };
        for n in ["client", "client2"] {
            let c = self.client(n).address;
            if self.chain.is_active(&hash(&c)) {
                out.insert(n.into(), versioned(&c, with_spare(&c, "get_client", &[2])));
            }
        }
        let w = self.worker("worker").address;
        if self.chain.is_active(&hash(&w)) {
            out.insert(
                "worker".into(),
                versioned(&w, with_spare(&w, "get_worker", &[1])),
            );
        }
        Value::Object(out)
    }
}

fn u(step: &Value, key: &str) -> u128 {
    step[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {step}")) as u128
}

fn s<'a>(step: &'a Value, key: &str) -> &'a str {
    step[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {step}"))
}

fn hash256(hex: &str) -> num_bigint::BigUint {
    num_bigint::BigUint::parse_bytes(hex.as_bytes(), 16).unwrap()
}

/// Code a step installs: the committed `contract`, or a fixture the contracts' build writes
/// (`v2`: the committed source plus a `version` getter; `refusing`: refuses every message).
fn code(name: &str, contract: Contract) -> ArcCell {
    match name {
        "committed" => contract.code(),
        "v2" => {
            let file = format!("build/fixtures/{}-v2.boc", contract.name());
            cocoon_ton::code::parse_boc(&std::fs::read(contracts_dir().join(file)).unwrap())
                .unwrap()
        }
        "refusing" => cocoon_ton::code::parse_boc(
            &std::fs::read(contracts_dir().join("build/fixtures/refusing.boc")).unwrap(),
        )
        .unwrap(),
        other => panic!("no code named {other}"),
    }
}

/// The message a step sends, and the party whose wallet sends it.
fn message(run: &Run, step: &Value, qid: u64) -> (&'static str, Outgoing) {
    let root = run.root.address.clone();
    let proxy = run.proxy.clone();
    let out = |from: &str, dest: &TonAddress, value: u128, body: ArcCell, state_init| {
        let from = *NAMES.iter().find(|n| **n == from).expect("a named party");
        let value = step["value"].as_u64().map_or(value, u128::from);
        let dest = dest.clone();
        (
            from,
            Outgoing {
                dest,
                value,
                body,
                state_init,
            },
        )
    };
    match s(step, "do") {
        "deploy_root" => {
            let init = run.root.state_init.clone();
            out(
                "owner",
                &root,
                1_000_000_000,
                layout::empty_cell(),
                Some(init),
            )
        }
        "set_params" => {
            let mut p = run.params.clone();
            p.worker_fee_per_token = u(step, "worker_fee_per_token");
            let cell = layout::params(&p).unwrap();
            let body = layout::body(op::SET_PARAMS, qid, |b| {
                b.store_reference(&cell).map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        kind @ ("allow_image" | "revoke_image") => {
            let code = if kind == "allow_image" {
                op::ALLOW_IMAGE
            } else {
                op::REVOKE_IMAGE
            };
            let role = step["role"].as_u64().unwrap() as u8;
            let h = hash256(s(step, "hash"));
            let body = layout::body(code, qid, |b| {
                b.store_u8(8, role)?.store_uint(256, &h).map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        "allow_model" => {
            let h = hash256(s(step, "hash"));
            let body =
                layout::body(op::ALLOW_MODEL, qid, |b| b.store_uint(256, &h).map(|_| ())).unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        "set_codes" => {
            let codes = layout::codes(
                &code(
                    step["proxy_code"].as_str().unwrap_or("committed"),
                    Contract::Proxy,
                ),
                &code(
                    step["client_code"].as_str().unwrap_or("committed"),
                    Contract::Client,
                ),
                &code(
                    step["worker_code"].as_str().unwrap_or("committed"),
                    Contract::Worker,
                ),
            )
            .unwrap();
            let body = layout::body(op::SET_CODES, qid, |b| {
                b.store_reference(&codes).map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        "upgrade_root" => {
            let new = code(s(step, "code"), Contract::Root);
            let body = layout::body(op::UPGRADE_ROOT, qid, |b| {
                b.store_reference(&new).map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        kind @ ("propose_owner" | "accept_owner" | "revoke_model" | "unregister_proxy") => {
            let body = match kind {
                "propose_owner" => {
                    let to = run.parties[s(step, "to")].wallet.address().clone();
                    layout::body(op::PROPOSE_OWNER, qid, |b| b.store_address(&to).map(|_| ()))
                }
                "accept_owner" => layout::body(op::ACCEPT_OWNER, qid, |_| Ok(())),
                "revoke_model" => {
                    let h = hash256(s(step, "hash"));
                    layout::body(op::REVOKE_MODEL, qid, |b| b.store_uint(256, &h).map(|_| ()))
                }
                _ => {
                    let key = run.parties[s(step, "proxy")].wallet.public_key();
                    layout::body(op::UNREGISTER_PROXY, qid, |b| {
                        b.store_slice(&key).map(|_| ())
                    })
                }
            }
            .unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        "proxy_add_stake" => {
            let amount = u(step, "amount");
            let body = layout::body(op::PROXY_ADD_STAKE, qid, |b| {
                b.store_coins(&coins(amount)).map(|_| ())
            })
            .unwrap();
            out("proxy", &proxy, amount + GAS, body, None)
        }
        "register_proxy" => {
            let p = &run.parties[s(step, "proxy")].wallet;
            let (key, wallet) = (p.public_key(), p.address().clone());
            let endpoint = std::sync::Arc::new(
                tonlib_core::cell::CellBuilder::new()
                    .store_string("proxy.example:8443")
                    .unwrap()
                    .build()
                    .unwrap(),
            );
            let body = layout::body(op::REGISTER_PROXY, qid, |b| {
                b.store_slice(&key)?
                    .store_address(&wallet)?
                    .store_reference(&endpoint)
                    .map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &root, GAS, body, None)
        }
        "open_proxy" => {
            let key = run.parties[s(step, "proxy")].wallet.public_key();
            let stake = u(step, "stake");
            let body = layout::body(op::OPEN_PROXY, qid, |b| {
                b.store_slice(&key)?.store_coins(&coins(stake)).map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &root, stake + GAS, body, None)
        }
        "proxy_withdraw" => {
            let amount = u(step, "amount");
            let body = layout::body(op::PROXY_WITHDRAW, qid, |b| {
                b.store_coins(&coins(amount)).map(|_| ())
            })
            .unwrap();
            out("proxy", &proxy, GAS, body, None)
        }
        kind @ ("proxy_close" | "proxy_finish_close") => {
            let code = if kind == "proxy_close" {
                op::PROXY_CLOSE
            } else {
                op::PROXY_FINISH_CLOSE
            };
            out(
                "proxy",
                &proxy,
                GAS,
                layout::body(code, qid, |_| Ok(())).unwrap(),
                None,
            )
        }
        "proxy_refund_client" => {
            let client = run.parties[s(step, "client")].wallet.address().clone();
            let body = layout::body(op::PROXY_REFUND_CLIENT, qid, |b| {
                b.store_address(&client).map(|_| ())
            })
            .unwrap();
            out("proxy", &proxy, GAS, body, None)
        }
        "client_deposit" => {
            let name = s(step, "client");
            let k = run.client(name);
            let amount = u(step, "amount");
            let body = layout::body(op::CLIENT_DEPOSIT, qid, |b| {
                b.store_coins(&coins(amount)).map(|_| ())
            })
            .unwrap();
            out(name, &k.address, amount + GAS, body, Some(k.state_init))
        }
        kind @ ("client_stake" | "client_withdraw") => {
            let code = if kind == "client_stake" {
                op::CLIENT_STAKE
            } else {
                op::CLIENT_WITHDRAW
            };
            let name = s(step, "client");
            let at = run.client(name).address;
            let amount = u(step, "amount");
            let body =
                layout::body(code, qid, |b| b.store_coins(&coins(amount)).map(|_| ())).unwrap();
            out(name, &at, GAS, body, None)
        }
        kind @ ("client_close" | "client_finish_close") => {
            let code = if kind == "client_close" {
                op::CLIENT_CLOSE
            } else {
                op::CLIENT_FINISH_CLOSE
            };
            let name = s(step, "client");
            let at = run.client(name).address;
            out(
                name,
                &at,
                GAS,
                layout::body(code, qid, |_| Ok(())).unwrap(),
                None,
            )
        }
        "charge" => {
            let name = s(step, "client");
            let named = run.client(step["names"].as_str().unwrap_or(name)).address;
            let tokens = step["tokens"].as_u64().unwrap();
            let message = run.sign(step, layout::charge_message(tokens, tokens, &named));
            let at = run.client(name).address;
            out(
                s(step, "from"),
                &at,
                GAS,
                layout::signed_payment(op::CHARGE, &message).unwrap(),
                None,
            )
        }
        "fake_charged" => {
            let client = run.parties[s(step, "client")].wallet.address().clone();
            let from = run.parties[s(step, "from")].wallet.address().clone();
            // Charged: tokens before and after, cost, client, where the excess goes.
            let body = layout::body(op::CHARGED, 0, |b| {
                b.store_u64(64, 0)?
                    .store_u64(64, 50)?
                    .store_coins(&coins(1000))?
                    .store_address(&client)?
                    .store_address(&from)
                    .map(|_| ())
            })
            .unwrap();
            out(s(step, "from"), &proxy, GAS, body, None)
        }
        "payout" => {
            let name = s(step, "worker");
            let k = run.worker(name);
            let named = match step["names"].as_str() {
                Some(other) => run.client(other).address,
                None => k.address.clone(),
            };
            let tokens = step["tokens"].as_u64().unwrap();
            let message = PaymentMessage::PayWorker {
                query_id: tokens,
                tokens,
                contract: account_id(&named),
            };
            let signed = run.sign(step, message);
            out(
                name,
                &k.address,
                GAS,
                layout::signed_payment(op::PAYOUT, &signed).unwrap(),
                Some(k.state_init),
            )
        }
        "worker_withdraw" => {
            let name = s(step, "worker");
            let at = run.worker(name).address;
            out(
                name,
                &at,
                GAS,
                layout::body(op::WORKER_WITHDRAW, qid, |_| Ok(())).unwrap(),
                None,
            )
        }
        other => panic!("unknown step {other}"),
    }
}

/// A scenario being run: the chain and parties, stepped one scenario step at a time.
pub(crate) struct Scenario {
    run: Run,
    wallets: HashSet<HashBytes>,
    steps: u64,
}

impl Scenario {
    pub(crate) fn new(params: &NetworkParams) -> Self {
        let run = Run::new(params.clone());
        let wallets = run
            .parties
            .values()
            .map(|p| hash(p.wallet.address()))
            .collect();
        Self {
            run,
            wallets,
            steps: 0,
        }
    }

    /// Runs one step; returns its record: the step's name, the exit codes of the contract
    /// transactions it caused, and the contracts' figures after it.
    pub(crate) fn step(&mut self, step: &Value) -> Value {
        let qid = self.steps;
        self.steps += 1;
        let run = &mut self.run;
        run.read_proxy();
        run.read_terms();
        run.read_codes();
        let txs = if s(step, "do") == "advance" {
            run.chain.now += step["seconds"].as_u64().unwrap() as u32;
            Vec::new()
        } else {
            // A batch is one wallet request carrying several messages.
            let subs = match step["steps"].as_array() {
                Some(subs) => subs.iter().collect(),
                None => vec![step],
            };
            let messages: Vec<_> = subs.iter().map(|sub| message(run, sub, qid)).collect();
            let from = messages[0].0;
            assert!(
                messages.iter().all(|(f, _)| *f == from),
                "a batch comes from one wallet"
            );
            run.send(from, messages.into_iter().map(|(_, m)| m).collect())
        };
        let exits: Vec<Value> = txs
            .iter()
            .filter(|t| !self.wallets.contains(&t.account))
            .map(|t| {
                if t.exit_code == SKIPPED {
                    json!("skipped")
                } else {
                    json!(t.exit_code)
                }
            })
            .collect();
        let label = step["label"]
            .as_str()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        run.read_proxy();
        run.read_terms();
        run.read_codes();
        json!({ "step": format!("{}{label}", s(step, "do")), "exits": exits, "state": run.state() })
    }

    /// All the TON on the chain: the emulator charges no fees, so it never changes.
    pub(crate) fn total_ton(&self) -> u128 {
        self.run.chain.total_balance()
    }
}

fn run_scenario(params: &NetworkParams, steps: &[Value]) -> Vec<Value> {
    let mut scenario = Scenario::new(params);
    steps.iter().map(|step| scenario.step(step)).collect()
}

/// The parameters the scenarios run with (contracts/test/scenarios.json).
pub(crate) fn scenario_params() -> NetworkParams {
    serde_json::from_value(read_json("test/scenarios.json")["params"].clone()).unwrap()
}

#[test]
fn scenarios_in_tycho_vm_match_the_reference_emulator() {
    let spec = read_json("test/scenarios.json");
    let expected = read_json("test/expected.json");
    let params: NetworkParams = serde_json::from_value(spec["params"].clone()).unwrap();
    let scenarios = spec["scenarios"].as_object().unwrap();
    assert_eq!(scenarios.len(), expected.as_object().unwrap().len());
    for (name, steps) in scenarios {
        let actual = run_scenario(&params, steps.as_array().unwrap());
        let wanted = expected[name]
            .as_array()
            .unwrap_or_else(|| panic!("{name} in expected.json"));
        assert_eq!(actual.len(), wanted.len(), "{name}");
        for (i, (a, e)) in actual.iter().zip(wanted).enumerate() {
            assert_eq!(a, e, "{name} step {i}");
        }
    }
}

#[test]
fn committed_code_matches_recorded_hashes() {
    for c in Contract::ALL {
        assert_eq!(
            hex::encode(c.code().cell_hash().as_slice()),
            c.recorded_hash(),
            "{}",
            c.name()
        );
    }
}
