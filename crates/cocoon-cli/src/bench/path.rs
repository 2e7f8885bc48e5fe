//! What the network path costs on its own: the synthetic backend called directly over HTTP
//! against the same backend behind client gateway → proxy → worker (its `upstream` backend).
//!
//! - routing: p50/p99 latency of short requests one at a time, and the most requests/s that
//!   closed loops of concurrent requests get through;
//! - streaming relay: chunks/s of long unpaced answers, and each token's transit time (sent
//!   → read by the app) of paced ones, direct against through the path;
//! - sealing: the same path with requests sealed end to end (the default) against requests in
//!   clear, in the same run, interleaved: what encryption adds per request and per token.

use std::time::{Duration, Instant};

use cocoon_engine::{Backend, UpstreamBackend, UpstreamConfig, UpstreamModel};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;

use super::client::{Answer, stream_chat};
use super::stats::{Summary, ms};
use super::synthetic::{self, Synthetic};

/// Settings of the network-path section.
#[derive(Debug, Clone)]
pub struct PathOptions {
    /// Sequential requests per path for latency.
    pub latency_requests: usize,
    /// Tokens per request for latency and throughput.
    pub short_tokens: u32,
    /// Concurrent closed loops for the most requests/s.
    pub concurrency: usize,
    /// Requests per path per round of the throughput test (two rounds each, interleaved).
    pub throughput_requests: usize,
    /// Tokens per answer for chunks/s.
    pub stream_tokens: u32,
    /// Unpaced long answers per path for chunks/s.
    pub stream_requests: usize,
    /// Pace of the transit-time test.
    pub paced_interval: Duration,
    /// Tokens per paced answer for the transit-time test.
    pub paced_tokens: u32,
}

impl Default for PathOptions {
    fn default() -> Self {
        Self {
            latency_requests: 300,
            short_tokens: 16,
            concurrency: 32,
            throughput_requests: 1500,
            stream_tokens: 2000,
            stream_requests: 10,
            paced_interval: Duration::from_millis(5),
            paced_tokens: 200,
        }
    }
}

/// One path's routing figures.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingFigures {
    /// Which path: "direct (synthetic server)" or "client -> proxy -> worker -> synthetic".
    pub path: String,
    /// Latency of a whole short streamed answer, ms.
    pub latency_ms: Summary,
    /// Time to first content chunk of a short answer, ms.
    pub ttft_ms: Summary,
    /// Most requests/s with `concurrency` closed loops.
    pub max_requests_per_s: f64,
}

/// One path's streaming-relay figures.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    /// Which path: "direct (synthetic server)" or "client -> proxy -> worker -> synthetic".
    pub path: String,
    /// Chunks per second within one unpaced answer (median over answers).
    pub chunks_per_s: f64,
    /// Each token's time from the backend's send to the app's read, ms (paced answers).
    pub transit_ms: Summary,
    /// Gaps between consecutive tokens as the app reads them, ms (paced answers).
    pub inter_token_ms: Summary,
}

