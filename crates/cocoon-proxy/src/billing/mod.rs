//! Payments at the proxy: a request is admitted only if the client's contract can pay for the
//! most it could cost (a reservation), and settled to what it really cost from the worker's
//! token counts. Each settlement is signed and written to the proxy's [`Book`] before the
//! answer is acknowledged; the signed charges reach the ledger in batches, the payouts reach
//! the workers, who claim them themselves.
//!
//! A client's stake is what guarantees the proxy payment for work it has done but not yet
//! committed, so the proxy never lets that work (reserved plus unbilled) exceed what the stake
//! covers; when it would, it commits first and looks again.

mod book;
mod receipts;
mod rollback;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cocoon_ledger::{
    ClientContract, ContractState, Ledger, LedgerError, LedgerOpener, Nanoton, Network,
    NetworkParams, Op, PublicKey, Tx, Wallet, unix_now,
};
use cocoon_protocol::{
    Billing as Bill, ErrorKind, LateBill, Payout, ProtocolError, Refund, RequestId, Usage,
};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub(crate) use book::Entry;
pub use book::{Book, BookError, ClientRecord, WorkerRecord};
pub(crate) use cocoon_protocol::{Bounded, Relayed, UsageBounds};
pub(crate) use receipts::Opened;

/// How long a client's contract as read from the ledger is trusted before it is read again.
/// A refusal always reads again first, so a fresh deposit is never missed.
const CONTRACT_TTL: Duration = Duration::from_secs(2);

/// How long a key the ledger had no contract for is asked about with one ledger read per
/// request instead of two (the cached read, then a fresh one): never zero, or a client's
/// deposit right after a refusal would not be seen.
const ABSENT_TTL: Duration = Duration::from_secs(2);

/// Keys remembered as having no contract; beyond it the oldest are forgotten (they are asked
/// about again, which is all a forgotten entry costs).
const ABSENT_KEPT: usize = 4096;

/// The least time between two commits one client's requests force (a request over its cover
/// commits what is unbilled, to free the stake): each costs the proxy a ledger transaction, on
/// a chain its gas.
const FORCED_COMMIT_EVERY: Duration = Duration::from_secs(2);

/// `[payments]` in `proxy.toml`. Payments are off (everything is free) without a ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    /// The ledger: its service, e.g. `http://127.0.0.1:9100`, or a TON root,
    /// `ton:<root address>@<toncenter API URL>`.
    pub ledger: Option<String>,
    /// The proxy's durable record of charges and debts. Must survive restarts: losing it
    /// stops the proxy (rollback detection) until an operator steps in.
    pub book: PathBuf,
    /// Seconds between batched commits of signed charges to the ledger.
    pub commit_interval_secs: u64,
    /// Seconds between two readings of the registry's allowed models (and, with
    /// `worker_images_from_registry`, images): a connected worker whose model or image was
    /// revoked is disconnected at the next one (0: never read again).
    pub registry_refresh_secs: u64,
    /// Also require the registry to allow each worker's attested image hash (its worker
    /// images), at join and at every reading: trust the owner's list, not only this file's
    /// `[worker_policy]`.
    pub worker_images_from_registry: bool,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            ledger: None,
            book: "proxy-book.redb".into(),
            commit_interval_secs: 10,
            registry_refresh_secs: 60,
            worker_images_from_registry: false,
        }
    }
}

/// What `GET /cocoon/v1/status` shows of payments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentsStatus {
    /// The ledger, as `[payments] ledger` names it.
    pub ledger: String,
    /// The proxy's public key (hex): the key its contracts are bound to.
    pub proxy_key: String,
    /// The network's floor price, in nanoton per weighted token.
    pub price_per_token: u64,
    /// Clients in the proxy's record: every one a settlement has named.
    pub clients: usize,
    /// Weighted tokens signed for but not yet committed to the ledger, all clients together.
    pub uncommitted_tokens: u64,
    /// Charges the ledger accepted since start.
    pub commits: u64,
    /// Why the ledger last refused a charge; `None` if it has refused none since start.
    pub last_commit_error: Option<String>,
    /// Seconds the oldest charge not yet on the ledger has waited (0: all committed): how far
    /// the ledger is behind the book.
    #[serde(default)]
    pub commit_lag_secs: u64,
    /// Nanoton billed to clients since start.
    #[serde(default)]
    pub billed_nanoton: u64,
    /// Of it, the proxy's commission (what is left after the workers' fee), nanoton.
    #[serde(default)]
    pub commission_nanoton: u64,
}

