use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::body::Body;

/// TCP connect plus TLS handshake must finish within this time; a peer that stalls in the
/// handshake (slow-loris) is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections, so a vanished peer is noticed even without traffic.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_CONCURRENT_STREAMS: u32 = 1024;

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
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Runs the TLS handshake as server on an accepted TCP connection.
pub async fn accept_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<server::TlsStream<TcpStream>> {
    tcp.set_nodelay(true)?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Serves HTTP/2 on `io` until the peer goes away or stops answering pings.
pub async fn serve_h2<IO, F, Fut>(io: IO, handler: F) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(http::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = http::Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .serve_connection(TokioIo::new(io), service)
        .await
}

/// A connection accepted by [`accept_tls`].
pub type ServerTls = server::TlsStream<TcpStream>;
/// A connection opened by [`connect_tls`].
pub type ClientTls = client::TlsStream<TcpStream>;
