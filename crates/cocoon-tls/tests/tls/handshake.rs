//! Real mutual TLS 1.3 handshakes over loopback TCP.

use std::sync::Arc;

use crate::common::handshake;
use cocoon_tls::{AnyPeer, Identity, PinnedPeers};

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
