//! The single-machine ledger: the rules of [`LedgerState`] over a redb database. Every
//! operation's changes are committed (fsync'd) in one transaction before `execute` returns, so
//! an acknowledged operation survives a crash and a refused or failed one leaves nothing.

use std::path::Path;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::LedgerError;
use crate::ledger::{Ledger, Receipt, Tx};
use crate::registry::Registry;
use crate::state::{LedgerState, Touched};
use crate::types::{Nanoton, PublicKey};

/// Contracts by `proxy/<address>`, `client/<address>`, `worker/<address>`; JSON values.
const CONTRACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("contracts");
/// `registry` and `totals`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

#[derive(serde::Serialize, serde::Deserialize)]
struct Totals {
    deposited: Nanoton,
    paid_out: Nanoton,
}

pub struct EmbeddedLedger {
    db: Database,
    /// The committed state; operations run one at a time, as on a chain. `Err` once memory
    /// and disk may disagree (a commit failed and the database could not be read back): from
    /// then on every operation is refused until the ledger is reopened.
    state: Mutex<Result<LedgerState, String>>,
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl EmbeddedLedger {
    /// Opens the ledger at `path`, creating it with `owner` as registry owner if new. An
    /// existing ledger must have the same owner.
    pub fn open(path: &Path, owner: PublicKey) -> Result<Self, LedgerError> {
        let db = Database::create(path).map_err(storage)?;
        let state = match load(&db)? {
            Some(state) => {
                if state.registry.owner != owner {
                    return Err(LedgerError::Storage(format!(
                        "{} belongs to another registry owner",
                        path.display()
                    )));
                }
                state
            }
            None => {
                let state = LedgerState::new(owner);
                persist(&db, &state, &[Touched::Registry, Touched::Totals])?;
                state
            }
        };
        Ok(Self {
            db,
            state: Mutex::new(Ok(state)),
        })
    }

    fn execute_sync(&self, tx: &Tx) -> Result<Receipt, LedgerError> {
        let mut guard = self.state.lock();
        let state = guard
            .as_mut()
            .map_err(|e| LedgerError::Storage(e.clone()))?;
        // `apply` refuses before changing anything, so only a failed commit needs undoing:
        // then the database, which holds the last commit, is read back.
        let (receipt, touched) = state.apply(tx)?;
        if let Err(e) = persist(&self.db, state, &touched) {
            *guard = match load(&self.db) {
                Ok(Some(committed)) => Ok(committed),
                _ => Err(format!("ledger needs reopening after a failed commit: {e}")),
            };
            return Err(e);
        }
        Ok(receipt)
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

fn persist(db: &Database, state: &LedgerState, touched: &[Touched]) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(storage)?;
    {
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

fn load(db: &Database) -> Result<Option<LedgerState>, LedgerError> {
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
    let mut state = LedgerState::new(registry.owner);
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
    Ok(Some(state))
}

#[async_trait::async_trait]
impl Ledger for EmbeddedLedger {
    /// One durable commit (an fsync) per operation: callers batch what they can, as the
    /// proxy does with its signed counters.
    async fn execute(&self, tx: Tx) -> Result<Receipt, LedgerError> {
        self.execute_sync(&tx)
    }

    async fn snapshot(&self) -> Result<LedgerState, LedgerError> {
        self.state.lock().clone().map_err(LedgerError::Storage)
    }
}
