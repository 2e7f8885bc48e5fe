//! `cocoon bench` itself: each section runs end to end on small numbers and reports figures
//! that are consistent with what was sent (exact token counts are checked inside the bench;
//! here, that the figures exist, are positive and hang together, and that the figure draws).

use std::sync::Arc;
use std::time::Duration;

use cocoon_cli::bench::{self, engine::EngineOptions, path::PathOptions};
use cocoon_engine::{Backend, LlamaConfig};
use cocoon_llama::LlamaBackend;

#[tokio::test]
async fn path_and_engine_sections_report_consistent_figures() {
    let path = bench::path::run(&PathOptions {
        latency_requests: 5,
        short_tokens: 4,
        concurrency: 4,
        throughput_requests: 20,
        stream_tokens: 50,
        stream_requests: 2,
        paced_interval: Duration::from_millis(2),
        paced_tokens: 10,
    })
    .await
    .unwrap();
    for f in [&path.direct, &path.network] {
        assert_eq!(f.latency_ms.n, 5);
        assert!(f.latency_ms.p50 > 0.0 && f.latency_ms.p50 <= f.latency_ms.p99);
        assert!(f.ttft_ms.p50 <= f.latency_ms.p99);
        assert!(f.max_requests_per_s > 0.0);
    }
    for s in [&path.stream_direct, &path.stream_network] {
        assert!(s.chunks_per_s > 0.0);
        // Every paced token's transit was measured (3 answers of 10).
        assert_eq!(s.transit_ms.n, 30);
        assert!(s.transit_ms.p50 >= 0.0);
        assert_eq!(s.inter_token_ms.n, 27);
    }
    assert!(path.throughput_ratio > 0.0 && path.chunks_ratio > 0.0);

    let options = EngineOptions {
        requests: 1,
        max_tokens: 4,
        threads: 2,
        levels: vec![1, 2],
        requests_per_stream: 1,
        parallel: 2,
        kv_cache_tokens: 1024,
    };
    let load = |prompt_cache| -> Arc<dyn Backend> {
        Arc::new(
            LlamaBackend::load(&LlamaConfig {
                model_path: crate::common::model_path(),
                threads: options.threads,
                parallel: options.parallel,
                kv_cache_tokens: options.kv_cache_tokens,
                prompt_cache,
                ..Default::default()
            })
            .unwrap(),
        )
    };
    let backend = load(false);
    let mut net = bench::network(vec![backend.clone()], false).await.unwrap();
    let engine = bench::engine::run(backend.clone(), &net.gateway_url(), &[], &options)
        .await
        .unwrap();
    net.shutdown().await;
    assert!(
        engine.embedded.prompt_tokens > 50,
        "the long prompt, templated"
    );
    assert!(engine.embedded.gen_tokens_per_s > 0.0 && engine.embedded.prompt_tokens_per_s > 0.0);
    assert!(engine.references.is_empty());
    let (lo, hi) = engine.embedded.gen_tokens_per_s_range;
    assert!(lo <= engine.embedded.gen_tokens_per_s && engine.embedded.gen_tokens_per_s <= hi);
    // Two paths (in-process, through the network) at two levels.
    assert_eq!(engine.levels.len(), 4);
    assert!(engine.levels.iter().all(|l| l.aggregate_tokens_per_s > 0.0));
    assert_eq!(engine.levels[2].requests, 2);

    // The multi-turn conversation: with the cache, every turn after the first starts from
    // the last one's cells; without, none does.
    let multiturn = bench::multiturn::run(&load(true), &backend, None, 4)
        .await
        .unwrap();
    let (with, without) = (&multiturn.paths[0], &multiturn.paths[1]);
    assert_eq!(multiturn.paths.len(), 2);
    assert_eq!(with.last_prompt_tokens, without.last_prompt_tokens);
    assert_eq!(without.cached_tokens, 0);
    assert!(
        with.cached_tokens > with.last_prompt_tokens,
        "turns 2 to 8 reused their history: {with:?}"
    );
    assert_eq!(with.ttft_ms.n, 7);
    assert!(multiturn.ttft_cached_over_uncached > 0.0);
    assert!(bench::multiturn::table(&multiturn).contains("prompt cache / no cache"));

    // Prompt lookup on the edit: the same answer with and without, guesses checked.
    let work = tempfile::tempdir().unwrap();
    let lookup = bench::lookup::run(
        &crate::common::model_path(),
        None,
        &options,
        &bench::lookup::LookupOptions {
            rounds: 1,
            max_tokens: 24,
        },
        work.path(),
    )
    .await
    .unwrap();
    assert_eq!(lookup.paths.len(), 2, "no llama-server rows without one");
    assert!(lookup.same_answer, "{lookup:?}");
    assert!(
        lookup.acceptance > 0.0 && lookup.speedup > 0.0,
        "{lookup:?}"
    );
    assert_eq!(
        lookup.paths[0].completion_tokens,
        lookup.paths[1].completion_tokens
    );

    let market = bench::market::run(&bench::market::MarketOptions {
        workers: vec![10, 2_000],
        picks: 400,
        quality_picks: 50,
    })
    .unwrap();
    let (small, large) = (&market.sizes[0], &market.sizes[1]);
    // Below a few dozen workers the pick is the exhaustive one: the same choice every time.
    // (Scores decay by the instant, so "the same" is to a few parts in a billion.)
    assert!((small.quality.p50 - 1.0).abs() < 1e-6 && (small.quality.p99 - 1.0).abs() < 1e-6);
    assert!(large.quality.p50 > 1.0 - 1e-6 && large.quality.n == 50);
    // At 2,000 workers scoring them all costs far more than a sample.
    assert!(large.speedup > 5.0, "{large:?}");
    assert_eq!(market.workers_growth, 200.0);

    // Payments under load: every answer settled durably, with and without.
    let load = bench::load::run(&bench::load::LoadOptions {
        concurrency: 4,
        requests: 40,
        rounds: 1,
        tokens: 4,
    })
    .await
    .unwrap();
    assert!(
        load.with[0] > 0.0 && load.without[0] > 0.0 && load.ratio > 0.0,
        "{load:?}"
    );

    // Each hop against nginx: three nginx processes and our three roles, each its own
    // process, relay the same origin; every process's CPU is read from /proc.
    let hops = bench::hops::run(&bench::hops::HopsOptions {
        cocoon: Some(env!("CARGO_BIN_EXE_cocoon").into()),
        nginx: "nginx".into(),
        rounds: 1,
        latency_requests: 5,
        short_tokens: 4,
        concurrency: 4,
        requests: 100,
        stream_tokens: 200,
        stream_requests: 4,
    })
    .await
    .unwrap();
    let names = |i: usize| -> Vec<&str> {
        hops.paths[i]
            .processes
            .iter()
            .map(|p| p.process.as_str())
            .collect()
    };
    assert_eq!(hops.paths.len(), 3);
    assert!(names(0).is_empty());
    assert_eq!(names(1), ["nginx hop 1", "nginx hop 2", "nginx hop 3"]);
    assert_eq!(names(2), ["client", "proxy", "worker"]);
    for p in &hops.paths {
        assert_eq!(p.latency_ms.n, 5);
        assert!(p.requests_per_s > 0.0 && p.tokens_per_s > 0.0, "{p:?}");
        assert!(p.cpu_ms_per_1000_requests >= 0.0 && p.cpu_ms_per_100k_tokens >= 0.0);
    }
    assert!(hops.requests_per_s_ratio > 0.0);

    let report = bench::BenchReport {
        machine: bench::machine(),
        path: Some(path),
        hops: Some(hops),
        engine: Some(engine),
        multiturn: Some(multiturn),
        lookup: Some(lookup),
        memory: None,
        payments: None,
        load: Some(load),
        market: Some(market),
    };
    let table = bench::table(&report);
    assert!(table.contains("### Routing") && table.contains("### Concurrency"));
    assert!(table.contains("### Each hop against nginx"));
    assert!(table.contains("### Choosing a worker"));
    assert!(table.contains("### Payments under load"));
    assert!(table.contains("### Multi-turn conversation"));
    assert!(table.contains("### Prompt lookup"));
    let svg = bench::figure(&report).expect("path and engine are there");
    assert!(svg.contains("2 streams") && svg.contains("<polyline"));
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["path"]["network"]["latency_ms"]["p99"].is_number());
}
