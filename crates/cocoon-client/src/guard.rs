//! Who may use the gateway, checked before a request reaches the API. The gateway spends its
//! contract's money for whoever reaches its port, and a browser is a confused deputy: any page
//! the user opens can POST to `127.0.0.1` (a "simple" cross-origin request, `text/plain`, needs
//! no preflight), and a page on a rebound DNS name can read the answers too. So, always:
//!
//! - `Host` must name this gateway: an IP literal or `localhost` (a rebinding page's `Host` is
//!   its own domain name), or one of `[access] hosts`;
//! - a request with an `Origin` (only browsers send one) must come from `[access] origins`,
//!   which then get CORS answers; no origin is allowed by default;
//! - a POST must say `Content-Type: application/json`;
//!
//! and with `[[access.keys]]` set, `Authorization: Bearer <key>` with one of them (OpenAI's
//! 401 otherwise), each key with an optional daily token limit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::key_usage::UsageFile;

/// `[access]` in `client.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// API keys apps must send as `Authorization: Bearer <key>`; none: no key is asked for
    /// (the default, for a gateway on loopback used by the machine's own apps).
    pub keys: Vec<ApiKey>,
    /// Host names (beyond IP literals and `localhost`) the gateway answers to, as apps reach
    /// it, e.g. `gateway.internal` or `gateway.internal:10000`.
    pub hosts: Vec<String>,
    /// Browser origins allowed to call the API (exactly as browsers send them, e.g.
    /// `http://localhost:3000`); they get CORS answers. None by default.
    pub origins: Vec<String>,
    /// Where each key's use today is kept, so a restart does not start the day afresh (keys
    /// named by their SHA-256); unset: in memory only, and a gateway whose keys have daily
    /// limits says so at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_file: Option<std::path::PathBuf>,
}

/// One API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The key itself; or set `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A file holding the key (its first line), so the key stays out of the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// A name for logs and `/v1/network` (never the key).
    #[serde(default)]
    pub name: String,
    /// Tokens (prompt and completion) the key may use per UTC day; unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
}

/// A key's use today.
#[derive(Debug)]
pub(crate) struct KeyUse {
    name: String,
    tokens_per_day: Option<u64>,
    day: Mutex<Day>,
    /// The key's SHA-256: how the usage file names it.
    digest: [u8; 32],
    /// Where its use today is kept across restarts: a limited key's, when `usage_file` is set.
    file: Option<Arc<UsageFile>>,
}

/// One UTC day of a key: the tokens its finished answers used, and the most its requests in
/// flight may still use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Day {
    day: u64,
    used: u64,
    reserved: u64,
}

fn today() -> u64 {
    cocoon_ledger::unix_now() / 86_400
}

impl KeyUse {
    /// The key's SHA-256: what keeps its apps' prompt caches apart from other keys' apps.
    pub(crate) fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Today's figures (a new day starts with nothing used; what is in flight stays held).
    fn today(&self) -> parking_lot::MutexGuard<'_, Day> {
        let mut day = self.day.lock();
        if day.day != today() {
            *day = Day {
                day: today(),
                used: 0,
                reserved: day.reserved,
            };
        }
        day
    }

    /// Whether the key may start another request today.
    fn allows(&self) -> bool {
        self.tokens_per_day
            .is_none_or(|limit| self.today().used < limit)
    }

    /// One request's hold (see [`KeyUse::hold_many`]).
    #[cfg(test)]
    pub(crate) fn hold(
        self: &Arc<Self>,
        prompt: u64,
        max_tokens: Option<u32>,
    ) -> Result<(KeyHold, Option<u32>), String> {
        let (mut holds, cap) = self.hold_many(prompt, max_tokens, 1)?;
        Ok((holds.pop().expect("one hold"), cap))
    }

    /// Holds what `n` requests alike (the choices of one answer), each of at most `prompt`
    /// prompt tokens and `max_tokens` completion tokens, may use against the key's day, under
    /// one lock, so requests in flight together cannot pass the limit: all of them fit, or
    /// none is held and nothing is sent. Without `max_tokens`, they share what is left of the
    /// day, each capped alike: the cap is returned, for the requests to carry. An embedding
    /// request's `max_tokens` is 0: its prompt is all it uses. The refusal says why.
    pub(crate) fn hold_many(
        self: &Arc<Self>,
        prompt: u64,
        max_tokens: Option<u32>,
        n: u32,
    ) -> Result<(Vec<KeyHold>, Option<u32>), String> {
        let n64 = u64::from(n.max(1));
        let Some(limit) = self.tokens_per_day else {
            return Ok(((0..n64).map(|_| self.held(0)).collect(), None));
        };
        let mut day = self.today();
        let left = limit.saturating_sub(day.used).saturating_sub(day.reserved);
        let completion = match max_tokens {
            Some(m) => u64::from(m),
            None => (left / n64).saturating_sub(prompt),
        };
        let need = prompt.saturating_add(completion);
        let all = need.saturating_mul(n64);
        if (completion == 0 && max_tokens.is_none()) || all > left {
            let what = match n {
                1 => "this request".to_owned(),
                n => format!("these {n} choices"),
            };
            return Err(format!(
                "{} has {left} of its {limit} tokens for today (UTC) left, and {what} may use \
                 up to {all} (prompt and max_tokens, each)",
                self.name
            ));
        }
        day.reserved += all;
        drop(day);
        let cap = max_tokens
            .is_none()
            .then(|| u32::try_from(completion).unwrap_or(u32::MAX));
        Ok(((0..n64).map(|_| self.held(need)).collect(), cap))
    }

    fn held(self: &Arc<Self>, amount: u64) -> KeyHold {
        KeyHold {
            key: self.clone(),
            amount,
            spent: AtomicBool::new(false),
        }
    }
}

