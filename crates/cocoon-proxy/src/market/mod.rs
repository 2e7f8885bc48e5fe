//! The market: which worker gets a request.
//!
//! Each connected worker is a [`Seller`] offering models at a price it sets (never below the
//! network's floor). A request names a model and may cap the price; of the workers that
//! serve the model at or under the cap, the proxy picks the one expected to finish soonest
//! for the money:
//!
//! `score = expected_secs × (1 + load) × price / success_rate`
//!
//! where `expected_secs = ttft + tokens / tokens_per_sec` comes from the worker's measured,
//! time-decayed performance ([`perf`]), and `load` is the tokens the worker has in flight over
//! what its `capacity` slots hold of requests like this one
//! (`in_flight_tokens / (capacity × tokens)`): a worker busy with long answers counts as more
//! loaded than one busy with short ones. Lower is better: a worker twice the price must be
//! twice as fast (or half as loaded) to win. A worker not yet measured scores a quarter of
//! that, so that it gets tried. A request with a long shared prefix goes to the
//! worker that served the prefix last while that one is below capacity and reliable
//! ([`affinity`]). Selection reads a bounded number of candidates, not every worker: each
//! model's sellers are kept sorted by price, so the price cap is a binary search, and the
//! candidates are a random sample of the affordable ones, the few best by measured quality
//! (refreshed once a second) and the prefix's previous worker. With few workers every one is
//! a candidate.

pub mod affinity;
pub mod perf;
pub mod reputation;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cocoon_protocol::{ListedModel, ModelCard, ModelList};
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use tokio::sync::Notify;

use self::affinity::Affinity;
pub use self::perf::{Outcome, Performance, Reputation};
use self::reputation::ReputationStore;

/// Below this many affordable workers, every one is scored.
const SCORE_ALL_BELOW: usize = 32;
/// Random candidates drawn above that.
const SAMPLES: usize = 8;
/// Workers kept as each model's leaders by measured quality and price.
const LEADERS: usize = 4;
/// How often the leaders are recomputed, in seconds.
const LEADERS_EVERY_SECS: f64 = 1.0;
/// The prefix's previous worker keeps it only while this reliable.
const AFFINITY_MIN_SUCCESS: f64 = 0.5;
/// A worker without a record yet is scored at this fraction, so that it is tried (and
/// measured) before the measured ones crowd it out.
const UNMEASURED: f64 = 0.25;
/// Departed workers' records kept in memory at most (they stay on disk).
const MAX_RECORDS: usize = 100_000;

/// What a worker offers for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The model's id, as requests name it.
    pub model: String,
    /// The worker's context window for it, in tokens (prompt plus completion).
    pub context_length: u32,
    /// The least it takes per weighted token (nanoton); 0: the network floor.
    pub price: u64,
}

impl From<&ModelCard> for Offer {
    fn from(card: &ModelCard) -> Self {
        Self {
            model: card.id.clone(),
            context_length: card.context_length,
            price: card.min_price,
        }
    }
}

/// [`Seller`] hold: its operator disabled it.
pub const HELD_BY_OPERATOR: u8 = 1;
/// [`Seller`] hold: the policy in force no longer admits it (for good).
pub const HELD_BY_POLICY: u8 = 2;
/// [`Seller`] hold: it is still joining.
pub const HELD_WHILE_JOINING: u8 = 4;

/// What a worker asks for one model now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// Its context window for the model, in tokens.
    pub context_length: u32,
    /// The least it takes per weighted token (nanoton); 0: the network floor.
    pub price: u64,
}

