use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a backend, shared with the generation threads. The recording side is public
/// so that backends in other crates (`cocoon-llama`) count the same way as the upstream one.
#[derive(Debug, Default)]
pub struct BackendStats {
    active: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
}

/// A copy of [`BackendStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Generations running now.
    pub active: u64,
    /// Generations that ended normally and were counted as [`Outcome::Completed`].
    pub completed: u64,
    /// Generations stopped because the requester went away.
    pub cancelled: u64,
    /// Generations that ended in an error, or whose outcome was never set.
    pub failed: u64,
    /// Prompt tokens processed, summed over all generations.
    pub prompt_tokens: u64,
    /// Tokens generated, summed over all generations.
    pub generated_tokens: u64,
}

/// How a generation ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The generation ran to its end and its answer was delivered.
    Completed,
    /// The requester went away before the generation ended.
    Cancelled,
    /// The generation failed; also the outcome of a guard dropped without one set.
    Failed,
}

impl BackendStats {
    /// Reads all counters now (each one atomically, not all together).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            active: self.active.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: self.generated_tokens.load(Ordering::Relaxed),
        }
    }

    /// Marks a generation as running until the returned guard is finished or dropped.
    pub fn start(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            stats: self,
            outcome: Outcome::Failed,
        }
    }

    /// Adds `n` to the prompt tokens processed.
    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` to the tokens generated.
    pub fn add_generated_tokens(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts a generation as active; records its outcome when dropped (failed unless told otherwise,
/// so a panic or an early return is never counted as a success).
pub struct ActiveGuard<'a> {
    stats: &'a BackendStats,
    outcome: Outcome,
}

impl ActiveGuard<'_> {
    /// Sets the outcome recorded when the guard is dropped; without a call it is
    /// [`Outcome::Failed`].
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let counter = match self.outcome {
            Outcome::Completed => &self.stats.completed,
            Outcome::Cancelled => &self.stats.cancelled,
            Outcome::Failed => &self.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}