/// What one request holds of its key's day until its answer ends.
#[derive(Debug)]
pub(crate) struct KeyHold {
    key: Arc<KeyUse>,
    amount: u64,
    spent: AtomicBool,
}

impl KeyHold {
    /// The answer ended with `tokens` used: they count, the rest of the hold is released.
    pub(crate) fn spend(&self, tokens: u64) {
        if self.spent.swap(true, Ordering::SeqCst) {
            return;
        }
        let (today, used) = {
            let mut day = self.key.today();
            day.reserved = day.reserved.saturating_sub(self.amount);
            day.used = day.used.saturating_add(tokens);
            (day.day, day.used)
        };
        if let Some(file) = &self.key.file
            && let Err(e) = file.record(&self.key.digest, today, used)
        {
            tracing::error!(key = %self.key.name, error = %e, "a key's use today could not be kept: a restart would forget it");
        }
    }
}

impl Drop for KeyHold {
    /// An answer that ended without its usage (an error, a cut-off, a disconnect) may still
    /// have been billed for all it held: the whole hold counts.
    fn drop(&mut self) {
        self.spend(self.amount);
    }
}

/// The checks, as the middleware runs them.
#[derive(Debug)]
pub(crate) struct Guard {
    port: u16,
    hosts: Vec<String>,
    origins: Vec<String>,
    /// By SHA-256 of the key: looked up by hash, so no key is compared byte by byte.
    keys: HashMap<[u8; 32], Arc<KeyUse>>,
}

fn digest(key: &str) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The error apps see, in OpenAI's shape.
fn refuse(status: StatusCode, kind: &str, code: Option<&str>, message: String) -> Response {
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    (status, axum::Json(body)).into_response()
}