struct ClientView {
    contract: Option<ClientContract>,
    fetched: Instant,
    /// Nanoton held for requests in flight.
    reserved: Nanoton,
    /// A cooperative close is under way: no new request is admitted.
    closing: bool,
    /// When a request over the cover last forced a commit of this client's charges.
    forced_commit: Option<Instant>,
}

/// Keys the ledger had no contract for, and when it said so.
#[derive(Default)]
struct Absent(HashMap<PublicKey, Instant>);

impl Absent {
    fn recently(&self, key: &PublicKey) -> bool {
        self.0.get(key).is_some_and(|at| at.elapsed() < ABSENT_TTL)
    }

    fn remember(&mut self, key: PublicKey) {
        if self.0.len() >= ABSENT_KEPT {
            self.0.retain(|_, at| at.elapsed() < ABSENT_TTL);
            if self.0.len() >= ABSENT_KEPT {
                self.0.clear();
            }
        }
        self.0.insert(key, Instant::now());
    }
}

pub(crate) struct Billing {
    ledger: Arc<dyn Ledger>,
    ledger_url: String,
    /// The network the signed counters are for, read from the ledger at start.
    network: Network,
    wallet: Arc<Wallet>,
    /// `None` once closed at shutdown: the database is released for the next proxy.
    book: Mutex<Option<Book>>,
    params: RwLock<NetworkParams>,
    clients: Mutex<HashMap<PublicKey, ClientView>>,
    /// Keys with no contract lately: read fresh at once, skipping the cached read.
    absent: Mutex<Absent>,
    commits: AtomicU64,
    last_commit_error: Mutex<Option<String>>,
    /// Since when charges have waited for the ledger: set by the first charge after the book
    /// was all committed, cleared by a commit round that leaves nothing behind.
    waiting_since: Mutex<Option<Instant>>,
    /// Settlements waiting for the book's next write, and whether a writer is at it.
    settling: Mutex<Settling>,
    /// Nanoton billed since start, and of it the commission.
    billed: AtomicU64,
    commission: AtomicU64,
    /// Requests with a client's id being answered or settled: asked for, their bill is
    /// pending, not absent.
    open: Mutex<std::collections::HashSet<(PublicKey, RequestId)>>,
}

/// Settlements waiting to be written, each with where its outcome goes.
#[derive(Default)]
struct Settling {
    /// Each with its reply and the reservation covering its work until it is written.
    waiting: Vec<(book::Settlement, SettleReply, Hold)>,
    writing: bool,
}

type SettleReply = tokio::sync::oneshot::Sender<Result<book::Settled, ProtocolError>>;

fn payment_required(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::PaymentRequired, message)
}

fn ledger_unavailable(e: LedgerError) -> ProtocolError {
    ProtocolError::unavailable(format!("the ledger cannot be read: {e}"))
}

/// What a reservation at one price and bound would hold.
struct Need {
    /// Nanoton held.
    amount: Nanoton,
    /// Weighted tokens it is for.
    weighted: u64,
    /// Nanoton per weighted token.
    price: u64,
    /// Which of the narrower choices it is; `None`: the widest.
    choice: Option<usize>,
}

/// Counter units for `weighted` tokens at `price` per token: the contract counts in units of
/// the floor price, so a dearer request advances it proportionally more, rounded down (the
/// client never pays above its price). Below the floor the floor applies.
fn units(params: &NetworkParams, weighted: u64, price: u64) -> u64 {
    let floor = u64::try_from(params.price_per_token).unwrap_or(u64::MAX);
    if floor == 0 {
        return weighted;
    }
    let price = price.max(floor);
    u64::try_from(u128::from(weighted) * u128::from(price) / u128::from(floor)).unwrap_or(u64::MAX)
}

/// Nanoton held for one request until it is settled or dropped.
pub(crate) struct Hold {
    billing: Arc<Billing>,
    client: PublicKey,
    amount: Nanoton,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(view) = self.billing.clients.lock().get_mut(&self.client) {
            view.reserved = view.reserved.saturating_sub(self.amount);
        }
    }
}

