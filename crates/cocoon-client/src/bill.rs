//! The gateway's check of each bill the proxy hands over: the charge must be the proxy's own
//! signature (the key it proved in the handshake) over this client's contract and the counter
//! the bill states, the price must be within the request's `max_price`, the billed units must
//! not exceed the weighted tokens at that price, and the cost must be the units at the unit
//! price. Where the gateway has a ledger, the floor price and the token multipliers are the
//! ledger's, not the proxy's word, and the weighted tokens are recomputed from the answer's
//! usage. Each bill claims the counter range it advanced; a range another bill already claimed
//! is a double charge.
//!
//! The ledger charges everything up to a charge's counter, so counters no bill claimed are
//! charged too. A proxy may skip none beyond what this gateway's unbilled requests could have
//! cost: each request sent holds an allowance (its prompt bound and `max_tokens`, or
//! [`UNBOUNDED_COMPLETION`] without one, weighted at its price cap); a request whose answer
//! ended without a bill (a disconnect) explains a gap by its allowance only until its proxy
//! says what it billed for it ([`late`]), and a gap the bills of requests still in flight may
//! fill is left to the next bill to judge (this bill's own figures hold: the gap is theirs).
//! A contract the record has not seen starts where the ledger's counter stands.
//!
//! A bill that fails is still passed on (the answer was delivered), marked
//! `bill_verified: false` with the reason, and logged at error level; after
//! `max_bad_bills` of them a proxy gets no more requests from this gateway. With a ledger the
//! claimed ranges and the bad-bill counts are written durably (`[payments] bill_file`) before
//! a verdict is given, so a restart forgets neither.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cocoon_ledger::{Address, Network, NetworkParams, PaymentMessage, SignedMessage};
use cocoon_protocol::{Billing, Relayed, RequestId, Usage, UsageBounds};
use parking_lot::Mutex;

mod late;
pub(crate) use late::run as ask_for_late_bills;

/// How often, at most, the gateway reads the ledger's parameters again because a bill did not
/// check out against them.
const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Counter ranges kept per contract; older ones fold into a floor below which every counter
/// counts as claimed.
const KEPT_RANGES: usize = 4096;

/// The completion tokens a request without `max_tokens` is allowed for when its bill has not
/// come (the gateway does not know the model's context): a counter gap up to its weight at the
/// request's price cap can be explained by it.
pub(crate) const UNBOUNDED_COMPLETION: u64 = 32_768;

/// Without `[payments] max_price_per_token`, the most a request may be billed per weighted
/// token is this many times the network's floor price.
pub(crate) const DEFAULT_PRICE_CAP_FLOORS: u64 = 10;

/// The counter ranges one contract's bills claimed: `start → end`, disjoint; touching ranges
/// merge, so bills that follow each other keep one range.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Claimed {
    ranges: BTreeMap<u64, u64>,
    /// Every counter at or below this was claimed (ranges folded away, or charged before
    /// the record first saw the contract).
    floor: u64,
    /// Allowances of requests whose answers ended without a bill that the proxy could no
    /// longer be asked about (see [`late`]): the counters it may have charged for them.
    #[serde(default)]
    unbilled: u64,
    /// Requests whose answers ended without a bill, until the proxy says what it billed.
    #[serde(default)]
    unsettled: Vec<Unsettled>,
}

/// A request whose answer ended without its bill (cut off, its connection lost), until its
/// proxy says what it billed: its allowance explains counter gaps meanwhile, and whatever
/// the proxy says is held to what the request could cost.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Unsettled {
    pub id: RequestId,
    /// The proxy's key (hex).
    pub proxy: String,
    pub allowance: u64,
    pub max_price: Option<u64>,
    pub bounds: Option<UsageBounds>,
    /// When the answer ended (unix seconds).
    pub since: u64,
    /// The proxy was reached about it (answered `pending`, or served answers while it would
    /// not answer the ask): if it never names a bill, none is owed.
    #[serde(default)]
    pub reached: bool,
    /// For a sealed request, the serving worker's verified receipt, if its answer got as far:
    /// the late bill may not weigh more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<cocoon_protocol::Receipt>,
}

impl Claimed {
    /// Claims `(end - len, end]`, or says which earlier claim it overlaps.
    fn claim(&mut self, end: u64, len: u64) -> Result<(), String> {
        if len == 0 {
            // Claims nothing, but its charge still moves the ledger's counter to `end`, and
            // the counters below it no bill claimed are charged too: it marks where the
            // counter stands (an honest one re-signs the counter as it is).
            if end > self.top() {
                self.ranges.insert(end, end);
            }
            return Ok(());
        }
        let start = end
            .checked_sub(len)
            .ok_or_else(|| format!("the counter {end} is below the {len} tokens billed"))?;
        let overlap = |(s, e): (u64, u64)| format!("tokens {}..{} were billed before", s, e);
        if start < self.floor {
            return Err(overlap((start, self.floor)));
        }
        if let Some((&s, &e)) = self.ranges.range(..end).next_back()
            && e > start
        {
            return Err(overlap((s, e)));
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e == start
        {
            self.ranges.remove(&s);
            start = s;
        }
        if let Some(e) = self.ranges.remove(&end) {
            end = e;
        }
        self.ranges.insert(start, end);
        if self.ranges.len() > KEPT_RANGES
            && let Some((_, e)) = self.ranges.pop_first()
        {
            self.floor = self.floor.max(e);
        }
        Ok(())
    }

    /// The highest counter a charge of this contract stood at.
    fn top(&self) -> u64 {
        self.ranges
            .last_key_value()
            .map_or(self.floor, |(_, &e)| e.max(self.floor))
    }

    /// The counters this contract's requests without a bill may explain: the allowances of
    /// those still unsettled and of those that can no longer be.
    fn credit(&self) -> u64 {
        self.unsettled
            .iter()
            .fold(self.unbilled, |sum, u| sum.saturating_add(u.allowance))
    }

    /// Counters below the highest claimed that no bill claimed: what the ledger charges beyond
    /// the bills this gateway verified.
    fn unexplained(&self) -> u64 {
        let top = self.top();
        let claimed: u64 = self.ranges.iter().map(|(s, e)| e - s).sum();
        top.saturating_sub(self.floor).saturating_sub(claimed)
    }
}

/// Requests in flight to one contract: each one's allowance, by its ticket's number (tickets
/// are numbered in the order they are taken).
type InFlight = BTreeMap<u64, u64>;

/// One request, from before it is sent until its answer ends: its allowance counts for gaps
/// while it is in flight (on no contract yet while the proxy is being chosen: its bill may land
/// on any), and while it is unsettled if its answer ends without a bill.
#[derive(Debug)]
pub(crate) struct Ticket {
    record: Arc<BillRecord>,
    /// The request's id, which its proxy keeps the bill under.
    pub id: RequestId,
    /// Its number among this gateway's tickets.
    seq: u64,
    /// The contract and the proxy's key, once bound.
    contract: Mutex<Option<Address>>,
    proxy: Mutex<Option<[u8; 32]>>,
    allowance: u64,
    max_price: Option<u64>,
    bounds: Option<UsageBounds>,
    billed: AtomicBool,
    /// A sealed request's opener: its receipt, if any, goes with the request if it is left
    /// without a bill.
    sealed: std::sync::OnceLock<crate::sealing::SharedOpener>,
}

fn leave(flying: &mut HashMap<Option<Address>, InFlight>, at: Option<Address>, seq: u64) {
    if let Some(f) = flying.get_mut(&at) {
        f.remove(&seq);
        if f.is_empty() {
            flying.remove(&at);
        }
    }
}

impl Ticket {
    /// The request is sealed and `opener` reads its answer.
    pub(crate) fn watch_sealed(&self, opener: crate::sealing::SharedOpener) {
        let _ = self.sealed.set(opener);
    }