impl Guard {
    /// The checks for a gateway listening on `listen`; fails on a key that cannot be read.
    pub(crate) fn new(config: &AccessConfig, listen: SocketAddr) -> anyhow::Result<Self> {
        let limited = config.keys.iter().any(|k| k.tokens_per_day.is_some());
        let file = match &config.usage_file {
            Some(path) if limited => Some(Arc::new(UsageFile::open(path.clone())?)),
            None if limited => {
                tracing::warn!(
                    "keys' daily limits are kept in memory only: a restart starts their day \
                     afresh; set [access] usage_file"
                );
                None
            }
            _ => None,
        };
        let mut keys = HashMap::new();
        for (i, k) in config.keys.iter().enumerate() {
            let key = match (&k.key, &k.key_file) {
                (Some(key), None) => key.trim().to_owned(),
                (None, Some(file)) => std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("[access] key file {}: {e}", file.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                _ => anyhow::bail!("[[access.keys]] #{}: set one of key and key_file", i + 1),
            };
            if key.len() < 16 {
                anyhow::bail!(
                    "[[access.keys]] #{}: a key must have at least 16 characters",
                    i + 1
                );
            }
            let name = if k.name.is_empty() {
                format!("key {}", i + 1)
            } else {
                k.name.clone()
            };
            let digest = digest(&key);
            let fresh = Arc::new(KeyUse {
                name,
                tokens_per_day: k.tokens_per_day,
                day: Mutex::new(Day {
                    day: today(),
                    used: file.as_ref().map_or(0, |f| f.used(&digest, today())),
                    reserved: 0,
                }),
                digest,
                file: k.tokens_per_day.and(file.clone()),
            });
            if keys.insert(digest, fresh).is_some() {
                anyhow::bail!(
                    "[[access.keys]] #{}: the same key is listed twice (each key has one limit)",
                    i + 1
                );
            }
        }
        if keys.is_empty() && !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "THE GATEWAY LISTENS BEYOND LOOPBACK WITHOUT API KEYS: anyone who reaches it \
                 spends this client's balance; set [[access.keys]]"
            );
        }
        Ok(Self {
            port: listen.port(),
            hosts: config
                .hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            origins: config.origins.clone(),
            keys,
        })
    }

    /// Whether `host` (a `Host` header) names this gateway: a configured name (with or without
    /// a port), or `localhost` or an IP literal on this gateway's port.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.hosts.contains(&host) {
            return true;
        }
        let (name, port) = match host.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((ip, "")) => (ip, None),
                Some((ip, tail)) => match tail.strip_prefix(':') {
                    Some(port) => (ip, Some(port)),
                    None => return false, // "[::1]evil.example"
                },
                None => return false,
            },
            None => match host.split_once(':') {
                Some((name, port)) if !port.contains(':') => (name, Some(port)),
                Some(_) => (host.as_str(), None), // a bare IPv6 literal
                None => (host.as_str(), None),
            },
        };
        if let Some(port) = port
            && port.parse::<u16>().ok() != Some(self.port)
        {
            return false;
        }
        name == "localhost"
            || name.parse::<IpAddr>().is_ok()
            || self.hosts.iter().any(|h| h == name)
    }

    /// The key a request names, if it is one of ours.
    fn key(&self, headers: &HeaderMap) -> Option<Arc<KeyUse>> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.keys.get(&digest(key.trim())).cloned()
    }

    fn cors(&self, response: &mut Response, origin: &HeaderValue) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// The host a request names: its URI's authority (HTTP/2's `:authority`, an absolute-form
/// request line) or its one `Host` header. Two that differ, or two `Host` headers, are
/// refused: which one a server reads decides nothing here.
fn named_host(request: &Request) -> Result<String, String> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has two Host headers".into());
    }
    let header = header
        .map(|h| h.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| "the Host header is not text".to_string())?;
    match (request.uri().authority().map(|a| a.to_string()), header) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(&h) => Err(format!(
            "the request names two hosts ('{a}' and Host '{h}')"
        )),
        (Some(a), _) => Ok(a),
        (None, Some(h)) => Ok(h),
        (None, None) => Err("the request names no host".into()),
    }
}

/// The middleware: refuses what the checks refuse, answers allowed origins' preflights, and
/// hands the request's key (if any) to the handler as an extension.
pub(crate) async fn check(
    State(guard): State<Arc<Guard>>,
    mut request: Request,
    next: Next,
) -> Response {
    match named_host(&request) {
        Ok(h) if guard.host_allowed(&h) => {}
        Ok(h) => {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_request_error",
                None,
                format!(
                    "this gateway does not answer to the host '{h}' (add it to [access] hosts)"
                ),
            );
        }
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_request_error", None, why),
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    if let Some(o) = &origin {
        let allowed = o
            .to_str()
            .is_ok_and(|o| guard.origins.iter().any(|a| a == o));
        if !allowed {
            return refuse(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                None,
                format!(
                    "requests from the web origin {:?} are not allowed (add it to [access] origins)",
                    o.to_str().unwrap_or("?")
                ),
            );
        }
        if request.method() == Method::OPTIONS {
            let mut response = StatusCode::NO_CONTENT.into_response();
            guard.cors(&mut response, o);
            let asked = request
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned();
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            // The origin is allowed: whatever headers its SDK sends are (the OpenAI JS SDK's
            // x-stainless-* among them).
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                asked.unwrap_or(HeaderValue::from_static("authorization, content-type")),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            return response;
        }
    }
    let mut response = match refusal(&guard, &mut request) {
        None => next.run(request).await,
        Some(refused) => refused,
    };
    // An allowed origin's app reads the refusals too (401, 415, 429), not only the answers.
    if let Some(o) = &origin {
        guard.cors(&mut response, o);
    }
    response
}

