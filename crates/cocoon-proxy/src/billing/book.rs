//! The proxy's own durable record of what it has charged each client and owes each worker,
//! with the latest message it signed for each. A settlement is written (fsync'd) before the
//! answer it bills is acknowledged, so a crash can lose neither a charge nor a debt, and the
//! counters it signs never go back: a message with a counter already used is never signed
//! twice for different work.

use std::collections::HashMap;
use std::path::Path;

use cocoon_ledger::{Address, Network, PaymentMessage, PublicKey, SignedMessage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};

const CLIENTS: TableDefinition<'static, &[u8; 32], &[u8]> = TableDefinition::new("clients");
const WORKERS: TableDefinition<'static, &[u8; 32], &[u8]> = TableDefinition::new("workers");
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
/// What each settlement of a request with a client's id billed, for the client's late ask:
/// client key ‖ request id → the answer to that ask.
const RECEIPTS: TableDefinition<'static, &[u8; 48], &[u8]> = TableDefinition::new("receipts");
/// The same receipts by when they were written: unix seconds (big-endian) ‖ client key ‖
/// request id, so that the old ones are pruned by a range.
const RECEIPTS_BY_TIME: TableDefinition<'static, &[u8; 56], ()> =
    TableDefinition::new("receipts_by_time");

/// Records a transaction is to write: the receipts, and the clients' and workers' new records.
#[derive(Default)]
struct Batch {
    receipts: Vec<([u8; 48], u64, Vec<u8>)>,
    clients: HashMap<PublicKey, ClientRecord>,
    workers: HashMap<PublicKey, WorkerRecord>,
}

impl Batch {
    fn receipt(&mut self, client: &PublicKey, id: [u8; 16], at: u64, bytes: Vec<u8>) {
        self.receipts.push((receipt_key(client, &id), at, bytes));
    }
}

/// One settlement of [`Book::settle_all`]: the two counters it moves, and its receipt
/// (request id, unix seconds, and how its bytes are made from what was signed).
pub(crate) struct Settlement {
    /// The client's side.
    pub client: Entry,
    /// The worker's side.
    pub worker: Entry,
    /// The request's receipt, if it has an id.
    pub receipt: Option<ReceiptMaker>,
}

/// A receipt to write with a settlement of a batch: request id, unix seconds, maker.
pub(crate) type ReceiptMaker = ([u8; 16], u64, Box<dyn FnOnce(&Settled) -> Vec<u8> + Send>);

/// A settlement's receipt, written in the settlement's transaction: what the client that sent
/// request `id` is told when it asks for the bill later.
pub struct Receipt<'a> {
    /// The client's id for the request.
    pub id: [u8; 16],
    /// When it was settled (unix seconds).
    pub at: u64,
    /// The receipt's bytes, made from what the settlement signed.
    pub make: &'a dyn Fn(&Settled) -> Vec<u8>,
}

fn receipt_key(client: &PublicKey, id: &[u8; 16]) -> [u8; 48] {
    let mut key = [0; 48];
    key[..32].copy_from_slice(client);
    key[32..].copy_from_slice(id);
    key
}

/// What the proxy has charged one client, by the client's key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Weighted tokens charged in total: the counter of the latest charge message.
    pub charged: u64,
    /// The highest counter the ledger is known to have accepted.
    pub committed: u64,
    /// The latest charge message signed for the client (for `charged`); `None` before the
    /// first.
    pub latest: Option<SignedMessage>,
}

/// What the proxy owes one worker, by the worker's key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Weighted tokens owed in total: the counter of the latest payout message.
    pub owed: u64,
    /// The latest payout message signed for the worker (for `owed`), which it claims from
    /// the ledger; `None` before the first.
    pub latest: Option<SignedMessage>,
}

/// One side of a settlement: whose counter grows, by how much, and the contract its message
/// names (the ledger decides how contracts are named: see `Ledger::client_address`).
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The client's or worker's key.
    pub party: PublicKey,
    /// Its contract with this proxy, which the signed message names.
    pub contract: Address,
    /// Weighted tokens this settlement adds to its counter.
    pub tokens: u64,
}

/// What one settlement signed.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The client's new counter: weighted tokens charged to it in total.
    pub tokens_used: u64,
    /// The charge message for `tokens_used`, for the ledger.
    pub charge: SignedMessage,
    /// The worker's new counter: weighted tokens owed to it in total.
    pub worker_owed: u64,
    /// The payout message for `worker_owed`, for the worker to claim.
    pub payout: SignedMessage,
}