    /// The request went to `contract`'s proxy, the one with key `proxy`; a contract the
    /// record has not seen starts at `baseline` (the ledger's counter), durably.
    pub(crate) fn bind(
        &self,
        contract: Address,
        proxy: [u8; 32],
        baseline: u64,
    ) -> Result<(), String> {
        *self.proxy.lock() = Some(proxy);
        {
            let mut kept = self.record.kept.lock();
            let key = hex::encode(contract.0);
            if !kept.claimed.contains_key(&key) {
                kept.claimed.insert(
                    key.clone(),
                    Claimed {
                        floor: baseline,
                        ..Claimed::default()
                    },
                );
                if let Err(e) = self.record.persist(&mut kept) {
                    kept.claimed.remove(&key);
                    return Err(e);
                }
            }
        }
        let mut bound = self.contract.lock();
        let mut flying = self.record.in_flight.lock();
        leave(&mut flying, *bound, self.seq);
        flying
            .entry(Some(contract))
            .or_default()
            .insert(self.seq, self.allowance);
        *bound = Some(contract);
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let bound = *self.contract.lock();
        leave(&mut self.record.in_flight.lock(), bound, self.seq);
        let Some(contract) = bound else {
            return; // never sent to a proxy: nothing can be billed for it
        };
        if self.billed.load(Ordering::SeqCst) || self.allowance == 0 {
            return;
        }
        let proxy = self.proxy.lock().map(hex::encode).unwrap_or_default();
        let mut kept = self.record.kept.lock();
        let claimed = kept.claimed.entry(hex::encode(contract.0)).or_default();
        claimed.unsettled.push(Unsettled {
            id: self.id,
            proxy,
            allowance: self.allowance,
            max_price: self.max_price,
            bounds: self.bounds,
            since: cocoon_ledger::unix_now(),
            reached: false,
            receipt: self.sealed.get().and_then(|o| o.lock().receipt().cloned()),
        });
        if let Err(e) = self.record.persist(&mut kept) {
            tracing::error!(error = %e, "a request without a bill was not recorded durably");
        }
        drop(kept);
        self.record.late.notify_one();
    }
}

/// What the gateway keeps between bills: the network's prices as its ledger states them, the
/// counter ranges each contract was billed, and the proxies that sent bad bills.
pub(crate) struct BillRecord {
    /// The ledger's parameters; `None` without a ledger (the proxy's figures are then
    /// checked only for consistency).
    params: parking_lot::RwLock<Option<NetworkParams>>,
    /// Where the parameters are read again when a bill does not check out against them (the
    /// owner may have changed them since): at most once per [`REFRESH_EVERY`].
    ledger: Option<Arc<dyn cocoon_ledger::Ledger>>,
    /// The ledger's network, which every charge must be signed for; `None` without a ledger
    /// (a charge is then checked on the network it names: it pays nothing here).
    network: Option<Network>,
    refreshed: Mutex<Option<std::time::Instant>>,
    max_bad_bills: u32,
    /// Where `kept` is written after every change; `None` keeps it in memory only.
    path: Option<PathBuf>,
    kept: Mutex<Kept>,
    /// Woken when a write of `kept` ends.
    written: parking_lot::Condvar,
    /// Requests in flight, per contract, and (`None`) those whose proxy is being chosen
    /// (memory only: after a restart none is).
    in_flight: Mutex<HashMap<Option<Address>, InFlight>>,
    /// Woken when a request ends without its bill: its proxy is to be asked for it.
    late: tokio::sync::Notify,
    /// Tickets taken so far: the next one's number.
    tickets: std::sync::atomic::AtomicU64,
    /// Per contract, the counters no bill claimed beyond the credit when last judged, and
    /// the tickets taken when that excess last grew: only requests whose tickets were taken
    /// by then can have been settled below the counters already claimed, so only they may
    /// fill it (memory only: after a restart no request is in flight).
    gaps: Mutex<HashMap<Address, (u64, u64)>>,
    /// Bills judged since start, for the operator's status.
    tally: Tally,
}

/// Bills judged since start: how many checked out, how many did not, and what they cost.
#[derive(Debug, Default)]
struct Tally {
    verified: std::sync::atomic::AtomicU64,
    bad: std::sync::atomic::AtomicU64,
    /// Nanoton the bills that checked out charged (late bills included).
    spent: std::sync::atomic::AtomicU64,
}

/// Bills judged since the gateway started, as its operator's status shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct BillTally {
    /// Bills that checked out.
    pub verified: u64,
    /// Bills that did not (and answers that came without the bill they owed).
    pub bad: u64,
    /// Nanoton the verified bills charged (a bad bill's cost is the proxy's unchecked word).
    pub spent_nanoton: u64,
}

impl std::fmt::Debug for BillRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BillRecord")
            .field("params", &self.params)
            .field("path", &self.path)
            .field("kept", &self.kept)
            .finish_non_exhaustive()
    }
}

/// What the record keeps, as its file holds it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Kept {
    /// Claimed counter ranges per contract (hex account id).
    claimed: HashMap<String, Claimed>,
    /// Bad bills per proxy key (hex).
    bad: HashMap<String, u32>,
    /// How far the file has caught up with the changes (memory only).
    #[serde(skip)]
    sync: Writes,
}

/// The record's writes, grouped: changes made while a write is under way go to disk together
/// in the next one.
#[derive(Debug, Default)]
struct Writes {
    /// Changes made so far.
    changes: u64,
    /// Changes on disk.
    written: u64,
    /// A write is under way (its writer has let go of the record meanwhile).
    writing: bool,
    /// Why a write failed: from then on nothing more is given a verdict, since what is on
    /// disk may be behind what was answered (until the gateway restarts on its file).
    broken: Option<String>,
}

impl BillRecord {
    #[cfg(test)]
    pub(crate) fn new(params: Option<NetworkParams>, max_bad_bills: u32) -> Self {
        Self::open(None, params, max_bad_bills).expect("an in-memory record opens")
    }