/// The checks past host and origin: a JSON body on POSTs, and the key when keys are set. The
/// refusal, if any.
fn refusal(guard: &Guard, request: &mut Request) -> Option<Response> {
    if request.method() == Method::POST {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Some(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                None,
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ));
        }
    }
    // The liveness probe needs no key: it spends nothing and says nothing.
    if guard.keys.is_empty() || request.uri().path() == "/health" {
        return None;
    }
    let Some(key) = guard.key(request.headers()) else {
        let message = if request.headers().contains_key(header::AUTHORIZATION) {
            "Incorrect API key provided."
        } else {
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
        };
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            message.into(),
        ));
    };
    if !key.allows() {
        return Some(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            Some("insufficient_quota"),
            format!(
                "{} has used its {} tokens for today (UTC)",
                key.name,
                key.tokens_per_day.unwrap_or(0)
            ),
        ));
    }
    request.extensions_mut().insert(key);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard for a gateway on 127.0.0.1:10000 that also answers to `hosts`.
    pub(super) fn guard(hosts: &[&str]) -> Guard {
        Guard::new(
            &AccessConfig {
                hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                ..AccessConfig::default()
            },
            "127.0.0.1:10000".parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hosts_that_name_this_gateway_and_those_that_do_not() {
        let g = guard(&["gateway.internal"]);
        for ok in [
            "127.0.0.1:10000",
            "127.0.0.1",
            "localhost:10000",
            "LOCALHOST:10000",
            "[::1]:10000",
            "10.0.0.5:10000",
            "gateway.internal",
            "gateway.internal:10000",
        ] {
            assert!(g.host_allowed(ok), "{ok} refused");
        }
        for bad in [
            "evil.example:10000",
            "evil.example",
            "127.0.0.1:10001",
            "localhost:80",
            "gateway.internal:9999",
            "127.0.0.1.evil.example:10000",
        ] {
            assert!(!g.host_allowed(bad), "{bad} allowed");
        }
    }

    /// A key's use today is kept in `usage_file`: a gateway started again on the same file
    /// refuses what the day no longer covers (a restart started the day afresh), another day
    /// starts at nothing, and a file that cannot be read stops the start.
    #[test]
    fn a_keys_day_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = AccessConfig {
            keys: vec![ApiKey {
                key: Some("sk-local-0123456789".into()),
                key_file: None,
                name: "ci".into(),
                tokens_per_day: Some(100),
            }],
            usage_file: Some(dir.path().join("usage.json")),
            ..AccessConfig::default()
        };
        let listen = "127.0.0.1:10000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer sk-local-0123456789".parse().unwrap(),
        );
        {
            let g = Guard::new(&config, listen).unwrap();
            let (hold, _) = g.key(&headers).unwrap().hold(10, Some(60)).unwrap();
            hold.spend(70);
        }
        let kept = std::fs::read_to_string(dir.path().join("usage.json")).unwrap();
        assert!(
            !kept.contains("sk-local"),
            "the key itself was written: {kept}"
        );
        let again = Guard::new(&config, listen).unwrap();
        let key = again.key(&headers).unwrap();
        let refused = key.hold(10, Some(30)).unwrap_err();
        assert!(refused.contains("30 of its 100 tokens"), "{refused}");
        key.hold(10, Some(20)).unwrap();
        // Kept for another day: today starts at nothing.
        let mut old: serde_json::Value = serde_json::from_str(&kept).unwrap();
        old["day"] = json!(today() - 1);
        std::fs::write(dir.path().join("usage.json"), old.to_string()).unwrap();
        let next_day = Guard::new(&config, listen).unwrap();
        next_day.key(&headers).unwrap().hold(10, Some(90)).unwrap();
        std::fs::write(dir.path().join("usage.json"), "not json").unwrap();
        let error = Guard::new(&config, listen).unwrap_err().to_string();
        assert!(error.contains("usage_file"), "{error}");
    }

    #[test]
    fn keys_are_checked_and_limits_reset_daily() {
        let g = Guard::new(
            &AccessConfig {
                keys: vec![ApiKey {
                    key: Some("sk-local-0123456789".into()),
                    key_file: None,
                    name: "ci".into(),
                    tokens_per_day: Some(100),
                }],
                ..AccessConfig::default()
            },
            "127.0.0.1:10000".parse().unwrap(),
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        assert!(g.key(&headers).is_none());
        headers.insert(header::AUTHORIZATION, "Bearer sk-wrong".parse().unwrap());
        assert!(g.key(&headers).is_none());
        headers.insert(
            header::AUTHORIZATION,
            "Bearer sk-local-0123456789".parse().unwrap(),
        );
        let key = g.key(&headers).expect("the key");
        assert!(key.allows());
        // Requests in flight together hold their bounds: the second does not fit beside the
        // first, whatever they end up using.
        let (first, cap) = key.hold(30, Some(40)).unwrap();
        assert_eq!(cap, None);
        let refused = key.hold(30, Some(1)).unwrap_err();
        assert!(refused.contains("30 of its 100 tokens"), "{refused}");
        first.spend(50);
        // Without max_tokens, a request gets what is left of the day.
        let (rest, cap) = key.hold(10, None).unwrap();
        assert_eq!(cap, Some(40));
        // An answer that ended without its usage counts its whole hold.
        drop(rest);
        assert!(!key.allows(), "100 of 100 used");
        // A new day.
        key.day.lock().day -= 1;
        assert!(key.allows());
        // Too short a key is refused at start.
        let short = Guard::new(
            &AccessConfig {
                keys: vec![ApiKey {
                    key: Some("abc".into()),
                    key_file: None,
                    name: String::new(),
                    tokens_per_day: None,
                }],
                ..AccessConfig::default()
            },
            "127.0.0.1:10000".parse().unwrap(),
        );
        assert!(short.is_err());
    }
}

