use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::body::Body;

/// TCP connect plus TLS handshake, as client, must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections, so a vanished peer is noticed even without traffic.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Cocoon's requests carry a handful of short headers; a peer sending more is up to no good.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Opens a TCP connection to `addr` and runs the TLS handshake as client.
pub async fn connect_tls(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<client::TlsStream<TcpStream>> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(cocoon_tls::SERVER_NAME)
            .expect("constant is a valid name");
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(readable)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// rustls shows a certificate our verifier refused in its debug form; the verifier's own
/// message (not pinned, image not allowed, stale quote) is what an operator needs to read.
fn readable(e: std::io::Error) -> std::io::Error {
    let refused = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(why)) => {
                Some(format!("peer certificate refused: {}", why.0))
            }
            _ => None,
        });
    match refused {
        Some(message) => std::io::Error::new(e.kind(), message),
        None => e,
    }
}

/// Runs the TLS handshake as server on an accepted TCP connection; a peer that has not
/// finished it within `timeout` (a slow-loris, a half-open connection) is dropped.
pub async fn accept_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> std::io::Result<server::TlsStream<TcpStream>> {
    tcp.set_nodelay(true)?;
    tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Serves HTTP/2 on `io` until the peer goes away or stops answering pings, or, with
/// `idle_timeout`, until it has had no request open for that long. Pings keep a quiet
/// connection alive at the transport, so only the absence of requests tells a peer that merely
/// holds a connection (and its slot under the connection limit) from one that uses it.
pub async fn serve_h2<IO, F, Fut>(
    io: IO,
    idle_timeout: Option<Duration>,
    handler: F,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(http::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = http::Response<Body>> + Send + 'static,
{
    serve_h2_counting(io, idle_timeout, |_| true, handler).await
}

/// [`serve_h2`], where only the requests `counts` accepts, and that succeed (a 2xx answer),
/// are activity for the idle timeout: a peer that sends nothing but cheap requests (a status
/// read every few minutes), or requests that are refused at once, does not hold its
/// connection, and its slot, for ever.
pub async fn serve_h2_counting<IO, C, F, Fut>(
    io: IO,
    idle_timeout: Option<Duration>,
    counts: C,
    handler: F,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Fn(&http::Request<Incoming>) -> bool + Send + Sync + 'static,
    F: Fn(http::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = http::Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let counts = Arc::new(counts);
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let handler = handler.clone();
            // Taken before the handler runs and released with the response body, so a long
            // stream counts as activity for as long as it lasts.
            let mut busy = counts(&req).then(|| activity.begin());
            async move {
                let response = handler(req).await;
                if !response.status().is_success()
                    && let Some(busy) = busy.as_mut()
                {
                    busy.refreshes = false;
                }
                Ok::<_, Infallible>(response.map(|body| {
                    body.map_frame(move |frame| {
                        let _ = &busy;
                        frame
                    })
                    .boxed_unsync()
                }))
            }
        })
    };
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .serve_connection(TokioIo::new(io), service);
    let Some(idle_timeout) = idle_timeout else {
        return conn.await;
    };
    tokio::pin!(conn);
    let check = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            done = conn.as_mut() => return done,
            _ = tokio::time::sleep(check) => {
                if activity.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    tracing::debug!(?idle_timeout, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    return conn.await;
                }
            }
        }
    }
}

/// Requests open on one connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    last_end: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            open: AtomicUsize::new(0),
            last_end: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.open.fetch_add(1, Ordering::SeqCst);
        Busy {
            activity: self.clone(),
            refreshes: true,
        }
    }

    /// How long the connection has had no request open; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        let last_end = *self.last_end.lock().expect("never poisoned");
        (self.open.load(Ordering::SeqCst) == 0).then(|| last_end.elapsed())
    }
}

/// One open request; its end is recorded when dropped, unless it was refused.
struct Busy {
    activity: Arc<Activity>,
    /// Whether its end counts as activity (not for a refused request).
    refreshes: bool,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.refreshes {
            *self.activity.last_end.lock().expect("never poisoned") = Instant::now();
        }
        self.activity.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection accepted by [`accept_tls`].
pub type ServerTls = server::TlsStream<TcpStream>;
/// A connection opened by [`connect_tls`].
pub type ClientTls = client::TlsStream<TcpStream>;