/// Why the proxy's record could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// The file could not be created, read or written, or belongs to another proxy key.
    #[error("proxy record {path}: {message}")]
    Storage {
        /// The record's file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A counter would pass `u64::MAX`; nothing was signed or written.
    #[error("a token counter would overflow")]
    Overflow,
}

/// The proxy's durable record (a redb database), loaded into memory when opened: every
/// client's [`ClientRecord`] and every worker's [`WorkerRecord`].
pub struct Book {
    db: Database,
    path: String,
    clients: HashMap<PublicKey, ClientRecord>,
    workers: HashMap<PublicKey, WorkerRecord>,
}

impl Book {
    /// Opens the record at `path` (created if missing). A record made by another proxy key is
    /// refused: its counters mean nothing for this key's contracts.
    pub fn open(path: &Path, proxy: PublicKey) -> Result<Self, BookError> {
        let name = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| BookError::Storage {
            path: name.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let db = Database::create(path).map_err(|e| err(&e))?;
        let mut book = Self {
            db,
            path: name.clone(),
            clients: HashMap::new(),
            workers: HashMap::new(),
        };
        let txn = book.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            let owner = meta
                .get("proxy")
                .map_err(|e| err(&e))?
                .map(|v| v.value().to_vec());
            match owner {
                Some(k) if k != proxy => {
                    return Err(err(&format!(
                        "belongs to proxy key {}, not {}",
                        hex::encode(k),
                        hex::encode(proxy)
                    )));
                }
                Some(_) => {}
                None => {
                    meta.insert("proxy", proxy.as_slice())
                        .map_err(|e| err(&e))?;
                }
            }
            let clients = txn.open_table(CLIENTS).map_err(|e| err(&e))?;
            for entry in clients.iter().map_err(|e| err(&e))? {
                let (k, v) = entry.map_err(|e| err(&e))?;
                let record = serde_json::from_slice(v.value()).map_err(|e| err(&e))?;
                book.clients.insert(*k.value(), record);
            }
            let workers = txn.open_table(WORKERS).map_err(|e| err(&e))?;
            for entry in workers.iter().map_err(|e| err(&e))? {
                let (k, v) = entry.map_err(|e| err(&e))?;
                let record = serde_json::from_slice(v.value()).map_err(|e| err(&e))?;
                book.workers.insert(*k.value(), record);
            }
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(book)
    }

    fn storage(&self, e: impl std::fmt::Display) -> BookError {
        BookError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// The client's record; an empty one if no settlement named it.
    pub fn client(&self, key: &PublicKey) -> ClientRecord {
        self.clients.get(key).cloned().unwrap_or_default()
    }

    /// Weighted tokens charged to `key` so far (no copy of the record).
    pub fn charged(&self, key: &PublicKey) -> u64 {
        self.clients.get(key).map_or(0, |c| c.charged)
    }

    /// Every client a settlement has named, with its record.
    pub fn clients(&self) -> impl Iterator<Item = (&PublicKey, &ClientRecord)> {
        self.clients.iter()
    }

    /// Every worker a settlement has named, with its record.
    pub fn workers(&self) -> impl Iterator<Item = (&PublicKey, &WorkerRecord)> {
        self.workers.iter()
    }

    /// The worker's record; an empty one if no settlement named it.
    pub fn worker(&self, key: &PublicKey) -> WorkerRecord {
        self.workers.get(key).cloned().unwrap_or_default()
    }

    /// Adds the client's tokens to its charge and the worker's to its due, signs both new
    /// counters and commits them in one transaction, with the request's receipt if it has
    /// one. Memory changes only once the commit succeeded.
    pub fn settle(
        &mut self,
        key: &Ed25519KeyPair,
        network: Network,
        client: Entry,
        worker: Entry,
        receipt: Option<Receipt<'_>>,
    ) -> Result<Settled, BookError> {
        let mut batch = Batch::default();
        let settled = self.sign(&mut batch, key, network, client, worker)?;
        if let Some(r) = receipt {
            batch.receipt(&client.party, r.id, r.at, (r.make)(&settled));
        }
        self.commit(batch)?;
        Ok(settled)
    }

    /// [`Self::settle`] for each of `settlements`, in order, in one transaction: one commit
    /// (one sync of the disk) for them all, so that answers ending together wait for one write
    /// instead of queueing for one each. A settlement that cannot be made (a counter that
    /// would overflow) fails alone; a failed commit fails them all, and memory changes only
    /// once the commit succeeded.
    pub(crate) fn settle_all(
        &mut self,
        key: &Ed25519KeyPair,
        network: Network,
        settlements: Vec<Settlement>,
    ) -> Result<Vec<Result<Settled, BookError>>, BookError> {
        let mut batch = Batch::default();
        let mut out = Vec::with_capacity(settlements.len());
        for s in settlements {
            let signed = self.sign(&mut batch, key, network, s.client, s.worker);
            if let (Ok(settled), Some((id, at, make))) = (&signed, s.receipt) {
                batch.receipt(&s.client.party, id, at, make(settled));
            }
            out.push(signed);
        }
        // Nothing to write when every settlement failed: no sync, and their errors stand.
        if !batch.clients.is_empty() {
            self.commit(batch)?;
        }
        Ok(out)
    }

    /// Signs the next counters of `client` and `worker` on top of what `batch` already moved
    /// (or the book holds), and keeps the new records in `batch`.
    fn sign(
        &self,
        batch: &mut Batch,
        key: &Ed25519KeyPair,
        network: Network,
        client: Entry,
        worker: Entry,
    ) -> Result<Settled, BookError> {
        let mut c = batch
            .clients
            .get(&client.party)
            .cloned()
            .unwrap_or_else(|| self.client(&client.party));
        let mut w = batch
            .workers
            .get(&worker.party)
            .cloned()
            .unwrap_or_else(|| self.worker(&worker.party));
        c.charged = c
            .charged
            .checked_add(client.tokens)
            .ok_or(BookError::Overflow)?;
        w.owed = w
            .owed
            .checked_add(worker.tokens)
            .ok_or(BookError::Overflow)?;
        let charge = PaymentMessage::ChargeClient {
            query_id: c.charged,
            tokens_used: c.charged,
            contract: client.contract,
        }
        .sign(key, network);
        let payout = PaymentMessage::PayWorker {
            query_id: w.owed,
            tokens: w.owed,
            contract: worker.contract,
        }
        .sign(key, network);
        c.latest = Some(charge.clone());
        w.latest = Some(payout.clone());
        let settled = Settled {
            tokens_used: c.charged,
            charge,
            worker_owed: w.owed,
            payout,
        };
        batch.clients.insert(client.party, c);
        batch.workers.insert(worker.party, w);
        Ok(settled)
    }

    /// Writes `batch` in one transaction, then (only once it committed) takes its records.
    fn commit(&mut self, batch: Batch) -> Result<(), BookError> {
        let txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        {
            if !batch.receipts.is_empty() {
                let mut t = txn.open_table(RECEIPTS).map_err(|e| self.storage(e))?;
                let mut timed = txn
                    .open_table(RECEIPTS_BY_TIME)
                    .map_err(|e| self.storage(e))?;
                for (key, at, bytes) in &batch.receipts {
                    t.insert(key, bytes.as_slice())
                        .map_err(|e| self.storage(e))?;
                    let mut by_time = [0; 56];
                    by_time[..8].copy_from_slice(&at.to_be_bytes());
                    by_time[8..].copy_from_slice(key);
                    timed.insert(&by_time, ()).map_err(|e| self.storage(e))?;
                }
            }
            let mut t = txn.open_table(CLIENTS).map_err(|e| self.storage(e))?;
            for (k, record) in &batch.clients {
                let v = serde_json::to_vec(record).expect("records serialize");
                t.insert(k, v.as_slice()).map_err(|e| self.storage(e))?;
            }
            let mut t = txn.open_table(WORKERS).map_err(|e| self.storage(e))?;
            for (k, record) in &batch.workers {
                let v = serde_json::to_vec(record).expect("records serialize");
                t.insert(k, v.as_slice()).map_err(|e| self.storage(e))?;
            }
        }
        txn.commit().map_err(|e| self.storage(e))?;
        self.clients.extend(batch.clients);
        self.workers.extend(batch.workers);
        Ok(())
    }

    /// Records that the ledger holds the client's counter at `tokens` (or higher).
    pub fn mark_committed(&mut self, client: PublicKey, tokens: u64) -> Result<(), BookError> {
        let mut c = self.client(&client);
        if tokens <= c.committed {
            return Ok(());
        }
        c.committed = tokens;
        let mut batch = Batch::default();
        batch.clients.insert(client, c);
        self.commit(batch)
    }

    /// The receipt of the client's request `id`, if a settlement wrote one.
    pub fn receipt(&self, client: &PublicKey, id: &[u8; 16]) -> Result<Option<Vec<u8>>, BookError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = match txn.open_table(RECEIPTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.storage(e)),
        };
        let found = table
            .get(&receipt_key(client, id))
            .map_err(|e| self.storage(e))?;
        Ok(found.map(|v| v.value().to_vec()))
    }