/// One worker as the market sees it; `link` is whatever reaches it (a connection, in the
/// proxy; nothing, in benchmarks).
#[derive(Debug)]
pub struct Seller<T> {
    /// Assigned by the market, unique per connection: a worker that reconnects gets a new one.
    pub id: u64,
    /// The worker's Ed25519 public key: what its record (and its payouts) are kept under.
    pub key: [u8; 32],
    /// SHA-256 of `key`, computed once: sealed requests name their workers by it.
    fingerprint: [u8; 32],
    /// The name the worker gave itself, for logs and the status page.
    pub name: String,
    /// Requests the worker runs at once; at least 1.
    pub capacity: u32,
    /// The models it serves, and what it asked for each when it joined (its prices now:
    /// [`Seller::offer`], [`Seller::offers_now`]).
    offers: Vec<Offer>,
    /// What it asks now for each of `offers`, in their order: a worker may change its prices
    /// while connected ([`Market::reprice`]).
    prices: Vec<AtomicU64>,
    /// Whatever reaches the worker.
    pub link: T,
    in_flight: AtomicU32,
    /// Tokens expected of the requests in flight.
    in_flight_tokens: AtomicU64,
    served: AtomicU64,
    healthy: AtomicBool,
    /// Why it is held out of routing, whatever its health: [`HELD_BY_OPERATOR`],
    /// [`HELD_BY_POLICY`], [`HELD_WHILE_JOINING`] (bits). Its answers in flight finish.
    held: AtomicU8,
    perf: Mutex<Performance>,
}

impl<T> Seller<T> {
    /// SHA-256 of its key: how gateways and operators name it.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Requests picked for it and not yet finished (their [`LoadGuard`]s still held).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Tokens the requests in flight are expected to take, all together.
    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight_tokens.load(Ordering::Relaxed)
    }

    /// Requests picked for it since it connected, finished or not.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether it passed its last health check; an unhealthy worker is never picked.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records the result of a health check (a worker starts out healthy).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Whether its operator keeps it out of routing.
    pub fn disabled(&self) -> bool {
        self.held.load(Ordering::SeqCst) & HELD_BY_OPERATOR != 0
    }

    /// Keeps it out of routing (`true`) or lets it back in, as the operator says; a worker the
    /// policy no longer admits stays out whatever the operator says.
    pub fn set_disabled(&self, disabled: bool) {
        if disabled {
            self.held.fetch_or(HELD_BY_OPERATOR, Ordering::SeqCst);
        } else {
            self.held.fetch_and(!HELD_BY_OPERATOR, Ordering::SeqCst);
        }
    }

    /// Keeps it out of routing for good: the policy in force no longer admits it.
    pub fn exclude(&self) {
        self.held.fetch_or(HELD_BY_POLICY, Ordering::SeqCst);
    }

    /// Whether it is still joining ([`Market::add_joining`]).
    pub fn joining(&self) -> bool {
        self.held.load(Ordering::SeqCst) & HELD_WHILE_JOINING != 0
    }

    /// Whether the policy in force no longer admits it.
    pub fn excluded(&self) -> bool {
        self.held.load(Ordering::SeqCst) & HELD_BY_POLICY != 0
    }

    /// It has passed what joining checks ([`Market::add_joining`]): routable from now on,
    /// unless held otherwise.
    pub fn joined(&self) {
        self.held.fetch_and(!HELD_WHILE_JOINING, Ordering::SeqCst);
    }

    /// Whether it may be picked now: healthy and held by nothing.
    pub fn available(&self) -> bool {
        self.healthy() && self.held.load(Ordering::SeqCst) == 0
    }

    /// Its terms for `model` now; `None` if it does not serve it.
    pub fn offer(&self, model: &str) -> Option<Terms> {
        let i = self.offers.iter().position(|o| o.model == model)?;
        Some(Terms {
            context_length: self.offers[i].context_length,
            price: self.prices[i].load(Ordering::Relaxed),
        })
    }

    /// Every model it serves, at its prices now.
    pub fn offers_now(&self) -> Vec<Offer> {
        self.offers
            .iter()
            .zip(&self.prices)
            .map(|(o, p)| Offer {
                price: p.load(Ordering::Relaxed),
                ..o.clone()
            })
            .collect()
    }

    /// How many requests of `tokens` tokens the work in flight comes to, per slot.
    fn load(&self, tokens: u32) -> f64 {
        self.in_flight_tokens() as f64
            / (f64::from(self.capacity.max(1)) * f64::from(tokens.max(1)))
    }
}

/// Holds one unit of a worker's load until dropped.
#[derive(Debug)]
pub struct LoadGuard<T> {
    seller: Arc<Seller<T>>,
    /// The price this request is served at: the worker's, raised to the floor.
    pub price: u64,
    tokens: u64,
}

