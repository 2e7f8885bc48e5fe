//! The gateway's failover between proxies: a proxy on its list that cannot be reached is
//! passed over and shown as down in `GET /v1/network`, and the one that answers serves.

use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::network;
use cocoon_testkit::http::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_several_proxies_fails_over_to_the_one_that_answers() {
    let b = Scripted::new(2048);
    let net = network(vec![b.clone()]).await;
    // The first proxy on the list is down (bound, never listening: refused at once); the
    // second is the network's.
    let dead_port = DeadPort::bind();
    let dead = dead_port.addr.clone();
    let stop = CancellationToken::new();
    let proxies = [dead.clone(), net.proxy_addr.to_string()];
    let url = net
        .own_gateway(&proxies, net.dir().join("client.key"), &stop)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let answer = post_json(
            &http,
            format!("{url}/chat/completions"),
            &chat_body("Hi", json!({"max_tokens": 2})),
        )
        .await;
        assert_eq!(answer["choices"][0]["message"]["content"], "tt", "{answer}");
        assert_eq!(answer["usage"]["bill_verified"], true);
    }
    assert_eq!(b.served(), 3);
    let view = get_json(&http, format!("{url}/network")).await;
    let proxies = view["proxies"].as_array().unwrap();
    assert_eq!(proxies[0]["addr"], dead.as_str());
    assert_eq!(proxies[0]["state"], "down", "{view}");
    assert!(
        proxies[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot reach proxy")
    );
    assert_eq!(proxies[1]["state"], "up");
    assert_eq!(proxies[1]["answers"], 3);
    assert_eq!(view["via"], net.proxy_addr.to_string());
    assert_eq!(view["network"]["load"]["workers"], 1, "{view}");
    stop.cancel();
}
