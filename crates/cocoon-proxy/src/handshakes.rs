//! The share of connections still in their TLS handshake. Before its handshake a peer is
//! neither client nor worker, so it gets neither's share; this one keeps half-open and slow
//! peers from holding every socket. When it is full, a newcomer takes a place:
//!
//! - from an address group (an IPv4 address, an IPv6 /64) holding at least two places more
//!   than the newcomer's own, once that place has run [`GRACE`] (half a second): no few
//!   addresses can hold the share against everyone else, however fast they renew their
//!   stalled connections;
//! - else from the oldest handshake, once it has run at least [`MIN_AGE`]: an honest handshake
//!   takes milliseconds to a round trip or two, so holding a place costs a flooder with many
//!   addresses a fresh connection every `MIN_AGE`.
//!
//! (Refusing the newcomer instead let a few addresses, each within its own cap, hold the whole
//! share for as long as they renewed their stalled connections.)

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
// Tokio's clock, so that tests can move it.
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long a handshake is sure of its place: a slower one may be displaced by a newcomer
/// while the share is full.
pub(crate) const MIN_AGE: Duration = Duration::from_secs(2);

/// How long every handshake is sure of its place, even in a group holding more than a
/// newcomer's: long enough for an honest handshake (a round trip or two), so a flooder with
/// many addresses cannot evict the young handshakes of an address many honest peers share
/// (a NAT, a worker pool) one connection at a time.
pub(crate) const GRACE: Duration = Duration::from_millis(500);

/// Handshakes under way, at most `limit` of them.
pub(crate) struct Handshakes {
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// By order of arrival (ids only grow): the oldest first.
    pending: BTreeMap<u64, Pending>,
    /// Places held per address group; a group holding none has no entry.
    held: HashMap<IpAddr, usize>,
}

struct Pending {
    since: Instant,
    group: IpAddr,
    displaced: CancellationToken,
}

