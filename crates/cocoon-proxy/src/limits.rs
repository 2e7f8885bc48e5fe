//! Abuse limits: what one client key may ask of the proxy (a request rate, requests in flight,
//! a completion length) and what one address may hold open (connections), plus the timeouts
//! that keep a silent peer from holding anything for long. A client over a limit gets a
//! `RateLimited` refusal (HTTP 429) that says when to retry.
//!
//! Keys are free to make, so every table here stays bounded: an entry that holds nothing
//! (no request in flight, a full bucket, no connection) means the same as no entry and is
//! dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(test)]
use cocoon_protocol::GenerateRequest;
use cocoon_protocol::ProtocolError;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

/// Client entries kept before idle ones are swept.
const SWEEP_ABOVE: usize = 4096;

/// `[limits]` in `proxy.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Generation requests per second one client key may sustain.
    pub requests_per_second: f64,
    /// Requests one client key may send at once above that rate.
    pub burst: u32,
    /// Generation requests one client key may have in flight.
    pub concurrent_requests: u32,
    /// Largest `max_tokens` a request may ask for. Unset, the model's context window is the
    /// bound (and a request beyond it gets the worker's `context_length_exceeded`).
    pub max_tokens: Option<u32>,
    /// Open connections from one IP address (an IPv4 address, or an IPv6 /64: one host
    /// holds a whole /64, so per address its holder would have no limit).
    pub connections_per_ip: u32,
    /// A connection must finish its TLS handshake within this time (slow-loris, half-open).
    pub handshake_timeout_secs: u64,
    /// A client connection with no request open for this long is closed.
    pub idle_timeout_secs: u64,
    /// A request body must arrive within this time (slow senders are cut off).
    pub body_timeout_secs: u64,
    /// A worker must start its answer, and send each next event, within this time.
    pub worker_timeout_secs: u64,
    /// The largest context a worker may announce for a model, in tokens: a request without
    /// `max_tokens` is reserved for the whole context, so an absurd announcement would turn
    /// every such request into a refusal. An offer beyond it is refused when the worker joins.
    pub max_context_length: u32,
    /// The highest price a worker may announce, in multiples of the network's floor price;
    /// an offer beyond it is refused when the worker joins (without payments: not checked).
    pub max_price_floors: u64,
    /// Connections still in their TLS handshake at most: before its handshake a peer is
    /// neither client nor worker, and gets neither's share. When they are all taken, a further
    /// connection takes the place of the oldest handshake that has run 2 s (so stalled
    /// handshakes cannot keep anyone out), or is closed at once if none has.
    pub handshaking_connections: u32,
    /// Open worker connections at most, apart from the clients' `max_connections`.
    pub worker_connections: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 20.0,
            burst: 40,
            concurrent_requests: 16,
            max_tokens: None,
            connections_per_ip: 64,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 300,
            body_timeout_secs: 30,
            worker_timeout_secs: 120,
            max_context_length: 1 << 20,
            max_price_floors: 100,
            handshaking_connections: 256,
            worker_connections: 1024,
        }
    }
}

impl LimitsConfig {
    /// Refuses settings under which nothing could ever be served.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.requests_per_second.is_finite() && self.requests_per_second > 0.0,
            "[limits] requests_per_second must be a positive number"
        );
        for (name, value) in [
            ("burst", u64::from(self.burst)),
            ("concurrent_requests", u64::from(self.concurrent_requests)),
            ("max_tokens", self.max_tokens.map_or(1, u64::from)),
            ("connections_per_ip", u64::from(self.connections_per_ip)),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("body_timeout_secs", self.body_timeout_secs),
            ("worker_timeout_secs", self.worker_timeout_secs),
            ("max_context_length", u64::from(self.max_context_length)),
            ("max_price_floors", self.max_price_floors),
            (
                "handshaking_connections",
                u64::from(self.handshaking_connections),
            ),
            ("worker_connections", u64::from(self.worker_connections)),
        ] {
            anyhow::ensure!(value > 0, "[limits] {name} must be at least 1");
        }
        Ok(())
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub(crate) fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs)
    }

    pub(crate) fn worker_timeout(&self) -> Duration {
        Duration::from_secs(self.worker_timeout_secs)
    }
}

