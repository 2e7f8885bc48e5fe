//! The worker's side of the operator's listener (`[admin]` in `worker.toml`, see
//! `cocoon-admin`): readiness, `/metrics`, `/status` (each proxy's connection, the models and
//! load, what each proxy owes, the collateral), the dashboard, and the controls COCOON's
//! workers have: `POST /disable` and `/enable` (take no new request while its answers in
//! flight finish, then take them again), `POST /prices` (change what it asks; each proxy
//! follows at its next health check).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use axum::routing::{get, post};
use cocoon_admin::json_answer;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Worker;

/// `POST /prices`: `price` for `model`, or for every model not priced apart when `model` is
/// absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPrice {
    model: Option<String>,
    /// Nanoton per weighted token; 0: the network's floor.
    price: u64,
}

impl Worker {
    /// Serves the operator's listener until `shutdown`: ready while connected to a proxy with
    /// a backend that serves a model and not disabled; `/metrics`; `/status`; the dashboard;
    /// the controls. Call it once the payouts are attached ([`Self::with_payouts`]).
    pub fn admin(
        &self,
        listener: cocoon_admin::AdminListener,
        collateral: Option<&cocoon_collateral::Running>,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let connected = self.connected.clone();
        let backend = self.backend.clone();
        let paused = self.paused.clone();
        let ready: cocoon_admin::Readiness = {
            let (connected, backend, paused) = (connected.clone(), backend.clone(), paused.clone());
            Arc::new(move || {
                if paused.load(Ordering::SeqCst) {
                    return Err("disabled by its operator: it takes no new request".into());
                }
                if !connected.load(Ordering::SeqCst) {
                    return Err("not connected to any of its proxies".into());
                }
                if backend.models().is_empty() {
                    return Err("its backends serve no model".into());
                }
                Ok(())
            })
        };
        let fetcher = collateral.map(|c| c.fetcher.clone());
        let status = {
            let (name, proxies, links) =
                (self.name.clone(), self.proxies.clone(), self.links.clone());
            let (connected, backend) = (connected.clone(), backend.clone());
            let (payouts, metrics) = (self.payouts.clone(), self.metrics.clone());
            let (draining, paused, prices) =
                (self.draining.clone(), paused.clone(), self.prices.clone());
            get(move || {
                let links = links.lock().clone();
                let status = json!({
                    "role": "worker",
                    "name": name,
                    "proxy": proxies.join(", "),
                    "proxies": proxies.iter().enumerate().map(|(i, addr)| json!({
                        "addr": addr,
                        "connected": links.get(i).copied().unwrap_or(false),
                    })).collect::<Vec<_>>(),
                    "connected": connected.load(Ordering::SeqCst),
                    "draining": draining.load(Ordering::SeqCst),
                    "disabled": paused.load(Ordering::SeqCst),
                    "models": backend.models(),
                    "prices": *prices.read(),
                    "capacity": backend.capacity(),
                    "in_flight": metrics.in_flight(),
                    "payouts": payouts.as_ref().map(|p| p.earnings()),
                    "collateral": fetcher.as_ref().map(|f| f.status()).unwrap_or_default(),
                });
                async move { axum::Json(status) }
            })
        };
        let pause = |disabled: bool| {
            let paused = paused.clone();
            post(move || {
                paused.store(disabled, Ordering::SeqCst);
                tracing::info!(disabled, "operator's control");
                async move { json_answer(StatusCode::OK, json!({"disabled": disabled})) }
            })
        };
        let prices = {
            let (prices, backend) = (self.prices.clone(), backend.clone());
            post(move |body: axum::body::Bytes| {
                let reply = match serde_json::from_slice::<NewPrice>(&body) {
                    Err(e) => json_answer(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("expected {{\"model\": …, \"price\": …}}: {e}")}),
                    ),
                    Ok(NewPrice {
                        model: Some(model), ..
                    }) if !backend.models().iter().any(|m| m.id == model) => json_answer(
                        StatusCode::NOT_FOUND,
                        json!({"error": format!("this worker serves no model {model:?}")}),
                    ),
                    Ok(new) => {
                        let mut prices = prices.write();
                        match &new.model {
                            Some(model) => {
                                prices.models.insert(model.clone(), new.price);
                            }
                            None => prices.default = new.price,
                        }
                        tracing::info!(model = ?new.model, price = new.price, "operator changed a price");
                        json_answer(StatusCode::OK, json!({"prices": *prices}))
                    }
                };
                async move { reply }
            })
        };
        let routes = axum::Router::new()
            .route("/status", status)
            .route("/disable", pause(true))
            .route("/enable", pause(false))
            .route("/prices", prices);
        let mut metrics = self.metrics.registry(connected);
        if let Some(c) = collateral {
            metrics = metrics.with(|r| c.register_metrics(r));
        }
        if let Some(payouts) = self.payouts.clone() {
            metrics = metrics.with(|r| crate::metrics::earnings(r, payouts));
        }
        listener.serve("worker", routes, ready, Arc::new(metrics), shutdown)
    }
}