impl<T> LoadGuard<T> {
    /// The worker picked.
    pub fn seller(&self) -> &Arc<Seller<T>> {
        &self.seller
    }
}

impl<T> Drop for LoadGuard<T> {
    fn drop(&mut self) {
        self.seller.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.seller
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// What a request asks of the market.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The model asked for.
    pub model: &'a str,
    /// The most the client pays per weighted token, in nanoton; `None`: any price.
    pub max_price: Option<u64>,
    /// [`affinity::prefix_key`] of the request.
    pub prefix: Option<u64>,
    /// Tokens the answer is expected to take (for the expected time).
    pub tokens: u32,
    /// Workers already tried for this request.
    pub exclude: &'a [u64],
    /// Only workers offering at least this context (0: any). Set after a worker found the
    /// request too long for its context.
    pub min_context: u32,
    /// Only workers offering at most this context (`None`: any): a request without
    /// `max_tokens` is reserved for the context, so one whose client cannot cover the longest
    /// is held to the workers its reservation covers.
    pub max_context: Option<u32>,
    /// Only workers whose key fingerprint is listed (`None`: any): a sealed request can be
    /// read only by the workers it was sealed for.
    pub only: Option<&'a [[u8; 32]]>,
}

/// Why no worker was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// No worker serves the model.
    UnknownModel,
    /// Some serve it, none at or below the price cap; the cheapest asks this.
    TooExpensive {
        /// The lowest price asked for the model, in nanoton per weighted token (floor
        /// applied).
        cheapest: u64,
    },
    /// Those that qualify were all tried or are unhealthy.
    NoneAvailable,
}

struct ModelBook<T> {
    /// Sorted by asked price.
    by_price: Vec<(u64, Arc<Seller<T>>)>,
    leaders: Mutex<Leaders<T>>,
}

struct Leaders<T> {
    at: f64,
    sellers: Vec<(u64, Arc<Seller<T>>)>,
}

impl<T> Default for ModelBook<T> {
    fn default() -> Self {
        Self {
            by_price: Vec::new(),
            leaders: Mutex::new(Leaders {
                at: f64::NEG_INFINITY,
                sellers: Vec::new(),
            }),
        }
    }
}

struct Index<T> {
    sellers: HashMap<u64, Arc<Seller<T>>>,
    books: HashMap<String, ModelBook<T>>,
}