impl Billing {
    /// Connects to the ledger `url` names (through `ledgers`), checks the proxy's contract is
    /// open and that the record and the ledger agree (rollback detection). Any failure stops
    /// the proxy from starting.
    pub(crate) async fn open(
        config: &PaymentsConfig,
        url: &str,
        ledgers: &dyn LedgerOpener,
        wallet: Arc<Wallet>,
        key_pkcs8: &[u8],
    ) -> anyhow::Result<Arc<Self>> {
        let ledger = ledgers
            .open(url, wallet.clone(), key_pkcs8)
            .await
            .map_err(anyhow::Error::msg)?;
        let network = ledger
            .network()
            .await
            .map_err(|e| anyhow::anyhow!("[payments] ledger {url}: {e}"))?;
        let proxy = wallet.public_key();
        let path = config.book.clone();
        let book = tokio::task::spawn_blocking(move || Book::open(&path, proxy)).await??;
        let clients: Vec<PublicKey> = book.clients().map(|(k, _)| *k).collect();
        let workers: Vec<PublicKey> = book.workers().map(|(k, _)| *k).collect();
        let state = ledger
            .proxy_view(proxy, &clients, &workers)
            .await
            .map_err(|e| anyhow::anyhow!("[payments] ledger {url}: {e}"))?;
        match state
            .proxies
            .values()
            .find(|p| p.key == proxy)
            .map(|p| p.state)
        {
            Some(ContractState::Normal) => {}
            Some(_) => anyhow::bail!("this proxy's contract is closing or closed"),
            None => anyhow::bail!(
                "this proxy (key {}) has no contract on the ledger: the registry owner must \
                 register it and it must open one with its stake (`cocoon ledger exec`)",
                hex::encode(proxy)
            ),
        }
        let found = rollback::disagreements(&book, &state, &proxy);
        if !found.is_empty() {
            anyhow::bail!(
                "refusing to serve: this proxy's record {} and the ledger disagree:\n  {}",
                config.book.display(),
                found.join("\n  ")
            );
        }
        Ok(Self::serving(
            ledger,
            url,
            network,
            wallet,
            book,
            state.registry.params,
        ))
    }

