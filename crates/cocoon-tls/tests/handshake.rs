//! Real mutual TLS 1.3 handshakes over loopback TCP.

use std::sync::Arc;

use cocoon_tls::{
    AnyPeer, Identity, PeerVerifier, PinnedPeers, client_config, peer_identity, server_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn handshake(
    server_id: Arc<Identity>,
    server_accepts: Arc<dyn PeerVerifier>,
    client_id: Arc<Identity>,
    client_accepts: Arc<dyn PeerVerifier>,
) -> (
    Result<Option<cocoon_tls::Fingerprint>, String>,
    Result<Option<cocoon_tls::Fingerprint>, String>,
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

#[tokio::test]
async fn mutual_handshake_identifies_both_sides() {
    let s = Arc::new(Identity::ephemeral("server").unwrap());
    let c = Arc::new(Identity::ephemeral("client").unwrap());
    let (client, server) = handshake(
        s.clone(),
        Arc::new(PinnedPeers::new([c.fingerprint()])),
        c.clone(),
        Arc::new(PinnedPeers::new([s.fingerprint()])),
    )
    .await;
    assert_eq!(client.unwrap(), Some(s.fingerprint()));
    assert_eq!(server.unwrap(), Some(c.fingerprint()));
}

#[tokio::test]
async fn client_refuses_unpinned_server() {
    let s = Arc::new(Identity::ephemeral("impostor").unwrap());
    let real = Identity::ephemeral("real").unwrap();
    let c = Arc::new(Identity::ephemeral("client").unwrap());
    let (client, _server) = handshake(
        s,
        Arc::new(AnyPeer),
        c,
        Arc::new(PinnedPeers::new([real.fingerprint()])),
    )
    .await;
    let err = client.unwrap_err();
    assert!(err.contains("NotPinned"), "{err}");
}

#[tokio::test]
async fn server_refuses_unpinned_client() {
    let s = Arc::new(Identity::ephemeral("server").unwrap());
    let c = Arc::new(Identity::ephemeral("stranger").unwrap());
    let other = Identity::ephemeral("friend").unwrap();
    let (_client, server) = handshake(
        s,
        Arc::new(PinnedPeers::new([other.fingerprint()])),
        c,
        Arc::new(AnyPeer),
    )
    .await;
    let err = server.unwrap_err();
    assert!(err.contains("NotPinned"), "{err}");
}
