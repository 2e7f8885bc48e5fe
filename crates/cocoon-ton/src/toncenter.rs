//! The toncenter HTTP API shape (v2 `sendBoc`, `runGetMethod`, `getWalletInformation`; v3
//! `transactions`): a client for any node that serves it, and a server that serves the local
//! emulated chain the same way, so the TON ledger backend runs unchanged against either.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use num_bigint::BigInt;
use parking_lot::Mutex;
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Value, json};
use tonlib_core::TonAddress;
use tycho_types::cell::HashBytes;

use crate::emulator::{Chain, SKIPPED, Tx};
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

/// A message as v3 reports it in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgInfo {
    /// The message cell's hash.
    pub hash: [u8; 32],
    /// Where it goes; `None` for an outbound external message (a log).
    pub destination: Option<TonAddress>,
}

/// The compute phase of a transaction as v3 reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// Nothing ran (e.g. no code at the account: `no_state`).
    Skipped,
    /// The code ran and exited with this code (0 and 1 are success).
    Ran(i32),
}

/// One transaction as v3 reports it, reduced to what confirmation needs.
#[derive(Debug, Clone)]
pub struct TxInfo {
    /// The transaction's logical time.
    pub lt: u64,
    /// Hash of the message that caused it; `None` for a tick-tock transaction.
    pub in_msg_hash: Option<[u8; 32]>,
    /// The messages it sent (none when its action phase failed).
    pub out_msgs: Vec<MsgInfo>,
    /// Its compute phase.
    pub compute: Compute,
    /// Its action phase's result code (0: success); `None` when there was none (the compute
    /// phase was skipped or failed).
    pub action_result: Option<i32>,
}

/// How a [`Client`] retries a call that failed in a way worth retrying (HTTP 429 or 5xx, a
/// connection error or a timeout): up to `attempts` calls in all, the wait doubling from `base`
/// up to `cap`, each wait drawn between half and all of that (jitter, so clients that failed
/// together do not come back together). A `Retry-After` header, in seconds, is honoured up to
/// [`MAX_RETRY_AFTER`].
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Calls in all, the first included; 1 turns retrying off.
    pub attempts: u32,
    /// The first wait.
    pub base: Duration,
    /// The longest wait backoff reaches.
    pub cap: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 5,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(3),
        }
    }
}

/// The longest `Retry-After` a [`Client`] waits for: a server asking for more is not worth
/// blocking a payment on, and the call fails instead of hanging.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

impl Retry {
    /// The wait before attempt `attempt + 1` (`attempt` counting from 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let full = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.cap);
        let mut byte = [0u8; 1];
        // Without randomness the wait is just the full backoff: still bounded, only less spread.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
        full / 2 + full / 2 * u32::from(byte[0]) / 255
    }
}

/// A client of a toncenter-shaped HTTP API (a real node's or the local chain's). Every call has
/// a timeout and is retried on rate limits, server errors and lost connections (see [`Retry`]);
/// a retried `sendBoc` re-sends the same signed message, which the wallet's seqno lets land at
/// most once.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<HeaderValue>,
    timeout: Duration,
    retry: Retry,
}

fn api(e: impl std::fmt::Display) -> TonError {
    TonError::Api(e.to_string())
}

/// How long one HTTP call may take by default, the response body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A hash as v3 writes it (base64, standard or URL-safe) or as hex.
fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() == 64 && hex::decode_to_slice(text, &mut out).is_ok() {
        return Some(out);
    }
    let bytes = B64
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
        .ok()?;
    bytes.try_into().ok()
}