    /// The record kept at `path` (empty if the file does not exist yet), or in memory only.
    pub(crate) fn open(
        path: Option<PathBuf>,
        params: Option<NetworkParams>,
        max_bad_bills: u32,
    ) -> anyhow::Result<Self> {
        let kept = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| anyhow::anyhow!("bill record {}: {e}", p.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Kept::default(),
                Err(e) => anyhow::bail!("bill record {}: {e}", p.display()),
            },
            None => Kept::default(),
        };
        Ok(Self {
            params: parking_lot::RwLock::new(params),
            ledger: None,
            network: None,
            refreshed: Mutex::new(None),
            max_bad_bills: max_bad_bills.max(1),
            path,
            kept: Mutex::new(kept),
            written: parking_lot::Condvar::new(),
            in_flight: Mutex::new(HashMap::new()),
            late: tokio::sync::Notify::new(),
            tickets: std::sync::atomic::AtomicU64::new(0),
            gaps: Mutex::new(HashMap::new()),
            tally: Tally::default(),
        })
    }

    /// Bills judged since start.
    pub(crate) fn tally(&self) -> BillTally {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        BillTally {
            verified: load(&self.tally.verified),
            bad: load(&self.tally.bad),
            spent_nanoton: load(&self.tally.spent),
        }
    }

    /// Whether the record has seen `contract` (else it starts at the ledger's counter).
    pub(crate) fn knows(&self, contract: &Address) -> bool {
        self.kept
            .lock()
            .claimed
            .contains_key(&hex::encode(contract.0))
    }

    /// The most a request may be billed per weighted token: `configured`, else
    /// [`DEFAULT_PRICE_CAP_FLOORS`] times the network's floor; `None` without the ledger's
    /// parameters (no bill then pays anything here).
    pub(crate) fn price_cap(&self, configured: Option<u64>) -> Option<u64> {
        configured.or_else(|| {
            let params = self.params.read();
            let floor = u64::try_from(params.as_ref()?.price_per_token).unwrap_or(u64::MAX);
            Some(floor.saturating_mul(DEFAULT_PRICE_CAP_FLOORS))
        })
    }

    /// Counter units a request of at most `prompt` and `completion` tokens may be billed at
    /// `price` per weighted token (0 without the ledger's parameters).
    pub(crate) fn allowance(&self, prompt: u64, completion: u64, price: u64) -> u64 {
        let Some(params) = self.params.read().clone() else {
            return 0;
        };
        let Ok(weighted) = params.weighted_bound(prompt, completion) else {
            return u64::MAX;
        };
        let floor = u64::try_from(params.price_per_token)
            .unwrap_or(u64::MAX)
            .max(1);
        u64::try_from(u128::from(weighted) * u128::from(price.max(floor)) / u128::from(floor))
            .unwrap_or(u64::MAX)
    }

    /// A request about to be sent, allowed `allowance` units, with a fresh id; [`Ticket::bind`]
    /// it to the contract once its proxy is chosen.
    pub(crate) fn ticket(self: &Arc<Self>, allowance: u64) -> Ticket {
        let seq = self.tickets.fetch_add(1, Ordering::SeqCst);
        self.in_flight
            .lock()
            .entry(None)
            .or_default()
            .insert(seq, allowance);
        Ticket {
            record: self.clone(),
            id: RequestId(rand::random()),
            seq,
            contract: Mutex::new(None),
            proxy: Mutex::new(None),
            allowance,
            max_price: None,
            bounds: None,
            billed: AtomicBool::new(false),
            sealed: std::sync::OnceLock::new(),
        }
    }

    /// A [`Self::ticket`] for a request with the price cap `max_price` and `bounds`, which a
    /// bill the proxy gives later for it is held to.
    pub(crate) fn ticket_for(
        self: &Arc<Self>,
        allowance: u64,
        max_price: Option<u64>,
        bounds: UsageBounds,
    ) -> Ticket {
        let mut ticket = self.ticket(allowance);
        (ticket.max_price, ticket.bounds) = (max_price, Some(bounds));
        ticket
    }

    /// Charges must be signed for `network`, the network of `ledger`; parameters are read
    /// again from `ledger` when a bill fails against them.
    pub(crate) fn with_ledger(
        mut self,
        ledger: Arc<dyn cocoon_ledger::Ledger>,
        network: Network,
    ) -> Self {
        self.ledger = Some(ledger);
        self.network = Some(network);
        self
    }

    /// Reads the ledger's parameters again, if it has a ledger and did not in the last
    /// [`REFRESH_EVERY`].
    async fn refresh(&self) -> Refreshed {
        let Some(ledger) = &self.ledger else {
            return Refreshed::Unchanged;
        };
        {
            let mut last = self.refreshed.lock();
            if last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
                return Refreshed::Skipped;
            }
            *last = Some(std::time::Instant::now());
        }
        match ledger.params().await {
            Ok(fresh) => {
                let mut params = self.params.write();
                let changed = params.as_ref() != Some(&fresh);
                if changed {
                    tracing::info!(
                        "the network's parameters changed: bills are checked against the new ones"
                    );
                    *params = Some(fresh);
                    return Refreshed::Changed;
                }
                Refreshed::Unchanged
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the network's parameters again");
                Refreshed::Skipped
            }
        }
    }

    /// Makes the change just made to `kept` durable before it returns. A verdict is given only
    /// once what it claimed is on disk, so this waits (blocking: the file stays small, as
    /// touching ranges merge). Changes made while another is being written go to disk together
    /// in the next write (group commit): one write and sync for many answers ending at once,
    /// each answered only once a write holding it is done. A failed write fails every change
    /// waiting on it, and all that come after (the record is then behind the answers given).
    fn persist(&self, kept: &mut parking_lot::MutexGuard<'_, Kept>) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // On the runtime's worker threads, waiting would hold the thread and with it the other
        // requests, which could then not join the write under way: the runtime moves them
        // elsewhere while this one waits.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.wait_durable(path, kept))
        } else {
            self.wait_durable(path, kept)
        }
    }

    /// [`Self::persist`]'s wait: the change just made is on disk, by this thread's write or
    /// another's.
    fn wait_durable(
        &self,
        path: &std::path::Path,
        kept: &mut parking_lot::MutexGuard<'_, Kept>,
    ) -> Result<(), String> {
        kept.sync.changes += 1;
        let mine = kept.sync.changes;
        loop {
            // On disk already, whatever failed after.
            if kept.sync.written >= mine {
                return Ok(());
            }
            if let Some(why) = &kept.sync.broken {
                return Err(why.clone());
            }
            if kept.sync.writing {
                self.written.wait(kept);
                continue;
            }
            let (upto, bytes) = (
                kept.sync.changes,
                serde_json::to_vec(&**kept).expect("the record serializes"),
            );
            kept.sync.writing = true;
            // Others change the record meanwhile; their changes go in the next write.
            let result = parking_lot::MutexGuard::unlocked(kept, || {
                cocoon_ledger::write_atomically(path, &bytes)
            });
            kept.sync.writing = false;
            match result {
                Ok(()) => kept.sync.written = upto,
                Err(e) => {
                    kept.sync.broken = Some(format!(
                        "the bill record {} cannot be written ({e}): no bill is judged until the \
                         gateway restarts on it",
                        path.display()
                    ));
                }
            }
            self.written.notify_all();
        }
    }

    /// Whether the proxy with `key` sent `max_bad_bills` bad bills.
    pub(crate) fn distrusts(&self, key: &[u8; 32]) -> bool {
        self.bad_bills(key) >= self.max_bad_bills
    }

    /// Bad bills from the proxy with `key` so far.
    pub(crate) fn bad_bills(&self, key: &[u8; 32]) -> u32 {
        self.kept
            .lock()
            .bad
            .get(&hex::encode(key))
            .copied()
            .unwrap_or(0)
    }

    fn bad_bill(&self, key: [u8; 32]) {
        let mut kept = self.kept.lock();
        let n = kept.bad.entry(hex::encode(key)).or_default();
        *n += 1;
        if *n == self.max_bad_bills {
            tracing::error!(proxy = %hex::encode(key), bad_bills = *n, "this proxy sent too many bills that do not check out: no more requests go to it");
        }
        if let Err(e) = self.persist(&mut kept) {
            tracing::error!(error = %e, "a bad bill was not recorded durably");
        }
    }

    /// Claims `len` tokens ending at `end` for `contract`, durably before it answers; with
    /// the request's `ticket`, or as the late bill of the unsettled request `late`, then holds
    /// the counters no bill claimed to what requests without a bill may explain (the claim
    /// stands either way: the ledger will charge it).
    fn claim(
        &self,
        contract: Address,
        (end, len): (u64, u64),
        ticket: Option<&Ticket>,
        late: Option<RequestId>,
    ) -> Result<(), Fault> {
        let mut kept = self.kept.lock();
        // After a failed write the record in memory may hold claims that were never accepted
        // (callers roll back into each other's changes): no bill is judged against it.
        if let Some(why) = &kept.sync.broken {
            return Err(Fault::Unrecorded(why.clone()));
        }
        let key = hex::encode(contract.0);
        let before = kept.claimed.get(&key).cloned();
        let claimed = kept.claimed.entry(key.clone()).or_default();
        // A range billed before is no price change: no refresh can explain it, so it counts
        // against the proxy even while the parameters cannot be read again.
        claimed.claim(end, len).map_err(Fault::Overbilled)?;
        // Settled in the claim's own write: a crash between the two would have the proxy
        // asked again, and its bill then look like a double charge.
        if let Some(id) = late {
            claimed.unsettled.retain(|u| u.id != id);
        }
        if let Err(e) = self.persist(&mut kept) {
            // Not kept, not claimed: a restart must not find a claim the gateway never had.
            match before {
                Some(b) => kept.claimed.insert(key, b),
                None => kept.claimed.remove(&key),
            };
            return Err(Fault::Unrecorded(e));
        }
        drop(kept);
        match (ticket, late) {
            (Some(ticket), _) => {
                ticket.billed.store(true, Ordering::SeqCst);
                self.judge(contract, Some(ticket.seq), Some(end))
            }
            (None, Some(_)) => self.judge(contract, None, Some(end)),
            (None, None) => Ok(()),
        }
    }

    /// Holds the counters of `contract` no bill claimed to what its requests without a bill
    /// may explain. `own`: the ticket of the request judging (not one that may still fill
    /// the gap); `end`: the counter it claimed, if any.
    fn judge(&self, contract: Address, own: Option<u64>, end: Option<u64>) -> Result<(), Fault> {
        let (unexplained, credit) = {
            let kept = self.kept.lock();
            match kept.claimed.get(&hex::encode(contract.0)) {
                Some(c) => (c.unexplained(), c.credit()),
                None => return Ok(()),
            }
        };
        let excess = unexplained.saturating_sub(credit);
        let taken = {
            let mut gaps = self.gaps.lock();
            if excess == 0 {
                gaps.remove(&contract);
                return Ok(());
            }
            let gap = gaps.entry(contract).or_insert((0, 0));
            if excess > gap.0 {
                gap.1 = self.tickets.load(Ordering::SeqCst);
            }
            gap.0 = excess;
            gap.1
        };
        // Bills of requests still in flight may fill the gap (concurrent answers' bills
        // arrive in any order), but only of those sent before it was seen: a request sent
        // after is settled above the counters already claimed.
        let others = {
            let flying = self.in_flight.lock();
            [Some(contract), None]
                .iter()
                .filter_map(|at| flying.get(at))
                .flat_map(|f| f.range(..taken))
                .filter(|(seq, _)| Some(**seq) != own)
                .fold(0u64, |sum, (_, a)| sum.saturating_add(*a))
        };
        let at = end.map_or(String::new(), |end| {
            format!("the charge's counter {end} leaves ")
        });
        let reason = format!(
            "{at}{unexplained} units that no bill of this gateway claimed, beyond the {credit} \
             its requests without a bill allow"
        );
        if others > 0 && excess <= others {
            tracing::debug!(%reason, "a counter gap waits for the bills of requests in flight");
            return Ok(());
        }
        Err(Fault::Overbilled(reason))
    }
}

/// What reading the ledger's parameters again found.
enum Refreshed {
    Changed,
    Unchanged,
    /// Not read (read too recently, or the ledger did not answer): the parameters a bill
    /// failed against may be stale.
    Skipped,
}

/// Why a bill is not verified: the proxy's fault, or the gateway's own (its record could not
/// be written), which does not count against the proxy.
#[derive(Debug)]
enum Fault {
    Bad(String),
    /// The charge claims a range billed before, or its counter skips more than this gateway's
    /// unbilled requests could cost: the proxy's fault, and not one a price change explains
    /// (no refresh, no re-check).
    Overbilled(String),
    Unrecorded(String),
    /// It failed against parameters that could not be confirmed as current: not counted
    /// against the proxy (a price change must not get honest proxies barred), at most once per
    /// refresh interval for a proxy that keeps failing.
    Unconfirmed(String),
}

impl Fault {
    fn reason(&self) -> String {
        match self {
            Fault::Bad(r) | Fault::Overbilled(r) => r.clone(),
            Fault::Unrecorded(r) => format!("the bill could not be recorded: {r}"),
            Fault::Unconfirmed(r) => format!(
                "{r} (against the network's parameters as last read; they could not be read again yet)"
            ),
        }
    }
}

/// Who a bill must be between: the proxy of the connection and this gateway's contract with
/// it, named as the ledger names it.
#[derive(Debug, Clone)]
pub(crate) struct Parties {
    pub proxy: Option<[u8; 32]>,
    pub contract: Option<Address>,
    /// The request's price cap, if it set one.
    pub max_price: Option<u64>,
    /// The most the request's answer may be counted as (from its prompt and `max_tokens`):
    /// a bill for more is bad, whatever the proxy or its worker says was used.
    pub bounds: Option<UsageBounds>,
    /// Whether a bill must come with the answer: this gateway pays through a ledger, so an
    /// answer without one is a proxy hiding what it charges.
    pub expects_bill: bool,
    pub record: Arc<BillRecord>,
    /// The request's place among this contract's requests in flight (with a ledger).
    pub ticket: Option<Arc<Ticket>>,
    /// What the request holds of its API key's day, which the answer's usage settles.
    pub key: Option<Arc<crate::guard::KeyHold>>,
    /// The unsettled request this is the late bill of, which its claim settles.
    pub late: Option<RequestId>,
    /// For a sealed answer: its opener, which holds the serving worker's verified receipt
    /// (the bill may not weigh more), and where receipts are kept.
    pub sealed: Option<(crate::sealing::SharedOpener, Arc<crate::sealing::Sealer>)>,
    /// For the late bill of a sealed request: the receipt kept when its answer ended.
    pub receipt: Option<cocoon_protocol::Receipt>,
}

