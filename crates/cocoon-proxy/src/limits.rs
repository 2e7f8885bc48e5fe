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

use cocoon_protocol::{GenerateRequest, ProtocolError};
use parking_lot::Mutex;
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
    /// Open connections from one IP address.
    pub connections_per_ip: u32,
    /// A connection must finish its TLS handshake within this time (slow-loris, half-open).
    pub handshake_timeout_secs: u64,
    /// A client connection with no request open for this long is closed.
    pub idle_timeout_secs: u64,
    /// A request body must arrive within this time (slow senders are cut off).
    pub body_timeout_secs: u64,
    /// A worker must start its answer, and send each next event, within this time.
    pub worker_timeout_secs: u64,
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
    config: LimitsConfig,
    clients: Mutex<HashMap<[u8; 32], Bucket>>,
    ips: Mutex<HashMap<IpAddr, u32>>,
}

impl Limiter {
    pub(crate) fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            clients: Mutex::default(),
            ips: Mutex::default(),
        })
    }

    pub(crate) fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Admits one generation request from `client`, or says when to try again. The permit
    /// counts the request as in flight until dropped.
    pub(crate) fn admit(
        self: &Arc<Self>,
        client: [u8; 32],
        request: &GenerateRequest,
    ) -> Result<RequestPermit, ProtocolError> {
        if let (Some(asked), Some(limit)) = (request.params.max_tokens, self.config.max_tokens)
            && asked > limit
        {
            return Err(ProtocolError::invalid(format!(
                "max_tokens {asked} is above this proxy's limit of {limit}"
            )));
        }
        let rate = self.config.requests_per_second;
        let burst = f64::from(self.config.burst);
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
        if bucket.in_flight >= self.config.concurrent_requests {
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
        let mut ips = self.ips.lock();
        let open = ips.entry(ip).or_insert(0);
        if *open >= self.config.connections_per_ip {
            return None;
        }
        *open += 1;
        Some(ConnectionPermit {
            limiter: self.clone(),
            ip,
        })
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

    fn request(max_tokens: Option<u32>) -> GenerateRequest {
        GenerateRequest {
            max_price: None,
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
