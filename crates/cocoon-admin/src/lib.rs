//! The operator's listener, the same on every role (`[admin]` in each role's config): plain
//! HTTP apart from the public port, loopback by default and beyond it only with a bearer token.
//!
//! This crate owns the listener and what every role serves on it: `/healthz` (the process
//! answers), `/readyz` (the node can do its job, as the role judges it), `/metrics` (its
//! Prometheus registry, in the OpenMetrics text format), the dashboard at `/` (one page built
//! into the binary that draws the role's `/status` and `/metrics`, refreshing itself) and the
//! role's own routes (its `/status`). Everything but the probes and the page itself (which holds
//! no figure: it fetches them with the token) needs the token when one is set. Connections are
//! few, short and time-limited, so whoever reaches the port cannot hold sockets the public
//! port needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use prometheus_client;
pub use prometheus_client::registry::Registry;

/// Connections the admin listener serves at once: a scraper and an operator or two.
const MAX_CONNECTIONS: usize = 16;

/// The most a connection may take to send its request's headers.
const HEADER_TIME: Duration = Duration::from_secs(5);

/// The most one connection may take, its request read and its answer written.
const CONNECTION_TIME: Duration = Duration::from_secs(10);

/// `[admin]` in a role's config: the operator's listener. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the operator's listener binds, e.g. `127.0.0.1:10444`; unset: none.
    pub listen: Option<String>,
    /// A file whose first line is the bearer token every request but the probes must carry
    /// (`Authorization: Bearer …`). Required when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
}

/// Whether a node can do its job now, and if not, why (answered by `/readyz`).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The dashboard: no external asset, so it works on a host with no way out.
const DASHBOARD: &str = include_str!("dashboard.html");

/// A role's Prometheus registry, and what brings its gauges up to date before each scrape
/// (figures read from the node's state rather than counted as they happen).
pub struct Metrics {
    registry: Registry,
    refresh: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// `registry`, its gauges set by `refresh` before each scrape.
    pub fn new(registry: Registry, refresh: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            registry,
            refresh: vec![Box::new(refresh)],
        }
    }

    /// Adds the metrics `part` registers (under the role's prefix), and the refresh it returns
    /// for them: figures that another crate keeps, such as the collateral's.
    pub fn with<R: Fn() + Send + Sync + 'static>(
        mut self,
        part: impl FnOnce(&mut Registry) -> R,
    ) -> Self {
        let refresh = part(&mut self.registry);
        self.refresh.push(Box::new(refresh));
        self
    }

    /// The registry in the OpenMetrics text format, refreshed first.
    pub fn encode(&self) -> String {
        for refresh in &self.refresh {
            refresh();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `body` as JSON with `status`: what the roles' control routes answer.
pub fn json_answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The bound operator's listener, ready to serve.
#[derive(Debug)]
pub struct AdminListener {
    listener: TcpListener,
    token: Option<Arc<str>>,
}

impl AdminConfig {
    /// Binds the listener `[admin]` asks for (`None` when it asks for none). Refuses an
    /// address beyond loopback without a token, and a token file that is empty.
    pub async fn bind(&self) -> anyhow::Result<Option<AdminListener>> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        let token = match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("[admin] token_file {}: {e}", path.display()))?;
                let token = text.lines().next().unwrap_or("").trim();
                anyhow::ensure!(
                    !token.is_empty(),
                    "[admin] token_file {} holds no token",
                    path.display()
                );
                Some(Arc::from(token))
            }
            None => None,
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("[admin] cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr()?;
        anyhow::ensure!(
            token.is_some() || addr.ip().is_loopback(),
            "[admin] listen = {listen} is beyond loopback: set [admin] token_file, or listen on \
             127.0.0.1 (the status and metrics name peers, models and money)"
        );
        Ok(Some(AdminListener { listener, token }))
    }
}

