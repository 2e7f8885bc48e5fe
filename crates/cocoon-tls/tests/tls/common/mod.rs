//! A real mutual TLS 1.3 handshake over loopback TCP, shared by the TLS tests.

use std::sync::Arc;

use cocoon_tls::{
    Fingerprint, Identity, PeerVerifier, client_config, peer_identity, server_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs one handshake plus a 4-byte echo; each side reports the peer it saw, or its error.
pub(crate) async fn handshake(
    server_id: Arc<Identity>,
    server_accepts: Arc<dyn PeerVerifier>,
    client_id: Arc<Identity>,
    client_accepts: Arc<dyn PeerVerifier>,
) -> (
    Result<Option<Fingerprint>, String>,
    Result<Option<Fingerprint>, String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(server_config(server_id, server_accepts, &[b"test"]));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates()).map(|p| p.fingerprint);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector =
        tokio_rustls::TlsConnector::from(client_config(client_id, client_accepts, &[b"test"]));
    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(cocoon_tls::SERVER_NAME).unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates()).map(|p| p.fingerprint);
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok::<_, String>(peer)
    }
    .await;
    (client, server.await.unwrap())
}