impl Inner {
    /// Frees place `id`, telling its handshake to give up when `displace`.
    fn free(&mut self, id: u64, displace: bool) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        if displace {
            p.displaced.cancel();
        }
        if let Some(n) = self.held.get_mut(&p.group) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&p.group);
            }
        }
    }

    /// The place a newcomer from `group` may take in a full share, if any: the oldest of a
    /// group holding two more than `group` once it has run `GRACE`, else the oldest of all
    /// once it has run `MIN_AGE`.
    fn to_displace(&self, group: IpAddr) -> Option<u64> {
        let mine = self.held.get(&group).copied().unwrap_or(0);
        if let Some((&hog, _)) = self
            .held
            .iter()
            .filter(|&(_, &n)| n >= mine + 2)
            .max_by_key(|&(_, &n)| n)
            && let Some((&id, _)) = self
                .pending
                .iter()
                .find(|(_, p)| p.group == hog && p.since.elapsed() >= GRACE)
        {
            return Some(id);
        }
        let (&id, oldest) = self.pending.first_key_value()?;
        (oldest.since.elapsed() >= MIN_AGE).then_some(id)
    }
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

    /// A place for a new handshake from address group `group`: a free one, or one taken from
    /// another handshake (told to give up) as the module says; `None` when none may be taken.
    pub(crate) fn enter(self: &Arc<Self>, group: IpAddr) -> Option<Place> {
        let mut inner = self.inner.lock();
        if inner.pending.len() >= self.limit {
            let id = inner.to_displace(group)?;
            inner.free(id, true);
        }
        let id = inner.next;
        inner.next += 1;
        let displaced = CancellationToken::new();
        inner.pending.insert(
            id,
            Pending {
                since: Instant::now(),
                group,
                displaced: displaced.clone(),
            },
        );
        *inner.held.entry(group).or_default() += 1;
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
        self.share.inner.lock().free(self.id, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_share_gives_the_oldest_place_to_a_newcomer_after_min_age() {
        // One place per address: no group holds more than another.
        let share = Handshakes::new(2);
        let first = share.enter(at(1)).unwrap();
        let second = share.enter(at(2)).unwrap();
        // Full, and nobody has run MIN_AGE: the newcomer is refused.
        assert!(share.enter(at(3)).is_none());
        tokio::time::advance(MIN_AGE / 2).await;
        assert!(share.enter(at(3)).is_none());
        drop(second);
        let third = share.enter(at(3)).expect("a freed place");
        assert_eq!(share.len(), 2);
        // The oldest has now run MIN_AGE (the third only half of it): a newcomer displaces it.
        let first_displaced = first.displaced();
        tokio::time::advance(MIN_AGE / 2).await;
        let fourth = share.enter(at(4)).expect("the oldest's place");
        first_displaced.await;
        assert_eq!(share.len(), 2);
        // The displaced place, dropped late, frees nothing of the others'.
        drop(first);
        assert_eq!(share.len(), 2);
        drop((third, fourth));
        assert_eq!(share.len(), 0);
    }

    /// A flooder renewing its stalled handshakes faster than MIN_AGE kept every place young,
    /// and a newcomer from elsewhere never got one. A group holding two places more than the
    /// newcomer's yields its oldest at once; one holding no more waits for the age rule.
    #[tokio::test(start_paused = true)]
    async fn a_group_holding_more_yields_to_a_newcomer_at_once() {
        let share = Handshakes::new(4);
        let hog: Vec<_> = (0..3).map(|_| share.enter(at(9)).unwrap()).collect();
        let other = share.enter(at(1)).unwrap();
        // Within GRACE every place is safe.
        assert!(share.enter(at(2)).is_none());
        tokio::time::advance(GRACE).await;
        let oldest = hog[0].displaced();
        // Past GRACE, the hog holding 3 against the newcomer's 0 yields its oldest at once.
        let newcomer = share.enter(at(2)).expect("the hog's oldest place");
        oldest.await;
        assert_eq!(share.len(), 4);
        // Now the hog holds 2, the others 1 each: a newcomer from one of them (1 + 2 > 2)
        // waits, one from a fresh address (0 + 2 <= 2) takes the hog's next.
        assert!(share.enter(at(1)).is_none());
        let next = hog[1].displaced();
        let fresh = share.enter(at(3)).expect("the hog's next place");
        next.await;
        // One each: only age displaces now, and the hog itself never takes another's place
        // early.
        assert!(share.enter(at(9)).is_none());
        assert!(share.enter(at(4)).is_none());
        drop((hog, other, newcomer, fresh));
        assert_eq!(share.len(), 0);
        assert!(share.inner.lock().held.is_empty());
    }

    /// ATTACK: an honest site behind one IPv4 address (a NAT, a worker pool) has two handshakes
    /// under way, a few milliseconds old, while a flooder holds the rest of the full share with
    /// one stalled connection per address. Any fresh flooder address took the site's
    /// oldest place at once (2 >= 0 + 2), younger than an honest handshake needs, so a blind
    /// flooder with many addresses (an IPv6 /48 is 65,536 groups) cuts such a site to one
    /// handshake at a time, each connection evicting one, where before every place was sure of
    /// itself for MIN_AGE. Now: a place is sure of itself for GRACE, as long as an honest
    /// handshake takes; only past it does a group holding more yield to a newcomer.
    #[tokio::test(start_paused = true)]
    async fn review_a_shared_address_keeps_its_young_handshakes() {
        let share = Handshakes::new(4);
        let flood: Vec<_> = [2u8, 3]
            .iter()
            .map(|&a| share.enter(at(a)).unwrap())
            .collect();
        let site: Vec<_> = (0..2).map(|_| share.enter(at(1)).unwrap()).collect();
        tokio::time::advance(MIN_AGE / 400).await;
        // A fresh flooder address, 5 ms into the site's handshakes.
        assert!(
            share.enter(at(4)).is_none(),
            "a 5 ms old honest handshake was displaced"
        );
        assert_eq!(share.inner.lock().held.get(&at(1)).copied(), Some(2));
        drop((flood, site));
    }
}
