//! The toncenter HTTP API shape (v2 `sendBoc`, `runGetMethod`, `getWalletInformation`; v3
//! `transactions`): a client for any node that serves it, and a server that serves the local
//! emulated chain the same way, so the TON ledger backend runs unchanged against either.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use num_bigint::BigInt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use tonlib_core::TonAddress;
use tycho_types::cell::HashBytes;

use crate::emulator::{Chain, SKIPPED};
use crate::error::TonError;

/// `0:<hex>`, the raw form every toncenter endpoint accepts.
pub fn raw(address: &TonAddress) -> String {
    format!(
        "{}:{}",
        address.workchain,
        hex::encode(address.hash_part.as_slice())
    )
}

fn parse_raw(text: &str) -> Option<HashBytes> {
    let (wc, hash) = text.split_once(':')?;
    if wc != "0" {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hash, &mut out).ok()?;
    Some(HashBytes(out))
}

/// One transaction as v3 reports it, reduced to what confirmation needs.
#[derive(Debug, Clone)]
pub struct TxInfo {
    /// The transaction's logical time.
    pub lt: u64,
    /// The compute phase's exit code; `None` when the compute phase was skipped.
    pub exit_code: Option<i32>,
}

/// A client of a toncenter-shaped HTTP API (a real node's or the local chain's).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

fn api(e: impl std::fmt::Display) -> TonError {
    TonError::Api(e.to_string())
}

impl Client {
    /// A client of the API at `base` (e.g. `https://toncenter.com`), trailing slash ignored.
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    async fn v2(&self, response: reqwest::Response) -> Result<Value, TonError> {
        let v: Value = response.json().await.map_err(api)?;
        if v["ok"].as_bool() != Some(true) {
            return Err(TonError::Api(
                v["error"].as_str().unwrap_or("request failed").to_owned(),
            ));
        }
        Ok(v["result"].clone())
    }

    /// Broadcasts a serialized external message (v2 `sendBoc`).
    pub async fn send_boc(&self, boc: &[u8]) -> Result<(), TonError> {
        let r = self
            .http
            .post(format!("{}/api/v2/sendBoc", self.base))
            .json(&json!({ "boc": B64.encode(boc) }))
            .send()
            .await
            .map_err(api)?;
        self.v2(r).await.map(|_| ())
    }

    /// Runs a get-method with integer arguments; integer results.
    pub async fn run_get_method(
        &self,
        address: &TonAddress,
        method: &str,
        args: &[BigInt],
    ) -> Result<Vec<BigInt>, TonError> {
        let stack: Vec<Value> = args
            .iter()
            .map(|a| json!(["num", format!("{a:#x}")]))
            .collect();
        let r = self
            .http
            .post(format!("{}/api/v2/runGetMethod", self.base))
            .json(&json!({ "address": raw(address), "method": method, "stack": stack }))
            .send()
            .await
            .map_err(api)?;
        let result = self.v2(r).await?;
        let code = result["exit_code"].as_i64().unwrap_or(-1);
        if code != 0 && code != 1 {
            return Err(TonError::Api(format!("{method} exited with {code}")));
        }
        result["stack"]
            .as_array()
            .ok_or_else(|| api("no stack"))?
            .iter()
            .map(|e| {
                let text = e[1]
                    .as_str()
                    .ok_or_else(|| api("non-numeric stack entry"))?;
                let (neg, digits) = text.strip_prefix('-').map_or((false, text), |d| (true, d));
                let n = BigInt::parse_bytes(digits.trim_start_matches("0x").as_bytes(), 16)
                    .ok_or_else(|| api("bad number"))?;
                Ok(if neg { -n } else { n })
            })
            .collect()
    }

    /// The wallet's seqno, or `None` while the wallet is not deployed.
    pub async fn seqno(&self, address: &TonAddress) -> Result<Option<u32>, TonError> {
        let r = self
            .http
            .get(format!("{}/api/v2/getWalletInformation", self.base))
            .query(&[("address", raw(address))])
            .send()
            .await
            .map_err(api)?;
        let result = self.v2(r).await?;
        Ok(result["seqno"].as_u64().map(|s| s as u32))
    }