fn parse_tx(t: &Value) -> TxInfo {
    let msg = |m: &Value| {
        Some(MsgInfo {
            hash: parse_hash(m["hash"].as_str()?)?,
            destination: m["destination"]
                .as_str()
                .and_then(|d| TonAddress::from_str(d).ok()),
        })
    };
    let compute = &t["description"]["compute_ph"];
    let code = |v: &Value| v.as_i64().and_then(|c| i32::try_from(c).ok());
    TxInfo {
        lt: t["lt"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
        in_msg_hash: t["in_msg"]["hash"].as_str().and_then(parse_hash),
        out_msgs: t["out_msgs"]
            .as_array()
            .map(|m| m.iter().filter_map(msg).collect())
            .unwrap_or_default(),
        compute: if compute["skipped"].as_bool() == Some(false) {
            // An exit code that does not read is a failure, never a success.
            Compute::Ran(code(&compute["exit_code"]).unwrap_or(-1))
        } else {
            Compute::Skipped
        },
        action_result: t["description"]["action"].as_object().map(|a| {
            match a.get("success").and_then(Value::as_bool) {
                Some(true) => 0,
                _ => a
                    .get("result_code")
                    .and_then(code)
                    .filter(|c| *c != 0)
                    .unwrap_or(-1),
            }
        }),
    }
}

/// Whether an HTTP status is worth calling again for: rate limited, or the server's trouble.
fn transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

impl Client {
    /// A client of the API at `base` (e.g. `https://toncenter.com`), trailing slash ignored, with
    /// no API key, [`DEFAULT_TIMEOUT`] and the default [`Retry`].
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            api_key: None,
            timeout: DEFAULT_TIMEOUT,
            retry: Retry::default(),
        }
    }

    /// Sends `key` as toncenter's `X-API-Key` on every call (without one toncenter allows about
    /// one request a second). A key that is not a valid header value is refused.
    pub fn with_api_key(mut self, key: &str) -> Result<Self, TonError> {
        let mut value =
            HeaderValue::from_str(key).map_err(|_| api("the API key is not a valid header"))?;
        // Kept out of reqwest's and our Debug output.
        value.set_sensitive(true);
        self.api_key = Some(value);
        Ok(self)
    }

    /// How long one HTTP call may take, the response body included ([`DEFAULT_TIMEOUT`] unless
    /// set).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How failed calls are retried ([`Retry::default`] unless set).
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Calls the API, retrying as [`Retry`] says, and reads the answer as JSON.
    async fn call(
        &self,
        what: &str,
        request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Value, TonError> {
        let attempts = self.retry.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut builder = request(&self.http).timeout(self.timeout);
            if let Some(key) = &self.api_key {
                builder = builder.header("X-API-Key", key.clone());
            }
            let (failure, wait) = match builder.send().await {
                Ok(response) if transient(response.status()) => {
                    let (status, wait) = (response.status(), retry_after(&response));
                    let text: String = response
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect();
                    (format!("{what}: HTTP {status} {text}"), wait)
                }
                Ok(response) => match response.json::<Value>().await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_timeout() => (format!("{what}: {e}"), None),
                    Err(e) => return Err(api(format!("{what}: {e}"))),
                },
                Err(e) if e.is_connect() || e.is_timeout() || e.is_request() => {
                    (format!("{what}: {e}"), None)
                }
                Err(e) => return Err(api(format!("{what}: {e}"))),
            };
            if attempt >= attempts {
                return Err(api(format!("{failure} (after {attempt} attempts)")));
            }
            let wait = wait.map_or_else(
                || self.retry.backoff(attempt),
                |after| after.max(self.retry.backoff(attempt)),
            );
            tracing::debug!(%failure, attempt, ?wait, "toncenter call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn v2(v: Value) -> Result<Value, TonError> {
        if v["ok"].as_bool() != Some(true) {
            return Err(TonError::Api(
                v["error"].as_str().unwrap_or("request failed").to_owned(),
            ));
        }
        Ok(v["result"].clone())
    }

    /// Broadcasts a serialized external message (v2 `sendBoc`).
    pub async fn send_boc(&self, boc: &[u8]) -> Result<(), TonError> {
        let url = format!("{}/api/v2/sendBoc", self.base);
        let body = json!({ "boc": B64.encode(boc) });
        let v = self
            .call("sendBoc", |http| http.post(&url).json(&body))
            .await?;
        Self::v2(v).map(|_| ())
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
        let url = format!("{}/api/v2/runGetMethod", self.base);
        let body = json!({ "address": raw(address), "method": method, "stack": stack });
        let v = self
            .call("runGetMethod", |http| http.post(&url).json(&body))
            .await?;
        let result = Self::v2(v)?;
        let code = result["exit_code"].as_i64().unwrap_or(-1);
        if code != 0 && code != 1 {
            return Err(TonError::GetMethod {
                method: method.to_owned(),
                exit_code: code as i32,
            });
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
        let url = format!("{}/api/v2/getWalletInformation", self.base);
        let query = [("address", raw(address))];
        let v = self
            .call("getWalletInformation", |http| http.get(&url).query(&query))
            .await?;
        let result = Self::v2(v)?;
        Ok(result["seqno"].as_u64().and_then(|s| u32::try_from(s).ok()))
    }

    async fn v3_transactions(
        &self,
        address: &TonAddress,
        query: &[(&str, String)],
    ) -> Result<Vec<TxInfo>, TonError> {
        let url = format!("{}/api/v3/transactions", self.base);
        let mut query = query.to_vec();
        query.push(("account", raw(address)));
        let v = self
            .call("transactions", |http| http.get(&url).query(&query))
            .await?;
        let txs = v["transactions"]
            .as_array()
            .ok_or_else(|| api(format!("transactions: {}", v["error"])))?;
        Ok(txs.iter().map(parse_tx).collect())
    }

    /// Up to [`PAGE`] of an account's transactions after logical time `after_lt`, oldest first.
    pub async fn transactions(
        &self,
        address: &TonAddress,
        after_lt: u64,
    ) -> Result<Vec<TxInfo>, TonError> {
        self.v3_transactions(
            address,
            &[
                ("start_lt", (after_lt + 1).to_string()),
                ("sort", "asc".into()),
                ("limit", PAGE.to_string()),
            ],
        )
        .await
    }

    /// The logical time of the account's latest transaction, `None` if it has none.
    pub async fn last_lt(&self, address: &TonAddress) -> Result<Option<u64>, TonError> {
        let latest = self
            .v3_transactions(address, &[("sort", "desc".into()), ("limit", "1".into())])
            .await?;
        Ok(latest.first().map(|t| t.lt))
    }
}

/// How many transactions [`Client::transactions`] asks for at once.
pub const PAGE: usize = 100;

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
        // As toncenter answers a get-method that threw: the call worked, the code refused.
        Err(TonError::GetMethod { exit_code, .. }) => {
            Json(json!({ "ok": true, "result": { "exit_code": exit_code, "stack": [] } }))
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
    end_lt: Option<u64>,
    #[serde(default)]
    sort: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    offset: usize,
}

fn b64(hash: &HashBytes) -> String {
    B64.encode(hash.as_slice())
}

fn raw_upper(hash: &HashBytes) -> String {
    format!("0:{}", hex::encode_upper(hash.as_slice()))
}

/// One transaction in v3's shape: hashes in base64, addresses raw in upper case, and the
/// compute and action phases as toncenter reports them, so a client reads the emulator and a
/// real node alike.
fn tx_json(t: &Tx) -> Value {
    let compute = if t.exit_code == SKIPPED {
        json!({ "skipped": true, "reason": "no_state" })
    } else {
        json!({
            "skipped": false,
            "success": t.exit_code == 0 || t.exit_code == 1,
            "exit_code": t.exit_code,
            "gas_used": t.gas_used.to_string(),
        })
    };
    let mut description = json!({
        "type": "ord",
        "aborted": t.action_result != Some(0),
        "compute_ph": compute,
    });
    if let Some(code) = t.action_result {
        description["action"] =
            json!({ "success": code == 0, "valid": code == 0, "result_code": code });
    }
    let out_msgs: Vec<Value> = t
        .out_msgs
        .iter()
        .map(|m| json!({ "hash": b64(&m.hash), "source": raw_upper(&t.account), "destination": raw_upper(&m.dst) }))
        .collect();
    json!({
        "account": raw_upper(&t.account),
        "lt": t.lt.to_string(),
        "in_msg": { "hash": b64(&t.in_msg_hash), "destination": raw_upper(&t.account), "bounced": t.bounced },
        "out_msgs": out_msgs,
        "description": description,
    })
}

async fn transactions(State(chain): State<Shared>, Query(q): Query<TxQuery>) -> Json<Value> {
    let Some(address) = parse_raw(&q.account) else {
        return fail("account must be raw 0:<hex>");
    };
    let chain = chain.lock();
    let mut txs: Vec<&Tx> = chain
        .transactions()
        .iter()
        .filter(|t| t.account == address && t.lt >= q.start_lt)
        .filter(|t| q.end_lt.is_none_or(|end| t.lt <= end))
        .collect();
    // toncenter's defaults: newest first, ten at a time, at most a thousand.
    if q.sort.as_deref() != Some("asc") {
        txs.reverse();
    }
    let limit = q.limit.unwrap_or(10).min(1000);
    let txs: Vec<Value> = txs
        .into_iter()
        .skip(q.offset)
        .take(limit)
        .map(tx_json)
        .collect();
    Json(json!({ "transactions": txs }))
}
