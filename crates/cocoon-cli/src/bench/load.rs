//! Payments under load: the same synthetic backend behind the whole network with payments on
//! and off, `concurrency` closed loops each, rounds interleaved. With payments every answer is
//! settled into the proxy's durable book (and its payout kept by the worker) before it is
//! acknowledged, so this is what durable money costs when many answers end at once.

use std::time::Duration;

use serde::Serialize;

use super::path::{closed_loop, upstream};
use super::synthetic::Synthetic;

/// Settings of the payments-under-load section.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Concurrent closed loops.
    pub concurrency: usize,
    /// Requests per path per round.
    pub requests: usize,
    /// Rounds per path, interleaved.
    pub rounds: usize,
    /// Tokens per answer.
    pub tokens: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            concurrency: 32,
            requests: 1500,
            rounds: 3,
            tokens: 16,
        }
    }
}

/// Requests/s of each round, with and without payments.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Concurrent closed loops.
    pub concurrency: usize,
    /// Tokens per answer.
    pub tokens: u32,
    /// Requests/s of each round without payments.
    pub without: Vec<f64>,
    /// Requests/s of each round with payments.
    pub with: Vec<f64>,
    /// Median with / median without.
    pub ratio: f64,
}

/// Runs the rounds.
pub async fn run(options: &LoadOptions) -> anyhow::Result<LoadReport> {
    let server = Synthetic::start(Duration::ZERO).await?;
    let mut free = super::network(vec![upstream(&server)?], false).await?;
    let mut paid = super::network(vec![upstream(&server)?], true).await?;
    let http = reqwest::Client::new();
    let urls = [
        format!("{}/chat/completions", free.gateway_url()),
        format!("{}/chat/completions", paid.gateway_url()),
    ];
    // Warm both paths: connections, caches, the contract read.
    for url in &urls {
        let warm = options.requests.min(200);
        closed_loop(&http, url, options.tokens, options.concurrency, warm).await?;
    }
    let mut rates: [Vec<f64>; 2] = Default::default();
    for _ in 0..options.rounds {
        for (i, url) in urls.iter().enumerate() {
            let (n, t) = closed_loop(
                &http,
                url,
                options.tokens,
                options.concurrency,
                options.requests,
            )
            .await?;
            rates[i].push(n as f64 / t.as_secs_f64());
        }
    }
    free.shutdown().await;
    paid.shutdown().await;
    let [without, with] = rates;
    let ratio = super::stats::median(with.clone()) / super::stats::median(without.clone());
    Ok(LoadReport {
        concurrency: options.concurrency,
        tokens: options.tokens,
        without,
        with,
        ratio,
    })
}

/// The report as a Markdown table.
pub fn table(r: &LoadReport) -> String {
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    format!(
        "### Payments under load ({} closed loops, {} tokens per answer, synthetic backend)\n\n\
         | path | req/s per round | median |\n|---|---|---:|\n\
         | client -> proxy -> worker, no payments | {} | {:.0} |\n\
         | same, with payments | {} | {:.0} |\n\n\
         with / without: **×{:.3}**\n",
        r.concurrency,
        r.tokens,
        rounds(&r.without),
        super::stats::median(r.without.clone()),
        rounds(&r.with),
        super::stats::median(r.with.clone()),
        r.ratio
    )
}