/// The path section's result in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// Tokens per short answer in the routing tests.
    pub short_tokens: u32,
    /// Concurrent closed loops in the requests/s test.
    pub concurrency: usize,
    /// Routing figures of the synthetic server called directly.
    pub direct: RoutingFigures,
    /// Routing figures through client gateway -> proxy -> worker.
    pub network: RoutingFigures,
    /// network − direct at p50 and p99, ms.
    pub added_latency_p50_ms: f64,
    /// Network minus direct latency at p99, ms.
    pub added_latency_p99_ms: f64,
    /// network / direct most requests/s.
    pub throughput_ratio: f64,
    /// Tokens per unpaced answer in the chunks/s test.
    pub stream_tokens: u32,
    /// Interval between tokens of the paced answers, ms.
    pub paced_interval_ms: f64,
    /// Streaming figures of the synthetic server called directly.
    pub stream_direct: StreamFigures,
    /// Streaming figures through client gateway -> proxy -> worker.
    pub stream_network: StreamFigures,
    /// network / direct chunks/s.
    pub chunks_ratio: f64,
    /// Transit time the path adds per token, p50 and p99, ms.
    pub added_transit_p50_ms: f64,
    /// Network minus direct transit time at p99, ms.
    pub added_transit_p99_ms: f64,
    /// Routing figures through the same path with requests in clear (no `[worker_policy]`).
    pub clear: RoutingFigures,
    /// Streaming figures through the same path with requests in clear.
    pub stream_clear: StreamFigures,
    /// What sealing adds to a request's latency: sealed − clear at p50, ms.
    pub sealing_added_latency_p50_ms: f64,
    /// Sealed − clear latency at p99, ms.
    pub sealing_added_latency_p99_ms: f64,
    /// Sealed / clear most requests/s.
    pub sealing_throughput_ratio: f64,
    /// What sealing adds to a token's transit: sealed − clear at p50, ms.
    pub sealing_added_transit_p50_ms: f64,
    /// Sealed − clear transit at p99, ms.
    pub sealing_added_transit_p99_ms: f64,
}

