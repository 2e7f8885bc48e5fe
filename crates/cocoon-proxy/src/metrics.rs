//! What the proxy counts for its operator's `/metrics` (Prometheus): requests and tokens by
//! model and outcome, time to first token, refusals by kind, and, read at each scrape, requests
//! in flight, workers by health and the quote cache. No prompt text and no client key in any
//! label: a model id, an outcome or an error kind is all a label holds.

use std::sync::Arc;

use cocoon_admin::prometheus_client::metrics::counter::Counter;
use cocoon_admin::prometheus_client::metrics::family::Family;
use cocoon_admin::prometheus_client::metrics::gauge::Gauge;
use cocoon_admin::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use cocoon_admin::{Metrics, Registry};

type Labels = Vec<(&'static str, String)>;

/// The proxy's counters; gauges are set from its state when scraped.
#[derive(Clone)]
pub(crate) struct ProxyMetrics {
    requests: Family<Labels, Counter>,
    tokens: Family<Labels, Counter>,
    ttft: Family<Labels, Histogram, fn() -> Histogram>,
    refusals: Family<Labels, Counter>,
    billed_nanoton: Family<Labels, Counter>,
    commission_nanoton: Family<Labels, Counter>,
    /// The ledger's figures: uncommitted tokens, commit lag, commits.
    ledger: Family<Labels, Gauge>,
    in_flight: Gauge,
    workers: Family<Labels, Gauge>,
    quote_cache: Family<Labels, Gauge>,
}

fn ttft_histogram() -> Histogram {
    // 5 ms to about 40 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyMetrics")
    }
}

/// How a request ended, as `/metrics` labels it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ended {
    /// Answered in full and billed.
    Served,
    /// The worker failed or went silent mid-answer.
    WorkerFailed,
    /// The client went away.
    ClientLeft,
}

impl ProxyMetrics {
    pub(crate) fn new() -> Self {
        Self {
            requests: Family::default(),
            tokens: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram),
            refusals: Family::default(),
            billed_nanoton: Family::default(),
            commission_nanoton: Family::default(),
            ledger: Family::default(),
            in_flight: Gauge::default(),
            workers: Family::default(),
            quote_cache: Family::default(),
        }
    }

    /// The registry `/metrics` serves, its gauges read by `refresh` before each scrape.
    pub(crate) fn registry(&self, refresh: impl Fn(&Self) + Send + Sync + 'static) -> Metrics {
        let mut r = Registry::with_prefix("cocoon_proxy");
        r.register(
            "requests",
            "Generation requests by model and outcome (served, worker_failed, client_left)",
            self.requests.clone(),
        );
        r.register(
            "tokens",
            "Tokens of answered requests by model and kind (prompt, completion)",
            self.tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From asking the serving worker to its first event, by model",
            self.ttft.clone(),
        );
        r.register(
            "refusals",
            "Requests refused before an answer began, by error kind",
            self.refusals.clone(),
        );
        r.register(
            "billed_nanoton",
            "What the proxy billed its clients, nanoton, by model",
            self.billed_nanoton.clone(),
        );
        r.register(
            "commission_nanoton",
            "The proxy's part of what it billed (after the workers' fee), nanoton, by model",
            self.commission_nanoton.clone(),
        );
        r.register(
            "ledger",
            "The book against the ledger: uncommitted_tokens (signed, not yet committed), \
             commit_lag_seconds (how long the oldest of them has waited), commits (accepted \
             since start)",
            self.ledger.clone(),
        );
        r.register(
            "in_flight_requests",
            "Requests being answered now",
            self.in_flight.clone(),
        );
        r.register(
            "workers",
            "Connected workers by health (healthy, unhealthy)",
            self.workers.clone(),
        );
        r.register(
            "quote_cache",
            "The worker policy's quote cache: hits and full verifications",
            self.quote_cache.clone(),
        );
        let this = self.clone();
        Metrics::new(r, move || refresh(&this))
    }

    /// An answer ended `how`, with `usage` counted when it was served.
    pub(crate) fn ended(&self, model: &str, how: Ended, usage: Option<cocoon_protocol::Usage>) {
        let outcome = match how {
            Ended::Served => "served",
            Ended::WorkerFailed => "worker_failed",
            Ended::ClientLeft => "client_left",
        };
        self.requests
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("outcome", outcome.into()),
            ])
            .inc();
        if let Some(u) = usage {
            for (kind, n) in [
                ("prompt", u.prompt_tokens),
                ("completion", u.completion_tokens),
            ] {
                self.tokens
                    .get_or_create(&vec![("model", model.to_owned()), ("kind", kind.into())])
                    .inc_by(u64::from(n));
            }
        }
    }

    /// An answer's first event came `secs` after its worker was asked.
    pub(crate) fn first_token(&self, model: &str, secs: f64) {
        self.ttft
            .get_or_create(&vec![("model", model.to_owned())])
            .observe(secs);
    }

    /// A request was refused before an answer began.
    pub(crate) fn refused(&self, error: &cocoon_protocol::ProtocolError) {
        self.refusals
            .get_or_create(&vec![("kind", format!("{:?}", error.kind))])
            .inc();
    }

    /// A bill of `cost` nanoton for `model`, `commission` of it the proxy's.
    pub(crate) fn billed(&self, model: &str, cost: u64, commission: u64) {
        let labels = vec![("model", model.to_owned())];
        self.billed_nanoton.get_or_create(&labels).inc_by(cost);
        self.commission_nanoton
            .get_or_create(&labels)
            .inc_by(commission);
    }

    /// Sets the gauges read from the proxy's state.
    pub(crate) fn set_state(
        &self,
        in_flight: u64,
        (healthy, unhealthy): (u64, u64),
        cache: Option<cocoon_tls::CacheStats>,
        payments: Option<&crate::billing::PaymentsStatus>,
    ) {
        if let Some(p) = payments {
            for (figure, n) in [
                ("uncommitted_tokens", p.uncommitted_tokens),
                ("commit_lag_seconds", p.commit_lag_secs),
                ("commits", p.commits),
            ] {
                self.ledger
                    .get_or_create(&vec![("figure", figure.into())])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        self.in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        for (state, n) in [("healthy", healthy), ("unhealthy", unhealthy)] {
            self.workers
                .get_or_create(&vec![("state", state.into())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Some(c) = cache {
            for (what, n) in [("hits", c.hits), ("verifications", c.verifications)] {
                self.quote_cache
                    .get_or_create(&vec![("counter", what.into())])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Shared by the relay and the admin listener.
pub(crate) type SharedMetrics = Arc<ProxyMetrics>;