/// The live set of workers, their records and the choice among them.
pub struct Market<T> {
    index: RwLock<Index<T>>,
    affinity: Mutex<Affinity>,
    /// Records of workers not connected now (by key), in market time.
    departed: Mutex<HashMap<[u8; 32], Performance>>,
    /// Keys whose record changed since the last save.
    dirty: Mutex<HashSet<[u8; 32]>>,
    /// `None` without a reputation file, or once closed.
    store: Mutex<Option<ReputationStore>>,
    /// Wakes the saver early (after a penalty).
    penalty: Notify,
    clock: Instant,
    floor: AtomicU64,
    next_id: AtomicU64,
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl<T> Market<T> {
    /// A market whose records live in memory only.
    pub fn new() -> Self {
        Self {
            index: RwLock::new(Index {
                sellers: HashMap::new(),
                books: HashMap::new(),
            }),
            affinity: Mutex::default(),
            departed: Mutex::default(),
            dirty: Mutex::default(),
            store: Mutex::new(None),
            penalty: Notify::new(),
            clock: Instant::now(),
            floor: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
        }
    }

    /// A market whose records are kept in `path` and read back from it.
    pub fn persistent(path: &Path) -> anyhow::Result<Self> {
        let (store, records) = ReputationStore::open(path)?;
        let mut market = Self::new();
        let offset = market.now() - unix_secs();
        *market.departed.get_mut() = records
            .into_iter()
            .map(|(k, p)| (k, p.shifted(offset)))
            .collect();
        *market.store.get_mut() = Some(store);
        Ok(market)
    }

    /// Seconds on the market's clock.
    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    /// The network's floor price: no request is served below it.
    pub fn set_floor(&self, floor: u64) {
        self.floor.store(floor, Ordering::Relaxed);
    }

    /// The floor price, in nanoton per weighted token; 0 until set (no payments).
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Relaxed)
    }

    fn effective(&self, price: u64) -> u64 {
        price.max(self.floor())
    }

    /// Adds a worker, with the record it left behind if it was here before.
    pub fn add(
        &self,
        key: [u8; 32],
        name: String,
        capacity: u32,
        offers: Vec<Offer>,
        link: T,
    ) -> Arc<Seller<T>> {
        self.insert(key, name, capacity, offers, link, 0)
    }

    /// [`Self::add`], held out of routing until [`Seller::joined`]: in the market from now
    /// on (so that whatever checks every worker sees it), picked only once its last checks
    /// pass.
    pub fn add_joining(
        &self,
        key: [u8; 32],
        name: String,
        capacity: u32,
        offers: Vec<Offer>,
        link: T,
    ) -> Arc<Seller<T>> {
        self.insert(key, name, capacity, offers, link, HELD_WHILE_JOINING)
    }

    fn insert(
        &self,
        key: [u8; 32],
        name: String,
        capacity: u32,
        offers: Vec<Offer>,
        link: T,
        held: u8,
    ) -> Arc<Seller<T>> {
        let perf = self.departed.lock().remove(&key).unwrap_or_default();
        let seller = Arc::new(Seller {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            fingerprint: ring::digest::digest(&ring::digest::SHA256, &key)
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes"),
            key,
            name,
            capacity: capacity.max(1),
            prices: offers.iter().map(|o| AtomicU64::new(o.price)).collect(),
            offers,
            link,
            in_flight: AtomicU32::new(0),
            in_flight_tokens: AtomicU64::new(0),
            served: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            held: AtomicU8::new(held),
            perf: Mutex::new(perf),
        });
        let mut index = self.index.write();
        for offer in &seller.offers {
            let book = index.books.entry(offer.model.clone()).or_default();
            let at = book.by_price.partition_point(|(p, _)| *p <= offer.price);
            book.by_price.insert(at, (offer.price, seller.clone()));
            book.leaders.get_mut().at = f64::NEG_INFINITY;
        }
        index.sellers.insert(seller.id, seller.clone());
        seller
    }

    /// Moves `seller`'s offer for `model` to `price` (a worker that changed its prices while
    /// connected): requests from now on see the new price. Returns whether it changed.
    pub fn reprice(&self, seller: &Arc<Seller<T>>, model: &str, price: u64) -> bool {
        let Some(i) = seller.offers.iter().position(|o| o.model == model) else {
            return false;
        };
        let mut index = self.index.write();
        if seller.prices[i].swap(price, Ordering::Relaxed) == price {
            return false;
        }
        // Still connected: its place in the book moves with its price.
        if index.sellers.contains_key(&seller.id)
            && let Some(book) = index.books.get_mut(model)
        {
            book.by_price.retain(|(_, s)| s.id != seller.id);
            let at = book.by_price.partition_point(|(p, _)| *p <= price);
            book.by_price.insert(at, (price, seller.clone()));
            let leaders = book.leaders.get_mut();
            leaders.sellers.retain(|(_, s)| s.id != seller.id);
            leaders.at = f64::NEG_INFINITY;
        }
        true
    }

    /// Removes a worker; its record stays for when it comes back.
    pub fn remove(&self, id: u64) {
        let mut index = self.index.write();
        let Some(seller) = index.sellers.remove(&id) else {
            return;
        };
        for offer in &seller.offers {
            if let Some(book) = index.books.get_mut(&offer.model) {
                book.by_price.retain(|(_, s)| s.id != id);
                book.leaders.get_mut().sellers.retain(|(_, s)| s.id != id);
                if book.by_price.is_empty() {
                    index.books.remove(&offer.model);
                }
            }
        }
        // The same key connected twice keeps the live record.
        if !index.sellers.values().any(|s| s.key == seller.key) {
            let mut departed = self.departed.lock();
            if departed.len() >= MAX_RECORDS
                && let Some(oldest) = departed
                    .iter()
                    .min_by(|a, b| a.1.success.at.total_cmp(&b.1.success.at))
                    .map(|(k, _)| *k)
            {
                departed.remove(&oldest);
            }
            departed.insert(seller.key, *seller.perf.lock());
        }
    }

    /// Connected workers.
    pub fn len(&self) -> usize {
        self.index.read().sellers.len()
    }

    /// Whether no worker is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connected worker with this [`Seller::id`]; `None` once it has left.
    pub fn get(&self, id: u64) -> Option<Arc<Seller<T>>> {
        self.index.read().sellers.get(&id).cloned()
    }

    /// Every connected worker, in the order they joined (by id).
    pub fn snapshot(&self) -> Vec<Arc<Seller<T>>> {
        let mut all: Vec<_> = self.index.read().sellers.values().cloned().collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Whether some connected worker serves `model` (healthy or not, at any price).
    pub fn knows(&self, model: &str) -> bool {
        self.index.read().books.contains_key(model)
    }

    /// The largest context window any worker offers for `model`.
    pub fn context_length(&self, model: &str) -> Option<u32> {
        let index = self.index.read();
        let book = index.books.get(model)?;
        book.by_price
            .iter()
            .filter_map(|(_, s)| s.offer(model))
            .map(|o| o.context_length)
            .max()
    }

    /// Whether some worker serves `model` at or below `max_price` (health and load aside).
    pub fn can_serve(&self, model: &str, max_price: Option<u64>) -> Result<(), NoPick> {
        let index = self.index.read();
        let book = index.books.get(model).ok_or(NoPick::UnknownModel)?;
        match self.affordable(book, max_price) {
            0 => Err(NoPick::TooExpensive {
                cheapest: self.effective(book.by_price[0].0),
            }),
            _ => Ok(()),
        }
    }

    /// At most `n` healthy workers serving `model` at or below `max_price`, the best for an
    /// answer of `tokens` first (as [`Self::pick`] scores them, load included): the candidates
    /// a sealed request is encrypted to.
    pub fn candidates(
        &self,
        model: &str,
        max_price: Option<u64>,
        tokens: u32,
        n: usize,
    ) -> Vec<Arc<Seller<T>>> {
        let index = self.index.read();
        let Some(book) = index.books.get(model) else {
            return Vec::new();
        };
        let now = self.now();
        let mut scored: Vec<(f64, &Arc<Seller<T>>)> = book.by_price
            [..self.affordable(book, max_price)]
            .iter()
            .filter(|(_, s)| s.available())
            .map(|(p, s)| (self.score(s, *p, tokens, now, true), s))
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        scored.into_iter().take(n).map(|(_, s)| s.clone()).collect()
    }

    /// What each worker serving `model` at or below `max_price` offers (health and load
    /// aside): its price, the network's floor applied, and its context.
    pub fn offers_within(&self, model: &str, max_price: Option<u64>) -> Vec<(u64, u32)> {
        let index = self.index.read();
        let Some(book) = index.books.get(model) else {
            return Vec::new();
        };
        book.by_price[..self.affordable(book, max_price)]
            .iter()
            .filter_map(|(p, s)| Some((self.effective(*p), s.offer(model)?.context_length)))
            .collect()
    }

    /// The highest price a request for `model` capped at `max_price` can be served at: what a
    /// reservation must cover whichever worker ends up serving it.
    pub fn highest_price(&self, model: &str, max_price: Option<u64>) -> Option<u64> {
        let index = self.index.read();
        let book = index.books.get(model)?;
        let cut = self.affordable(book, max_price);
        (cut > 0).then(|| self.effective(book.by_price[cut - 1].0))
    }

    /// How many of the book's sellers are at or below `max_price`.
    fn affordable(&self, book: &ModelBook<T>, max_price: Option<u64>) -> usize {
        match max_price {
            None => book.by_price.len(),
            Some(max) => book
                .by_price
                .partition_point(|(p, _)| self.effective(*p) <= max),
        }
    }

    /// `reputation` of a worker right now.
    pub fn reputation(&self, seller: &Seller<T>) -> Reputation {
        seller.perf.lock().reputation(self.now())
    }

    /// Lower is better; see the module's documentation.
    fn score(&self, seller: &Seller<T>, price: u64, tokens: u32, now: f64, loaded: bool) -> f64 {
        let r = seller.perf.lock().reputation(now);
        let load = if loaded { seller.load(tokens) } else { 0.0 };
        let score = r.expected_secs(tokens) * (1.0 + load) * self.effective(price).max(1) as f64
            / r.success_rate.max(0.01);
        // Under half a sample: nothing measured yet, or so long ago that it has faded.
        if r.samples < 0.5 {
            score * UNMEASURED
        } else {
            score
        }
    }

    /// Picks the worker for `ask` and counts the request against it.
    pub fn pick(&self, ask: &Ask<'_>) -> Result<LoadGuard<T>, NoPick> {
        self.choose(ask, false)
    }

    /// Like [`Self::pick`], but scores every affordable worker however many there are: what
    /// `pick` does below a few dozen, and the reference its sampling is measured against.
    pub fn pick_exhaustive(&self, ask: &Ask<'_>) -> Result<LoadGuard<T>, NoPick> {
        self.choose(ask, true)
    }

    /// `seller`'s score for `ask` right now (lower is better), at its price for the model.
    pub fn score_for(&self, seller: &Seller<T>, ask: &Ask<'_>) -> Option<f64> {
        let offer = seller.offer(ask.model)?;
        Some(self.score(seller, offer.price, ask.tokens, self.now(), true))
    }

    fn choose(&self, ask: &Ask<'_>, exhaustive: bool) -> Result<LoadGuard<T>, NoPick> {
        let index = self.index.read();
        let book = index.books.get(ask.model).ok_or(NoPick::UnknownModel)?;
        let cut = self.affordable(book, ask.max_price);
        if cut == 0 {
            return Err(NoPick::TooExpensive {
                cheapest: self.effective(book.by_price[0].0),
            });
        }
        let eligible = &book.by_price[..cut];
        let usable = |s: &Seller<T>| {
            s.available()
                && !ask.exclude.contains(&s.id)
                && ask.only.is_none_or(|o| o.contains(&s.fingerprint()))
                && s.offer(ask.model).is_some_and(|o| {
                    o.context_length >= ask.min_context
                        && ask.max_context.is_none_or(|m| o.context_length <= m)
                })
        };
        let now = self.now();
        // The prefix's previous worker, if it can take one more now.
        if let Some(owner) = ask.prefix.and_then(|p| self.affinity.lock().get(p))
            && let Some(seller) = index.sellers.get(&owner)
            && let Some(offer) = seller.offer(ask.model)
            && ask
                .max_price
                .is_none_or(|m| self.effective(offer.price) <= m)
            && usable(seller)
            && seller.in_flight() < seller.capacity
            && seller.perf.lock().reputation(now).success_rate >= AFFINITY_MIN_SUCCESS
        {
            return Ok(self.take(seller.clone(), offer.price, ask.tokens));
        }
        let best = |candidates: &mut dyn Iterator<Item = &(u64, Arc<Seller<T>>)>| {
            candidates
                .filter(|(_, s)| usable(s))
                .map(|(p, s)| (self.score(s, *p, ask.tokens, now, true), *p, s))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, p, s)| (p, s.clone()))
        };
        let chosen = if exhaustive || cut <= SCORE_ALL_BELOW {
            best(&mut eligible.iter())
        } else {
            let mut rng = rand::thread_rng();
            let sampled: Vec<&(u64, Arc<Seller<T>>)> = (0..SAMPLES)
                .map(|_| &eligible[rng.gen_range(0..cut)])
                .collect();
            let leaders = self.leaders(book, ask.tokens, now);
            let max = ask.max_price.unwrap_or(u64::MAX);
            let affordable_leaders = leaders.iter().filter(|(p, _)| self.effective(*p) <= max);
            best(&mut sampled.into_iter().chain(affordable_leaders))
                // All of the sample tried or unhealthy: look at everyone once.
                .or_else(|| best(&mut eligible.iter()))
        };
        let (price, seller) = chosen.ok_or(NoPick::NoneAvailable)?;
        if let Some(prefix) = ask.prefix {
            self.affinity.lock().set(prefix, seller.id);
        }
        Ok(self.take(seller, price, ask.tokens))
    }

    fn take(&self, seller: Arc<Seller<T>>, price: u64, tokens: u32) -> LoadGuard<T> {
        let tokens = u64::from(tokens.max(1));
        seller.in_flight.fetch_add(1, Ordering::Relaxed);
        seller.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        seller.served.fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            seller,
            price: self.effective(price),
            tokens,
        }
    }

    /// The model's best few sellers by measured quality and price, ignoring load; recomputed
    /// at most once a second by whichever request finds them stale.
    fn leaders(&self, book: &ModelBook<T>, tokens: u32, now: f64) -> Vec<(u64, Arc<Seller<T>>)> {
        let Some(mut leaders) = book.leaders.try_lock() else {
            return Vec::new();
        };
        if now - leaders.at >= LEADERS_EVERY_SECS {
            let mut scored: Vec<(f64, usize)> = book
                .by_price
                .iter()
                .enumerate()
                .map(|(i, (p, s))| (self.score(s, *p, tokens, now, false), i))
                .collect();
            let n = LEADERS.min(scored.len());
            if n < scored.len() {
                scored.select_nth_unstable_by(n, |a, b| a.0.total_cmp(&b.0));
            }
            leaders.sellers = scored[..n]
                .iter()
                .map(|(_, i)| book.by_price[*i].clone())
                .collect();
            leaders.at = now;
        }
        leaders.sellers.clone()
    }

    /// Records how an attempt on `seller` went.
    pub fn record(&self, seller: &Seller<T>, outcome: Outcome) {
        seller.perf.lock().record(outcome, self.now());
        self.dirty.lock().insert(seller.key);
        if !matches!(outcome, Outcome::Served { .. }) {
            self.penalty.notify_one();
        }
    }

    /// Writes the changed records to the reputation file, if there is one.
    pub fn save(&self) -> anyhow::Result<()> {
        let store = self.store.lock();
        let Some(store) = store.as_ref() else {
            return Ok(());
        };
        let keys: Vec<[u8; 32]> = self.dirty.lock().drain().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let offset = unix_secs() - self.now();
        let records: Vec<([u8; 32], Performance)> = {
            let index = self.index.read();
            let live: HashMap<&[u8; 32], &Arc<Seller<T>>> =
                index.sellers.values().map(|s| (&s.key, s)).collect();
            let departed = self.departed.lock();
            keys.iter()
                .filter_map(|k| {
                    let perf = live
                        .get(k)
                        .map(|s| *s.perf.lock())
                        .or_else(|| departed.get(k).copied());
                    perf.map(|p| (*k, p.shifted(offset)))
                })
                .collect()
        };
        if let Err(e) = store.save(&records) {
            // Put them back: the next save tries again.
            self.dirty.lock().extend(keys);
            return Err(e);
        }
        Ok(())
    }

    /// Saves what changed and releases the reputation file (for the next proxy to open);
    /// records are kept in memory only from then on.
    pub fn close(&self) -> anyhow::Result<()> {
        let saved = self.save();
        self.store.lock().take();
        saved
    }

    /// Resolves when a penalty was recorded (for a saver that writes those at once).
    pub async fn penalized(&self) {
        self.penalty.notified().await;
    }

    /// Models served by at least one worker that has joined: the largest context, the price
    /// range, the count.
    pub fn models(&self) -> ModelList {
        let index = self.index.read();
        let mut models: Vec<ListedModel> = index
            .books
            .iter()
            .filter_map(|(id, book)| {
                // A worker still joining is not served yet: announced, a request could find it
                // held.
                let joined: Vec<&(u64, Arc<Seller<T>>)> =
                    book.by_price.iter().filter(|(_, s)| !s.joining()).collect();
                let (cheapest, dearest) = (joined.first()?.0, joined.last()?.0);
                Some(ListedModel {
                    card: ModelCard {
                        id: id.clone(),
                        context_length: joined
                            .iter()
                            .filter_map(|(_, s)| s.offer(id))
                            .map(|o| o.context_length)
                            .max()
                            .unwrap_or(0),
                        min_price: self.effective(cheapest),
                        // Workers of one model may run weights of different allowed hashes.
                        model_hash: None,
                    },
                    workers: joined.len() as u32,
                    max_price: self.effective(dearest),
                })
            })
            .collect();
        models.sort_by(|a, b| a.card.id.cmp(&b.card.id));
        ModelList { models }
    }
}

impl<T> Default for Market<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
