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

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

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
    /// (UTC day number, tokens used that day).
    used: Mutex<(u64, u64)>,
}

fn today() -> u64 {
    cocoon_ledger::unix_now() / 86_400
}

impl KeyUse {
    /// Whether the key may start another request today.
    fn allows(&self) -> bool {
        let Some(limit) = self.tokens_per_day else {
            return true;
        };
        let mut used = self.used.lock();
        if used.0 != today() {
            *used = (today(), 0);
        }
        used.1 < limit
    }

    /// Counts `tokens` an answer used.
    pub(crate) fn spend(&self, tokens: u64) {
        let mut used = self.used.lock();
        if used.0 != today() {
            *used = (today(), 0);
        }
        used.1 = used.1.saturating_add(tokens);
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
            keys.insert(
                digest(&key),
                Arc::new(KeyUse {
                    name,
                    tokens_per_day: k.tokens_per_day,
                    used: Mutex::new((today(), 0)),
                }),
            );
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
                Some((ip, tail)) => (ip, tail.strip_prefix(':')),
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
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))?;
        self.keys.get(&digest(key.trim())).cloned()
    }

    fn cors(&self, response: &mut Response, origin: &HeaderValue) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// The middleware: refuses what the checks refuse, answers allowed origins' preflights, and
/// hands the request's key (if any) to the handler as an extension.
pub(crate) async fn check(
    State(guard): State<Arc<Guard>>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if guard.host_allowed(&h) => {}
        Some(h) => {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_request_error",
                None,
                format!(
                    "this gateway does not answer to the host '{h}' (add it to [access] hosts)"
                ),
            );
        }
        None => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "the request names no host".into(),
            );
        }
    }
    let origin = headers.get(header::ORIGIN).cloned();
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
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            return response;
        }
    }
    if request.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                None,
                "the body must be JSON, sent with Content-Type: application/json".into(),
            );
        }
    }
    // The liveness probe needs no key: it spends nothing and says nothing.
    if !guard.keys.is_empty() && request.uri().path() != "/health" {
        let Some(key) = guard.key(request.headers()) else {
            let message = if request.headers().contains_key(header::AUTHORIZATION) {
                "Incorrect API key provided."
            } else {
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
            };
            return refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                message.into(),
            );
        };
        if !key.allows() {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
                format!(
                    "{} has used its {} tokens for today (UTC)",
                    key.name,
                    key.tokens_per_day.unwrap_or(0)
                ),
            );
        }
        request.extensions_mut().insert(key);
    }
    let mut response = next.run(request).await;
    if let Some(o) = &origin {
        guard.cors(&mut response, o);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str]) -> Guard {
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
        key.spend(100);
        assert!(!key.allows(), "100 of 100 used");
        // A new day.
        key.used.lock().0 -= 1;
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