    /// Removes the receipts written before `before` (unix seconds); how many.
    pub fn prune_receipts(&self, before: u64) -> Result<usize, BookError> {
        let txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        let mut pruned = 0;
        {
            let mut by_time = txn
                .open_table(RECEIPTS_BY_TIME)
                .map_err(|e| self.storage(e))?;
            let mut receipts = txn.open_table(RECEIPTS).map_err(|e| self.storage(e))?;
            let mut end = [0; 56];
            end[..8].copy_from_slice(&before.to_be_bytes());
            let old = by_time
                .extract_from_if::<&[u8; 56], _>(..&end, |_, _| true)
                .map_err(|e| self.storage(e))?;
            for entry in old {
                let (k, _) = entry.map_err(|e| self.storage(e))?;
                let key: [u8; 48] = k.value()[8..].try_into().expect("56 - 8 bytes");
                receipts.remove(&key).map_err(|e| self.storage(e))?;
                pruned += 1;
            }
        }
        txn.commit().map_err(|e| self.storage(e))?;
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: Network = Network::basechain(7);

    fn key(seed: u8) -> cocoon_ledger::Wallet {
        cocoon_ledger::Wallet::from_seed([seed; 32])
    }

    fn entries(
        proxy: &cocoon_ledger::Wallet,
        (client, client_tokens): (PublicKey, u64),
        (worker, worker_tokens): (PublicKey, u64),
    ) -> (Entry, Entry) {
        let proxy = proxy.public_key();
        (
            Entry {
                party: client,
                contract: Address::client(&proxy, &client),
                tokens: client_tokens,
            },
            Entry {
                party: worker,
                contract: Address::worker(&proxy, &worker),
                tokens: worker_tokens,
            },
        )
    }

    fn settle(
        book: &mut Book,
        proxy: &cocoon_ledger::Wallet,
        client: (PublicKey, u64),
        worker: (PublicKey, u64),
    ) -> Result<Settled, BookError> {
        let (c, w) = entries(proxy, client, worker);
        book.settle(proxy.key_pair(), NET, c, w, None)
    }

    /// A settlement's receipt is written with it, read back only by the client that sent the
    /// request, survives a reopen (a client asks after a crash too), and is pruned by age.
    #[test]
    fn receipts_are_kept_per_client_durably_and_pruned_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.redb");
        let proxy = key(9);
        let (client, other, worker) = ([2u8; 32], [4u8; 32], [3u8; 32]);
        let id = [7u8; 16];
        {
            let mut book = Book::open(&path, proxy.public_key()).unwrap();
            let (c, w) = entries(&proxy, (client, 10), (worker, 8));
            let make = |s: &Settled| s.tokens_used.to_be_bytes().to_vec();
            let receipt = Receipt {
                id,
                at: 100,
                make: &make,
            };
            book.settle(proxy.key_pair(), NET, c, w, Some(receipt))
                .unwrap();
            let (c, w) = entries(&proxy, (other, 5), (worker, 4));
            let receipt = Receipt {
                id: [8; 16],
                at: 200,
                make: &make,
            };
            book.settle(proxy.key_pair(), NET, c, w, Some(receipt))
                .unwrap();
        }
        let book = Book::open(&path, proxy.public_key()).unwrap();
        assert_eq!(
            book.receipt(&client, &id).unwrap(),
            Some(10u64.to_be_bytes().to_vec())
        );
        assert_eq!(
            book.receipt(&other, &id).unwrap(),
            None,
            "another client's id"
        );
        assert_eq!(book.receipt(&client, &[9; 16]).unwrap(), None);
        assert_eq!(book.prune_receipts(150).unwrap(), 1);
        assert_eq!(book.receipt(&client, &id).unwrap(), None);
        assert!(book.receipt(&other, &[8; 16]).unwrap().is_some());
        assert_eq!(book.prune_receipts(150).unwrap(), 0);
    }