#[cfg(test)]
mod review_tests {
    use super::tests::guard;
    use super::*;

    fn key(key: Option<&str>, file: Option<std::path::PathBuf>, limit: Option<u64>) -> ApiKey {
        ApiKey {
            key: key.map(str::to_owned),
            key_file: file,
            name: String::new(),
            tokens_per_day: limit,
        }
    }

    fn keys(keys: Vec<ApiKey>) -> anyhow::Result<Guard> {
        Guard::new(
            &AccessConfig {
                keys,
                ..AccessConfig::default()
            },
            "127.0.0.1:10000".parse().unwrap(),
        )
    }

    /// DNS rebinding (threat 2): names that only look like this gateway's, numeric spellings an
    /// `IpAddr` parser does not take, and configured names with and without a port.
    #[test]
    fn review_host_spellings() {
        let g = guard(&["gateway.internal", "Other.Internal:8080"]);
        for ok in [
            "[::1]:10000",
            "[::1]",
            "[::ffff:127.0.0.1]:10000",
            "LOCALHOST:10000",
            "Gateway.Internal:10000",
            "other.internal:8080",
        ] {
            assert!(g.host_allowed(ok), "{ok} refused");
        }
        for bad in [
            "127.0.0.1.nip.io:10000",
            "localhost.evil.example:10000",
            "evil.localhost:10000",
            "localhost.:10000",
            "localhost.",
            "0x7f000001:10000",
            "2130706433:10000",
            "127.1:10000",
            "evil@127.0.0.1:10000",
            "127.0.0.1:10000@evil.example",
            "[fe80::1%25lo]:10000",
            "[::1]:10001",
            "[::1:10000",
            "::1:10000",
            "gateway.internal.:10000",
            "gateway.internal:10001",
            "other.internal",
            "other.internal:10000",
            "",
            ":10000",
        ] {
            assert!(!g.host_allowed(bad), "{bad} allowed");
        }
    }

