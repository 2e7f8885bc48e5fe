//! Steering a running proxy: a reload of its configuration file (what `cocoon proxy` does on
//! SIGHUP, and `POST /reload` on the operator's listener) admits a newly pinned worker while a
//! stream goes on, keeps the old configuration when the new one is bad, and lets go of a
//! worker no longer pinned once its answer ends; the operator disables and enables a worker.

use std::sync::Arc;
use std::time::Duration;

use cocoon_client::{ClientConfig, Gateway};
use cocoon_proxy::{AdminConfig, Proxy, ProxyConfig};
use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::keys::LEDGERS;
use cocoon_testkit::http::wait_until_async;
use cocoon_tls::{Identity, PeerPolicy};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A worker pinned by key (no attestation on this network), serving `backend` for the proxy
/// at `addr` whose key is `proxy`.
fn worker(
    identity: &Arc<Identity>,
    backend: &Arc<Scripted>,
    addr: &str,
    proxy: &str,
) -> cocoon_worker::Worker {
    let pinned = PeerPolicy {
        fingerprints: vec![proxy.to_owned()],
        ..PeerPolicy::default()
    }
    .build("proxy_policy", "proxy")
    .unwrap();
    cocoon_worker::Worker::new(
        "w",
        addr,
        backend.clone() as Arc<dyn cocoon_engine::Backend>,
        identity.clone(),
        pinned,
        Duration::from_millis(100),
    )
}

fn proxy_config(dir: &std::path::Path, pins: &[String]) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".into(),
        key_file: Some(dir.join("proxy.key")),
        worker_policy: PeerPolicy {
            fingerprints: pins.to_vec(),
            ..PeerPolicy::default()
        },
        client_policy: PeerPolicy {
            insecure_accept_any_peer: true,
            ..PeerPolicy::default()
        },
        admin: AdminConfig {
            listen: Some("127.0.0.1:0".into()),
            token_file: None,
        },
        ..ProxyConfig::default()
    }
}

/// Worker keys, one per name, kept in `dir`.
fn identities(dir: &std::path::Path, names: &[&str]) -> Vec<Arc<Identity>> {
    names
        .iter()
        .map(|n| {
            Arc::new(
                Identity::load_or_create(&dir.join(format!("{n}.key")), "cocoon-worker").unwrap(),
            )
        })
        .collect()
}

/// A proxy running until `stop`: where it listens, its operator's listener, its key, its
/// controls.
struct Running {
    addr: String,
    admin: String,
    fingerprint: String,
    controls: cocoon_proxy::Controls,
}

fn start(proxy: Proxy, stop: &CancellationToken) -> Running {
    let running = Running {
        addr: proxy.local_addr().to_string(),
        admin: format!("http://{}", proxy.admin_addr().unwrap()),
        fingerprint: proxy.fingerprint().to_string(),
        controls: proxy.controls(),
    };
    tokio::spawn(proxy.run(stop.clone()));
    running
}

/// A gateway (no payments, requests in clear) to the proxy at `addr` with key `proxy`, until
/// `stop`; its chat completions URL.
async fn gateway(addr: &str, proxy: &str, stop: &CancellationToken) -> String {
    let gateway = Gateway::bind(
        &ClientConfig {
            listen: "127.0.0.1:0".into(),
            proxy_addr: addr.to_owned(),
            proxy_policy: PeerPolicy {
                fingerprints: vec![proxy.to_owned()],
                ..PeerPolicy::default()
            },
            ..ClientConfig::default()
        },
        LEDGERS,
    )
    .await
    .unwrap();
    let chat = format!("http://{}/v1/chat/completions", gateway.local_addr());
    tokio::spawn(gateway.run(stop.clone()));
    chat
}

