//! The share of connections still in their TLS handshake. Before its handshake a peer is
//! neither client nor worker, so it gets neither's share; this one keeps half-open and slow
//! peers from holding every socket. When it is full, a newcomer takes the place of the
//! oldest handshake that has run at least [`MIN_AGE`]: a flood of stalled handshakes cannot
//! keep a worker (or anyone) out, since an honest handshake takes milliseconds to a round
//! trip or two, and holding a place costs a flooder a fresh connection every `MIN_AGE`.
//! (Refusing the newcomer instead let a few addresses, each within its own cap, hold the whole
//! share for as long as they renewed their stalled connections.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
// Tokio's clock, so that tests can move it.
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long a handshake is sure of its place: a slower one may be displaced by a newcomer
/// while the share is full.
pub(crate) const MIN_AGE: Duration = Duration::from_secs(2);

/// Handshakes under way, at most `limit` of them.
pub(crate) struct Handshakes {
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// By order of arrival (ids only grow): the oldest first.
    pending: BTreeMap<u64, (Instant, CancellationToken)>,
}

/// One handshake's place in the share; dropping it frees the place.
pub(crate) struct Place {
    id: u64,
    share: Arc<Handshakes>,
    displaced: CancellationToken,
}

impl Handshakes {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            inner: Mutex::default(),
        })
    }

    /// A place for a new handshake: a free one, or the oldest's if it has run `MIN_AGE`
    /// (that one is told to give up); `None` when every place is younger.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<Place> {
        let mut inner = self.inner.lock();
        if inner.pending.len() >= self.limit {
            let (_, (since, _)) = inner.pending.first_key_value()?;
            if since.elapsed() < MIN_AGE {
                return None;
            }
            if let Some((_, (_, oldest))) = inner.pending.pop_first() {
                oldest.cancel();
            }
        }
        let id = inner.next;
        inner.next += 1;
        let displaced = CancellationToken::new();
        inner
            .pending
            .insert(id, (Instant::now(), displaced.clone()));
        Some(Place {
            id,
            share: self.clone(),
            displaced,
        })
    }

    /// Handshakes under way now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().pending.len()
    }
}

impl Place {
    /// Resolves when a newcomer has taken this place.
    pub(crate) fn displaced(&self) -> WaitForCancellationFutureOwned {
        self.displaced.clone().cancelled_owned()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.share.inner.lock().pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_share_gives_the_oldest_place_to_a_newcomer_after_min_age() {
        let share = Handshakes::new(2);
        let first = share.enter().unwrap();
        let second = share.enter().unwrap();
        // Full, and nobody has run MIN_AGE: the newcomer is refused.
        assert!(share.enter().is_none());
        tokio::time::advance(MIN_AGE / 2).await;
        assert!(share.enter().is_none());
        drop(second);
        let third = share.enter().expect("a freed place");
        assert_eq!(share.len(), 2);
        // The oldest has now run MIN_AGE (the third only half of it): a newcomer displaces it.
        let first_displaced = first.displaced();
        tokio::time::advance(MIN_AGE / 2).await;
        let fourth = share.enter().expect("the oldest's place");
        first_displaced.await;
        assert_eq!(share.len(), 2);
        // The displaced place, dropped late, frees nothing of the others'.
        drop(first);
        assert_eq!(share.len(), 2);
        drop((third, fourth));
        assert_eq!(share.len(), 0);
    }
}
