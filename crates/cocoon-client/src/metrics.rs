//! What the gateway counts for its operator's `/metrics` (Prometheus): requests by model and
//! outcome, and, read at each scrape, its proxies by state and their bills that did not check
//! out. No prompt text and no API key in any label.

use std::sync::Arc;

use cocoon_admin::prometheus_client::metrics::counter::Counter;
use cocoon_admin::prometheus_client::metrics::family::Family;
use cocoon_admin::prometheus_client::metrics::gauge::Gauge;
use cocoon_admin::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use cocoon_admin::{Metrics, Registry};

use crate::bill::BillRecord;
use crate::pool::ProxyPool;

type Labels = Vec<(&'static str, String)>;

/// The gateway's counters.
#[derive(Clone)]
pub(crate) struct GatewayMetrics {
    requests: Family<Labels, Counter>,
    response: Histogram,
    proxies: Family<Labels, Gauge>,
    bad_bills: Gauge,
    bills: Family<Labels, Gauge>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            // 5 ms to about 80 s.
            response: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            proxies: Family::default(),
            bad_bills: Gauge::default(),
            bills: Family::default(),
        }
    }
}

impl GatewayMetrics {
    /// The registry `/metrics` serves; the proxies' figures are read from `pool`, the bills'
    /// from `bills`.
    pub(crate) fn registry(&self, pool: Arc<ProxyPool>, bills: Arc<BillRecord>) -> Metrics {
        let mut r = Registry::with_prefix("cocoon_gateway");
        r.register(
            "requests",
            "Generation requests by model and outcome (answered, or the error's kind)",
            self.requests.clone(),
        );
        r.register(
            "response_seconds",
            "From an app's request to the start of its response (a streamed answer: its first \
             token; otherwise the whole answer)",
            self.response.clone(),
        );
        r.register(
            "bills",
            "Bills judged since start: verified, bad (did not check out, or missing), and \
             spent_nanoton (what they charged)",
            self.bills.clone(),
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
            let tally = bills.tally();
            for (figure, n) in [
                ("verified", tally.verified),
                ("bad", tally.bad),
                ("spent_nanoton", tally.spent_nanoton),
            ] {
                this.bills
                    .get_or_create(&vec![("figure", figure.into())])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        })
    }

    /// A request for `model` ended in `outcome` (answered, or the error's kind), its response
    /// starting `took` after it came.
    pub(crate) fn request(&self, model: &str, outcome: &str, took: std::time::Duration) {
        self.response.observe(took.as_secs_f64());
        self.requests
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }
}
