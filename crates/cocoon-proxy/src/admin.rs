//! The operator's listener (`[admin]` in `proxy.toml`): plain HTTP, apart from the public TLS
//! port, serving what only the proxy's operator should see (every worker's fingerprint, image
//! and record, the refusals with their reasons, the ledger and the book's figures) and a
//! liveness probe. Clients get only the aggregate view on the public port.
//!
//! It listens on loopback unless told otherwise, and beyond loopback only with a bearer
//! token: the status names peers and the ledger, which is nobody else's business.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::server::StatusSource;

/// Connections the admin listener serves at once: a scraper and an operator or two.
const MAX_CONNECTIONS: usize = 16;

/// The most a connection may take to send its request's headers.
const HEADER_TIME: Duration = Duration::from_secs(5);

/// The most one connection may take, its request read and its answer written.
const CONNECTION_TIME: Duration = Duration::from_secs(10);

/// `[admin]` in `proxy.toml`: the operator's listener. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the operator's listener binds, e.g. `127.0.0.1:10444`; unset: none.
    pub listen: Option<String>,
    /// A file whose first line is the bearer token every request must carry
    /// (`Authorization: Bearer …`). Required when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
}

/// The bound operator's listener, ready to serve.
pub(crate) struct AdminListener {
    listener: TcpListener,
    token: Option<Arc<str>>,
}

impl AdminConfig {
    /// Binds the listener `[admin]` asks for (`None` when it asks for none). Refuses an
    /// address beyond loopback without a token, and a token file that is empty.
    pub(crate) async fn bind(&self) -> anyhow::Result<Option<AdminListener>> {
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
             127.0.0.1 (the status names every peer and the ledger)"
        );
        Ok(Some(AdminListener { listener, token }))
    }
}

impl AdminListener {
    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Serves `/status` and `/healthz` until `shutdown` is cancelled: one request per
    /// connection, at most [`MAX_CONNECTIONS`] at once, its headers within [`HEADER_TIME`] and
    /// all of it within [`CONNECTION_TIME`], so that whoever reaches the port (the token is checked only once a
    /// request arrives) cannot hold sockets the public port needs.
    pub(crate) async fn serve(self, status: Arc<dyn StatusSource>, shutdown: CancellationToken) {
        let app = Router::new()
            .route("/status", get(full_status))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(Admin {
                status,
                token: self.token,
            });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            // Over the cap the connection is closed at once.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIME)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
                drop(slot);
            });
        }
    }
}

#[derive(Clone)]
struct Admin {
    status: Arc<dyn StatusSource>,
    token: Option<Arc<str>>,
}

impl Admin {
    /// Whether the request carries the token (always, when none is set).
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in time independent of where they differ: the token guards the status.
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

async fn full_status(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !admin.allows(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required ([admin] token_file)\n",
        )
            .into_response();
    }
    axum::Json(admin.status.status()).into_response()
}