    /// An account's transactions after logical time `after_lt`, oldest first.
    pub async fn transactions(
        &self,
        address: &TonAddress,
        after_lt: u64,
    ) -> Result<Vec<TxInfo>, TonError> {
        let v: Value = self
            .http
            .get(format!("{}/api/v3/transactions", self.base))
            .query(&[
                ("account", raw(address)),
                ("start_lt", (after_lt + 1).to_string()),
                ("sort", "asc".into()),
            ])
            .send()
            .await
            .map_err(api)?
            .json()
            .await
            .map_err(api)?;
        Ok(v["transactions"]
            .as_array()
            .map(|txs| {
                txs.iter()
                    .map(|t| TxInfo {
                        lt: t["lt"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
                        exit_code: t["description"]["compute_ph"]["exit_code"]
                            .as_i64()
                            .map(|c| c as i32),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

type Shared = Arc<Mutex<Chain>>;

/// Serves `chain` in the toncenter shape.
pub fn router(chain: Shared) -> Router {
    Router::new()
        .route("/api/v2/sendBoc", post(send_boc))
        .route("/api/v2/runGetMethod", post(run_get_method))
        .route("/api/v2/getWalletInformation", get(wallet_information))
        .route("/api/v3/transactions", get(transactions))
        .with_state(chain)
}

fn fail(message: impl std::fmt::Display) -> Json<Value> {
    Json(json!({ "ok": false, "error": message.to_string(), "code": 400 }))
}

#[derive(Deserialize)]
struct SendBoc {
    boc: String,
}

async fn send_boc(State(chain): State<Shared>, Json(req): Json<SendBoc>) -> Json<Value> {
    let Ok(boc) = B64.decode(req.boc.as_bytes()) else {
        return fail("boc is not base64");
    };
    match chain.lock().send_external(&boc) {
        Ok(_) => Json(json!({ "ok": true, "result": { "@type": "ok" } })),
        Err(e) => fail(e),
    }
}

#[derive(Deserialize)]
struct GetMethod {
    address: String,
    method: String,
    #[serde(default)]
    stack: Vec<(String, String)>,
}

async fn run_get_method(State(chain): State<Shared>, Json(req): Json<GetMethod>) -> Json<Value> {
    let Some(address) = parse_raw(&req.address) else {
        return fail("address must be raw 0:<hex>");
    };
    let mut args = Vec::new();
    for (_, v) in &req.stack {
        match BigInt::parse_bytes(v.trim_start_matches("0x").as_bytes(), 16) {
            Some(n) => args.push(n),
            None => return fail("stack entries must be [\"num\", \"0x..\"]"),
        }
    }
    match chain.lock().get(&address, &req.method, &args) {
        Ok(values) => {
            let stack: Vec<Value> = values
                .iter()
                .map(|v| {
                    let text = if v.sign() == num_bigint::Sign::Minus {
                        format!("-{:#x}", -v)
                    } else {
                        format!("{v:#x}")
                    };
                    json!(["num", text])
                })
                .collect();
            Json(json!({ "ok": true, "result": { "exit_code": 0, "stack": stack } }))
        }
        Err(e) => fail(e),
    }
}

#[derive(Deserialize)]
struct ByAddress {
    address: String,
}

async fn wallet_information(
    State(chain): State<Shared>,
    Query(q): Query<ByAddress>,
) -> Json<Value> {
    let Some(address) = parse_raw(&q.address) else {
        return fail("address must be raw 0:<hex>");
    };
    let chain = chain.lock();
    let balance = chain.account(&address).map_or(0, |a| a.balance);
    let seqno = chain
        .get(&address, "seqno", &[])
        .ok()
        .and_then(|v| v.first().and_then(|s| u64::try_from(s).ok()));
    let state = if chain.is_active(&address) {
        "active"
    } else {
        "uninitialized"
    };
    Json(
        json!({ "ok": true, "result": { "wallet": seqno.is_some(), "balance": balance.to_string(), "account_state": state, "seqno": seqno } }),
    )
}

#[derive(Deserialize)]
struct TxQuery {
    account: String,
    #[serde(default)]
    start_lt: u64,
}

async fn transactions(State(chain): State<Shared>, Query(q): Query<TxQuery>) -> Json<Value> {
    let Some(address) = parse_raw(&q.account) else {
        return fail("account must be raw 0:<hex>");
    };
    let chain = chain.lock();
    let txs: Vec<Value> = chain
        .transactions()
        .iter()
        .filter(|t| t.account == address && t.lt >= q.start_lt)
        .map(|t| {
            let compute = if t.exit_code == SKIPPED { json!({ "skipped": true }) } else { json!({ "exit_code": t.exit_code, "gas_used": t.gas_used.to_string() }) };
            json!({ "lt": t.lt.to_string(), "description": { "compute_ph": compute, "bounced": t.bounced } })
        })
        .collect();
    Json(json!({ "transactions": txs }))
}
