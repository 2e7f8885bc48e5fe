//! The proxy's side of the operator's listener (`[admin]` in `proxy.toml`, see
//! `cocoon-admin`): its whole status (every worker's fingerprint, image and record, the
//! refusals with their reasons, the ledger and the book's figures) at `/status`, its metrics,
//! its dashboard, the operator's controls (`POST /reload`, `POST /workers/{fingerprint}/
//! disable` and `/enable`), and readiness: a proxy is ready when some worker can take a request. Clients get only the
//! aggregate view on the public port.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
pub use cocoon_admin::AdminConfig;
use cocoon_admin::json_answer;
use cocoon_admin::{AdminListener, Readiness};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::server::{State, StatusSource};

/// Serves the operator's listener for the proxy whose state is `state` until `shutdown`.
pub(crate) async fn serve(listener: AdminListener, state: Arc<State>, shutdown: CancellationToken) {
    let status: Arc<dyn StatusSource> = state.clone();
    let controls = crate::Controls {
        state: state.clone(),
    };
    let routes = Router::new()
        .route(
            "/status",
            get(move || {
                let status = status.clone();
                async move { axum::Json(status.status()) }
            }),
        )
        .route(
            "/reload",
            post({
                let controls = controls.clone();
                move || {
                    let controls = controls.clone();
                    async move {
                        match controls.reload_file() {
                            Ok(changed) => json_answer(StatusCode::OK, json!({"reloaded": changed})),
                            Err(error) => json_answer(StatusCode::BAD_REQUEST, json!({"error": error})),
                        }
                    }
                }
            }),
        )
        .route(
            "/workers/{fingerprint}/{action}",
            post(move |Path((fingerprint, action)): Path<(String, String)>| {
                let controls = controls.clone();
                async move {
                    let disabled = match action.as_str() {
                        "disable" => true,
                        "enable" => false,
                        other => {
                            let error = format!("no action {other:?}: disable or enable");
                            return json_answer(StatusCode::NOT_FOUND, json!({"error": error}));
                        }
                    };
                    match controls.set_worker_disabled(&fingerprint, disabled) {
                        Ok(connected) => json_answer(
                            StatusCode::OK,
                            json!({"worker": fingerprint, "disabled": disabled, "connected": connected}),
                        ),
                        Err(error) => json_answer(StatusCode::BAD_REQUEST, json!({"error": error})),
                    }
                }
            }),
        );
    let ready: Readiness = {
        let state = state.clone();
        Arc::new(move || {
            if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("shutting down: new requests are refused".into());
            }
            match state.workers.snapshot().iter().any(|w| w.available()) {
                true => Ok(()),
                false => Err("no healthy worker is connected".into()),
            }
        })
    };
    let mut metrics = {
        let (counters, state) = (state.metrics.clone(), state.clone());
        counters.registry(move |m| {
            let workers = state.workers.snapshot();
            let healthy = workers.iter().filter(|w| w.healthy()).count() as u64;
            let in_flight = workers.iter().map(|w| u64::from(w.in_flight())).sum();
            m.set_state(
                in_flight,
                (healthy, workers.len() as u64 - healthy),
                state.worker_cache_stats(),
                state.billing.as_ref().map(|b| b.status()).as_ref(),
            );
        })
    };
    if let Some(c) = &state.collateral {
        metrics = metrics.with(|r| c.register_metrics(r));
    }
    listener
        .serve("proxy", routes, ready, Arc::new(metrics), shutdown)
        .await;
}
