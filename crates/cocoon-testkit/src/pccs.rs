//! A server shaped like a PCCS: Intel's v4 collateral API (PCK CRL, TDX TCB info, TDX QE
//! identity, root CA CRL), answering from recorded collateral the test chooses, as a real PCCS
//! answers (issuer chains percent-encoded in headers, signed JSON bodies, the root CRL in hex).
//! It can be taken down (its port refuses connections) and brought back on the same address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cocoon_attest::{Collateral, Described};

#[derive(Default)]
struct Shared {
    /// By FMSPC; the CA is checked against the collateral's.
    collateral: Mutex<Vec<Described>>,
    requests: AtomicU64,
}

/// A running PCCS-shaped server.
pub struct PccsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PccsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PccsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl PccsServer {
    /// Serves `collateral` on a free loopback port.
    pub async fn start(collateral: Vec<Collateral>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Self {
            addr,
            shared: Arc::default(),
            task: Mutex::default(),
        };
        server.serve(collateral);
        server.listen(listener);
        server
    }

    /// The service's URL, as a node's `pccs_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on answers with `collateral` (Intel published new collateral, say).
    pub fn serve(&self, collateral: Vec<Collateral>) {
        let described = collateral
            .into_iter()
            .map(|c| Described::new(c).expect("recorded collateral is Intel's"))
            .collect();
        *self.shared.collateral.lock().unwrap() = described;
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Stops listening: connections to the address are refused until [`up`](Self::up).
    pub fn down(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn up(&self) {
        self.down();
        // The aborted task drops its listener when it next runs; retry until the port is free.
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        self.listen(listener);
    }

    fn listen(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/sgx/certification/v4/pckcrl", axum::routing::get(pck_crl))
            .route("/tdx/certification/v4/tcb", axum::routing::get(tcb_info))
            .route(
                "/tdx/certification/v4/qe/identity",
                axum::routing::get(qe_identity),
            )
            .route(
                "/sgx/certification/v4/rootcacrl",
                axum::routing::get(root_ca_crl),
            )
            .with_state(self.shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        *self.task.lock().unwrap() = Some(task);
    }
}

impl Drop for PccsServer {
    fn drop(&mut self) {
        self.down();
    }
}

type Params = Query<HashMap<String, String>>;

fn chain_header(name: &'static str, pem: &str) -> HeaderMap {
    let encoded =
        percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string();
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(&encoded).unwrap());
    h
}

fn find(shared: &Shared, pick: impl Fn(&Described) -> bool) -> Option<Arc<Collateral>> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let all = shared.collateral.lock().unwrap();
    all.iter().find(|d| pick(d)).map(|d| d.collateral.clone())
}

async fn pck_crl(State(s): State<Arc<Shared>>, Query(q): Params) -> Response {
    let ca = q.get("ca").cloned().unwrap_or_default();
    if q.get("encoding").map(String::as_str) != Some("der") {
        return (StatusCode::BAD_REQUEST, "encoding=der expected").into_response();
    }
    match find(&s, |d| d.platform.ca == ca) {
        Some(c) => (
            chain_header("SGX-PCK-CRL-Issuer-Chain", &c.pck_crl_issuer_chain),
            c.pck_crl.clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn tcb_info(State(s): State<Arc<Shared>>, Query(q): Params) -> Response {
    let fmspc = q
        .get("fmspc")
        .cloned()
        .unwrap_or_default()
        .to_ascii_uppercase();
    match find(&s, |d| d.platform.fmspc == fmspc) {
        Some(c) => (
            chain_header("TCB-Info-Issuer-Chain", &c.tcb_info_issuer_chain),
            format!(
                "{{\"tcbInfo\":{},\"signature\":\"{}\"}}",
                c.tcb_info,
                hex::encode(&c.tcb_info_signature)
            ),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn qe_identity(State(s): State<Arc<Shared>>) -> Response {
    match find(&s, |_| true) {
        Some(c) => (
            chain_header(
                "SGX-Enclave-Identity-Issuer-Chain",
                &c.qe_identity_issuer_chain,
            ),
            format!(
                "{{\"enclaveIdentity\":{},\"signature\":\"{}\"}}",
                c.qe_identity,
                hex::encode(&c.qe_identity_signature)
            ),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn root_ca_crl(State(s): State<Arc<Shared>>) -> Response {
    match find(&s, |_| true) {
        // A PCCS serves the root CA's CRL as hex text.
        Some(c) => hex::encode(&c.root_ca_crl).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
