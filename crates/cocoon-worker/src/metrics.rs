//! What a worker counts for its operator's `/metrics` (Prometheus): requests and tokens by
//! model and outcome, requests in flight, and whether it is connected to its proxy. No prompt
//! text in any label.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cocoon_admin::prometheus_client::metrics::counter::Counter;
use cocoon_admin::prometheus_client::metrics::family::Family;
use cocoon_admin::prometheus_client::metrics::gauge::Gauge;
use cocoon_admin::{Metrics, Registry};
use cocoon_protocol::GenerateEvent;

type Labels = Vec<(&'static str, String)>;

/// A worker's counters.
#[derive(Clone, Default)]
pub struct WorkerMetrics {
    requests: Family<Labels, Counter>,
    tokens: Family<Labels, Counter>,
    in_flight: Gauge,
    connected: Gauge,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerMetrics")
    }
}

impl WorkerMetrics {
    /// The registry `/metrics` serves; `connected` is read at each scrape.
    pub fn registry(&self, connected: Arc<AtomicBool>) -> Metrics {
        let mut r = Registry::with_prefix("cocoon_worker");
        r.register(
            "requests",
            "Generation requests by model and outcome (served, failed, cancelled)",
            self.requests.clone(),
        );
        r.register(
            "tokens",
            "Tokens of served requests by model and kind (prompt, completion)",
            self.tokens.clone(),
        );
        r.register(
            "in_flight_requests",
            "Requests being generated now",
            self.in_flight.clone(),
        );
        r.register(
            "connected",
            "1 while connected to the proxy",
            self.connected.clone(),
        );
        let gauge = self.connected.clone();
        Metrics::new(r, move || {
            gauge.set(i64::from(connected.load(Ordering::SeqCst)));
        })
    }

    /// Requests being generated now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// A request for `model` starts; the guard counts it until dropped, and `ended` says how.
    pub(crate) fn start(&self, model: &str) -> InFlight {
        self.in_flight.inc();
        InFlight {
            metrics: self.clone(),
            model: model.to_owned(),
            outcome: "cancelled",
        }
    }
}

/// A request being generated.
pub(crate) struct InFlight {
    metrics: WorkerMetrics,
    model: String,
    outcome: &'static str,
}

impl InFlight {
    /// Notes `event` as it leaves: the end of the answer sets the outcome (and counts tokens).
    pub(crate) fn saw(&mut self, event: &GenerateEvent) {
        match event {
            GenerateEvent::Done { usage, .. } => {
                self.outcome = "served";
                for (kind, n) in [
                    ("prompt", usage.prompt_tokens),
                    ("completion", usage.completion_tokens),
                ] {
                    self.metrics
                        .tokens
                        .get_or_create(&vec![("model", self.model.clone()), ("kind", kind.into())])
                        .inc_by(u64::from(n));
                }
            }
            GenerateEvent::Error { .. } => self.outcome = "failed",
            _ => {}
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .requests
            .get_or_create(&vec![
                ("model", std::mem::take(&mut self.model)),
                ("outcome", self.outcome.into()),
            ])
            .inc();
    }
}

/// `owed_tokens{proxy}`, `claimed_tokens{proxy}` and `owed_nanoton{proxy}` (once the worker
/// fee is read): what each proxy owes this worker, read from `payouts` at each scrape.
pub(crate) fn earnings(
    registry: &mut Registry,
    payouts: Arc<crate::PayoutStore>,
) -> impl Fn() + Send + Sync + use<> {
    let (owed, claimed, worth) = (
        Family::<Labels, Gauge>::default(),
        Family::<Labels, Gauge>::default(),
        Family::<Labels, Gauge>::default(),
    );
    registry.register(
        "owed_tokens",
        "Weighted tokens each proxy owes this worker, as its latest signed payout says",
        owed.clone(),
    );
    registry.register(
        "claimed_tokens",
        "Of the tokens owed by each proxy, those claimed on the ledger",
        claimed.clone(),
    );
    registry.register(
        "owed_nanoton",
        "What each proxy owes this worker at the network's worker fee, nanoton",
        worth.clone(),
    );
    move || {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for e in payouts.earnings() {
            let labels = vec![("proxy", e.proxy)];
            owed.get_or_create(&labels).set(gauge(e.owed_tokens));
            claimed.get_or_create(&labels).set(gauge(e.claimed_tokens));
            if let Some(n) = e.owed_nanoton {
                worth.get_or_create(&labels).set(gauge(n));
            }
        }
    }
}
