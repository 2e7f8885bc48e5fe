//! The ledger as a service: signed transactions over HTTP, refused when forged or replayed, and
//! refusals that read the same as the embedded ledger's.

use std::sync::Arc;

use crate::common::*;
use cocoon_ledger::{EmbeddedLedger, Ledger, LedgerError, Op, RemoteLedger, Tx, Wallet};

struct Served {
    url: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(owner: PublicKey) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(
        EmbeddedLedger::open_network(&dir.path().join("ledger.redb"), owner, NET).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cocoon_ledger::service::serve(
        ledger,
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Served {
        url,
        _dir: dir,
        _stop: stop,
    }
}

fn wallet(seed: u8) -> Arc<Wallet> {
    Arc::new(Wallet::new(keypair(seed)))
}

use cocoon_ledger::PublicKey;

fn signed(w: &Wallet, op: Op) -> Tx {
    Tx {
        sender: w.public_key(),
        op,
        now: 0,
    }
}

#[tokio::test]
async fn signed_operations_over_http() {
    let owner = wallet(1);
    let proxy = wallet(9);
    let client = wallet(2);
    let served = serve(owner.public_key()).await;
    let as_owner = RemoteLedger::new(&served.url, Some(owner.clone()));
    let as_proxy = RemoteLedger::new(&served.url, Some(proxy.clone()));
    let as_client = RemoteLedger::new(&served.url, Some(client.clone()));

    as_owner
        .execute(signed(&owner, Op::SetParams { params: params() }))
        .await
        .unwrap();
    as_owner
        .execute(signed(
            &owner,
            Op::RegisterProxy {
                key: proxy.public_key(),
                address: "127.0.0.1:1".into(),
            },
        ))
        .await
        .unwrap();
    // Only the owner changes the registry: the refusal crosses the wire intact.
    let e = as_client
        .execute(signed(&client, Op::SetParams { params: params() }))
        .await
        .unwrap_err();
    assert_eq!(e, LedgerError::NotOwner);

    as_proxy
        .execute(signed(&proxy, Op::ProxyOpen { stake: 100 * TON }))
        .await
        .unwrap();
    let receipt = as_client
        .execute(signed(
            &client,
            Op::ClientDeposit {
                proxy: proxy.public_key(),
                amount: 20 * TON,
            },
        ))
        .await
        .unwrap();
    assert_eq!(receipt.deposited, 20 * TON);
    let contract = as_client
        .client(proxy.public_key(), client.public_key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(contract.balance, 20 * TON);
    // Nobody else can be the sender of a wallet's transactions.
    let e = as_client
        .execute(signed(&owner, Op::ProxyClose))
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::BadTransaction(_)), "{e:?}");

    let read_only = RemoteLedger::new(&served.url, None);
    assert_eq!(read_only.params().await.unwrap(), params());
    assert_eq!(read_only.network().await.unwrap(), NET);
    let state = read_only.snapshot().await.unwrap();
    assert_eq!(state.held(), 120 * TON);
    assert_eq!(state.deposited - state.paid_out, state.held());
}

#[tokio::test]
async fn replayed_forged_and_malformed_transactions_are_refused() {
    let owner = wallet(1);
    let served = serve(owner.public_key()).await;
    let http = reqwest::Client::new();
    let url = format!("{}{}", served.url, cocoon_ledger::service::paths::TX);
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let allow = |n: u64| {
        owner.sign_with_nonce(
            Op::AllowModel {
                hash: format!("{n:064x}"),
            },
            n,
            NET,
        )
    };
    let first = serde_json::to_value(allow(10)).unwrap();
    assert_eq!(post(first.clone()).await.0, 200);
    // The same transaction again.
    let (status, body) = post(first).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "stale_nonce", "{body}");
    // An older nonce.
    let (_, body) = post(serde_json::to_value(allow(9)).unwrap()).await;
    assert_eq!(body["error"]["code"], "stale_nonce");
    // The owner's genuine transaction, signed for another network (a test ledger the same key
    // uses, say): refused, and it does not spend the nonce here.
    let elsewhere = owner.sign_with_nonce(
        Op::AllowModel {
            hash: "cd".repeat(32),
        },
        20,
        cocoon_ledger::Network::basechain(8),
    );
    let (status, body) = post(serde_json::to_value(&elsewhere).unwrap()).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "bad_transaction", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("network 8"),
        "{body}"
    );
    // A signature over another body.
    let mut forged = serde_json::to_value(allow(11)).unwrap();
    forged["signature"] = serde_json::to_value(allow(12).signature).unwrap();
    let (_, body) = post(forged).await;
    assert_eq!(body["error"]["code"], "bad_transaction", "{body}");
    // A refused operation still spends its nonce: it cannot be replayed later.
    let stranger = wallet(5);
    let refused = stranger.sign_with_nonce(Op::ProxyOpen { stake: TON }, 7, NET);
    let (_, body) = post(serde_json::to_value(&refused).unwrap()).await;
    assert_eq!(body["error"]["code"], "unknown_proxy");
    let (_, body) = post(serde_json::to_value(&refused).unwrap()).await;
    assert_eq!(body["error"]["code"], "stale_nonce");
    // Not JSON, and over the size limit.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![b' '; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // Only the first allowed model made it.
    let state = RemoteLedger::new(&served.url, None)
        .snapshot()
        .await
        .unwrap();
    assert_eq!(state.registry.models.len(), 1);
}
