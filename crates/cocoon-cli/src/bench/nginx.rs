//! The reference middlebox: a chain of three nginx processes (Debian's package) in front of
//! the same origin as our gateway → proxy → worker chain, shaped like it: the app talks plain
//! HTTP to the first hop on loopback, the two inner links are TLS 1.3 with keep-alive
//! connections to each upstream (the certificate verified, as ours are), and the last hop talks
//! plain HTTP to the origin. Answers stream through unbuffered, as SSE must.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The three hops, up and relaying.
pub struct NginxChain {
    /// Each hop's process, first (the app's side) to last (the origin's side).
    pub hops: Vec<(String, u32)>,
    /// The first hop's base URL, `http://127.0.0.1:port/v1`.
    pub base_url: String,
    children: Vec<tokio::process::Child>,
    _dir: tempfile::TempDir,
}

/// One hop's configuration: where it listens (with TLS or not) and where it relays to.
fn config(dir: &Path, hop: usize, listen: u16, tls_in: bool, next: &str, tls_out: bool) -> String {
    let d = dir.display();
    let listen_tls = if tls_in {
        format!(
            " ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:hop{hop}:1m"
        )
    } else {
        String::new()
    };
    let (scheme, upstream_tls) = if tls_out {
        (
            "https",
            "
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_session_reuse on;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate cert.pem;
            proxy_ssl_name localhost;"
                .replace("cert.pem", &format!("{d}/cert.pem")),
        )
    } else {
        ("http", String::new())
    };
    format!(
        "daemon off;
master_process off;
pid {d}/hop{hop}.pid;
error_log {d}/hop{hop}.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body{hop};
    proxy_temp_path {d}/proxy{hop};
    fastcgi_temp_path {d}/fastcgi{hop};
    uwsgi_temp_path {d}/uwsgi{hop};
    scgi_temp_path {d}/scgi{hop};
    keepalive_requests 1000000;
    upstream next {{
        server {next};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen}{listen_tls};
        location / {{
            proxy_pass {scheme}://next;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;{upstream_tls}
        }}
    }}
}}
"
    )
}

impl NginxChain {
    /// Starts three hops with `nginx` in front of `origin` (`host:port`, plain HTTP).
    pub async fn start(nginx: &Path, origin: &str) -> anyhow::Result<Self> {
        // Debian puts nginx in /usr/sbin, which a user's PATH may lack.
        let sbin = Path::new("/usr/sbin/nginx");
        let nginx = if nginx == Path::new("nginx") && sbin.is_file() {
            sbin
        } else {
            nginx
        };
        let dir = tempfile::tempdir()?;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem())?;
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem())?;
        let ports: Vec<u16> = (0..3)
            .map(|_| Ok(super::free_loopback_addr()?.port()))
            .collect::<anyhow::Result<_>>()?;
        let mut children = Vec::new();
        let mut hops = Vec::new();
        for hop in 0..3 {
            let (next, tls_out) = match ports.get(hop + 1) {
                Some(port) => (format!("127.0.0.1:{port}"), true),
                None => (origin.to_owned(), false),
            };
            let text = config(dir.path(), hop, ports[hop], hop > 0, &next, tls_out);
            let file: PathBuf = dir.path().join(format!("hop{hop}.conf"));
            std::fs::write(&file, text)?;
            let child = tokio::process::Command::new(nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&file)
                .arg("-e")
                .arg(dir.path().join(format!("hop{hop}.log")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!("cannot run {}: {e} (apt install nginx)", nginx.display())
                })?;
            let pid = child
                .id()
                .ok_or_else(|| anyhow::anyhow!("nginx hop {hop} exited at once"))?;
            hops.push((format!("nginx hop {}", hop + 1), pid));
            children.push(child);
        }
        let chain = Self {
            hops,
            base_url: format!("http://127.0.0.1:{}/v1", ports[0]),
            children,
            _dir: dir,
        };
        chain.wait_up().await?;
        Ok(chain)
    }

    /// Up when a request crosses all three hops to the origin and back.
    async fn wait_up(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}/chat/completions", self.base_url);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = http
                .post(&url)
                .json(&serde_json::json!({
                    "model": super::synthetic::MODEL,
                    "messages": [{"role": "user", "content": "up?"}],
                    "max_tokens": 1,
                }))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the nginx chain did not come up in 20 s; logs in {}",
                self._dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the three processes.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}
