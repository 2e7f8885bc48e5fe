//! What the proxy has measured of one worker: time to first token, generation speed and
//! success rate, each an exponentially decayed average that leans on a prior until there are
//! samples. Old samples fade twice over: half of their weight is gone after [`HALF_LIFE`],
//! and the total weight is capped at [`MAX_WEIGHT`] samples, so that a busy worker's long
//! history does not drown what it does now. A worker that stalled an hour ago is judged by
//! what it does now, and one whose link degrades, or that stalls, loses standing within a
//! few requests.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How fast old samples lose their weight.
pub const HALF_LIFE: Duration = Duration::from_secs(600);

/// A fresh worker is assumed as good as this until measured, so it gets tried.
const PRIOR_TTFT_SECS: f64 = 0.5;
const PRIOR_TOKENS_PER_SEC: f64 = 30.0;
const PRIOR_SUCCESS: f64 = 1.0;
/// How many samples the prior is worth.
const PRIOR_WEIGHT: f64 = 1.0;
/// The most samples a record is worth: each new one moves it by at least 1/21.
pub const MAX_WEIGHT: f64 = 20.0;
/// Samples of a stall count this many times: a worker that hangs costs its clients the whole
/// timeout, where one that refuses costs them a retry.
pub const STALL_WEIGHT: f64 = 3.0;
/// Samples of an answer whose token counts broke the proxy's bounds count this many times: a
/// worker that overstates its counts is out to take its clients' money.
pub const OVERREPORT_WEIGHT: f64 = 5.0;

/// A time-decayed mean. `at` is in seconds on any monotonic clock the caller keeps using
/// (unix seconds when persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Decayed {
    /// The weighted mean of the samples alone.
    pub mean: f64,
    /// Their total weight, decayed to `at`.
    pub weight: f64,
    /// When the latest sample was added (what `weight` is decayed to), in seconds on the
    /// caller's clock.
    pub at: f64,
}

fn decay(from: f64, to: f64) -> f64 {
    let dt = (to - from).max(0.0);
    (-dt * std::f64::consts::LN_2 / HALF_LIFE.as_secs_f64()).exp()
}

impl Decayed {
    /// Adds `sample` with `weight` at `now`, after decaying the old weight (capped at
    /// [`MAX_WEIGHT`]).
    pub fn add(&mut self, sample: f64, weight: f64, now: f64) {
        let old = (self.weight * decay(self.at, now)).min(MAX_WEIGHT);
        let total = old + weight;
        if total > 0.0 {
            self.mean = (self.mean * old + sample * weight) / total;
        }
        self.weight = total;
        self.at = now.max(self.at);
    }

    /// The mean blended with `prior`, as of `now`.
    pub fn value(&self, prior: f64, now: f64) -> f64 {
        let w = self.weight * decay(self.at, now);
        (self.mean * w + prior * PRIOR_WEIGHT) / (w + PRIOR_WEIGHT)
    }
}

/// One worker's record, as kept in memory and on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Performance {
    /// Time to first token, in seconds, of the answers it delivered.
    pub ttft_secs: Decayed,
    /// Generation speed, in tokens per second, of the answers that had more than one token.
    pub tokens_per_sec: Decayed,
    /// Success of its attempts: 1 for each delivered answer, 0 for each failure (stalls and
    /// overreports weighing more).
    pub success: Decayed,
}

/// How one attempt on a worker ended, as far as the worker is to blame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The answer was delivered: its time to first token, and its generation speed when it
    /// generated more than one token.
    Served {
        /// From sending the request to the first token.
        ttft: Duration,
        /// Tokens per second after the first; `None` for a one-token answer.
        tokens_per_sec: Option<f64>,
    },
    /// It refused or failed (unreachable, an internal error, a broken stream).
    Failed,
    /// It went silent: no first token in time, or no next one, or no health answer.
    Stalled,
    /// It delivered, but reported more tokens than the request and the relayed text allow;
    /// its speed is not measured on counts it made up.
    Overreported,
}

/// The figures a routing decision uses, read at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    /// Expected time to first token, in seconds (the prior until measured).
    pub ttft_secs: f64,
    /// Expected generation speed, in tokens per second; at least 0.1.
    pub tokens_per_sec: f64,
    /// 0 to 1.
    pub success_rate: f64,
    /// Decayed number of attempts the figures rest on.
    pub samples: f64,
}

