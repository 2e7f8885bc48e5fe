//! The single-machine ledger: the rules of [`LedgerState`] over a redb database. Every
//! operation's changes are committed (fsync'd) in one transaction before `execute` returns, so
//! an acknowledged operation survives a crash and a refused or failed one leaves nothing.

use std::collections::HashMap;
use std::path::Path;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::LedgerError;
use crate::ledger::{Ledger, Receipt, Tx};
use crate::registry::{NetworkParams, Registry};
use crate::state::{LedgerState, Touched};
use crate::types::{Address, ClientContract, Nanoton, Network, PublicKey};
use crate::wallet::SignedTx;

/// Contracts by `proxy/<address>`, `client/<address>`, `worker/<address>`; JSON values.
const CONTRACTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("contracts");
/// `registry` and `totals`.
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
/// The last nonce of each sender of signed transactions.
const NONCES: TableDefinition<'static, &[u8; 32], u64> = TableDefinition::new("nonces");

#[derive(serde::Serialize, serde::Deserialize)]
struct Totals {
    deposited: Nanoton,
    paid_out: Nanoton,
}

/// The ledger executed in this process, its state kept durably in a redb database.
pub struct EmbeddedLedger {
    db: Database,
    /// The committed state; operations run one at a time, as on a chain. `Err` once memory
    /// and disk may disagree (a commit failed and the database could not be read back): from
    /// then on every operation is refused until the ledger is reopened.
    state: Mutex<Result<Committed, String>>,
}

/// What was last committed: the contracts' state, and each signer's last nonce.
#[derive(Clone)]
struct Committed {
    state: LedgerState,
    nonces: HashMap<PublicKey, u64>,
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl EmbeddedLedger {
    /// Opens the ledger at `path`, creating it with `owner` as registry owner and a fresh
    /// random [`Network`] id if new. An existing ledger must have the same owner.
    pub fn open(path: &Path, owner: PublicKey) -> Result<Self, LedgerError> {
        Self::open_on(path, owner, None)
    }

    /// Opens the ledger at `path` as [`open`](Self::open) does, creating it on `network` if
    /// new; an existing ledger must be on `network` already.
    pub fn open_network(
        path: &Path,
        owner: PublicKey,
        network: Network,
    ) -> Result<Self, LedgerError> {
        Self::open_on(path, owner, Some(network))
    }

    fn open_on(
        path: &Path,
        owner: PublicKey,
        network: Option<Network>,
    ) -> Result<Self, LedgerError> {
        let db = Database::create(path).map_err(storage)?;
        let committed = match load(&db)? {
            Some(Committed { state, nonces }) => {
                if state.registry.owner != owner {
                    return Err(LedgerError::Storage(format!(
                        "{} belongs to another registry owner",
                        path.display()
                    )));
                }
                if let Some(network) = network
                    && state.registry.network != network
                {
                    return Err(LedgerError::Storage(format!(
                        "{} is a ledger of {}, not {network}",
                        path.display(),
                        state.registry.network
                    )));
                }
                Committed { state, nonces }
            }
            None => {
                let state = LedgerState::new(owner, network.unwrap_or_else(Network::random));
                persist(&db, &state, &[Touched::Registry, Touched::Totals], None)?;
                Committed {
                    state,
                    nonces: HashMap::new(),
                }
            }
        };
        Ok(Self {
            db,
            state: Mutex::new(Ok(committed)),
        })
    }

    /// Executes a transaction signed by its sender (what the ledger service receives), at the
    /// ledger's own clock `now`. The nonce is spent even when the operation is refused, so a
    /// refused transaction cannot be replayed later, when it might pass.
    pub fn execute_signed(&self, signed: &SignedTx, now: u64) -> Result<Receipt, LedgerError> {
        let body = signed.open()?;
        let network = self.read(|s| s.registry.network)?;
        if body.network != network {
            return Err(LedgerError::BadTransaction(format!(
                "signed for {}, this ledger is {network}",
                body.network
            )));
        }
        let tx = Tx {
            sender: body.sender,
            op: body.op,
            now,
        };
        self.execute_sync(&tx, Some(body.nonce))
    }

    /// Reads the committed state.
    fn read<R>(&self, f: impl FnOnce(&LedgerState) -> R) -> Result<R, LedgerError> {
        match &*self.state.lock() {
            Ok(c) => Ok(f(&c.state)),
            Err(e) => Err(LedgerError::Storage(e.clone())),
        }
    }

    fn execute_sync(&self, tx: &Tx, nonce: Option<u64>) -> Result<Receipt, LedgerError> {
        let mut guard = self.state.lock();
        let committed = guard
            .as_mut()
            .map_err(|e| LedgerError::Storage(e.clone()))?;
        let spent = match nonce {
            Some(got) => {
                let last = committed.nonces.get(&tx.sender).copied().unwrap_or(0);
                if got <= last {
                    return Err(LedgerError::StaleNonce { last, got });
                }
                Some((tx.sender, got))
            }
            None => None,
        };
        // `apply` refuses before changing anything, so only a failed commit needs undoing:
        // then the database, which holds the last commit, is read back.
        let outcome = committed.state.apply(tx);
        let touched = match &outcome {
            Ok((_, touched)) => touched.as_slice(),
            Err(_) if spent.is_none() => return outcome.map(|(r, _)| r),
            Err(_) => &[],
        };
        if let Err(e) = persist(&self.db, &committed.state, touched, spent) {
            *guard = match load(&self.db) {
                Ok(Some(committed)) => Ok(committed),
                _ => Err(format!("ledger needs reopening after a failed commit: {e}")),
            };
            return Err(e);
        }
        if let Some((sender, n)) = spent {
            committed.nonces.insert(sender, n);
        }
        outcome.map(|(r, _)| r)
    }
}

fn key(t: &Touched) -> Option<String> {
    match t {
        Touched::Proxy(a) => Some(format!("proxy/{a}")),
        Touched::Client(a) => Some(format!("client/{a}")),
        Touched::Worker(a) => Some(format!("worker/{a}")),
        Touched::Registry | Touched::Totals => None,
    }
}

fn persist(
    db: &Database,
    state: &LedgerState,
    touched: &[Touched],
    nonce: Option<(PublicKey, u64)>,
) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        if let Some((sender, n)) = nonce {
            let mut nonces = txn.open_table(NONCES).map_err(storage)?;
            nonces.insert(&sender, n).map_err(storage)?;
        }
        let mut contracts = txn.open_table(CONTRACTS).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        for t in touched {
            let value = match t {
                Touched::Registry => {
                    let v = serde_json::to_vec(&state.registry).map_err(storage)?;
                    meta.insert("registry", v.as_slice()).map_err(storage)?;
                    continue;
                }
                Touched::Totals => {
                    let v = serde_json::to_vec(&Totals {
                        deposited: state.deposited,
                        paid_out: state.paid_out,
                    })
                    .map_err(storage)?;
                    meta.insert("totals", v.as_slice()).map_err(storage)?;
                    continue;
                }
                Touched::Proxy(a) => serde_json::to_vec(&state.proxies[a]),
                Touched::Client(a) => serde_json::to_vec(&state.clients[a]),
                Touched::Worker(a) => serde_json::to_vec(&state.workers[a]),
            }
            .map_err(storage)?;
            let k = key(t).expect("contracts have keys");
            contracts
                .insert(k.as_str(), value.as_slice())
                .map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)
}