    /// One batch (group commit): a client's and a worker's several answers in it move their
    /// counters on one after another, each signed for its own counter; each receipt names its
    /// own settlement; all of it survives a reopen; a settlement that would overflow a counter
    /// fails alone, the rest are written.
    #[test]
    fn a_batch_moves_each_counter_on_in_order_and_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.redb");
        let proxy = key(9);
        let (client, other, worker) = ([2u8; 32], [4u8; 32], [3u8; 32]);
        let settlement = |c: (PublicKey, u64), w: (PublicKey, u64), id: Option<u8>| {
            let (client, worker) = entries(&proxy, c, w);
            Settlement {
                client,
                worker,
                receipt: id.map(|i| {
                    let make = |s: &Settled| s.tokens_used.to_be_bytes().to_vec();
                    ([i; 16], 100, Box::new(make) as Box<_>)
                }),
            }
        };
        {
            let mut book = Book::open(&path, proxy.public_key()).unwrap();
            settle(&mut book, &proxy, (client, 5), (worker, 4)).unwrap();
            let results = book
                .settle_all(
                    proxy.key_pair(),
                    NET,
                    vec![
                        settlement((client, 10), (worker, 8), Some(1)),
                        settlement((other, 7), (worker, 6), None),
                        settlement((client, u64::MAX), (worker, 1), Some(2)),
                        settlement((client, 3), (worker, 2), Some(3)),
                    ],
                )
                .unwrap();
            let counters: Vec<_> = results
                .iter()
                .map(|r| r.as_ref().map(|s| (s.tokens_used, s.worker_owed)).ok())
                .collect();
            assert_eq!(
                counters,
                vec![Some((15, 12)), Some((7, 18)), None, Some((18, 20))],
                "each settlement moves on from the one before it in the batch"
            );
            assert!(matches!(results[2], Err(BookError::Overflow)));
            for (r, (contract, tokens)) in results.iter().zip([
                (Address::client(&proxy.public_key(), &client), 15),
                (Address::client(&proxy.public_key(), &other), 7),
            ]) {
                let message = r.as_ref().unwrap().charge.verify(&proxy.public_key(), NET);
                assert!(
                    matches!(message, Ok(PaymentMessage::ChargeClient { tokens_used, contract: c, .. })
                        if tokens_used == tokens && c == contract),
                    "{message:?}"
                );
            }
        }
        let book = Book::open(&path, proxy.public_key()).unwrap();
        assert_eq!(book.charged(&client), 18);
        assert_eq!(book.charged(&other), 7);
        assert_eq!(book.worker(&worker).owed, 20);
        for (id, tokens) in [(1, 15u64), (3, 18)] {
            assert_eq!(
                book.receipt(&client, &[id; 16]).unwrap(),
                Some(tokens.to_be_bytes().to_vec())
            );
        }
        assert_eq!(
            book.receipt(&client, &[2; 16]).unwrap(),
            None,
            "a failed settlement's"
        );
    }

    #[test]
    fn settlements_sign_growing_counters_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.redb");
        let proxy = key(9);
        let (client, worker) = ([2u8; 32], [3u8; 32]);
        {
            let mut book = Book::open(&path, proxy.public_key()).unwrap();
            let a = settle(&mut book, &proxy, (client, 10), (worker, 8)).unwrap();
            let b = settle(&mut book, &proxy, (client, 5), (worker, 4)).unwrap();
            assert_eq!((a.tokens_used, b.tokens_used), (10, 15));
            assert_eq!((a.worker_owed, b.worker_owed), (8, 12));
            let PaymentMessage::ChargeClient {
                tokens_used,
                contract,
                ..
            } = b.charge.verify(&proxy.public_key(), NET).unwrap()
            else {
                panic!("not a charge");
            };
            assert_eq!(tokens_used, 15);
            assert_eq!(contract, Address::client(&proxy.public_key(), &client));
            book.mark_committed(client, 10).unwrap();
            book.mark_committed(client, 3).unwrap(); // never goes back
        }
        let book = Book::open(&path, proxy.public_key()).unwrap();
        let c = book.client(&client);
        assert_eq!((c.charged, c.committed), (15, 10));
        assert_eq!(book.worker(&worker).owed, 12);
        // Another proxy's key cannot use this record.
        drop(book);
        let e = Book::open(&path, key(8).public_key()).err().unwrap();
        assert!(e.to_string().contains("belongs to proxy key"), "{e}");
    }

    #[test]
    fn counter_overflow_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = key(9);
        let mut book = Book::open(&dir.path().join("b.redb"), proxy.public_key()).unwrap();
        settle(&mut book, &proxy, ([2; 32], u64::MAX - 1), ([3; 32], 1)).unwrap();
        assert!(matches!(
            settle(&mut book, &proxy, ([2; 32], 2), ([3; 32], 1)),
            Err(BookError::Overflow)
        ));
        assert_eq!(book.client(&[2; 32]).charged, u64::MAX - 1);
        assert_eq!(book.worker(&[3; 32]).owed, 1);
    }
}