/// One client key's request budget.
#[derive(Debug)]
struct Bucket {
    /// Requests it may send now (fractional while refilling).
    tokens: f64,
    refilled: Instant,
    in_flight: u32,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let earned = now.duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(burst);
        self.refilled = now;
    }

    /// Holds nothing a fresh entry would not: a full bucket and no request in flight.
    fn is_idle(&self, now: Instant, rate: f64, burst: f64) -> bool {
        self.in_flight == 0
            && self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate >= burst
    }
}

#[derive(Debug)]
pub(crate) struct Limiter {
    /// Replaced by a reload; each check reads the limits in force.
    config: RwLock<LimitsConfig>,
    clients: Mutex<HashMap<[u8; 32], Bucket>>,
    ips: Mutex<HashMap<IpAddr, u32>>,
}

/// The address connection caps count by: IPv4 addresses as they are (IPv4-mapped IPv6 too),
/// IPv6 addresses by their /64.
pub(crate) fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl Limiter {
    pub(crate) fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(config),
            clients: Mutex::default(),
            ips: Mutex::default(),
        })
    }

    /// The limits in force.
    pub(crate) fn config(&self) -> LimitsConfig {
        self.config.read().clone()
    }

    /// Puts `config` in force (a reload): clients' buckets and connections carry over.
    pub(crate) fn set_config(&self, config: LimitsConfig) {
        *self.config.write() = config;
    }

    /// Admits one generation request from `client`, or says when to try again. The permit
    /// counts the request as in flight until dropped.
    #[cfg(test)]
    pub(crate) fn admit(
        self: &Arc<Self>,
        client: [u8; 32],
        request: &GenerateRequest,
    ) -> Result<RequestPermit, ProtocolError> {
        self.check(request.params.max_tokens)?;
        self.permit(client)
    }

    /// Refuses a request asking for more than this proxy allows.
    pub(crate) fn check(&self, max_tokens: Option<u32>) -> Result<(), ProtocolError> {
        if let (Some(asked), Some(limit)) = (max_tokens, self.config.read().max_tokens)
            && asked > limit
        {
            return Err(ProtocolError::invalid(format!(
                "max_tokens {asked} is above this proxy's limit of {limit}"
            )));
        }
        Ok(())
    }

    /// Takes a request slot for `client` (its rate and its requests in flight), or says when to
    /// try again; taken before the request's body is read, so a client over its limits costs
    /// no body read. The permit counts the request as in flight until dropped.
    pub(crate) fn permit(
        self: &Arc<Self>,
        client: [u8; 32],
    ) -> Result<RequestPermit, ProtocolError> {
        let (rate, burst, concurrent) = {
            let c = self.config.read();
            (
                c.requests_per_second,
                f64::from(c.burst),
                c.concurrent_requests,
            )
        };
        let now = Instant::now();
        let mut clients = self.clients.lock();
        if clients.len() > SWEEP_ABOVE {
            clients.retain(|_, b| !b.is_idle(now, rate, burst));
        }
        let bucket = clients.entry(client).or_insert(Bucket {
            tokens: burst,
            refilled: now,
            in_flight: 0,
        });
        bucket.refill(now, rate, burst);
        if bucket.in_flight >= concurrent {
            return Err(ProtocolError::rate_limited(
                format!(
                    "this client already has {} requests in flight, the most this proxy \
                     allows; wait for one to finish",
                    bucket.in_flight
                ),
                1,
            ));
        }
        if bucket.tokens < 1.0 {
            let wait = ((1.0 - bucket.tokens) / rate).ceil();
            return Err(ProtocolError::rate_limited(
                format!(
                    "this client sent more than {rate} requests per second (burst {burst}); \
                     retry after {wait} s"
                ),
                wait as u32,
            ));
        }
        bucket.tokens -= 1.0;
        bucket.in_flight += 1;
        Ok(RequestPermit {
            limiter: self.clone(),
            client,
        })
    }

    /// Counts one more connection from `ip`, or refuses it when that address holds its
    /// share already.
    pub(crate) fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionPermit> {
        let ip = group(ip);
        let mut ips = self.ips.lock();
        let open = ips.entry(ip).or_insert(0);
        if *open >= self.config.read().connections_per_ip {
            return None;
        }
        *open += 1;
        Some(ConnectionPermit {
            limiter: self.clone(),
            ip,
        })
    }

    /// What this proxy takes of a joining worker's `cards`: offers within `max_context_length`
    /// and, with payments (`floor`, the network's floor price), within `max_price_floors`
    /// floors; and why each other one is refused.
    pub(crate) fn offers(
        &self,
        cards: &[cocoon_protocol::ModelCard],
        floor: Option<u64>,
    ) -> (Vec<crate::market::Offer>, Vec<String>) {
        let config = self.config();
        let max_price = floor.map(|f| f.saturating_mul(config.max_price_floors));
        let mut refused = Vec::new();
        let offers = cards
            .iter()
            .filter(|card| {
                if card.context_length > config.max_context_length {
                    refused.push(format!(
                        "{}: a context of {} tokens is above [limits] max_context_length {}",
                        card.id, card.context_length, config.max_context_length
                    ));
                    return false;
                }
                if let Some(max) = max_price
                    && card.min_price > max
                {
                    refused.push(format!(
                        "{}: the price {} is above [limits] max_price_floors ({max})",
                        card.id, card.min_price
                    ));
                    return false;
                }
                true
            })
            .map(crate::market::Offer::from)
            .collect();
        (offers, refused)
    }

    #[cfg(test)]
    fn tracked_clients(&self) -> usize {
        self.clients.lock().len()
    }
}

