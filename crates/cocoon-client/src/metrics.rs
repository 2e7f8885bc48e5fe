//! What the gateway counts for its operator's `/metrics` (Prometheus): requests by model and
//! outcome, and, read at each scrape, its proxies by state and their bills that did not check
//! out. No prompt text and no API key in any label.

use std::sync::Arc;

use cocoon_admin::prometheus_client::metrics::counter::Counter;
use cocoon_admin::prometheus_client::metrics::family::Family;
use cocoon_admin::prometheus_client::metrics::gauge::Gauge;
use cocoon_admin::{Metrics, Registry};

use crate::pool::ProxyPool;

type Labels = Vec<(&'static str, String)>;

/// The gateway's counters.
#[derive(Clone, Default)]
pub(crate) struct GatewayMetrics {
    requests: Family<Labels, Counter>,
    proxies: Family<Labels, Gauge>,
    bad_bills: Gauge,
}

impl GatewayMetrics {
    /// The registry `/metrics` serves; the proxies' figures are read from `pool`.
    pub(crate) fn registry(&self, pool: Arc<ProxyPool>) -> Metrics {
        let mut r = Registry::with_prefix("cocoon_gateway");
        r.register(
            "requests",
            "Generation requests by model and outcome (answered, or the error's kind)",
            self.requests.clone(),
        );
        r.register(
            "proxies",
            "This gateway's proxies by state (up, down, unknown, distrusted)",
            self.proxies.clone(),
        );
        r.register(
            "bad_bills",
            "Bills from this gateway's proxies that did not check out",
            self.bad_bills.clone(),
        );
        let this = self.clone();
        Metrics::new(r, move || {
            let states = pool.states();
            for state in ["up", "down", "unknown", "distrusted"] {
                let n = states.iter().filter(|s| s.state == state).count();
                this.proxies
                    .get_or_create(&vec![("state", state.into())])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let bad: u64 = states.iter().map(|s| u64::from(s.bad_bills)).sum();
            this.bad_bills.set(i64::try_from(bad).unwrap_or(i64::MAX));
        })
    }

    /// A request for `model` ended in `outcome` (answered, or the error's kind).
    pub(crate) fn request(&self, model: &str, outcome: &str) {
        self.requests
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }
}