impl Parties {
    /// A sealed answer's bill against the serving worker's signed receipt: the same counts,
    /// or counts the proxy held to its bounds that weigh no more (a proxy may bill less than a
    /// worker claims, never more), for the weights the receipt names.
    fn check_receipt(
        &self,
        receipt: Option<&cocoon_protocol::Receipt>,
        bill: &Billing,
        usage: Usage,
    ) -> Result<(), String> {
        let receipt =
            receipt.ok_or("the sealed answer ended without the serving worker's receipt")?;
        if bill.model_hash.is_some() && bill.model_hash != receipt.model_hash {
            return Err("the bill names other weights than the worker's receipt".into());
        }
        if receipt.usage == usage {
            return Ok(());
        }
        let weigh = |u: &Usage| {
            let p = u.priced();
            let params = self.record.params.read().clone()?;
            params
                .weighted_answer(p.prompt, p.cached, p.completion, p.reasoning)
                .ok()
        };
        match (weigh(&usage), weigh(&receipt.usage)) {
            (Some(billed), Some(signed)) if billed <= signed => Ok(()),
            _ => {
                let counts = |u: &Usage| {
                    format!(
                        "{} prompt ({} cached) and {} completion ({} reasoning) tokens",
                        u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens
                    )
                };
                Err(format!(
                    "the bill is for {}, more than the serving worker's signed receipt for {}",
                    counts(&usage),
                    counts(&receipt.usage)
                ))
            }
        }
    }

    /// Checks `bill` for an answer of `usage`; the reason when it does not hold. A bill that
    /// holds claims its counter range.
    #[cfg(test)]
    pub(crate) fn check(&self, bill: &Billing, usage: Usage) -> Result<(), String> {
        self.check_bill(bill, usage).map_err(|f| f.reason())
    }

    fn check_bill(&self, bill: &Billing, usage: Usage) -> Result<(), Fault> {
        let contract = self.check_figures(bill, usage).map_err(Fault::Bad)?;
        self.record.claim(
            contract,
            (bill.tokens_used, bill.billed_tokens),
            self.ticket.as_deref(),
            self.late,
        )
    }

    /// Everything a bill must say, before its counter range is claimed; the contract it names.
    fn check_figures(&self, bill: &Billing, usage: Usage) -> Result<Address, String> {
        let proxy = self.proxy.ok_or("the proxy's key is unknown")?;
        let bytes = hex::decode(&bill.charge).map_err(|_| "the charge is not hex".to_string())?;
        let charge = SignedMessage(bytes);
        let network = self
            .record
            .network
            .or_else(|| charge.named_network())
            .ok_or("the charge is not a payment message")?;
        let message = charge
            .verify(&proxy, network)
            .map_err(|e| format!("the charge is not the proxy's: {e}"))?;
        let PaymentMessage::ChargeClient {
            tokens_used,
            contract,
            ..
        } = message
        else {
            return Err("the charge is not a charge message".into());
        };
        if Some(contract) != self.contract {
            return Err("the charge is for another contract".into());
        }
        if tokens_used != bill.tokens_used || tokens_used < bill.billed_tokens {
            return Err(format!(
                "the charge counts {tokens_used} tokens, the bill {} (this answer {})",
                bill.tokens_used, bill.billed_tokens
            ));
        }
        if let Some(bounds) = &self.bounds
            && let Some(breach) = bounds.apply(usage, Relayed::default()).breach
        {
            return Err(format!(
                "the usage is more than the request could use: {breach}"
            ));
        }
        if let Some(max) = self.max_price
            && bill.price_per_token > max
        {
            return Err(format!(
                "the price {} is above the request's max_price {max}",
                bill.price_per_token
            ));
        }
        let allowed = u128::from(bill.weighted_tokens) * u128::from(bill.price_per_token)
            / u128::from(bill.unit_price.max(1));
        if u128::from(bill.billed_tokens) > allowed {
            return Err(format!(
                "{} units billed for {} tokens at {} (unit price {})",
                bill.billed_tokens, bill.weighted_tokens, bill.price_per_token, bill.unit_price
            ));
        }
        if bill.billed_tokens.checked_mul(bill.unit_price) != Some(bill.cost) {
            return Err(format!(
                "cost {} is not {} units at {}",
                bill.cost, bill.billed_tokens, bill.unit_price
            ));
        }
        if let Some(params) = self.record.params.read().clone() {
            let floor = u64::try_from(params.price_per_token).unwrap_or(u64::MAX);
            if bill.unit_price != floor {
                return Err(format!(
                    "the unit price {} is not the network's {floor}",
                    bill.unit_price
                ));
            }
            if bill.price_per_token < floor {
                return Err(format!(
                    "the price {} is below the network's floor {floor}",
                    bill.price_per_token
                ));
            }
            let p = usage.priced();
            let weighted = params
                .weighted_answer(p.prompt, p.cached, p.completion, p.reasoning)
                .map_err(|e| e.to_string())?;
            if bill.weighted_tokens != weighted {
                return Err(format!(
                    "{} weighted tokens billed for {} prompt ({} cached) and {} completion ({} \
                     reasoning) tokens, which weigh {weighted}",
                    bill.weighted_tokens,
                    usage.prompt_tokens,
                    usage.cached_tokens,
                    usage.completion_tokens,
                    usage.reasoning_tokens
                ));
            }
        }
        if let Some((opener, _)) = &self.sealed {
            self.check_receipt(opener.lock().receipt(), bill, usage)?;
        }
        if let Some(receipt) = &self.receipt {
            self.check_receipt(Some(receipt), bill, usage)?;
        }
        Ok(contract)
    }