/// One admitted request; it stops counting against its client when dropped.
#[derive(Debug)]
pub(crate) struct RequestPermit {
    limiter: Arc<Limiter>,
    client: [u8; 32],
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        if let Some(bucket) = self.limiter.clients.lock().get_mut(&self.client) {
            bucket.in_flight = bucket.in_flight.saturating_sub(1);
        }
    }
}

/// One open connection from an address.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    limiter: Arc<Limiter>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut ips = self.limiter.ips.lock();
        if let Some(open) = ips.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                ips.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cocoon_protocol::{ErrorKind, Input, SamplingParams};

    use super::*;

    /// A worker's announcement is bounded: an absurd context or price would make every
    /// request without max_tokens or max_price need more reservation than any client's cover.
    #[test]
    fn absurd_offers_are_refused_at_join() {
        let limiter = Limiter::new(LimitsConfig::default());
        let card = |id: &str, context_length: u32, min_price: u64| cocoon_protocol::ModelCard {
            id: id.into(),
            context_length,
            min_price,
            model_hash: None,
        };
        let cards = [
            card("ok", 131_072, 40),
            card("huge", u32::MAX, 20),
            card("dear", 2048, 20 * 1000),
        ];
        let (kept, refused) = limiter.offers(&cards, Some(20));
        assert_eq!(
            kept.iter().map(|o| o.model.as_str()).collect::<Vec<_>>(),
            ["ok"]
        );
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("max_context_length"), "{refused:?}");
        assert!(refused[1].contains("max_price_floors"), "{refused:?}");
        // Without payments there is no floor: prices are not bounded, contexts still are.
        let (kept, _) = limiter.offers(&cards, None);
        assert_eq!(kept.len(), 2);
    }

    /// An IPv6 /64 is one holder's: its addresses share one connection cap, as an IPv4
    /// address's connections do; another /64, or an IPv4 address, has its own.
    #[test]
    fn connections_are_capped_per_ipv4_address_and_per_ipv6_slash_64() {
        let limiter = Limiter::new(LimitsConfig {
            connections_per_ip: 2,
            ..LimitsConfig::default()
        });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = limiter.connect(ip("2001:db8:1:2::1")).unwrap();
        let _b = limiter
            .connect(ip("2001:db8:1:2:ffff:ffff:ffff:fffe"))
            .unwrap();
        assert!(
            limiter.connect(ip("2001:db8:1:2:dead:beef::7")).is_none(),
            "a third address of the same /64 got in"
        );
        let _other = limiter.connect(ip("2001:db8:1:3::1")).unwrap();
        let v4 = limiter.connect(ip("192.0.2.7")).unwrap();
        let _v4b = limiter.connect(ip("192.0.2.7")).unwrap();
        assert!(
            limiter.connect(ip("::ffff:192.0.2.7")).is_none(),
            "the IPv4-mapped form walked around the IPv4 cap"
        );
        drop((a, v4));
        limiter.connect(ip("2001:db8:1:2::99")).unwrap();
        limiter.connect(ip("::ffff:192.0.2.7")).unwrap();
    }

    fn request(max_tokens: Option<u32>) -> GenerateRequest {
        GenerateRequest {
            max_price: None,
            cache_scope: None,
            model: "m".into(),
            input: Input::Text {
                prompt: "hi".into(),
            },
            params: SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            },
        }
    }

    fn limiter(rate: f64, burst: u32, concurrent: u32) -> Arc<Limiter> {
        Limiter::new(LimitsConfig {
            max_tokens: Some(1000),
            requests_per_second: rate,
            burst,
            concurrent_requests: concurrent,
            connections_per_ip: 2,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_with_a_retry_time() {
        let limiter = limiter(0.5, 3, 100);
        let key = [1; 32];
        let permits: Vec<_> = (0..3)
            .map(|_| limiter.admit(key, &request(None)).unwrap())
            .collect();
        let refused = limiter.admit(key, &request(None)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        // One request per 2 s: the next one is due in 2 s.
        assert_eq!(refused.retry_after_secs, Some(2));
        // Another key has its own budget.
        limiter.admit([2; 32], &request(None)).unwrap();
        drop(permits);
    }

    #[test]
    fn requests_in_flight_are_capped_and_freed_when_done() {
        let limiter = limiter(1000.0, 1000, 2);
        let key = [1; 32];
        let first = limiter.admit(key, &request(None)).unwrap();
        let _second = limiter.admit(key, &request(None)).unwrap();
        let refused = limiter.admit(key, &request(None)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        assert_eq!(refused.retry_after_secs, Some(1));
        drop(first);
        limiter.admit(key, &request(None)).unwrap();
    }

    #[test]
    fn max_tokens_above_the_limit_is_invalid() {
        let limiter = limiter(1000.0, 1000, 10);
        let limit = limiter.config().max_tokens.unwrap();
        let refused = limiter
            .admit([1; 32], &request(Some(limit + 1)))
            .unwrap_err();
        assert_eq!(refused.kind, ErrorKind::InvalidRequest);
        assert!(refused.message.contains("max_tokens"), "{refused}");
        limiter.admit([1; 32], &request(Some(limit))).unwrap();
    }

    #[test]
    fn connections_per_address_are_capped_and_released() {
        let limiter = limiter(1.0, 1, 1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limiter.connect(ip).unwrap();
        let _b = limiter.connect(ip).unwrap();
        assert!(limiter.connect(ip).is_none());
        assert!(limiter.connect("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(limiter.connect(ip).is_some());
        assert!(limiter.ips.lock().len() <= 2);
    }

    #[test]
    fn a_flood_of_fresh_keys_leaves_a_bounded_table() {
        // A high rate refills a bucket at once, so every finished key is idle.
        let limiter = limiter(1e9, 1, 1);
        for i in 0..(3 * SWEEP_ABOVE as u32) {
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            drop(limiter.admit(key, &request(None)).unwrap());
        }
        assert!(
            limiter.tracked_clients() <= SWEEP_ABOVE + 1,
            "{} entries",
            limiter.tracked_clients()
        );
    }

    #[test]
    fn settings_that_serve_nothing_are_refused() {
        assert!(LimitsConfig::default().check().is_ok());
        for bad in [
            LimitsConfig {
                requests_per_second: 0.0,
                ..LimitsConfig::default()
            },
            LimitsConfig {
                requests_per_second: f64::NAN,
                ..LimitsConfig::default()
            },
            LimitsConfig {
                concurrent_requests: 0,
                ..LimitsConfig::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