    /// Host parsing (threat 2, low): anything after an IPv6 literal's `]` that is not `:PORT`
    /// is ignored, so `[::1]evil.example` and `[::1]:10000junk`-like tails pass as `[::1]`.
    /// Not reachable from a browser (its Host is a URL's host), but the check accepts a Host
    /// that names nothing.
    #[test]
    fn review_a_tail_after_an_ipv6_literal_is_refused() {
        let g = guard(&[]);
        for bad in ["[::1]evil.example", "[::1]x:10000", "[::1]@evil"] {
            assert!(!g.host_allowed(bad), "{bad} allowed");
        }
    }

    /// Key files (threat 3): a key file written on Windows (CRLF) or with trailing spaces and
    /// a second line is read as its first line's key.
    #[test]
    fn review_a_key_file_with_crlf_is_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key.txt");
        std::fs::write(&file, "  sk-file-0123456789abcdef \r\nsecond line\r\n").unwrap();
        let g = keys(vec![key(None, Some(file), None)]).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer sk-file-0123456789abcdef".parse().unwrap(),
        );
        assert!(g.key(&headers).is_some());
        headers.insert(
            header::AUTHORIZATION,
            "Bearer sk-file-0123456789abcdef\r"
                .parse()
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer sk-file-0123456789abcdef ")),
        );
        assert!(g.key(&headers).is_some());
        // An empty key file, a key of 15 characters, and both key and key_file: refused.
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\r\n").unwrap();
        assert!(keys(vec![key(None, Some(empty), None)]).is_err());
        assert!(keys(vec![key(Some("sk-0123456789ab"), None, None)]).is_err());
        assert!(keys(vec![key(Some("   sk-0123456789ab   "), None, None)]).is_err());
        assert!(
            keys(vec![key(
                Some("sk-0123456789abcdef"),
                Some(dir.path().join("key.txt")),
                None
            )])
            .is_err()
        );
        assert!(keys(vec![key(None, Some(dir.path().join("none.txt")), None)]).is_err());
    }

    /// Key lookup (threat 3): only `Bearer`/`bearer` and the exact key (trimmed) match.
    #[test]
    fn review_authorization_spellings() {
        let g = keys(vec![key(Some("sk-local-0123456789"), None, None)]).unwrap();
        let found = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            g.key(&h).is_some()
        };
        assert!(found("Bearer sk-local-0123456789"));
        assert!(found("bearer sk-local-0123456789"));
        assert!(found("Bearer \t sk-local-0123456789 \t"));
        for bad in [
            "sk-local-0123456789",
            "Basic sk-local-0123456789",
            "Bearersk-local-0123456789",
            "Bearer sk-local-012345678",
            "Bearer sk-local-01234567890",
            "Bearer sk-local-0123456789, Bearer x",
            "Bearer  Bearer sk-local-0123456789",
        ] {
            assert!(!found(bad), "{bad} found");
        }
    }

    /// Keys (threat 3, low): the same key listed twice, once with a daily limit and once
    /// without, is two entries of one hash: the later one silently wins and the limit is gone.
    /// A config like that should be refused at start.
    #[test]
    fn review_a_key_listed_twice_is_refused_at_start() {
        let twice = keys(vec![
            key(Some("sk-local-0123456789"), None, Some(10)),
            key(Some(" sk-local-0123456789 "), None, None),
        ]);
        assert!(
            twice.is_err(),
            "a key listed twice is accepted, its limit {:?}",
            twice.unwrap().keys.values().next().unwrap().tokens_per_day
        );
    }

    /// Day rollover (threat 4): use from a past day neither blocks today nor adds to it.
    #[test]
    fn review_day_rollover_resets_use_once() {
        let g = keys(vec![key(Some("sk-local-0123456789"), None, Some(10))]).unwrap();
        let k = g.keys.values().next().unwrap().clone();
        k.day.lock().day = today() - 1;
        k.day.lock().used = 1_000;
        k.hold(0, Some(4)).unwrap().0.spend(4);
        assert_eq!(
            *k.day.lock(),
            Day {
                day: today(),
                used: 4,
                reserved: 0
            }
        );
        assert!(k.allows());
        k.hold(0, Some(6)).unwrap().0.spend(6);
        assert!(!k.allows());
        // A day from the future (a clock set back) starts again too.
        k.day.lock().day = today() + 1;
        assert!(k.allows());
        // A limit of 0: nothing today.
        let zero = keys(vec![key(Some("sk-local-0123456789"), None, Some(0))]).unwrap();
        assert!(!zero.keys.values().next().unwrap().allows());
    }
}