impl Performance {
    /// Adds the attempt's samples at `now` (seconds on the record's clock).
    pub fn record(&mut self, outcome: Outcome, now: f64) {
        match outcome {
            Outcome::Served {
                ttft,
                tokens_per_sec,
            } => {
                self.success.add(1.0, 1.0, now);
                self.ttft_secs.add(ttft.as_secs_f64(), 1.0, now);
                if let Some(tps) = tokens_per_sec.filter(|t| t.is_finite() && *t > 0.0) {
                    self.tokens_per_sec.add(tps, 1.0, now);
                }
            }
            Outcome::Failed => self.success.add(0.0, 1.0, now),
            Outcome::Stalled => self.success.add(0.0, STALL_WEIGHT, now),
            Outcome::Overreported => self.success.add(0.0, OVERREPORT_WEIGHT, now),
        }
    }

    /// The record's figures as of `now`, blended with the priors.
    pub fn reputation(&self, now: f64) -> Reputation {
        Reputation {
            ttft_secs: self.ttft_secs.value(PRIOR_TTFT_SECS, now),
            tokens_per_sec: self
                .tokens_per_sec
                .value(PRIOR_TOKENS_PER_SEC, now)
                .max(0.1),
            success_rate: self.success.value(PRIOR_SUCCESS, now).clamp(0.0, 1.0),
            samples: self.success.weight * decay(self.success.at, now),
        }
    }

    /// The same record with its clock moved by `offset` seconds (from the process's clock to
    /// unix time and back).
    pub fn shifted(mut self, offset: f64) -> Self {
        for d in [
            &mut self.ttft_secs,
            &mut self.tokens_per_sec,
            &mut self.success,
        ] {
            d.at += offset;
        }
        self
    }
}

impl Reputation {
    /// Seconds an answer of `tokens` tokens is expected to take on an idle worker.
    pub fn expected_secs(&self, tokens: u32) -> f64 {
        self.ttft_secs + f64::from(tokens) / self.tokens_per_sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prior_until_measured_then_samples_dominate() {
        let mut p = Performance::default();
        assert_eq!(p.reputation(0.0).success_rate, 1.0);
        for i in 0..20 {
            p.record(
                Outcome::Served {
                    ttft: Duration::from_millis(100),
                    tokens_per_sec: Some(50.0),
                },
                f64::from(i),
            );
        }
        let r = p.reputation(20.0);
        assert!((r.ttft_secs - 0.119).abs() < 0.01, "{r:?}");
        assert!((r.tokens_per_sec - 49.0).abs() < 1.0, "{r:?}");
        assert_eq!(r.success_rate, 1.0);
    }

    #[test]
    fn stalls_cost_more_than_failures_and_fade_with_time() {
        let mut failed = Performance::default();
        let mut stalled = Performance::default();
        for _ in 0..2 {
            failed.record(Outcome::Failed, 0.0);
            stalled.record(Outcome::Stalled, 0.0);
        }
        let (f, s) = (failed.reputation(0.0), stalled.reputation(0.0));
        assert!((f.success_rate - 1.0 / 3.0).abs() < 1e-9, "{f:?}");
        assert!((s.success_rate - 1.0 / 7.0).abs() < 1e-9, "{s:?}");
        // Three half-lives later the samples weigh 6/8 against the prior's 1.
        let later = s.success_rate;
        let s = stalled.reputation(3.0 * HALF_LIFE.as_secs_f64());
        assert!(s.success_rate > later && (s.success_rate - 1.0 / 1.75).abs() < 1e-9);
    }

    #[test]
    fn a_long_history_does_not_drown_a_sudden_change() {
        let mut p = Performance::default();
        let fast = Outcome::Served {
            ttft: Duration::from_millis(10),
            tokens_per_sec: Some(40.0),
        };
        for i in 0..1000 {
            p.record(fast, f64::from(i) / 100.0);
        }
        let slow = Outcome::Served {
            ttft: Duration::from_millis(800),
            tokens_per_sec: Some(10.0),
        };
        for _ in 0..10 {
            p.record(slow, 10.0);
        }
        let r = p.reputation(10.0);
        // Ten slow answers after a thousand fast ones: a third of the way there already.
        assert!(r.ttft_secs > 0.25 && r.tokens_per_sec < 31.0, "{r:?}");
    }

    #[test]
    fn shifting_keeps_the_reading() {
        let mut p = Performance::default();
        p.record(Outcome::Failed, 5.0);
        let moved = p.shifted(1000.0);
        assert_eq!(p.reputation(65.0), moved.reputation(1065.0));
    }
}