impl AdminListener {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Serves `/healthz`, `/readyz` (by `ready`), `/metrics`, the dashboard of `role`
    /// (`proxy`, `worker` or `gateway`) and the role's `routes` until `shutdown` is cancelled:
    /// one request per connection, at most [`MAX_CONNECTIONS`] at once, its headers within
    /// [`HEADER_TIME`] and all of it within [`CONNECTION_TIME`].
    pub async fn serve(
        self,
        role: &'static str,
        routes: Router,
        ready: Readiness,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let guarded = routes
            .route(
                "/metrics",
                get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics.encode(),
                        )
                    }
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                Token(self.token.clone()),
                require_token,
            ))
            .layer(axum::middleware::from_fn_with_state(
                Token(self.token.clone()),
                same_origin,
            ));
        let page = DASHBOARD.replace("{{ROLE}}", role);
        // The probes answer without the token: orchestrators and load balancers ask them.
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/",
                get(move || {
                    let page = page.clone();
                    async move {
                        (
                            [
                                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                                // Nothing it draws may come from elsewhere.
                                (
                                    header::CONTENT_SECURITY_POLICY,
                                    "default-src 'none'; script-src 'unsafe-inline'; \
                                     style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                                ),
                            ],
                            page,
                        )
                    }
                }),
            )
            .route(
                "/readyz",
                get(move || {
                    let ready = ready.clone();
                    async move {
                        match ready() {
                            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                        }
                    }
                }),
            )
            .merge(guarded);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        // Connections still waiting for their request, oldest first: when every slot is taken,
        // the oldest of them gives way, so that idle sockets cannot keep the probes out.
        let mut waiting: std::collections::VecDeque<Arc<Waiting>> = Default::default();
        loop {
            let tcp = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            waiting.retain(|w| !w.asked.load(Ordering::SeqCst) && !w.gone.is_cancelled());
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    // Over the cap: the oldest connection that has not asked anything yet
                    // gives way; with none, the newcomer is closed at once.
                    let Some(oldest) = waiting.pop_front() else {
                        continue;
                    };
                    oldest.gone.cancel();
                    match tokio::time::timeout(
                        Duration::from_millis(100),
                        slots.clone().acquire_owned(),
                    )
                    .await
                    {
                        Ok(Ok(slot)) => slot,
                        _ => continue,
                    }
                }
            };
            let this = Arc::new(Waiting::default());
            waiting.push_back(this.clone());
            let app = app.clone();
            let asked = this.clone();
            let service = TowerToHyperService::new(tower::service_fn(move |request| {
                asked.asked.store(true, Ordering::SeqCst);
                let mut app = app.clone();
                async move { tower::Service::call(&mut app, request).await }
            }));
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIME)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    _ = tokio::time::timeout(CONNECTION_TIME, connection) => {}
                    () = this.gone.cancelled() => {}
                }
                this.gone.cancel();
                drop(slot);
            });
        }
    }
}

/// A connection of the listener: whether it has sent its request, and how to close it.
#[derive(Default)]
struct Waiting {
    asked: AtomicBool,
    gone: CancellationToken,
}

#[derive(Clone)]
struct Token(Option<Arc<str>>);

impl Token {
    /// Whether the request carries the token (always, when none is set).
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.0 else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in time independent of where they differ.
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Refuses what a web page the operator visits could send: a request from another origin
/// (which could disable workers or reload the configuration), and, without a token, one that
/// names the listener by anything but a loopback address or `localhost` (a page rebinding its
/// own name to 127.0.0.1 could otherwise read the status).
async fn same_origin(State(token): State<Token>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site");
    let foreign_origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|origin| origin.strip_prefix("http://") != Some(host));
    if cross_site || foreign_origin {
        return (
            StatusCode::FORBIDDEN,
            "requests from another origin are refused\n",
        )
            .into_response();
    }
    if token.0.is_none() && !loopback_name(host) {
        return (
            StatusCode::FORBIDDEN,
            "without [admin] token_file, ask by a loopback address (http://127.0.0.1:PORT) or \
             localhost\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header names loopback: `127.x.y.z`, `[::1]` or `localhost`, with or
/// without a port.
fn loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    if !token.allows(request.headers()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required ([admin] token_file)\n",
        )
            .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::loopback_name;

    #[test]
    fn only_loopback_names_pass_without_a_token() {
        for host in [
            "127.0.0.1:10444",
            "127.0.0.1",
            "[::1]:80",
            "localhost:9",
            "LOCALHOST",
        ] {
            assert!(loopback_name(host), "{host}");
        }
        for host in [
            "",
            "evil.example:10444",
            "10.0.0.1:10444",
            "127.0.0.1.evil.example",
            "[::2]:1",
        ] {
            assert!(!loopback_name(host), "{host}");
        }
    }
}
