//! How a node's configuration names places in what it measures into RTMR3: by where prompts
//! and payments really go, and with no secret (the measurement travels in the node's
//! certificates).

/// `url` as the HTTP client will reach it (parsed as reqwest parses it, so the host measured is
/// the host connected to), without user info, query or fragment. A URL that does not parse is
/// measured as given up to its query: the client refuses it anyway.
pub fn url_for_measurement(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_owned(),
    }
}

/// A ledger as `[payments] ledger` names it (`http(s)://…`, or `ton:<root>@<API URL>`), for
/// measurement: its URL without credentials.
pub fn ledger_for_measurement(spec: &str) -> String {
    match spec.strip_prefix("ton:").and_then(|s| s.split_once('@')) {
        Some((root, api)) => format!("ton:{root}@{}", url_for_measurement(api)),
        None => url_for_measurement(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host measured is the one the client connects to, even where a naive reading of the
    /// URL sees another, and no credential or query is kept.
    #[test]
    fn urls_are_measured_as_the_client_reaches_them_without_secrets() {
        assert_eq!(
            url_for_measurement("https://user:pw@api.example:8443/v1?key=s3cret#x"),
            "https://api.example:8443/v1"
        );
        // WHATWG parsing (reqwest's): a backslash ends the host of an https URL.
        let tricky = url_for_measurement("https://evil.example\\@api.openai.com/v1");
        assert!(tricky.starts_with("https://evil.example/"), "{tricky}");
        assert_eq!(
            ledger_for_measurement("ton:0:abc@https://user:key@toncenter.example/api/v2?k=1"),
            "ton:0:abc@https://toncenter.example/api/v2"
        );
        assert_eq!(
            ledger_for_measurement("http://u:p@127.0.0.1:9100"),
            "http://127.0.0.1:9100/"
        );
    }
}
