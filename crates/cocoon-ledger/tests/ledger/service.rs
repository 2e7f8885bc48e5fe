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

/// REVIEW, threat 1 (replay between two embedded ledgers of one owner): the same keys make the
/// same contract addresses on both (an embedded address has no network in it), so only the
/// network id tells them apart. A charge the proxy signed for ledger A and a transaction the
/// owner signed for A are refused on B, change nothing there, and do not spend B's nonce; each
/// applies on A. A ledger file cannot be reopened as another network. (Holds.)
#[tokio::test]
async fn review_two_ledgers_of_one_owner_refuse_each_others_messages() {
    let dir = tempfile::tempdir().unwrap();
    let owner = wallet(1);
    let proxy = keypair(9);
    let client = wallet(2);
    let open =
        |name: &str| EmbeddedLedger::open(&dir.path().join(name), owner.public_key()).unwrap();
    let (a, b) = (open("a.redb"), open("b.redb"));
    let (net_a, net_b) = (a.network().await.unwrap(), b.network().await.unwrap());
    assert_ne!(net_a, net_b, "two ledgers picked the same random id");
    for l in [&a, &b] {
        l.execute(tx(owner.public_key(), Op::SetParams { params: params() }))
            .await
            .unwrap();
        l.execute(tx(
            owner.public_key(),
            Op::RegisterProxy {
                key: public(&proxy),
                address: "127.0.0.1:10443".into(),
            },
        ))
        .await
        .unwrap();
        l.execute(tx(public(&proxy), Op::ProxyOpen { stake: 100 * TON }))
            .await
            .unwrap();
        l.execute(tx(
            client.public_key(),
            Op::ClientDeposit {
                proxy: public(&proxy),
                amount: 20 * TON,
            },
        ))
        .await
        .unwrap();
        l.execute(tx(
            client.public_key(),
            Op::ClientStake {
                proxy: public(&proxy),
                amount: 10 * TON,
            },
        ))
        .await
        .unwrap();
    }
    let contract = cocoon_ledger::Address::client(&public(&proxy), &client.public_key());
    let charge = cocoon_ledger::PaymentMessage::ChargeClient {
        query_id: 1,
        tokens_used: 1000,
        contract,
    }
    .sign(&proxy, net_a);
    let deliver = Op::Charge {
        proxy: public(&proxy),
        message: charge,
    };
    let refused = b.execute(tx(public(&proxy), deliver.clone())).await;
    assert!(
        matches!(&refused, Err(LedgerError::BadMessage(m)) if m.contains("signed for")),
        "{refused:?}"
    );
    let used = |s: &cocoon_ledger::LedgerState| s.clients[&contract].tokens_used;
    assert_eq!(used(&b.snapshot().await.unwrap()), 0, "B charged nothing");
    a.execute(tx(public(&proxy), deliver)).await.unwrap();
    assert_eq!(used(&a.snapshot().await.unwrap()), 1000);

    // The owner's transaction for A, nonce 5, replayed on B: refused, nonce 5 still free on B.
    let allow = |n: u64, net| {
        owner.sign_with_nonce(
            Op::AllowModel {
                hash: "ab".repeat(32),
            },
            n,
            net,
        )
    };
    let got = b.execute_signed(&allow(5, net_a), 1_000);
    assert!(
        matches!(got, Err(LedgerError::BadTransaction(_))),
        "{got:?}"
    );
    assert!(b.snapshot().await.unwrap().registry.models.is_empty());
    b.execute_signed(&allow(5, net_b), 1_000).unwrap();
    a.execute_signed(&allow(5, net_a), 1_000).unwrap();
    let again = a.execute_signed(&allow(5, net_a), 1_000);
    assert!(
        matches!(again, Err(LedgerError::StaleNonce { .. })),
        "{again:?}"
    );
    drop(a);
    let reopened =
        EmbeddedLedger::open_network(&dir.path().join("a.redb"), owner.public_key(), net_b);
    assert!(matches!(reopened, Err(LedgerError::Storage(_))));
}