fn load(db: &Database) -> Result<Option<Committed>, LedgerError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    let Some(registry) = meta.get("registry").map_err(storage)? else {
        return Ok(None);
    };
    let registry: Registry = serde_json::from_slice(registry.value()).map_err(storage)?;
    let totals: Totals = match meta.get("totals").map_err(storage)? {
        Some(v) => serde_json::from_slice(v.value()).map_err(storage)?,
        None => return Err(LedgerError::Storage("totals are missing".into())),
    };
    let mut state = LedgerState::new(registry.owner, registry.network);
    state.registry = registry;
    state.deposited = totals.deposited;
    state.paid_out = totals.paid_out;
    let contracts = txn.open_table(CONTRACTS).map_err(storage)?;
    for entry in contracts.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let (kind, _) = k
            .value()
            .split_once('/')
            .ok_or_else(|| LedgerError::Storage(format!("bad key {}", k.value())))?;
        let v = v.value();
        match kind {
            "proxy" => {
                let c: crate::ProxyContract = serde_json::from_slice(v).map_err(storage)?;
                state.proxies.insert(crate::Address::proxy(&c.key), c);
            }
            "client" => {
                let c: crate::ClientContract = serde_json::from_slice(v).map_err(storage)?;
                state
                    .clients
                    .insert(crate::Address::client(&c.proxy, &c.client), c);
            }
            "worker" => {
                let c: crate::WorkerContract = serde_json::from_slice(v).map_err(storage)?;
                state
                    .workers
                    .insert(crate::Address::worker(&c.proxy, &c.worker), c);
            }
            other => return Err(LedgerError::Storage(format!("unknown record kind {other}"))),
        }
    }
    let mut nonces = HashMap::new();
    match txn.open_table(NONCES) {
        Ok(table) => {
            for entry in table.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                nonces.insert(*k.value(), v.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(storage(e)),
    }
    Ok(Some(Committed { state, nonces }))
}

#[async_trait::async_trait]
impl Ledger for EmbeddedLedger {
    /// One durable commit (an fsync) per operation: callers batch what they can, as the
    /// proxy does with its signed counters.
    async fn execute(&self, tx: Tx) -> Result<Receipt, LedgerError> {
        self.execute_sync(&tx, None)
    }

    async fn snapshot(&self) -> Result<LedgerState, LedgerError> {
        self.read(LedgerState::clone)
    }

    async fn params(&self) -> Result<NetworkParams, LedgerError> {
        self.read(|s| s.registry.params.clone())
    }

    async fn network(&self) -> Result<Network, LedgerError> {
        self.read(|s| s.registry.network)
    }

    async fn client(
        &self,
        proxy: PublicKey,
        client: PublicKey,
    ) -> Result<Option<ClientContract>, LedgerError> {
        self.read(|s| s.clients.get(&Address::client(&proxy, &client)).cloned())
    }
}
