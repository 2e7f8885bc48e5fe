//! The proxy's choice of worker with many workers: the cost of one pick as the number of
//! workers grows (100 to 10,000 simulated workers with varied prices, speeds, reliability and
//! load), against scoring every worker (the exhaustive pick, the reference) in the same run,
//! and how good the sampled choice is: its score over the best score of all, at the same
//! instant.

use std::time::{Duration, Instant};

use cocoon_proxy::market::{Ask, LoadGuard, Market, Offer, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::stats::Summary;

const MODEL: &str = "m";

/// Settings of the market section.
#[derive(Debug, Clone)]
pub struct MarketOptions {
    /// Market sizes to measure, in simulated workers.
    pub workers: Vec<usize>,
    /// Timed picks per size and method.
    pub picks: usize,
    /// Picks whose quality is compared with the exhaustive best.
    pub quality_picks: usize,
}

impl Default for MarketOptions {
    fn default() -> Self {
        Self {
            workers: vec![100, 1_000, 10_000],
            picks: 20_000,
            quality_picks: 2_000,
        }
    }
}

/// The figures at one market size.
#[derive(Debug, Clone, Serialize)]
pub struct MarketSize {
    /// Simulated workers in the market.
    pub workers: usize,
    /// Mean cost of one pick (and its release), sampled and exhaustive.
    pub sampled_ns: f64,
    /// Mean cost of one exhaustive pick (scoring every worker) and its release, in nanoseconds.
    pub exhaustive_ns: f64,
    /// `exhaustive / sampled`.
    pub speedup: f64,
    /// The pick that also recomputes the model's leaders (once a second), in µs.
    pub leader_refresh_us: f64,
    /// Score of the sampled choice over the best score of all: 1.0 is the best choice.
    pub quality: Summary,
    /// Picks with a price cap that only a tenth of the workers meet, sampled.
    pub capped_ns: f64,
}

/// The market section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct MarketReport {
    /// One entry per market size, in the order of `MarketOptions::workers`.
    pub sizes: Vec<MarketSize>,
    /// Sampled cost at the largest size over the smallest, and the same for the workers.
    pub cost_growth: f64,
    /// Workers at the largest size over the smallest (a ratio).
    pub workers_growth: f64,
}

/// A market of `n` workers with varied asks and records, a quarter of them busy.
fn market(n: usize, rng: &mut StdRng) -> (Market<()>, Vec<LoadGuard<()>>) {
    let m = Market::<()>::new();
    m.set_floor(20);
    let sellers: Vec<_> = (0..n)
        .map(|i| {
            let mut key = [0; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let offer = Offer {
                model: MODEL.into(),
                context_length: 4096,
                price: rng.gen_range(20..=40),
            };
            m.add(key, format!("w{i}"), rng.gen_range(1..=16), vec![offer], ())
        })
        .collect();
    for s in &sellers {
        let (ttft, tps, ok) = (
            rng.gen_range(0.02..1.0),
            rng.gen_range(5.0..100.0),
            rng.gen_range(0.7..1.0),
        );
        for _ in 0..10 {
            let outcome = if rng.gen_bool(ok) {
                Outcome::Served {
                    ttft: Duration::from_secs_f64(ttft),
                    tokens_per_sec: Some(tps),
                }
            } else {
                Outcome::Failed
            };
            m.record(s, outcome);
        }
    }
    // Load where routing puts it: held answers on the workers it chose.
    let held = (0..n / 4)
        .filter_map(|_| m.pick_exhaustive(&ask(None)).ok())
        .collect();
    (m, held)
}

fn ask(max_price: Option<u64>) -> Ask<'static> {
    Ask {
        model: MODEL,
        max_price,
        prefix: None,
        tokens: 128,
        exclude: &[],
        min_context: 0,
        max_context: None,
        only: None,
    }
}

fn time_picks(picks: usize, mut pick: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..picks {
        pick();
    }
    started.elapsed().as_nanos() as f64 / picks as f64
}

/// Builds a simulated market at each size (fixed seed), times sampled picks against
/// exhaustive ones and grades the sampled choices.
pub fn run(options: &MarketOptions) -> anyhow::Result<MarketReport> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut sizes = Vec::new();
    for &n in &options.workers {
        let (m, _held) = market(n, &mut rng);
        // Warm, and leaders fresh.
        drop(m.pick(&ask(None)));
        let (mut sampled, mut exhaustive) = (0.0, 0.0);
        // Interleaved in rounds, so drift in the machine affects both alike.
        let rounds = 4;
        for _ in 0..rounds {
            sampled += time_picks(options.picks / rounds, || drop(m.pick(&ask(None))));
            exhaustive += time_picks(options.picks / rounds, || {
                drop(m.pick_exhaustive(&ask(None)))
            });
        }
        let (sampled, exhaustive) = (sampled / rounds as f64, exhaustive / rounds as f64);
        let capped = time_picks(options.picks, || drop(m.pick(&ask(Some(22)))));
        let quality = (0..options.quality_picks)
            .filter_map(|_| {
                // Each choice is released before it is scored: both are scored on the state
                // they were chosen on, like for like.
                let best = m.pick_exhaustive(&ask(None)).ok()?.seller().clone();
                let chosen = m.pick(&ask(None)).ok()?.seller().clone();
                Some(m.score_for(&chosen, &ask(None))? / m.score_for(&best, &ask(None))?)
            })
            .collect::<Vec<f64>>();
        // The pick after the leaders went stale pays for recomputing them.
        std::thread::sleep(Duration::from_millis(1050));
        let started = Instant::now();
        drop(m.pick(&ask(None)));
        let leader_refresh_us = started.elapsed().as_nanos() as f64 / 1000.0;
        sizes.push(MarketSize {
            workers: n,
            sampled_ns: sampled,
            exhaustive_ns: exhaustive,
            speedup: exhaustive / sampled,
            leader_refresh_us,
            quality: Summary::of(quality),
            capped_ns: capped,
        });
    }
    let (first, last) = (sizes.first().unwrap(), sizes.last().unwrap());
    Ok(MarketReport {
        cost_growth: last.sampled_ns / first.sampled_ns,
        workers_growth: last.workers as f64 / first.workers as f64,
        sizes,
    })
}

/// The market report as a Markdown table, one row per size.
pub fn table(r: &MarketReport) -> String {
    let mut out = String::from(
        "### Choosing a worker (one model, simulated workers)\n\n\
         | workers | sampled pick | exhaustive pick (reference) | exhaustive / sampled | \
         capped at 22 (a tenth) | leader refresh (once a second) | choice quality p50 / p90 / p99 |\n\
         |---:|---:|---:|---:|---:|---:|---|\n",
    );
    for s in &r.sizes {
        out.push_str(&format!(
            "| {} | {:.2} µs | {:.2} µs | ×{:.1} | {:.2} µs | {:.0} µs | {:.3} / {:.3} / {:.3} |\n",
            s.workers,
            s.sampled_ns / 1000.0,
            s.exhaustive_ns / 1000.0,
            s.speedup,
            s.capped_ns / 1000.0,
            s.leader_refresh_us,
            s.quality.p50,
            s.quality.p90,
            s.quality.p99,
        ));
    }
    out.push_str(&format!(
        "\n{:.0}× the workers cost the sampled pick ×{:.2}. Quality is the chosen worker's \
         score over the best of all (1.000: the best).\n",
        r.workers_growth, r.cost_growth
    ));
    out
}