pub(super) fn body(max_tokens: u32) -> Value {
    json!({
        "model": synthetic::MODEL,
        "messages": [{"role": "user", "content": "measure the path"}],
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

pub(super) fn upstream(server: &Synthetic) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(Arc::new(UpstreamBackend::new(upstream_config(server))?))
}

/// A worker's upstream backend for the synthetic server.
pub(super) fn upstream_config(server: &Synthetic) -> UpstreamConfig {
    UpstreamConfig {
        url: server.url(),
        ca_file: None,
        api_key: None,
        models: vec![UpstreamModel {
            id: synthetic::MODEL.into(),
            upstream_id: None,
            context_length: 1 << 20,
            // Declared, as a paid network's registry allows weights by their hash.
            model_hash: Some(cocoon_testkit::backends::scripted_model_hash()),
        }],
        parallel: 1024,
        timeout_secs: 60,
        idle_timeout_secs: 120,
        cache_salt: true,
    }
}

pub(super) fn check(answer: Answer, tokens: u32) -> anyhow::Result<Answer> {
    anyhow::ensure!(
        answer.completion_tokens == tokens && answer.chunks.len() == tokens as usize,
        "expected {tokens} tokens, got {} in {} chunks",
        answer.completion_tokens,
        answer.chunks.len()
    );
    Ok(answer)
}

/// Closed loops: `concurrency` tasks each sending requests until `total` are done.
pub(super) async fn closed_loop(
    http: &reqwest::Client,
    url: &str,
    tokens: u32,
    concurrency: usize,
    total: usize,
) -> anyhow::Result<(usize, Duration)> {
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(total));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, left) = (http.clone(), url.to_owned(), left.clone());
            tokio::spawn(async move {
                let body = body(tokens);
                let mut done = 0usize;
                while left
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
                {
                    check(stream_chat(&http, &url, &body).await?, tokens)?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await??;
    }
    Ok((done, start.elapsed()))
}

fn transit(answers: &[Answer]) -> (Summary, Summary) {
    let mut transit = Vec::new();
    let mut gaps = Vec::new();
    for a in answers {
        for (arrived, text) in &a.chunks {
            if let Some(sent) = synthetic::sent_at(text) {
                transit.push(ms(arrived.saturating_duration_since(sent)));
            }
        }
        for w in a.chunks.windows(2) {
            gaps.push(ms(w[1].0 - w[0].0));
        }
    }
    (Summary::of(transit), Summary::of(gaps))
}

fn chunks_per_s(answers: &[Answer]) -> f64 {
    super::stats::median(
        answers
            .iter()
            .map(|a| {
                let first = a.chunks.first().map_or(a.start, |c| c.0);
                let last = a.chunks.last().map_or(a.start, |c| c.0);
                (a.chunks.len() - 1) as f64 / (last - first).as_secs_f64()
            })
            .collect(),
    )
}

/// Measures routing and streaming relay, direct against through a loopback network whose
/// worker fronts the synthetic server.
pub async fn run(options: &PathOptions) -> anyhow::Result<PathReport> {
    let fast = Synthetic::start(Duration::ZERO).await?;
    let paced = Synthetic::start(options.paced_interval).await?;
    // Two workers: model "synthetic" behind each server would clash, so one network each.
    let mut fast_net = super::network(vec![upstream(&fast)?], false).await?;
    let mut paced_net = super::network(vec![upstream(&paced)?], false).await?;
    let mut clear_net = super::network_sealed(vec![upstream(&fast)?], false, false).await?;
    let mut paced_clear_net = super::network_sealed(vec![upstream(&paced)?], false, false).await?;
    let http = reqwest::Client::new();
    let direct_url = format!("{}/chat/completions", fast.url());
    let network_url = format!("{}/chat/completions", fast_net.gateway_url());
    let clear_url = format!("{}/chat/completions", clear_net.gateway_url());
    let urls = [
        direct_url.as_str(),
        network_url.as_str(),
        clear_url.as_str(),
    ];

    // Routing latency, one request at a time, the paths interleaved.
    let short = options.short_tokens;
    for url in urls {
        for _ in 0..20 {
            check(stream_chat(&http, url, &body(short)).await?, short)?;
        }
    }
    let mut lat: [Vec<Answer>; 3] = Default::default();
    for _ in 0..options.latency_requests {
        for (i, url) in urls.iter().enumerate() {
            lat[i].push(check(stream_chat(&http, url, &body(short)).await?, short)?);
        }
    }
    // Most requests/s, two rounds per path, interleaved.
    let mut served = [(0usize, Duration::ZERO); 3];
    for _ in 0..2 {
        for (i, url) in urls.iter().enumerate() {
            let (n, t) = closed_loop(
                &http,
                url,
                short,
                options.concurrency,
                options.throughput_requests,
            )
            .await?;
            served[i].0 += n;
            served[i].1 += t;
        }
    }
    let routing = |i: usize, name: &str| RoutingFigures {
        path: name.into(),
        latency_ms: Summary::of(lat[i].iter().map(|a| ms(a.latency)).collect()),
        ttft_ms: Summary::of(lat[i].iter().map(|a| ms(a.ttft)).collect()),
        max_requests_per_s: served[i].0 as f64 / served[i].1.as_secs_f64(),
    };
    let direct = routing(0, "direct (synthetic server)");
    let network = routing(1, "client -> proxy -> worker -> synthetic (sealed)");
    let clear = routing(2, "client -> proxy -> worker -> synthetic (clear)");

    // Streaming relay: unpaced chunks/s, then paced transit times.
    let long = options.stream_tokens;
    let mut streams: [Vec<Answer>; 3] = Default::default();
    for _ in 0..options.stream_requests {
        for (i, url) in urls.iter().enumerate() {
            streams[i].push(check(stream_chat(&http, url, &body(long)).await?, long)?);
        }
    }
    let paced_urls = [
        format!("{}/chat/completions", paced.url()),
        format!("{}/chat/completions", paced_net.gateway_url()),
        format!("{}/chat/completions", paced_clear_net.gateway_url()),
    ];
    let mut paced_answers: [Vec<Answer>; 3] = Default::default();
    let pt = options.paced_tokens;
    for _ in 0..3 {
        for (i, url) in paced_urls.iter().enumerate() {
            paced_answers[i].push(check(stream_chat(&http, url, &body(pt)).await?, pt)?);
        }
    }
    let stream = |i: usize, name: &str| {
        let (transit_ms, inter_token_ms) = transit(&paced_answers[i]);
        StreamFigures {
            path: name.into(),
            chunks_per_s: chunks_per_s(&streams[i]),
            transit_ms,
            inter_token_ms,
        }
    };
    let stream_direct = stream(0, "direct (synthetic server)");
    let stream_network = stream(1, "client -> proxy -> worker -> synthetic (sealed)");
    let stream_clear = stream(2, "client -> proxy -> worker -> synthetic (clear)");
    for net in [
        &mut fast_net,
        &mut paced_net,
        &mut clear_net,
        &mut paced_clear_net,
    ] {
        net.shutdown().await;
    }
    Ok(PathReport {
        short_tokens: short,
        concurrency: options.concurrency,
        added_latency_p50_ms: network.latency_ms.p50 - direct.latency_ms.p50,
        added_latency_p99_ms: network.latency_ms.p99 - direct.latency_ms.p99,
        throughput_ratio: network.max_requests_per_s / direct.max_requests_per_s,
        stream_tokens: long,
        paced_interval_ms: ms(options.paced_interval),
        chunks_ratio: stream_network.chunks_per_s / stream_direct.chunks_per_s,
        added_transit_p50_ms: stream_network.transit_ms.p50 - stream_direct.transit_ms.p50,
        added_transit_p99_ms: stream_network.transit_ms.p99 - stream_direct.transit_ms.p99,
        sealing_added_latency_p50_ms: network.latency_ms.p50 - clear.latency_ms.p50,
        sealing_added_latency_p99_ms: network.latency_ms.p99 - clear.latency_ms.p99,
        sealing_throughput_ratio: network.max_requests_per_s / clear.max_requests_per_s,
        sealing_added_transit_p50_ms: stream_network.transit_ms.p50 - stream_clear.transit_ms.p50,
        sealing_added_transit_p99_ms: stream_network.transit_ms.p99 - stream_clear.transit_ms.p99,
        direct,
        network,
        clear,
        stream_clear,
        stream_direct,
        stream_network,
    })
}

/// The path report as Markdown: the routing table and the streaming-relay table.
pub fn table(r: &PathReport) -> String {
    let mut out = format!(
        "### Routing: {}-token streamed answers from the synthetic backend\n\n\
         | path | p50 ms | p90 ms | p99 ms | TTFT p50 ms | max req/s ({} loops) |\n|---|---|---|---|---|---|\n",
        r.short_tokens, r.concurrency
    );
    for f in [&r.direct, &r.network, &r.clear] {
        out.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |\n",
            f.path,
            f.latency_ms.p50,
            f.latency_ms.p90,
            f.latency_ms.p99,
            f.ttft_ms.p50,
            f.max_requests_per_s
        ));
    }
    out.push_str(&format!(
        "\nadded by the path: p50 +{:.3} ms, p99 +{:.3} ms; throughput network/direct x{:.3}\n\n",
        r.added_latency_p50_ms, r.added_latency_p99_ms, r.throughput_ratio
    ));
    out.push_str(&format!(
        "### Streaming relay: {} unpaced tokens per answer; transit of tokens paced every {:.1} ms\n\n\
         | path | chunks/s | transit p50 ms | transit p99 ms | inter-token p50 ms | inter-token p99 ms |\n|---|---|---|---|---|---|\n",
        r.stream_tokens, r.paced_interval_ms
    ));
    for f in [&r.stream_direct, &r.stream_network, &r.stream_clear] {
        out.push_str(&format!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            f.path,
            f.chunks_per_s,
            f.transit_ms.p50,
            f.transit_ms.p99,
            f.inter_token_ms.p50,
            f.inter_token_ms.p99
        ));
    }
    out.push_str(&format!(
        "\nchunks/s network/direct x{:.3}; transit added per token: p50 +{:.3} ms, p99 +{:.3} ms\n",
        r.chunks_ratio, r.added_transit_p50_ms, r.added_transit_p99_ms
    ));
    out.push_str(&format!(
        "\nsealing (sealed - clear, same run): per request p50 {:+.3} ms, p99 {:+.3} ms, \
         req/s x{:.3}; per token transit p50 {:+.3} ms, p99 {:+.3} ms\n",
        r.sealing_added_latency_p50_ms,
        r.sealing_added_latency_p99_ms,
        r.sealing_throughput_ratio,
        r.sealing_added_transit_p50_ms,
        r.sealing_added_transit_p99_ms
    ));
    out
}
