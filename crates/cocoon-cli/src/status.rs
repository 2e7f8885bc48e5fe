//! `cocoon status`: a role's state as its operator's listener (`[admin]`) reports it, for a
//! person at a terminal: readiness and why not, the role's `/status` when it has one, and its
//! request counts from `/metrics`.

use std::path::Path;

/// What the listener at `admin` (`host:port`) reports, as text; `token_file` holds the bearer
/// token when the listener wants one.
pub async fn report(admin: &str, token_file: Option<&Path>) -> anyhow::Result<String> {
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let get = |path: &str| {
        let mut request = http.get(format!("http://{admin}{path}"));
        if let Some(t) = &token {
            request = request.bearer_auth(t);
        }
        async move {
            let answer = request
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach the listener at {admin}: {e}"))?;
            anyhow::Ok((answer.status().as_u16(), answer.text().await?))
        }
    };
    let mut out = String::new();
    let (code, why) = get("/readyz").await?;
    out.push_str(&match code {
        200 => format!("{admin}: ready\n"),
        _ => format!("{admin}: NOT READY: {}\n", why.trim()),
    });
    match get("/status").await? {
        (200, body) => {
            let status: serde_json::Value = serde_json::from_str(&body)?;
            out.push_str(&format!(
                "status: {}\n",
                serde_json::to_string_pretty(&status)?
            ));
        }
        (401, _) => out.push_str("status: needs the listener's token (--token-file)\n"),
        _ => {}
    }
    match get("/metrics").await? {
        (200, metrics) => {
            let requests: Vec<&str> = metrics
                .lines()
                .filter(|l| !l.starts_with('#') && l.contains("_requests_total{"))
                .collect();
            if requests.is_empty() {
                out.push_str("requests: none yet\n");
            }
            for line in requests {
                out.push_str(&format!("requests: {line}\n"));
            }
        }
        (401, _) => out.push_str("metrics: need the listener's token (--token-file)\n"),
        (code, _) => out.push_str(&format!("metrics: answered {code}\n")),
    }
    Ok(out)
}