    /// Billing over an opened book and ledger, nothing settled yet in this run.
    fn serving(
        ledger: Arc<dyn Ledger>,
        url: &str,
        network: Network,
        wallet: Arc<Wallet>,
        book: Book,
        params: NetworkParams,
    ) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            ledger_url: url.to_owned(),
            network,
            wallet,
            book: Mutex::new(Some(book)),
            params: RwLock::new(params),
            clients: Mutex::new(HashMap::new()),
            absent: Mutex::default(),
            commits: AtomicU64::new(0),
            last_commit_error: Mutex::new(None),
            waiting_since: Mutex::new(None),
            settling: Mutex::default(),
            billed: AtomicU64::new(0),
            commission: AtomicU64::new(0),
            open: Mutex::default(),
        })
    }

    fn proxy(&self) -> PublicKey {
        self.wallet.public_key()
    }

    /// Whether the registry allows the worker image `hash`.
    pub(crate) async fn worker_image_allowed(&self, hash: &str) -> Result<bool, LedgerError> {
        self.ledger
            .image_allowed(cocoon_ledger::ImageRole::Worker, hash)
            .await
    }

    /// Whether the registry allows the model whose weights hash to `hash`.
    pub(crate) async fn model_allowed(&self, hash: &str) -> Result<bool, LedgerError> {
        self.ledger.model_allowed(hash).await
    }

    /// The network's floor price per weighted token, as last read from the ledger.
    pub(crate) fn floor(&self) -> u64 {
        u64::try_from(self.params.read().price_per_token).unwrap_or(u64::MAX)
    }

    /// Runs `f` on the book, or fails once the proxy has shut down.
    fn with_book<R>(&self, f: impl FnOnce(&mut Book) -> R) -> Result<R, ProtocolError> {
        match self.book.lock().as_mut() {
            Some(book) => Ok(f(book)),
            None => Err(ProtocolError::unavailable("the proxy is shutting down")),
        }
    }

    /// What the book says of `client` (nothing once closed).
    fn client_record(&self, client: &PublicKey) -> ClientRecord {
        self.with_book(|b| b.client(client)).unwrap_or_default()
    }

    /// Weighted tokens charged to `client` so far (0 once closed): read per request.
    fn charged(&self, client: &PublicKey) -> u64 {
        self.with_book(|b| b.charged(client)).unwrap_or(0)
    }

    /// The proxy's part of `bill`: its cost less the workers' share (its tokens at the
    /// network's worker fee), in nanoton.
    pub(crate) fn commission_of(&self, bill: &Bill) -> u64 {
        let share = self
            .params
            .read()
            .worker_fee_per_token
            .saturating_mul(Nanoton::from(bill.billed_tokens));
        bill.cost
            .saturating_sub(u64::try_from(share).unwrap_or(u64::MAX))
    }

    /// Releases the book after a last commit; later settlements fail.
    pub(crate) fn close(&self) {
        self.book.lock().take();
    }

    pub(crate) fn status(&self) -> PaymentsStatus {
        let book = self.book.lock();
        let records: Vec<&ClientRecord> = book
            .iter()
            .flat_map(|b| b.clients().map(|(_, r)| r))
            .collect();
        PaymentsStatus {
            ledger: self.ledger_url.clone(),
            proxy_key: hex::encode(self.proxy()),
            price_per_token: u64::try_from(self.params.read().price_per_token).unwrap_or(u64::MAX),
            clients: records.len(),
            uncommitted_tokens: records.iter().map(|r| r.charged - r.committed).sum(),
            commits: self.commits.load(Ordering::Relaxed),
            last_commit_error: self.last_commit_error.lock().clone(),
            commit_lag_secs: self
                .waiting_since
                .lock()
                .map_or(0, |since| since.elapsed().as_secs()),
            billed_nanoton: self.billed.load(Ordering::Relaxed),
            commission_nanoton: self.commission.load(Ordering::Relaxed),
        }
    }

    /// The client's contract, from the cache unless stale or `fresh`.
    async fn contract(
        &self,
        client: PublicKey,
        fresh: bool,
    ) -> Result<Option<ClientContract>, ProtocolError> {
        if !fresh
            && let Some(view) = self.clients.lock().get(&client)
            && view.fetched.elapsed() < CONTRACT_TTL
        {
            return Ok(view.contract.clone());
        }
        let contract = self
            .ledger
            .client(self.proxy(), client)
            .await
            .map_err(ledger_unavailable)?;
        let mut clients = self.clients.lock();
        // Keys cost nothing to make: one without a contract leaves no entry behind (unless it
        // still holds something), so a flood of them cannot grow the table.
        if contract.is_none()
            && clients
                .get(&client)
                .is_none_or(|v| v.reserved == 0 && !v.closing)
        {
            clients.remove(&client);
            return Ok(None);
        }
        let view = clients.entry(client).or_insert(ClientView {
            contract: None,
            fetched: Instant::now(),
            reserved: 0,
            closing: false,
            forced_commit: None,
        });
        view.contract = contract.clone();
        view.fetched = Instant::now();
        Ok(contract)
    }

    /// Holds the most a request could cost against the client's contract, or refuses it: at
    /// `widest` (its bounds and price per token) if the contract covers that, else at the
    /// dearest of the `narrower` choices it covers (asked for only then; `Some(index)` of the
    /// one held). A client that cannot cover the dearest worker is held to those it can cover,
    /// instead of refused.
    pub(crate) async fn reserve(
        self: &Arc<Self>,
        client: PublicKey,
        widest: (&UsageBounds, u64),
        narrower: impl FnOnce() -> Vec<(UsageBounds, u64)>,
    ) -> Result<(Hold, Option<usize>), ProtocolError> {
        let params = self.params.read().clone();
        let need_of = |bounds: &UsageBounds, price: u64| -> Result<Need, ProtocolError> {
            let weighted = params
                .weighted_bound(bounds.prompt(), bounds.completion())
                .map_err(|e| ProtocolError::invalid(e.to_string()))?;
            let amount = params
                .cost(units(&params, weighted, price))
                .map_err(|e| ProtocolError::invalid(e.to_string()))?;
            Ok(Need {
                amount,
                weighted,
                price,
                choice: None,
            })
        };
        // Dearest first: the first the contract covers leaves the most workers to choose from.
        let mut needs = vec![need_of(widest.0, widest.1)?];
        let mut narrower = Some(narrower);
        let no_contract = || {
            payment_required(format!(
                "this client ({}) has no contract with this proxy: deposit and stake first \
                 (`cocoon client deposit`, `cocoon client stake`)",
                hex::encode(client)
            ))
        };
        // A key that had no contract a moment ago is read fresh at once: one ledger read per
        // request, not two, and a deposit made since is seen.
        let mut fresh = self.absent.lock().recently(&client);
        loop {
            let contract = self.contract(client, fresh).await?;
            if contract
                .as_ref()
                .is_none_or(|c| c.state != ContractState::Normal)
                && !fresh
            {
                // A contract opened (or reopened) moments ago is not in the cache yet.
                fresh = true;
                continue;
            }
            let Some(contract) = contract else {
                self.absent.lock().remember(client);
                return Err(no_contract());
            };
            if contract.state != ContractState::Normal {
                return Err(payment_required(
                    "this client's contract with the proxy is closing or closed".into(),
                ));
            }
            let charged = self.charged(&client);
            let unbilled = params
                .cost(charged.saturating_sub(contract.tokens_used))
                .unwrap_or(Nanoton::MAX);
            let cover = contract.balance.min(contract.stake);
            let committed_work = loop {
                let mut clients = self.clients.lock();
                let view = clients.get_mut(&client).expect("read just above");
                if view.closing {
                    return Err(payment_required(
                        "this client's contract is being closed".into(),
                    ));
                }
                let committed_work = unbilled.saturating_add(view.reserved);
                if let Some(need) = needs
                    .iter()
                    .find(|n| committed_work.saturating_add(n.amount) <= cover)
                {
                    view.reserved += need.amount;
                    let hold = Hold {
                        billing: self.clone(),
                        client,
                        amount: need.amount,
                    };
                    return Ok((hold, need.choice));
                }
                drop(clients);
                match narrower.take() {
                    Some(choices) => {
                        for (i, (bounds, price)) in choices().iter().enumerate() {
                            needs.push(Need {
                                choice: Some(i),
                                ..need_of(bounds, *price)?
                            });
                        }
                        needs[1..].sort_by_key(|n| std::cmp::Reverse(n.amount));
                    }
                    None => break committed_work,
                }
            };
            if fresh {
                let least = needs.iter().min_by_key(|n| n.amount).expect("the widest");
                return Err(payment_required(format!(
                    "this request may cost up to {} nanoton ({} tokens at up to {} nanoton) \
                     even on the cheapest worker that serves it; the contract's balance is {} \
                     and its stake {}, which must cover the {committed_work} nanoton of work \
                     already in flight or not yet settled as well: deposit or raise the stake \
                     (`cocoon client deposit`, `cocoon client stake`)",
                    least.amount,
                    least.weighted,
                    least
                        .price
                        .max(u64::try_from(params.price_per_token).unwrap_or(u64::MAX)),
                    contract.balance,
                    contract.stake
                )));
            }
            // Committing what is unbilled frees the stake for new work; a deposit may also
            // have landed since the contract was read. At most one such commit per client per
            // FORCED_COMMIT_EVERY: each is a ledger transaction the proxy pays for.
            let force = unbilled > 0 && {
                let mut clients = self.clients.lock();
                let view = clients.get_mut(&client).expect("read just above");
                let due = view
                    .forced_commit
                    .is_none_or(|at| at.elapsed() >= FORCED_COMMIT_EVERY);
                if due {
                    view.forced_commit = Some(Instant::now());
                }
                due
            };
            if force {
                self.commit_client(client).await;
            }
            fresh = true;
        }
    }

    /// Bills the request held by `hold` for `usage` at `price` per weighted token, on the
    /// weights hashing to `model_hash`, signs the client's charge and the worker's payout, and
    /// writes both to the book before returning, with the bill under the client's request `id`
    /// if it has one (for its late ask).
    pub(crate) async fn settle(
        self: &Arc<Self>,
        hold: Hold,
        id: Option<RequestId>,
        worker: PublicKey,
        usage: Usage,
        (price, model_hash): (u64, Option<String>),
    ) -> Result<(Bill, Payout), ProtocolError> {
        let params = self.params.read().clone();
        let price = price.max(u64::try_from(params.price_per_token).unwrap_or(u64::MAX));
        let p = usage.priced();
        let weighted = params
            .weighted_answer(p.prompt, p.cached, p.completion, p.reasoning)
            .map_err(|e| ProtocolError::internal(e.to_string()))?;
        let mut tokens = units(&params, weighted, price);
        // A bill never exceeds its reservation. Usage within the bounds cannot, so this holds
        // only if a bound and the reservation ever disagreed; the client pays what it agreed to.
        let reserved = u64::try_from(hold.amount / params.price_per_token.max(1)).unwrap_or(0);
        if tokens > reserved {
            tracing::error!(client = %hex::encode(hold.client), tokens, reserved, "a bill above its reservation; billing the reservation");
            tokens = reserved;
        }
        let named = |e: LedgerError| ProtocolError::internal(format!("contract address: {e}"));
        let proxy = self.proxy();
        let client = Entry {
            party: hold.client,
            contract: self
                .ledger
                .client_address(&proxy, &hold.client)
                .await
                .map_err(named)?,
            tokens,
        };
        let worker = Entry {
            party: worker,
            contract: self
                .ledger
                .worker_address(&proxy, &worker)
                .await
                .map_err(named)?,
            tokens,
        };
        let cost = params.cost(tokens).unwrap_or(Nanoton::MAX);
        let bill = move |settled: &book::Settled| Bill {
            price_per_token: price,
            weighted_tokens: weighted,
            unit_price: u64::try_from(params.price_per_token).unwrap_or(u64::MAX),
            billed_tokens: tokens,
            cost: u64::try_from(cost).unwrap_or(u64::MAX),
            tokens_used: settled.tokens_used,
            charge: hex::encode(&settled.charge.0),
            model_hash: model_hash.clone(),
        };
        let receipt: Option<book::ReceiptMaker> = id.map(|id| {
            let bill = bill.clone();
            let make = move |settled: &book::Settled| {
                let late = LateBill::Billed {
                    billing: bill(settled),
                    usage,
                };
                serde_json::to_vec(&late).expect("a bill serializes")
            };
            (id.0, unix_now(), Box::new(make) as Box<_>)
        });
        // The hold goes with the settlement: released by the writer once the book has it (or
        // could not take it), even if this request goes away meanwhile.
        let settled = self
            .write_settlement(
                book::Settlement {
                    client,
                    worker,
                    receipt,
                },
                hold,
            )
            .await?;
        let bill = bill(&settled);
        self.waiting_since.lock().get_or_insert_with(Instant::now);
        self.billed.fetch_add(bill.cost, Ordering::Relaxed);
        self.commission
            .fetch_add(self.commission_of(&bill), Ordering::Relaxed);
        let payout = Payout {
            proxy: hex::encode(self.proxy()),
            tokens: settled.worker_owed,
            message: hex::encode(&settled.payout.0),
        };
        Ok((bill, payout))
    }

    /// Writes `settlement` to the book, durably, with whatever other settlements wait: one
    /// commit for all of them (group commit), each acknowledged only once it is on disk.
    async fn write_settlement(
        self: &Arc<Self>,
        settlement: book::Settlement,
        hold: Hold,
    ) -> Result<book::Settled, ProtocolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut queue = self.settling.lock();
            queue.waiting.push((settlement, tx, hold));
            !std::mem::replace(&mut queue.writing, true)
        };
        if lead {
            tokio::spawn(self.clone().write_settlements());
        }
        rx.await
            .map_err(|_| ProtocolError::internal("the book's writer stopped"))?
    }

    /// Writes what waits, one transaction at a time, until nothing does.
    async fn write_settlements(self: Arc<Self>) {
        loop {
            let waiting = {
                let mut queue = self.settling.lock();
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let mut settlements = Vec::with_capacity(waiting.len());
            let mut replies = Vec::with_capacity(waiting.len());
            let mut holds = Vec::with_capacity(waiting.len());
            for (settlement, reply, hold) in waiting {
                settlements.push(settlement);
                replies.push(reply);
                holds.push(hold);
            }
            let billing = self.clone();
            let written = tokio::task::spawn_blocking(move || {
                billing.with_book(|book| {
                    book.settle_all(billing.wallet.key_pair(), billing.network, settlements)
                })
            })
            .await;
            // Written or refused, the work is in the book or was not done: the reservations go.
            drop(holds);
            let unrecorded = |e: &dyn std::fmt::Display| {
                ProtocolError::internal(format!("the proxy could not record the charge: {e}"))
            };
            match written {
                Ok(Ok(Ok(results))) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result.map_err(|e| unrecorded(&e)));
                    }
                }
                failed => {
                    let error = match failed {
                        Ok(Ok(Err(e))) => unrecorded(&e),
                        // The book is closed: the proxy is shutting down.
                        Ok(Err(e)) => e,
                        Err(e) => unrecorded(&e),
                        Ok(Ok(Ok(_))) => unreachable!("matched above"),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Closes the client's contract with the proxy's cooperation: commits the last charge, then
    /// refunds everything left at once. Refused while the client has requests in flight, whose
    /// charges could no longer reach a closed contract.
    pub(crate) async fn refund(
        self: &Arc<Self>,
        client: PublicKey,
    ) -> Result<Refund, ProtocolError> {
        // A key with no open contract has nothing to close: refused from a read of it, never
        // with a refund transaction the proxy would send (and, on a chain, pay for).
        match self.contract(client, true).await? {
            Some(c) if c.state == ContractState::Normal => {}
            Some(_) => {
                return Err(payment_required(
                    "this client's contract with the proxy is already closing or closed".into(),
                ));
            }
            None => {
                return Err(payment_required(format!(
                    "this client ({}) has no contract with this proxy: there is nothing to close",
                    hex::encode(client)
                )));
            }
        }
        {
            let mut clients = self.clients.lock();
            let view = clients.entry(client).or_insert(ClientView {
                contract: None,
                fetched: Instant::now() - CONTRACT_TTL,
                reserved: 0,
                closing: false,
                forced_commit: None,
            });
            if view.reserved > 0 {
                return Err(ProtocolError::invalid(
                    "requests are in flight on this contract: let them finish before closing",
                ));
            }
            // From here on nothing new is admitted, so the last charge stays the last.
            view.closing = true;
        }
        let result = self.commit_and_refund(client).await;
        let mut clients = self.clients.lock();
        if let Some(view) = clients.get_mut(&client) {
            view.closing = false;
            view.fetched = Instant::now() - CONTRACT_TTL;
            if view.contract.is_none() && view.reserved == 0 {
                clients.remove(&client);
            }
        }
        result
    }

    async fn commit_and_refund(
        self: &Arc<Self>,
        client: PublicKey,
    ) -> Result<Refund, ProtocolError> {
        self.commit_client(client).await;
        let record = self.client_record(&client);
        if record.committed < record.charged {
            return Err(ProtocolError::unavailable(
                "the last charge could not be committed to the ledger yet; try again",
            ));
        }
        let receipt = self
            .ledger
            .execute(Tx {
                sender: self.proxy(),
                op: Op::ProxyRefundClient { client },
                now: unix_now(),
            })
            .await
            .map_err(|e| match e {
                LedgerError::Unreachable(_) | LedgerError::Storage(_) => ledger_unavailable(e),
                e => ProtocolError::invalid(format!("the ledger refused the close: {e}")),
            })?;
        tracing::info!(client = %hex::encode(client), refunded = %receipt.paid_out, "client contract closed with a refund");
        Ok(Refund {
            refunded: u64::try_from(receipt.paid_out).unwrap_or(u64::MAX),
            tokens_used: record.charged,
        })
    }

    /// The latest payout signed for `worker`, to hand it over when it (re)joins.
    pub(crate) fn latest_payout(&self, worker: &PublicKey) -> Option<Payout> {
        let record = self.with_book(|b| b.worker(worker)).ok()?;
        record.latest.map(|m| Payout {
            proxy: hex::encode(self.proxy()),
            tokens: record.owed,
            message: hex::encode(&m.0),
        })
    }

    /// Submits the client's latest charge to the ledger if it is not there yet.
    async fn commit_client(self: &Arc<Self>, client: PublicKey) {
        let record = self.client_record(&client);
        let Some(message) = record.latest.clone() else {
            return;
        };
        if record.charged <= record.committed {
            return;
        }
        let tx = Tx {
            sender: self.proxy(),
            op: Op::Charge {
                proxy: self.proxy(),
                message,
            },
            now: unix_now(),
        };
        let accepted = match self.ledger.execute(tx).await {
            Ok(_) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                true
            }
            // Committed before (a retry after a crash): the ledger has it already.
            Err(LedgerError::CounterNotIncreasing { stored, .. }) if stored >= record.charged => {
                true
            }
            Err(e) => {
                tracing::error!(client = %hex::encode(client), error = %e, "ledger refused a charge");
                *self.last_commit_error.lock() = Some(e.to_string());
                false
            }
        };
        if accepted {
            let billing = self.clone();
            let marked = tokio::task::spawn_blocking(move || {
                billing.with_book(|b| b.mark_committed(client, record.charged))
            })
            .await;
            if let Ok(Ok(Err(e))) = marked {
                tracing::error!(error = %e, "could not record a commit");
            }
        }
        // The ledger's balance changed: read it again before the next admission.
        if let Some(view) = self.clients.lock().get_mut(&client) {
            view.fetched = Instant::now() - CONTRACT_TTL;
        }
    }

    /// Commits every client's uncommitted charges and rereads the network's prices.
    pub(crate) async fn commit_all(self: &Arc<Self>) {
        let pending: Vec<PublicKey> = self
            .with_book(|b| {
                b.clients()
                    .filter(|(_, r)| r.charged > r.committed)
                    .map(|(k, _)| *k)
                    .collect()
            })
            .unwrap_or_default();
        for client in pending {
            self.commit_client(client).await;
        }
        let behind = self
            .with_book(|b| b.clients().any(|(_, r)| r.charged > r.committed))
            .unwrap_or(false);
        if !behind {
            *self.waiting_since.lock() = None;
        }
        match self.ledger.params().await {
            Ok(params) => *self.params.write() = params,
            Err(e) => tracing::warn!(error = %e, "cannot reread network parameters"),
        }
    }

    /// Commits in batches every `interval` until `shutdown`, then once more and closes the
    /// book.
    pub(crate) async fn run_commits(
        self: Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {
                    self.commit_all().await;
                    self.prune_receipts().await;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        self.commit_all().await;
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key without a contract is remembered for a moment (so its requests cost one ledger
    /// read each, not two), and the memory stays bounded however many keys come.
    #[test]
    fn keys_without_a_contract_are_remembered_briefly_and_boundedly() {
        let mut absent = Absent::default();
        assert!(!absent.recently(&[1; 32]));
        absent.remember([1; 32]);
        assert!(absent.recently(&[1; 32]));
        assert!(!absent.recently(&[2; 32]));
        for i in 0..(ABSENT_KEPT as u32 * 3) {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            absent.remember(key);
            assert!(absent.0.len() <= ABSENT_KEPT);
        }
        // An entry older than the TTL no longer refuses.
        absent.0.insert([3; 32], Instant::now() - ABSENT_TTL);
        assert!(!absent.recently(&[3; 32]));
    }

    /// A payments-on [`Billing`] over a book and an embedded ledger in `dir` (no contracts:
    /// enough to settle, which names contracts without reading them).
    fn billing_at(dir: &std::path::Path) -> Arc<Billing> {
        let wallet = Arc::new(Wallet::from_seed([9; 32]));
        let ledger = cocoon_ledger::EmbeddedLedger::open(&dir.join("ledger.redb"), [1; 32])
            .expect("ledger opens");
        let book = Book::open(&dir.join("book.redb"), wallet.public_key()).expect("book opens");
        Billing::serving(
            Arc::new(ledger),
            "embedded",
            Network::basechain(7),
            wallet,
            book,
            NetworkParams::default(),
        )
    }

    /// REVIEW, fixed: `settle` said the hold is "released only now: until the book had it, the
    /// reservation covered this work", but the hold lives in `settle`'s future while the
    /// settlement itself is handed to the group-commit queue. A future dropped while its
    /// settlement waits there (a batch being written ahead of it) releases the reservation at
    /// once, and the settlement is still written later: for that window the work is in neither
    /// the book nor a reservation. `reserve` then admits more than the stake covers, and
    /// `refund` (which refuses only while `reserved > 0`) commits the record without the
    /// queued charge and refunds the client in full, after which the queued settlement signs
    /// a charge the closed contract never pays and a payout the proxy owes the worker.
    /// Latent today (the only caller, `Answer::relay`, runs in its own task), and the old
    /// detached `spawn_blocking` had the same shape; the hold should travel with the
    /// settlement (dropped by the writer after the commit), not with the waiting future.
    #[tokio::test]
    async fn review_a_queued_settlement_keeps_its_reservation_when_its_caller_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let billing = billing_at(dir.path());
        let (client, worker) = ([2u8; 32], [3u8; 32]);
        let price = u64::try_from(NetworkParams::default().price_per_token).unwrap();
        // What `reserve` would hold for 1000 weighted tokens at the floor.
        let amount: Nanoton = 1_000 * Nanoton::from(price);
        billing.clients.lock().insert(
            client,
            ClientView {
                contract: None,
                fetched: Instant::now(),
                reserved: amount,
                closing: false,
                forced_commit: None,
            },
        );
        let hold = Hold {
            billing: billing.clone(),
            client,
            amount,
        };
        let usage = Usage {
            prompt_tokens: 10,
            completion_tokens: 10,
            ..Usage::default()
        };
        // Another batch is being written: this settlement waits in the queue behind it.
        billing.settling.lock().writing = true;
        let mut settling = Box::pin(billing.settle(hold, None, worker, usage, (price, None)));
        let waited = tokio::time::timeout(Duration::from_millis(200), &mut settling).await;
        assert!(
            waited.is_err(),
            "the settlement waits for the batch ahead of it"
        );
        assert_eq!(billing.settling.lock().waiting.len(), 1, "queued");
        // Its caller goes (its task cancelled) while the settlement is queued.
        drop(settling);
        let reserved_while_queued = billing
            .clients
            .lock()
            .get(&client)
            .map_or(0, |v| v.reserved);
        let charged_while_queued = billing.charged(&client);
        // The batch ahead ends; the writer takes what waits, this settlement included.
        billing.clone().write_settlements().await;
        let written = billing.charged(&client);
        assert!(
            written > 0,
            "the queued settlement is still written after its caller went"
        );
        assert!(
            reserved_while_queued > 0 || charged_while_queued > 0,
            "while its settlement was queued, the {written} tokens of work were covered by \
             neither the book ({charged_while_queued} charged) nor a reservation \
             ({reserved_while_queued} nanoton reserved)"
        );
    }
}
