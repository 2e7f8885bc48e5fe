use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use cocoon_net::Channel;
use cocoon_protocol::{ListedModel, ModelCard, ModelList};
use cocoon_tls::{Fingerprint, Verified};
use parking_lot::RwLock;

/// A connected worker.
#[derive(Debug)]
pub struct WorkerEntry {
    pub id: u64,
    pub name: String,
    pub fingerprint: Fingerprint,
    /// The worker's key: its payouts are bound to it.
    pub public_key: [u8; 32],
    pub models: Vec<ModelCard>,
    pub capacity: u32,
    /// What the worker proved in its handshake.
    pub attestation: Verified,
    pub(crate) channel: Channel,
    in_flight: AtomicU32,
    served: AtomicU64,
}

impl WorkerEntry {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m.id == model)
    }
}

/// Holds one unit of a worker's load until dropped.
#[derive(Debug)]
pub struct LoadGuard(Arc<WorkerEntry>);

impl LoadGuard {
    pub fn worker(&self) -> &Arc<WorkerEntry> {
        &self.0
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live set of workers. Workers are few enough per proxy (hundreds) that a scan per request
/// costs less than keeping an index up to date under churn.
#[derive(Debug, Default)]
pub struct WorkerSet {
    workers: RwLock<Vec<Arc<WorkerEntry>>>,
    next_id: AtomicU64,
}

impl WorkerSet {
    pub(crate) fn add(
        &self,
        name: String,
        public_key: [u8; 32],
        models: Vec<ModelCard>,
        capacity: u32,
        attestation: Verified,
        channel: Channel,
    ) -> Arc<WorkerEntry> {
        let entry = Arc::new(WorkerEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name,
            fingerprint: Fingerprint::of_public_key(&public_key),
            public_key,
            models,
            capacity: capacity.max(1),
            attestation,
            channel,
            in_flight: AtomicU32::new(0),
            served: AtomicU64::new(0),
        });
        self.workers.write().push(entry.clone());
        entry
    }

    pub(crate) fn remove(&self, id: u64) {
        self.workers.write().retain(|w| w.id != id);
    }

    pub fn len(&self) -> usize {
        self.workers.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<Arc<WorkerEntry>> {
        self.workers.read().clone()
    }

    /// Whether any connected worker serves `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.workers.read().iter().any(|w| w.serves(model))
    }

    /// Picks the least-loaded live worker serving `model` (load relative to capacity; ties go to
    /// the one that served fewest requests, which spreads work evenly), skipping `exclude`.
    pub fn pick(&self, model: &str, exclude: &[u64]) -> Option<LoadGuard> {
        let workers = self.workers.read();
        let best = workers
            .iter()
            .filter(|w| w.serves(model) && !w.channel.is_closed() && !exclude.contains(&w.id))
            .min_by(|a, b| {
                let la = u64::from(a.in_flight()) * u64::from(b.capacity);
                let lb = u64::from(b.in_flight()) * u64::from(a.capacity);
                la.cmp(&lb).then(a.served().cmp(&b.served()))
            })?
            .clone();
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        best.served.fetch_add(1, Ordering::Relaxed);
        Some(LoadGuard(best))
    }

    /// The largest context window any connected worker offers for `model`.
    pub fn context_length(&self, model: &str) -> Option<u32> {
        self.workers
            .read()
            .iter()
            .flat_map(|w| w.models.iter())
            .filter(|m| m.id == model)
            .map(|m| m.context_length)
            .max()
    }

    /// Models served by at least one worker, each with the largest context any of them offers.
    pub fn models(&self) -> ModelList {
        let mut models: Vec<ListedModel> = Vec::new();
        for w in self.workers.read().iter() {
            for card in &w.models {
                match models.iter_mut().find(|m| m.card.id == card.id) {
                    Some(m) => {
                        m.workers += 1;
                        m.card.context_length = m.card.context_length.max(card.context_length);
                    }
                    None => models.push(ListedModel {
                        card: card.clone(),
                        workers: 1,
                    }),
                }
            }
        }
        models.sort_by(|a, b| a.card.id.cmp(&b.card.id));
        ModelList { models }
    }
}