    /// The verdict on the bill (or its absence) of an answer of `usage`: `None` when there is
    /// nothing to judge (no bill, none expected). A failure is logged at error level and, if
    /// it is the proxy's, counted against it.
    pub(crate) async fn verdict(
        &self,
        bill: Option<&Billing>,
        usage: Usage,
    ) -> Option<Result<(), String>> {
        if let Some(key) = &self.key {
            key.spend(u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens));
        }
        if let Some((opener, sealer)) = &self.sealed
            && let Some(receipt) = opener.lock().receipt()
        {
            sealer.keep(receipt);
        }
        let verdict = match bill {
            Some(bill) => self.judged(bill, usage).await,
            None if self.expects_bill => Err(self.count(Fault::Bad(
                "the answer came without a bill, though this gateway pays for answers".into(),
            ))),
            None => return None,
        };
        if bill.is_none() {
            // An answer without the bill it owed: bad, and nothing to add to what was spent.
            self.record.tally.bad.fetch_add(1, Ordering::Relaxed);
        }
        Some(verdict.map_err(|fault| fault.reason()))
    }

    /// [`Self::check_bill`], again after reading the ledger's prices if it failed against
    /// them; a failure logged and, if it is the proxy's, counted against it.
    async fn judged(&self, bill: &Billing, usage: Usage) -> Result<(), Fault> {
        let verdict = match self.check_bill(bill, usage) {
            // The owner may have changed the prices since they were read: an honest bill at
            // the new ones must not count against the proxy.
            Err(Fault::Bad(reason)) => match self.record.refresh().await {
                Refreshed::Changed => self.check_bill(bill, usage),
                Refreshed::Unchanged => Err(Fault::Bad(reason)),
                Refreshed::Skipped => Err(Fault::Unconfirmed(reason)),
            },
            verdict => verdict,
        };
        let tally = &self.record.tally;
        match &verdict {
            // Only a bill that checked out says what was charged: a bad one's cost is the
            // proxy's unsigned word (and a replayed one charged nothing more).
            Ok(()) => {
                tally.verified.fetch_add(1, Ordering::Relaxed);
                let _ = tally
                    .spent
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_add(bill.cost))
                    });
            }
            Err(_) => {
                tally.bad.fetch_add(1, Ordering::Relaxed);
            }
        }
        verdict.map_err(|fault| self.count(fault))
    }

    fn count(&self, fault: Fault) -> Fault {
        if let Fault::Bad(_) | Fault::Overbilled(_) = &fault
            && let Some(ticket) = &self.ticket
        {
            // Judged and counted: its proxy is not asked for it again (its receipt is this
            // very bill). A bill not recorded, or judged on stale prices, is asked again.
            ticket.billed.store(true, Ordering::SeqCst);
        }
        if let (Fault::Bad(_) | Fault::Overbilled(_), Some(proxy)) = (&fault, self.proxy) {
            self.record.bad_bill(proxy);
        }
        tracing::error!(reason = %fault.reason(), "the proxy's bill is not verified");
        fault
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_ledger::Wallet;

    pub(super) const NET: Network = Network::basechain(7);

    pub(super) fn bill(proxy: &Wallet, client: [u8; 32], tokens_used: u64, billed: u64) -> Billing {
        let charge = PaymentMessage::ChargeClient {
            query_id: tokens_used,
            tokens_used,
            contract: Address::client(&proxy.public_key(), &client),
        }
        .sign(proxy.key_pair(), NET);
        Billing {
            price_per_token: 20,
            weighted_tokens: billed,
            unit_price: 20,
            billed_tokens: billed,
            cost: billed * 20,
            tokens_used,
            charge: hex::encode(&charge.0),
            model_hash: None,
        }
    }

    fn parties(proxy: &Wallet, client: [u8; 32], params: Option<NetworkParams>) -> Parties {
        Parties {
            proxy: Some(proxy.public_key()),
            contract: Some(Address::client(&proxy.public_key(), &client)),
            max_price: Some(30),
            bounds: None,
            expects_bill: true,
            record: Arc::new(BillRecord::new(params, 3)),
            ticket: None,
            key: None,
            late: None,
            sealed: None,
            receipt: None,
        }
    }

    /// `billed` tokens of completion (weight 1 at the default multipliers).
    pub(super) fn usage(billed: u64) -> Usage {
        Usage::new(0, u32::try_from(billed).unwrap())
    }

    #[test]
    fn only_the_proxys_consistent_bills_for_this_client_pass() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let fresh = || parties(&proxy, client, None);
        fresh()
            .check(&bill(&proxy, client, 100, 10), usage(10))
            .unwrap();
        // Signed by someone else, for another client, a counter other than stated, an
        // inflated cost, an unknown proxy.
        let impostor = Wallet::from_seed([8; 32]);
        assert!(
            fresh()
                .check(&bill(&impostor, client, 100, 10), usage(10))
                .is_err()
        );
        assert!(
            fresh()
                .check(&bill(&proxy, [3; 32], 100, 10), usage(10))
                .is_err()
        );
        let mut b = bill(&proxy, client, 100, 10);
        b.tokens_used = 90;
        assert!(fresh().check(&b, usage(10)).is_err());
        let mut b = bill(&proxy, client, 100, 10);
        b.cost += 1;
        assert!(fresh().check(&b, usage(10)).is_err());
        // A dearer worker: 10 tokens at 30 are 15 units of 20, not more, and not above the cap.
        let mut b = bill(&proxy, client, 100, 15);
        (b.weighted_tokens, b.price_per_token) = (10, 30);
        fresh().check(&b, usage(10)).unwrap();
        b.billed_tokens = 16;
        b.cost = 16 * 20;
        assert!(fresh().check(&b, usage(10)).is_err());
        let mut b = bill(&proxy, client, 100, 10);
        b.price_per_token = 31;
        b.weighted_tokens = 7;
        assert!(fresh().check(&b, usage(7)).is_err());
        let unknown = Parties {
            proxy: None,
            ..fresh()
        };
        assert!(
            unknown
                .check(&bill(&proxy, client, 100, 10), usage(10))
                .is_err()
        );
        let unnamed = Parties {
            contract: None,
            ..fresh()
        };
        assert!(
            unnamed
                .check(&bill(&proxy, client, 100, 10), usage(10))
                .is_err()
        );
    }

    #[test]
    fn a_counter_range_billed_twice_is_a_double_charge_in_any_order() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = parties(&proxy, client, None);
        // Two answers settled in turn may arrive in either order.
        p.check(&bill(&proxy, client, 20, 10), usage(10)).unwrap();
        p.check(&bill(&proxy, client, 10, 10), usage(10)).unwrap();
        // The same bill again, or one reaching back into a billed range.
        let again = p.check(&bill(&proxy, client, 20, 10), usage(10));
        assert!(again.unwrap_err().contains("billed before"));
        assert!(p.check(&bill(&proxy, client, 25, 10), usage(10)).is_err());
        // Disjoint ranges pass, with a gap left for an answer cut off before its bill came.
        p.check(&bill(&proxy, client, 40, 10), usage(10)).unwrap();
        p.check(&bill(&proxy, client, 30, 10), usage(10)).unwrap();
        // Another contract has its own counter.
        let other = Wallet::from_seed([1; 32]);
        let q = Parties {
            record: p.record.clone(),
            ..parties(&other, client, None)
        };
        q.check(&bill(&other, client, 20, 10), usage(10)).unwrap();
    }

    #[test]
    fn with_a_ledger_its_prices_and_multipliers_are_the_measure() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let params = NetworkParams::default();
        assert_eq!(
            params.price_per_token, 20,
            "the bills here are at the default floor"
        );
        let fresh = || parties(&proxy, client, Some(params.clone()));
        fresh()
            .check(&bill(&proxy, client, 100, 10), usage(10))
            .unwrap();
        // A proxy that claims more weighted tokens than the usage weighs: the counts fit
        // each other, but not the answer.
        let b = bill(&proxy, client, 300, 200);
        assert!(
            fresh()
                .check(&b, usage(10))
                .unwrap_err()
                .contains("weigh 10")
        );
        // A unit price of its own: 20× the counter units, a cost that looks 20× smaller.
        let mut b = bill(&proxy, client, 300, 200);
        (b.unit_price, b.weighted_tokens, b.price_per_token, b.cost) = (1, 10, 20, 200);
        assert!(
            fresh()
                .check(&b, usage(10))
                .unwrap_err()
                .contains("network's 20")
        );
        // At the default multipliers a prompt token and a completion token weigh one each.
        let prompt = Usage::new(7, 3);
        fresh()
            .check(&bill(&proxy, client, 100, 10), prompt)
            .unwrap();
    }

    /// Sealed request `id` answered, through the gateway's opener, by a worker that reports
    /// `reported` in a signed receipt: the opener, holding the verified receipt.
    pub(super) fn sealed_answer(id: RequestId, reported: Usage) -> crate::sealing::SharedOpener {
        use cocoon_protocol::{FinishReason, GenerateEvent, Input, SamplingParams};
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::Ed25519KeyPair::from_pkcs8(
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        let keys = cocoon_seal::WorkerKeys::generate();
        let worker = "ab".repeat(32);
        let request = cocoon_protocol::GenerateRequest {
            model: "m".into(),
            input: Input::Text {
                prompt: "hi".into(),
            },
            params: SamplingParams::default(),
            max_price: None,
            cache_scope: None,
        };
        let header = cocoon_protocol::SealedHeader {
            request_id: id,
            model: "m".into(),
            max_tokens: None,
            max_price: None,
            prompt_bound: 100,
            affinity: None,
            cache_hint: None,
        };
        let to = cocoon_seal::SealTo {
            worker: worker.clone(),
            encryption_key: keys.public_key(),
            signing_key: signer.public_key().as_ref().try_into().unwrap(),
        };
        let (sealed, mut opener) = cocoon_seal::seal_request(
            header,
            &request,
            &[Arc::new(cocoon_seal::Session::new(to).unwrap())],
        )
        .unwrap();
        let mut opened = cocoon_seal::open_request(&sealed, &worker, &keys).unwrap();
        let done = GenerateEvent::Done {
            finish_reason: FinishReason::Stop,
            usage: reported,
            billing: None,
        };
        let chunk = opened
            .answer
            .seal(&done)
            .expect("a Done seals as the last chunk");
        let receipt = cocoon_seal::sign_receipt(
            cocoon_protocol::Receipt {
                request_id: id,
                worker,
                model: "m".into(),
                model_hash: None,
                answer_sha256: opened.answer.answer_sha256(),
                usage: reported,
                signature: String::new(),
            },
            &signer,
        );
        let last_chunk = chunk.with_receipt(receipt);
        assert_eq!(opener.open(last_chunk).unwrap(), None);
        Arc::new(parking_lot::Mutex::new(opener))
    }

    /// A sealed answer's bill is held to the serving worker's signed receipt: the proxy may
    /// bill less than the worker claims (it holds counts to its bounds), never more.
    #[test]
    fn a_sealed_answers_bill_may_not_weigh_more_than_the_workers_receipt() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let params = NetworkParams::default();
        let sealer = Arc::new(crate::sealing::Sealer::new(
            Arc::new(cocoon_tls::AnyPeer),
            &crate::config::SealingConfig::default(),
            None,
        ));
        let with_receipt = |reported: Usage| Parties {
            sealed: Some((sealed_answer(RequestId([5; 16]), reported), sealer.clone())),
            ..parties(&proxy, client, Some(params.clone()))
        };
        // The worker signed for 7 + 3; a bill for exactly that checks out.
        with_receipt(Usage::new(7, 3))
            .check(&bill(&proxy, client, 100, 10), Usage::new(7, 3))
            .unwrap();
        // A proxy billing 9 + 3 for it is overbilling, whatever its own counts say.
        let e = with_receipt(Usage::new(7, 3))
            .check(&bill(&proxy, client, 100, 12), Usage::new(9, 3))
            .unwrap_err();
        assert!(
            e.contains("more than the serving worker's signed receipt"),
            "{e}"
        );
        // Cached tokens priced as fresh ones weigh more than the receipt's split.
        let cached = Usage {
            cached_tokens: 5,
            ..Usage::new(7, 3)
        };
        let e = with_receipt(cached)
            .check(&bill(&proxy, client, 100, 10), Usage::new(7, 3))
            .unwrap_err();
        assert!(e.contains("signed receipt"), "{e}");
        // Held to its bounds below what the worker claimed: the client pays less, fine.
        with_receipt(Usage::new(70, 30))
            .check(&bill(&proxy, client, 100, 10), Usage::new(7, 3))
            .unwrap();
    }

    /// Each kind of token weighs the network's multiplier for it: cached prompt tokens and
    /// reasoning tokens too. A bill that prices them as plain prompt or answer tokens is bad.
    #[test]
    fn cached_and_reasoning_tokens_weigh_their_own_multipliers() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        // The prompt's multiplier is the weight of one.
        let one = NetworkParams::default().prompt_multiplier;
        let params = NetworkParams {
            reasoning_multiplier: 2 * one,
            ..NetworkParams::default()
        };
        assert_eq!(params.cached_multiplier, one / 10);
        let fresh = || parties(&proxy, client, Some(params.clone()));
        // 10 fresh prompt tokens, 30 cached at 0.1, 2 of answer, 3 of thinking at 2: 21.
        let usage = Usage {
            cached_tokens: 30,
            reasoning_tokens: 3,
            ..Usage::new(40, 5)
        };
        fresh()
            .check(&bill(&proxy, client, 100, 21), usage)
            .unwrap();
        // The thinking priced as answer (18), the cache ignored (48): both bad.
        for weighed in [18, 48] {
            let e = fresh()
                .check(&bill(&proxy, client, 100, weighed), usage)
                .unwrap_err();
            assert!(e.contains("weigh 21"), "{e}");
        }
        // What a request may be billed at most covers either split of its counts.
        assert_eq!(params.weighted_bound(40, 5).unwrap(), 40 + 10);
    }

    #[tokio::test]
    async fn a_proxy_is_distrusted_after_max_bad_bills() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = parties(&proxy, client, None);
        let key = proxy.public_key();
        let mut b = bill(&proxy, client, 100, 10);
        b.cost += 1;
        for n in 1..=2 {
            assert!(!p.record.distrusts(&key));
            assert!(p.verdict(Some(&b), usage(10)).await.unwrap().is_err());
            assert_eq!(p.record.bad_bills(&key), n);
        }
        // An answer without a bill, from a proxy that must bill, is a bad bill too.
        let missing = p.verdict(None, usage(10)).await.unwrap().unwrap_err();
        assert!(missing.contains("without a bill"), "{missing}");
        assert_eq!(p.record.bad_bills(&key), 3);
        assert!(p.record.distrusts(&key));
        // Without payments there is nothing to judge.
        let free = Parties {
            expects_bill: false,
            ..parties(&proxy, client, None)
        };
        assert_eq!(free.verdict(None, usage(10)).await, None);
    }

    #[tokio::test]
    async fn the_record_survives_a_restart_and_its_writes_are_required() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bills.json");
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let key = proxy.public_key();
        let durable = || Parties {
            record: Arc::new(BillRecord::open(Some(path.clone()), None, 2).unwrap()),
            ..parties(&proxy, client, None)
        };
        let p = durable();
        for end in [10, 20, 30] {
            p.verdict(Some(&bill(&proxy, client, end, 10)), usage(10))
                .await
                .unwrap()
                .unwrap();
        }
        let mut bad = bill(&proxy, client, 40, 10);
        bad.cost += 1;
        assert!(p.verdict(Some(&bad), usage(10)).await.unwrap().is_err());
        drop(p);
        // Bills that follow each other keep one range.
        let kept: Kept = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let ranges: Vec<_> = kept
            .claimed
            .values()
            .flat_map(|c| c.ranges.clone())
            .collect();
        assert_eq!(ranges, vec![(0, 30)]);

        // After a restart: a range billed before is still a double charge, and the proxy's bad
        // bill still counts (one more and it is distrusted).
        let p = durable();
        let again = p
            .verdict(Some(&bill(&proxy, client, 20, 10)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(again.contains("billed before"), "{again}");
        assert_eq!(p.record.bad_bills(&key), 2);
        assert!(p.record.distrusts(&key));
        p.verdict(Some(&bill(&proxy, client, 50, 10)), usage(10))
            .await
            .unwrap()
            .unwrap();

        // A record that cannot be written: not verified, not claimed, not the proxy's fault.
        let gone = dir.path().join("no-such-dir").join("bills.json");
        let p = Parties {
            record: Arc::new(BillRecord::open(Some(gone), None, 2).unwrap()),
            ..parties(&proxy, client, None)
        };
        let unrecorded = p
            .verdict(Some(&bill(&proxy, client, 10, 10)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(unrecorded.contains("could not be recorded"), "{unrecorded}");
        assert_eq!(p.record.bad_bills(&key), 0);
        assert!(p.record.kept.lock().claimed.is_empty());
    }

    #[tokio::test]
    async fn after_the_owner_changes_the_prices_honest_bills_still_check_out() {
        use cocoon_ledger::{EmbeddedLedger, Ledger, Op, Tx};
        let dir = tempfile::tempdir().unwrap();
        let owner = [1u8; 32];
        let ledger = Arc::new(
            EmbeddedLedger::open_network(&dir.path().join("ledger.redb"), owner, NET).unwrap(),
        );
        let before = ledger.params().await.unwrap();
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = Parties {
            record: Arc::new(
                BillRecord::new(Some(before.clone()), 3).with_ledger(ledger.clone(), NET),
            ),
            max_price: None,
            ..parties(&proxy, client, None)
        };
        let doubled = NetworkParams {
            price_per_token: before.price_per_token * 2,
            ..before.clone()
        };
        ledger
            .execute(Tx {
                sender: owner,
                op: Op::SetParams { params: doubled },
                now: 1,
            })
            .await
            .unwrap();
        // The proxy bills at the new floor, which the gateway has not read yet.
        let at = |end: u64, price: u64| {
            let mut b = bill(&proxy, client, end, 10);
            (b.unit_price, b.price_per_token, b.cost) = (price, price, 10 * price);
            b
        };
        p.verdict(Some(&at(10, 40)), usage(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.record.bad_bills(&proxy.public_key()), 0);
        // A bill at the old price is now the one not verified. It is not counted yet: the
        // parameters cannot be read again within the refresh interval, and a price change in
        // that interval must not get an honest proxy counted.
        let old = p
            .verdict(Some(&at(20, 20)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(old.contains("could not be read again yet"), "{old}");
        assert_eq!(p.record.bad_bills(&proxy.public_key()), 0);
    }

    /// The bounds of a 2-byte chat prompt ("Hi") with `max_tokens` 4.
    pub(super) fn hi_in_four() -> UsageBounds {
        use cocoon_protocol::{ChatMessage, GenerateRequest, Input, Role, SamplingParams};
        let request = GenerateRequest {
            model: "m".into(),
            input: Input::Chat {
                messages: vec![ChatMessage::new(Role::User, "Hi")],
                tools: None,
            },
            params: SamplingParams {
                max_tokens: Some(4),
                ..SamplingParams::default()
            },
            max_price: None,
            cache_scope: None,
        };
        UsageBounds::new(&request, u32::MAX)
    }

    #[test]
    fn a_bill_for_more_than_the_request_could_use_is_bad() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = Parties {
            bounds: Some(hi_in_four()),
            ..parties(&proxy, client, None)
        };
        // Consistent figures, but a 2-byte prompt cannot be 1,000 tokens, nor 4 max_tokens 10.
        let inflated = Usage::new(1000, 4);
        let err = p
            .check(&bill(&proxy, client, 1004, 1004), inflated)
            .unwrap_err();
        assert!(err.contains("more than the request could use"), "{err}");
        assert!(p.check(&bill(&proxy, client, 2000, 10), usage(10)).is_err());
        // What the request could use passes.
        let honest = Usage::new(9, 4);
        p.check(&bill(&proxy, client, 13, 13), honest).unwrap();
    }

    /// One request (allowance 100) on `record`, billed `len` units up to `end`, then ended:
    /// the verdict on its bill.
    pub(super) async fn billed(
        record: &Arc<BillRecord>,
        proxy: &Wallet,
        client: [u8; 32],
        (end, len): (u64, u64),
    ) -> Result<(), String> {
        let p = on(record, proxy, client, 100, 0);
        let verdict = p
            .verdict(Some(&bill(proxy, client, end, len)), usage(len))
            .await;
        drop(p);
        verdict.expect("a bill is judged")
    }

    /// Parties for one request on `record`, holding a ticket of `allowance` units bound to the
    /// client's contract (which starts at `baseline` if the record has not seen it).
    pub(super) fn on(
        record: &Arc<BillRecord>,
        proxy: &Wallet,
        client: [u8; 32],
        allowance: u64,
        baseline: u64,
    ) -> Parties {
        let ticket = Arc::new(record.ticket(allowance));
        let contract = Address::client(&proxy.public_key(), &client);
        ticket.bind(contract, proxy.public_key(), baseline).unwrap();
        Parties {
            record: record.clone(),
            ticket: Some(ticket),
            ..parties(proxy, client, None)
        }
    }

    /// ATTACK: the ledger charges `tokens_used - stored counter`, so a bill whose counter jumps
    /// far past its own short range is a charge for everything in between. The gateway holds
    /// the counters no bill claimed to what its unbilled requests could cost.
    #[tokio::test]
    async fn attack_a_counter_jump_is_an_overbill() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let record = Arc::new(BillRecord::new(Some(NetworkParams::default()), 3));
        billed(&record, &proxy, client, (10, 10)).await.unwrap();
        // Signed counter 1,000,000: the ledger would take 999,990 units for a 10-token answer
        // (999,980 of them claimed by no bill).
        let jump = on(&record, &proxy, client, 100, 0);
        let e = jump
            .verdict(Some(&bill(&proxy, client, 1_000_000, 10)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.contains("999980 units that no bill"), "{e}");
        assert_eq!(record.bad_bills(&proxy.public_key()), 1, "counted");
    }

    /// REVIEW: the counter jump of `attack_a_counter_jump_is_an_overbill`, in a bill of 0
    /// units, passed and left no trace (`Claimed::claim` returned before looking at the
    /// counter when `len == 0`); the proxy then billed on from the counter the gateway
    /// believed, holding 999,990 units. A zero bill now marks where its charge puts the
    /// counter.
    #[tokio::test]
    async fn review_a_zero_bill_jumps_the_counter_unseen() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let record = Arc::new(BillRecord::new(Some(NetworkParams::default()), 3));
        billed(&record, &proxy, client, (10, 10)).await.unwrap();
        let _ = billed(&record, &proxy, client, (1_000_000, 0)).await;
        let _ = billed(&record, &proxy, client, (20, 10)).await;
        assert!(
            record.bad_bills(&proxy.public_key()) >= 1,
            "a charge signed at counter 1,000,000 in a 0-unit bill went unnoticed"
        );
    }

    /// Honest proxies, real traffic: bills of concurrent requests arrive in any order, an
    /// answer cut off leaves its bill unseen, and a contract first seen mid-life starts at the
    /// ledger's counter. None of it counts against the proxy; a skip beyond it does.
    #[tokio::test]
    async fn gaps_that_requests_in_flight_or_cut_off_explain_are_not_bad() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let record = Arc::new(BillRecord::new(Some(NetworkParams::default()), 3));
        // First seen with the ledger at 500: counting starts there.
        let (a, b) = (
            on(&record, &proxy, client, 50, 500),
            on(&record, &proxy, client, 50, 0),
        );
        // B settled after A but its bill comes first: A's 20 units are a gap, A still in flight,
        // so the gap waits for A's bill.
        b.verdict(Some(&bill(&proxy, client, 530, 10)), usage(10))
            .await
            .unwrap()
            .unwrap();
        a.verdict(Some(&bill(&proxy, client, 520, 20)), usage(20))
            .await
            .unwrap()
            .unwrap();
        drop((a, b));
        // C's answer is cut off before its bill: its allowance explains a later gap.
        drop(on(&record, &proxy, client, 40, 0));
        let d = on(&record, &proxy, client, 40, 0);
        d.verdict(Some(&bill(&proxy, client, 565, 10)), usage(10))
            .await
            .unwrap()
            .unwrap();
        drop(d);
        assert_eq!(record.bad_bills(&proxy.public_key()), 0);
        // 25 more skipped than C could cost: bad, though small.
        let e = on(&record, &proxy, client, 40, 0);
        let skipped = e
            .verdict(Some(&bill(&proxy, client, 600, 10)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(skipped.contains("beyond the 40"), "{skipped}");
        assert_eq!(record.bad_bills(&proxy.public_key()), 1);
    }

    /// ATTACK: a gap was forgiven whenever requests were in flight, so under steady load (some
    /// request always in flight) a proxy kept a skip up to their allowances for good. Only
    /// requests sent before the gap was seen can fill it: once they have ended, it is judged.
    #[tokio::test]
    async fn a_gap_is_judged_once_the_requests_that_could_fill_it_have_ended() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let record = Arc::new(BillRecord::new(Some(NetworkParams::default()), 3));
        billed(&record, &proxy, client, (10, 10)).await.unwrap();
        // A is in flight when B's bill shows 40 unclaimed counters: A's bill may fill them.
        let a = on(&record, &proxy, client, 100, 0);
        billed(&record, &proxy, client, (60, 10)).await.unwrap();
        // C is sent after the gap was seen: its bill will land above it, it cannot fill it.
        // A's bill fills 10 of the 40, and with A ended, nothing sent before the gap is left
        // in flight to fill the 30 others: judged now, though C is in flight.
        let c = on(&record, &proxy, client, 100, 0);
        let e = a
            .verdict(Some(&bill(&proxy, client, 30, 10)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.contains("30 units that no bill"), "{e}");
        drop((a, c));
    }

    /// A request is allowed its prompt bound and max_tokens, weighted, at its price cap, in
    /// floor units; the cap defaults to ten floors.
    #[test]
    fn allowances_and_the_default_price_cap() {
        let params = NetworkParams::default();
        let record = BillRecord::new(Some(params.clone()), 3);
        let floor = u64::try_from(params.price_per_token).unwrap();
        assert_eq!(record.price_cap(None), Some(10 * floor));
        assert_eq!(record.price_cap(Some(7)), Some(7));
        // 100 + 50 tokens at weight 1, at twice the floor: 300 units.
        assert_eq!(record.allowance(100, 50, 2 * floor), 300);
        // Below the floor the floor applies.
        assert_eq!(record.allowance(100, 50, 1), 150);
        assert_eq!(BillRecord::new(None, 3).allowance(100, 50, 40), 0);
    }

    /// ATTACK: without a `max_price` in the request (the API's default), nothing bounded
    /// `price_per_token` from above: 10 tokens billed as 10,000,000 units. The gateway now
    /// always has a cap (its config's, or ten floors) and sends it as the request's max_price.
    #[test]
    fn attack_without_max_price_the_gateways_cap_holds() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let record = Arc::new(BillRecord::new(Some(NetworkParams::default()), 3));
        let p = Parties {
            max_price: record.price_cap(None),
            record: record.clone(),
            ..parties(&proxy, client, None)
        };
        let units = 10_000_000;
        let mut b = bill(&proxy, client, units, units);
        (b.weighted_tokens, b.price_per_token) = (10, 20 * 1_000_000);
        let e = p.check(&b, usage(10)).unwrap_err();
        assert!(e.contains("above the request's max_price 200"), "{e}");
    }

    /// ATTACK: the record is shared by all proxies and the refresh is rate-limited globally:
    /// a dishonest proxy's bad bill spends the refresh, the owner then changes the prices, and
    /// an honest proxy's bills at the new prices count against it (durably) for up to 10 s.
    #[tokio::test]
    async fn attack_one_proxys_bad_bill_makes_anothers_honest_bills_bad() {
        use cocoon_ledger::{Ledger, Op, Tx};
        let (_dir, ledger, record, [_, h]) = two_proxies_on_a_ledger().await;
        let (owner, client, honest) = ([1u8; 32], [2; 32], Wallet::from_seed([9; 32]));
        let before = ledger.params().await.unwrap();
        ledger
            .execute(Tx {
                sender: owner,
                op: Op::SetParams {
                    params: NetworkParams {
                        price_per_token: before.price_per_token * 2,
                        ..before.clone()
                    },
                },
                now: 1,
            })
            .await
            .unwrap();
        for end in [10, 20, 30] {
            let mut b = bill(&honest, client, end, 10);
            (b.unit_price, b.price_per_token, b.cost) = (40, 40, 400);
            let _ = h.verdict(Some(&b), usage(10)).await;
        }
        assert_eq!(
            record.bad_bills(&honest.public_key()),
            0,
            "honest bills at the owner's new prices were counted bad"
        );
    }

    /// A record on a real embedded ledger (owner `[1; 32]`) shared by two proxies' parties
    /// for client `[2; 32]`: a dishonest one (seed 8) whose first bill was junk, which has just
    /// spent the record's parameter refresh, and an honest one (seed 9).
    async fn two_proxies_on_a_ledger() -> (
        tempfile::TempDir,
        Arc<cocoon_ledger::EmbeddedLedger>,
        Arc<BillRecord>,
        [Parties; 2],
    ) {
        use cocoon_ledger::{EmbeddedLedger, Ledger};
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(
            EmbeddedLedger::open_network(&dir.path().join("ledger.redb"), [1; 32], NET).unwrap(),
        );
        let params = ledger.params().await.unwrap();
        let record = Arc::new(BillRecord::new(Some(params), 3).with_ledger(ledger.clone(), NET));
        let client = [2; 32];
        let [evil, honest] = [8, 9].map(|seed| Wallet::from_seed([seed; 32]));
        let on_record = |proxy: &Wallet| Parties {
            record: record.clone(),
            max_price: None,
            ..parties(proxy, client, None)
        };
        let (e, h) = (on_record(&evil), on_record(&honest));
        let mut junk = bill(&evil, client, 10, 10);
        junk.cost += 1;
        assert!(e.verdict(Some(&junk), usage(10)).await.unwrap().is_err());
        (dir, ledger, record, [e, h])
    }

    /// ATTACK: a range billed twice failed as a plain bad bill, which a price change might
    /// explain: while the parameters could not be read again (any proxy's bad bill spends the
    /// refresh for 10 s), the double charge was reported but never counted against the proxy.
    #[tokio::test]
    async fn attack_a_double_charge_counts_while_the_refresh_is_spent() {
        let (_dir, _ledger, record, [_, h]) = two_proxies_on_a_ledger().await;
        let honest = Wallet::from_seed([9; 32]);
        let once = bill(&honest, [2; 32], 10, 10);
        h.verdict(Some(&once), usage(10)).await.unwrap().unwrap();
        let twice = h
            .verdict(Some(&once), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(twice.contains("billed before"), "{twice}");
        assert_eq!(record.bad_bills(&honest.public_key()), 1, "not counted");
    }

    /// HELD: edges of the claimed ranges (u64::MAX, 0, out-of-order merges, the fold, len 0).
    #[test]
    fn held_len_zero_and_edges() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = parties(&proxy, client, None);
        // Range at u64::MAX, then everything: the whole range overlaps.
        let mut c = Claimed::default();
        c.claim(u64::MAX, 5).unwrap();
        assert!(c.claim(u64::MAX, u64::MAX).is_err());
        assert!(c.claim(u64::MAX - 4, 1).is_err());
        c.claim(u64::MAX - 5, u64::MAX - 5).unwrap();
        assert_eq!(c.ranges.len(), 1);
        assert!(c.claim(1, 1).is_err());
        // Out-of-order merging both sides.
        let mut c = Claimed::default();
        c.claim(10, 5).unwrap();
        c.claim(20, 5).unwrap();
        c.claim(15, 5).unwrap();
        assert_eq!(c.ranges.iter().collect::<Vec<_>>(), vec![(&5, &20)]);
        assert!(c.claim(6, 1).is_err());
        assert!(c.claim(21, 2).is_err());
        // Fold: ranges below the floor stay claimed.
        let mut c = Claimed::default();
        for i in 0..=(KEPT_RANGES as u64) {
            c.claim(i * 3 + 2, 1).unwrap();
        }
        assert!(c.claim(2, 1).is_err());
        assert!(c.claim(2, 2).is_err());
        // A zero bill claims nothing and costs nothing.
        p.check(&bill(&proxy, client, 0, 0), usage(0)).unwrap();
    }

    /// A genuine charge of this proxy for this contract, signed for another network (a test
    /// ledger the same keys use): it pays nothing on this one, so the bill is bad.
    #[tokio::test]
    async fn a_charge_signed_for_another_network_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(
            cocoon_ledger::EmbeddedLedger::open_network(
                &dir.path().join("ledger.redb"),
                [1; 32],
                NET,
            )
            .unwrap(),
        );
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = Parties {
            record: Arc::new(BillRecord::new(None, 3).with_ledger(ledger, NET)),
            ..parties(&proxy, client, None)
        };
        p.check(&bill(&proxy, client, 10, 10), usage(10)).unwrap();
        let mut elsewhere = bill(&proxy, client, 20, 10);
        let charge = PaymentMessage::ChargeClient {
            query_id: 20,
            tokens_used: 20,
            contract: Address::client(&proxy.public_key(), &client),
        }
        .sign(proxy.key_pair(), Network::basechain(8));
        elsewhere.charge = hex::encode(&charge.0);
        let e = p.check(&elsewhere, usage(10)).unwrap_err();
        assert!(e.contains("network 8"), "{e}");
    }

    /// REVIEW, fixed: the operator's "spent" figure (`/status` `bills.spent_nanoton`, the gateway's
    /// dashboard and `cocoon_gateway_bills{figure="spent_nanoton"}`) adds each bill's `cost`
    /// as the proxy states it, checked out or not. `cost` is the proxy's unsigned word (the
    /// signed charge is a counter): a proxy sends a bill whose cost does not check out, say
    /// 2^64 - 100, and the atomic counter wraps, so the figure drops, hiding what the proxy
    /// really charged (or it inflates it at will). What was charged is at most the counters
    /// the charges moved (here 20 units of 20 nanoton) and at least the verified bill's cost.
    #[tokio::test]
    async fn review_gateway_spend_takes_a_bad_bills_cost_at_its_word() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = parties(&proxy, client, None);
        let honest = bill(&proxy, client, 10, 10);
        p.verdict(Some(&honest), usage(10)).await.unwrap().unwrap();
        let mut forged = bill(&proxy, client, 20, 10);
        forged.cost = u64::MAX - 99;
        assert!(p.verdict(Some(&forged), usage(10)).await.unwrap().is_err());
        let spent = p.record.tally().spent_nanoton;
        assert!(
            (honest.cost..=20 * 20).contains(&spent),
            "spent {spent}: a proxy's bad bill set the operator's spend figure"
        );
    }

    /// REVIEW, fixed: a bill sent again (a replay, refused as "billed before": the ledger charges its
    /// counter range once) is added to the operator's spend figure again, so a proxy can make
    /// the gateway's reported spend as large as it likes with one real charge.
    #[tokio::test]
    async fn review_gateway_spend_counts_a_replayed_bill_twice() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let p = parties(&proxy, client, None);
        let once = bill(&proxy, client, 10, 10);
        p.verdict(Some(&once), usage(10)).await.unwrap().unwrap();
        let again = p
            .verdict(Some(&once), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        assert!(again.contains("billed before"), "{again}");
        assert_eq!(
            p.record.tally().spent_nanoton,
            once.cost,
            "one charge, spent twice"
        );
    }

    /// REVIEW, fixed: with the group commit the record's lock is let go while a write is under way,
    /// so a second claim on the same contract snapshots (`before`) the first claim's range
    /// before it is on disk. When that write fails, the writer restores its own `before`
    /// first (it holds the lock through its rollback), then the waiter restores its `before`,
    /// which puts back the writer's range: the memory now claims counters 10..20 that the
    /// gateway answered "could not be recorded" for and that are not in the file. The record
    /// is `broken`, yet `claim` still checks ranges against that memory before it persists.
    /// The same bill comes back: the request whose bill was not recorded keeps its ticket
    /// unbilled, so its `Drop` leaves it unsettled (in memory) and `late::run` asks its proxy
    /// for that very bill. It is then judged a double charge and counted against the honest
    /// proxy (and, as `forget` cannot be written either, asked and counted again on every
    /// retry, until `distrusts` bars the proxy), instead of failing as not recorded like every
    /// other verdict after a failed write.
    #[cfg(unix)]
    #[tokio::test]
    async fn review_a_failed_group_write_rolls_back_into_a_phantom_claim() {
        use std::io::Read;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bills.json");
        let record = Arc::new(BillRecord::open(Some(path.clone()), None, 3).unwrap());
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let contract = Address::client(&proxy.public_key(), &client);
        // Counters 0..10, on disk (change 1).
        record.claim(contract, (10, 10), None, None).unwrap();

        // The next write's temporary file is a FIFO: its writer blocks opening it (with the
        // record unlocked) until this test opens the other end, and then fails (a FIFO cannot
        // be synced), so the write fails deterministically while others wait on it.
        let tmp = path.with_extension("tmp");
        let made = std::process::Command::new("mkfifo")
            .arg(&tmp)
            .status()
            .unwrap();
        assert!(made.success());
        let until = |what: &str, done: &dyn Fn(&Writes) -> bool| {
            let start = Instant::now();
            while !done(&record.kept.lock().sync) {
                assert!(start.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };

        // A claims 10..20 (change 2) and is the writer, stuck on the FIFO.
        let a = {
            let record = record.clone();
            std::thread::spawn(move || record.claim(contract, (20, 10), None, None))
        };
        until("A writes", &|s: &Writes| s.writing && s.changes == 2);
        // B claims 20..30 (change 3), its `before` holding A's range, and waits on A's write.
        let b = {
            let record = record.clone();
            std::thread::spawn(move || record.claim(contract, (30, 10), None, None))
        };
        until("B waits", &|s: &Writes| s.changes == 3);
        // Let A's write go on: it fails.
        let mut sink = Vec::new();
        std::fs::File::open(&tmp)
            .unwrap()
            .read_to_end(&mut sink)
            .unwrap();
        let a = a.join().unwrap();
        let b = b.join().unwrap();
        assert!(matches!(a, Err(Fault::Unrecorded(_))), "{a:?}");
        assert!(matches!(b, Err(Fault::Unrecorded(_))), "{b:?}");
        // On disk: only 0..10. Neither 10..20 nor 20..30 was accepted.
        let file: Kept = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let on_disk: Vec<_> = file
            .claimed
            .values()
            .flat_map(|c| c.ranges.clone())
            .collect();
        assert_eq!(on_disk, vec![(0, 10)]);

        // The proxy's bill for 10..20, judged again: the record cannot be written, so it must
        // fail as not recorded, not count against the proxy.
        let p = Parties {
            record: record.clone(),
            ..parties(&proxy, client, None)
        };
        let again = p
            .verdict(Some(&bill(&proxy, client, 20, 10)), usage(10))
            .await
            .unwrap()
            .unwrap_err();
        let in_memory: Vec<_> = record
            .kept
            .lock()
            .claimed
            .values()
            .flat_map(|c| c.ranges.clone())
            .collect();
        assert!(
            again.contains("could not be recorded"),
            "a range never accepted is judged billed before: {again} (memory {in_memory:?}, \
             file {on_disk:?})"
        );
        assert_eq!(
            record.bad_bills(&proxy.public_key()),
            0,
            "the gateway's own failed write counted against the proxy"
        );
    }
}

#[cfg(test)]
mod group_commit {
    use super::*;

    /// Changes made from many threads at once are all on disk once each has returned (the
    /// writes grouped, none lost), and a record reopened from the file has every one.
    #[test]
    fn changes_made_together_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bills.json");
        let record = Arc::new(BillRecord::open(Some(path.clone()), None, u32::MAX).unwrap());
        let threads: Vec<_> = (0..16u8)
            .map(|i| {
                let record = record.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        record.bad_bill([i; 32]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let kept = record.kept.lock();
        assert_eq!(
            kept.sync.written, kept.sync.changes,
            "every change is on disk"
        );
        assert_eq!(kept.sync.changes, 16 * 20);
        drop(kept);
        let reopened = BillRecord::open(Some(path), None, u32::MAX).unwrap();
        for i in 0..16u8 {
            assert_eq!(reopened.bad_bills(&[i; 32]), 20);
        }
    }

    /// A write that fails fails the change waiting on it and every later one: what is on disk
    /// may be behind what was answered, so no verdict is given until a restart.
    #[test]
    fn a_failed_write_fails_every_change_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        // A folder that does not exist: the write cannot be made.
        let path = dir.path().join("missing").join("bills.json");
        let record = BillRecord::open(Some(path), None, 3).unwrap();
        let first = record.persist(&mut record.kept.lock()).unwrap_err();
        assert!(first.contains("cannot be written"), "{first}");
        std::fs::create_dir(dir.path().join("missing")).unwrap();
        let later = record.persist(&mut record.kept.lock()).unwrap_err();
        assert!(later.contains("until the gateway restarts"), "{later}");
    }
}
