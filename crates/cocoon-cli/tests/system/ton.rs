//! The network settling on TON: `cocoon dev --ledger ton` configures the proxy, the worker and
//! the gateway with `ledger = "ton:<root>@<API>"`, and every payment goes through the committed
//! contracts on a local emulated chain, as wallet v5 requests over the toncenter API. Bills name
//! the client's contract by its account id and the gateway verifies them; the proxy's batched
//! charges land on the client contract; the worker claims its payouts on its own contract and
//! withdraws them with the CLI; a restarted proxy checks its record against the contracts.

use std::time::Duration;

use crate::common::*;
use cocoon_cli::money::{key_party, open_ledger};
use cocoon_ledger::{Address, ContractState, Ledger, PaymentMessage, SignedMessage};
use cocoon_testkit::dev::ledger::{CLIENT_DEPOSIT, CLIENT_STAKE, dev_params};
use cocoon_testkit::dev::{DevLedgerKind, DevNetwork, DevOptions};
use serde_json::{Value, json};

async fn ask(http: &reqwest::Client, net: &DevNetwork, content: &str) -> Value {
    let answer = post_json(
        http,
        format!("{}/chat/completions", net.gateway_url()),
        &chat_body(content, json!({"max_tokens": 4, "temperature": 0})),
    )
    .await;
    assert_eq!(
        answer["usage"]["bill_verified"], true,
        "the gateway checks the bill against its TON contract: {answer}"
    );
    answer
}

/// The chain as the party of `key_file` sees it.
async fn as_party(net: &DevNetwork, key_file: &str) -> std::sync::Arc<dyn Ledger> {
    let (wallet, key) = key_party(&net.dir().join(key_file)).unwrap();
    open_ledger(net.ledger_url().unwrap(), wallet, &key)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_settle_on_the_ton_contracts() {
    let mut net = DevNetwork::start(
        DevOptions {
            ledger: DevLedgerKind::Ton,
            commit_interval_secs: 1,
            ..test_options()
        },
        vec![llama()],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(30)).await.unwrap();
    let spec = net.ledger_url().unwrap().to_owned();
    assert!(spec.starts_with("ton:0:"), "{spec}");
    let http = reqwest::Client::new();
    let (proxy, client, worker) = (
        net.proxy_key().unwrap(),
        net.client_key(),
        net.worker_key(0),
    );
    let price = dev_params().price_per_token;
    let chain = as_party(&net, "client.key").await;
    let on_chain = chain.client_address(&proxy, &client).await.unwrap();
    assert_ne!(on_chain, Address::client(&proxy, &client));

    let mut billed = 0;
    for question in ["What is 2+2?", "Name a colour."] {
        let answer = ask(&http, &net, question).await;
        let bill = &answer["usage"]["billing"];
        billed += bill["billed_tokens"].as_u64().unwrap();
        assert_eq!(bill["tokens_used"], billed);
        let charge = SignedMessage(hex::decode(bill["charge"].as_str().unwrap()).unwrap());
        let PaymentMessage::ChargeClient { contract, .. } = charge
            .verify(&proxy, cocoon_ton::local::LOCAL_NETWORK)
            .unwrap()
        else {
            panic!("not a charge");
        };
        assert_eq!(contract, on_chain, "charges name the contract's account id");
    }

    // The proxy's batched commit reaches the client contract on the chain.
    wait_until("charges committed", Duration::from_secs(30), || {
        net.proxy_status()
            .payments
            .is_some_and(|p| p.uncommitted_tokens == 0 && p.commits >= 1)
    })
    .await;
    let contract = chain.client(proxy, client).await.unwrap().unwrap();
    assert_eq!(contract.tokens_used, billed);
    assert_eq!(
        contract.balance,
        CLIENT_DEPOSIT - u128::from(billed) * price
    );
    assert_eq!(
        (contract.stake, contract.state),
        (CLIENT_STAKE, ContractState::Normal)
    );

    // The worker claims its payout on its own contract, then withdraws with the CLI.
    let mine = as_party(&net, "dev-worker-0.key").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let earned = loop {
        let view = mine.proxy_view(proxy, &[], &[worker]).await.unwrap();
        let at = mine.worker_address(&proxy, &worker).await.unwrap();
        // The claim is confirmed on the chain and marked in the worker's file: the CLI below
        // sends from the same wallet, so it must not race the claim for the seqno.
        let kept: Value = serde_json::from_slice(
            &std::fs::read(net.dir().join("dev-worker-0-payouts.json")).unwrap_or_default(),
        )
        .unwrap_or(Value::Null);
        let marked = kept[hex::encode(proxy)]["claimed"] == billed;
        if let Some(w) = view
            .workers
            .get(&at)
            .filter(|w| marked && w.tokens_paid == billed)
        {
            assert_eq!(
                w.balance,
                u128::from(billed) * dev_params().worker_fee_per_token
            );
            break w.balance;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "payout never claimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let config = dev_worker_config(&net, &spec);
    let report = cocoon_report(&["worker", "-c", config.to_str().unwrap(), "withdraw"]).await;
    assert_eq!(
        report["withdrawn_ton"][hex::encode(proxy)],
        cocoon_cli::money::format_ton(earned)
    );

    // The client's CLI reads the same contract from the chain.
    let client_config = net.write_client_config().unwrap();
    let report = cocoon_report(&["client", "balance", "-c", client_config.to_str().unwrap()]).await;
    assert_eq!(report["contract"], on_chain.to_string());
    assert_eq!(report["tokens_used"], billed);

    // A restarted proxy checks its record against the contracts it knows, and serves on.
    net.restart_proxy().await.unwrap();
    net.wait_ready(1, Duration::from_secs(30)).await.unwrap();
    let answer = ask(&http, &net, "Say hello.").await;
    assert!(answer["usage"]["billing"]["tokens_used"].as_u64().unwrap() > billed);
    net.shutdown().await;
}
