//! The embedded ledger as a service, so that processes other than the one holding the
//! database (a client's CLI, workers, proxies) share one ledger, as they share one chain. It
//! accepts only transactions signed by their sender ([`SignedTx`]) and runs each at its own
//! clock; reading is open to anyone, as a chain's state is.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::embedded::EmbeddedLedger;
use crate::error::LedgerError;
use crate::ledger::{Ledger, unix_now};
use crate::types::PublicKey;
use crate::wallet::SignedTx;

/// Paths of the service's API.
pub mod paths {
    /// POST a [`SignedTx`](crate::SignedTx) to execute it; the answer is its
    /// [`Receipt`](crate::Receipt).
    pub const TX: &str = "/ledger/v1/tx";
    /// GET the whole committed [`LedgerState`](crate::LedgerState).
    pub const STATE: &str = "/ledger/v1/state";
    /// GET the network's current [`NetworkParams`](crate::NetworkParams).
    pub const PARAMS: &str = "/ledger/v1/params";
    /// GET the [`Network`](crate::Network) every signed message and transaction must name.
    pub const NETWORK: &str = "/ledger/v1/network";
    /// GET this, then `/<proxy>/<client>` (hex keys): that client's contract, or `null`.
    pub const CLIENTS: &str = "/ledger/v1/clients";
}

/// Largest transaction accepted: operations are small; a registry update is the largest.
const MAX_TX_BYTES: usize = 64 * 1024;

/// A refusal as it travels: the error itself and its text.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The refusal, as the caller's [`LedgerError`] reads it back.
    pub error: LedgerError,
    /// The refusal's text, for people reading the answer.
    pub message: String,
}

struct Refused(LedgerError);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = match self.0 {
            LedgerError::Storage(_) | LedgerError::Unreachable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            LedgerError::NotOwner | LedgerError::NotAllowed(_) => StatusCode::FORBIDDEN,
            LedgerError::NoContract(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::CONFLICT,
        };
        let body = ErrorBody {
            message: self.0.to_string(),
            error: self.0,
        };
        (status, Json(body)).into_response()
    }
}

/// The routes, over `ledger`.
pub fn router(ledger: Arc<EmbeddedLedger>) -> Router {
    Router::new()
        .route(paths::TX, post(execute))
        .route(paths::STATE, get(state))
        .route(paths::PARAMS, get(params))
        .route(paths::NETWORK, get(network))
        .route(
            &format!("{}/{{proxy}}/{{client}}", paths::CLIENTS),
            get(client),
        )
        .layer(DefaultBodyLimit::max(MAX_TX_BYTES))
        .with_state(ledger)
}

async fn execute(
    State(ledger): State<Arc<EmbeddedLedger>>,
    Json(tx): Json<SignedTx>,
) -> Result<Response, Refused> {
    // The commit fsyncs: off the async threads.
    let receipt = tokio::task::spawn_blocking(move || ledger.execute_signed(&tx, unix_now()))
        .await
        .map_err(|e| Refused(LedgerError::Storage(e.to_string())))?
        .map_err(Refused)?;
    Ok(Json(receipt).into_response())
}

async fn state(State(ledger): State<Arc<EmbeddedLedger>>) -> Result<Response, Refused> {
    let state = ledger.snapshot().await.map_err(Refused)?;
    Ok(Json(state).into_response())
}

async fn params(State(ledger): State<Arc<EmbeddedLedger>>) -> Result<Response, Refused> {
    let params = ledger.params().await.map_err(Refused)?;
    Ok(Json(params).into_response())
}

async fn network(State(ledger): State<Arc<EmbeddedLedger>>) -> Result<Response, Refused> {
    let network = ledger.network().await.map_err(Refused)?;
    Ok(Json(network).into_response())
}

fn key(hex_key: &str) -> Result<PublicKey, Refused> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut out)
        .map_err(|_| Refused(LedgerError::BadTransaction(format!("bad key {hex_key}"))))?;
    Ok(out)
}

async fn client(
    State(ledger): State<Arc<EmbeddedLedger>>,
    Path((proxy, client)): Path<(String, String)>,
) -> Result<Response, Refused> {
    let contract = ledger
        .client(key(&proxy)?, key(&client)?)
        .await
        .map_err(Refused)?;
    Ok(Json(contract).into_response())
}

/// Serves `ledger` on `listener` until `shutdown` resolves.
pub async fn serve(
    ledger: Arc<EmbeddedLedger>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Small answers on kept-alive connections would otherwise wait for delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(ledger))
        .with_graceful_shutdown(shutdown)
        .await
}