/// A reload admits a newly pinned worker with no restart while a stream to the first goes on;
/// a bad file (one that does not parse, one that changes the listener) is refused with the
/// reason and the configuration in force stays; unpinning the first lets it go once its
/// answer ends, and the operator can disable and enable a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_admits_a_new_pin_while_streams_go_on_and_a_bad_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(dir.path(), &["a", "b"]);
    let fp = |i: usize| ids[i].fingerprint().to_string();
    let file = dir.path().join("proxy.toml");
    let write = |config: &ProxyConfig| {
        std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    };
    let config = proxy_config(dir.path(), &[fp(0)]);
    write(&config);
    let proxy = Proxy::bind(&config, LEDGERS)
        .await
        .unwrap()
        .with_config_file(file.clone());
    let stop = CancellationToken::new();
    let Running {
        addr,
        admin,
        fingerprint: proxy_fp,
        ..
    } = start(proxy, &stop);
    let (first, second) = (Scripted::new(2048), Scripted::new(2048));
    for (i, backend) in [&first, &second].into_iter().enumerate() {
        tokio::spawn(worker(&ids[i], backend, &addr, &proxy_fp).run(stop.clone()));
    }
    let chat = gateway(&addr, &proxy_fp, &stop).await;
    let http = reqwest::Client::new();
    let status = || async {
        reqwest::get(format!("{admin}/status"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let connected = |s: &Value, i: usize| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["fingerprint"] == fp(i))
    };
    wait_until_async("the pinned worker joins", || async {
        connected(&status().await, 0)
    })
    .await;
    // The unpinned worker keeps knocking and is refused each time.
    wait_until_async("the unpinned worker's refusal", || async {
        status().await["recent_refusals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["fingerprint"] == fp(1))
    })
    .await;
    assert!(!connected(&status().await, 1), "an unpinned worker joined");

    // A stream to the first worker, 20 tokens 100 ms apart.
    first.pace(Duration::from_millis(100));
    let stream = {
        let (http, chat) = (http.clone(), chat.clone());
        tokio::spawn(async move {
            let body =
                cocoon_testkit::http::chat_body("hi", json!({"max_tokens": 20, "stream": true}));
            let answer = http.post(&chat).json(&body).send().await.unwrap();
            assert_eq!(answer.status(), 200);
            answer.text().await.unwrap()
        })
    };
    wait_until_async("the stream started", || async {
        status().await["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["fingerprint"] == fp(0) && w["in_flight"] == 1)
    })
    .await;

    // Pin the second: it joins with no restart while the stream goes on.
    write(&proxy_config(dir.path(), &[fp(0), fp(1)]));
    let reload = |http: reqwest::Client| {
        let url = format!("{admin}/reload");
        async move {
            let answer = http.post(url).send().await.unwrap();
            (
                answer.status().as_u16(),
                answer.json::<Value>().await.unwrap(),
            )
        }
    };
    let (code, body) = reload(http.clone()).await;
    assert_eq!(
        (code, &body["reloaded"]),
        (200, &json!(["worker_policy"])),
        "{body}"
    );
    wait_until_async("the newly pinned worker joins", || async {
        connected(&status().await, 1)
    })
    .await;
    assert!(
        !stream.is_finished(),
        "the stream ended before the reload was done"
    );

    // Bad files change nothing: one that does not parse, one that moves the listener.
    std::fs::write(&file, "listen = [").unwrap();
    let (code, body) = reload(http.clone()).await;
    assert_eq!(code, 400, "{body}");
    let mut moved = proxy_config(dir.path(), &[fp(1)]);
    moved.listen = "127.0.0.1:1".into();
    write(&moved);
    let (code, body) = reload(http.clone()).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("listen changed"),
        "{body}"
    );
    let s = status().await;
    assert!(connected(&s, 0) && connected(&s, 1), "{s}");

    // Unpin the first: it gets nothing new, its answer ends in full, then it is let go.
    write(&proxy_config(dir.path(), &[fp(1)]));
    assert_eq!(reload(http.clone()).await.0, 200);
    let answered = stream.await.unwrap();
    assert!(
        answered.contains("\"finish_reason\":\"length\""),
        "{answered}"
    );
    assert!(answered.trim_end().ends_with("data: [DONE]"), "{answered}");
    wait_until_async("the unpinned worker is let go", || async {
        !connected(&status().await, 0)
    })
    .await;
    first.pace(Duration::ZERO);
    let before = second.served();
    let ask = || async {
        http.post(&chat)
            .json(&cocoon_testkit::http::chat_body(
                "hi",
                json!({"max_tokens": 1}),
            ))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ask().await, 200);
    assert_eq!(second.served(), before + 1);

    // The operator disables the second: nothing is routed to it (and it stays disabled),
    // until enabled again.
    let control = |action: &'static str| {
        let (http, admin, worker) = (http.clone(), admin.clone(), fp(1));
        async move {
            http.post(format!("{admin}/workers/{worker}/{action}"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(control("disable").await["connected"], 1);
    let s = status().await;
    assert_eq!(s["workers"][0]["disabled"], true, "{s}");
    assert_eq!(ask().await, 503);
    assert_eq!(second.served(), before + 1);
    control("enable").await;
    assert_eq!(ask().await, 200);
    assert_eq!(second.served(), before + 2);
    // A page elsewhere cannot steer the proxy through the operator's browser.
    let forged = http
        .post(format!("{admin}/workers/{}/disable", fp(1)))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let rebound = http
        .get(format!("{admin}/status"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    assert_eq!(status().await["workers"][0]["disabled"], false);
    stop.cancel();
}

/// The proxy's operator status at `admin`.
async fn admin_status(admin: &str) -> Value {
    reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()
}

/// Whether the status `s` shows the worker `fingerprint` connected, neither disabled nor
/// leaving: routed new requests.
fn routable(s: &Value, fingerprint: &str) -> bool {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["fingerprint"] == fingerprint && w["disabled"] != true && w["leaving"] != true)
}

/// REVIEW, fixed: a reload re-checks only the workers already in the market, but a worker is
/// admitted (`Admission::worker`, right after its handshake) before its hello, and joins the
/// market only after the hello and the registry's checks (each an await, the hello up to 10
/// s). A worker whose connection passed the old policy and that holds its hello back until
/// the reload is done joins afterwards under the old policy, is never re-checked, and is
/// routed prompts though the policy in force no longer admits it. A worker about to be
/// unpinned (say, found to be leaking prompts) keeps a fresh connection in that state at all
/// times, so removing its pin never takes. Here worker A, pinned, stalls its hello; the
/// operator unpins it (pinning B instead); A then says hello and is in the market, enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_worker_admitted_before_a_reload_joins_after_it_unchecked() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(dir.path(), &["a", "b"]);
    let fp = |i: usize| ids[i].fingerprint().to_string();
    let proxy = Proxy::bind(&proxy_config(dir.path(), &[fp(0)]), LEDGERS)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let Running {
        addr,
        admin,
        fingerprint: proxy_fp,
        controls,
    } = start(proxy, &stop);

    // Worker A by hand: it answers the proxy's hello only once released.
    let (asked, released, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let proxy_policy = PeerPolicy {
        fingerprints: vec![proxy_fp.clone()],
        ..PeerPolicy::default()
    }
    .build("proxy_policy", "proxy")
    .unwrap();
    let tls = cocoon_tls::client_config(
        ids[0].clone(),
        proxy_policy,
        &[cocoon_protocol::ALPN_WORKER],
    );
    let conn = cocoon_net::connect_tls(&addr, tls).await.unwrap();
    {
        let (asked, released, answered) = (asked.clone(), released.clone(), answered.clone());
        tokio::spawn(cocoon_net::serve_h2(
            conn,
            None,
            move |req: http::Request<hyper::body::Incoming>| {
                let (asked, released, answered) =
                    (asked.clone(), released.clone(), answered.clone());
                async move {
                    if req.uri().path() != cocoon_protocol::paths::HELLO {
                        return cocoon_net::no_route(req.method(), req.uri().path());
                    }
                    asked.store(true, Ordering::SeqCst);
                    while !released.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let hello = cocoon_protocol::WorkerHello {
                        protocol_version: cocoon_protocol::PROTOCOL_VERSION,
                        name: "late".into(),
                        models: cocoon_testkit::backends::model_card(2048),
                        capacity: 4,
                        certificate: None,
                        draining: false,
                    };
                    answered.store(true, Ordering::SeqCst);
                    cocoon_net::response(http::StatusCode::OK, cocoon_net::json(&hello))
                }
            },
        ));
    }
    // The proxy admitted A under the policy in force and waits for its hello.
    wait_until_async("the proxy asks A's hello", || async {
        asked.load(Ordering::SeqCst)
    })
    .await;
    // The operator unpins A.
    assert_eq!(
        controls.reload(proxy_config(dir.path(), &[fp(1)])),
        Ok(vec!["worker_policy"])
    );
    released.store(true, Ordering::SeqCst);
    wait_until_async("A answers its hello", || async {
        answered.load(Ordering::SeqCst)
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let s = admin_status(&admin).await;
        assert!(
            !routable(&s, &fp(0)),
            "a worker the policy in force does not admit joined after the reload and is routed \
             prompts: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
}

/// REVIEW, fixed: a reload "changes the client policy at once", but the client policy is checked
/// only when a connection is made: a client the reloaded policy no longer admits (a private
/// proxy's revoked key, an abusive client) keeps its open HTTP/2 connection and is served on
/// it, for as long as it sends a request within every idle timeout. Here a client pinned in
/// `[client_policy]` is served, the operator pins another key instead, and the first client's
/// next request on its connection is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_client_the_reloaded_policy_refuses_is_still_served() {
    use cocoon_protocol::{ChatMessage, GenerateRequest, Input, Role, SamplingParams};
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str, role: &str| {
        Arc::new(Identity::load_or_create(&dir.path().join(format!("{name}.key")), role).unwrap())
    };
    let (w, client, other) = (
        key("w", "cocoon-worker"),
        key("c", "cocoon-client"),
        key("o", "cocoon-client"),
    );
    let admitting = |client: &Arc<Identity>| ProxyConfig {
        client_policy: PeerPolicy {
            fingerprints: vec![client.fingerprint().to_string()],
            ..PeerPolicy::default()
        },
        ..proxy_config(dir.path(), &[w.fingerprint().to_string()])
    };
    let proxy = Proxy::bind(&admitting(&client), LEDGERS).await.unwrap();
    let stop = CancellationToken::new();
    let Running {
        addr,
        admin,
        fingerprint: proxy_fp,
        controls,
    } = start(proxy, &stop);
    let backend = Scripted::new(2048);
    tokio::spawn(worker(&w, &backend, &addr, &proxy_fp).run(stop.clone()));
    wait_until_async("the worker joins", || async {
        routable(&admin_status(&admin).await, &w.fingerprint().to_string())
    })
    .await;

    let verifier = PeerPolicy {
        fingerprints: vec![proxy_fp.clone()],
        ..PeerPolicy::default()
    }
    .build("proxy_policy", "proxy")
    .unwrap();
    let tls = cocoon_tls::client_config(client.clone(), verifier, &[cocoon_protocol::ALPN_CLIENT]);
    let conn = cocoon_net::connect_tls(&addr, tls).await.unwrap();
    let (channel, driver) = cocoon_net::Channel::handshake(conn).await.unwrap();
    tokio::spawn(driver);
    let request = GenerateRequest {
        model: cocoon_testkit::backends::MODEL.into(),
        input: Input::Chat {
            messages: vec![ChatMessage::new(Role::User, "hi")],
            tools: None,
        },
        params: SamplingParams::default(),
        max_price: None,
        cache_scope: None,
    };
    let mut answer = channel.generate(&request, None).await.unwrap();
    while let Some(event) = answer.next().await {
        event.unwrap();
    }
    assert_eq!(backend.served(), 1);

    // The operator admits another client key instead.
    assert_eq!(
        controls.reload(admitting(&other)),
        Ok(vec!["client_policy"])
    );
    let after = channel.generate(&request, None).await;
    assert!(
        after.is_err(),
        "a client the client policy in force does not admit was served on its open connection"
    );
    assert_eq!(backend.served(), 1, "its prompt reached a worker");
    stop.cancel();
}

/// REVIEW, fixed: a worker the reloaded policy no longer admits is only marked `disabled` (the same
/// flag as the operator's), and `POST /workers/<fp>/enable` clears that flag whatever set it:
/// the worker is routed new prompts again, though no policy admits it, until some moment its
/// answers all end (under steady traffic, never). The status shows both as `disabled: true`,
/// so an operator re-enabling "their" disabled workers cannot tell. Here A is unpinned while
/// a stream to it goes on; the operator enables A; a new request is sent to A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_enabling_a_worker_the_reloaded_policy_refuses_routes_it_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let ids = identities(dir.path(), &["a", "b"]);
    let fp = |i: usize| ids[i].fingerprint().to_string();
    let proxy = Proxy::bind(&proxy_config(dir.path(), &[fp(0)]), LEDGERS)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let Running {
        addr,
        admin,
        fingerprint: proxy_fp,
        controls,
    } = start(proxy, &stop);
    let first = Scripted::new(2048);
    tokio::spawn(worker(&ids[0], &first, &addr, &proxy_fp).run(stop.clone()));
    let chat = gateway(&addr, &proxy_fp, &stop).await;
    let http = reqwest::Client::new();
    wait_until_async("A joins", || async {
        routable(&admin_status(&admin).await, &fp(0))
    })
    .await;

    // A stream to A, 20 tokens 100 ms apart.
    first.pace(Duration::from_millis(100));
    let _stream = {
        let (http, chat) = (http.clone(), chat.clone());
        tokio::spawn(async move {
            let body =
                cocoon_testkit::http::chat_body("hi", json!({"max_tokens": 20, "stream": true}));
            let _ = http
                .post(&chat)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await;
        })
    };
    wait_until_async("the stream started", || async {
        admin_status(&admin).await["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["fingerprint"] == fp(0) && w["in_flight"] == 1)
    })
    .await;

    // A is unpinned: it gets nothing new...
    assert_eq!(
        controls.reload(proxy_config(dir.path(), &[fp(1)])),
        Ok(vec!["worker_policy"])
    );
    assert!(!routable(&admin_status(&admin).await, &fp(0)));
    // ...until the operator enables it.
    let enabled: Value = http
        .post(format!("{admin}/workers/{}/enable", fp(0)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(enabled["connected"], 1, "{enabled}");
    let before = first.served();
    let code = http
        .post(&chat)
        .json(&cocoon_testkit::http::chat_body(
            "a new prompt",
            json!({"max_tokens": 1}),
        ))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(
        first.served(),
        before,
        "a worker no policy admits was sent a new prompt after the operator's enable (answer \
         {code})"
    );
    stop.cancel();
}
