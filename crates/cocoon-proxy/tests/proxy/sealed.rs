//! Sealed requests end to end (issue 22): the gateway encrypts each request to workers it
//! verified itself, so the proxy routes and bills what it cannot read.
//!
//! - The proxy is blind: a string in the prompt and one in the answer never appear in any byte
//!   the proxy reads or writes after TLS (a wire tap on every connection), in its logs, or in
//!   anything the network stores; the same request in clear shows both, so the tap can see.
//! - A request sealed for one worker, handed by a lying proxy to another, does not open there.
//! - A worker the gateway's policy refuses (weights not listed) is never sent a request.
//! - The worker's signed receipt comes with the answer, matches the bill, and is kept.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_client::SealingConfig;
use cocoon_engine::Backend;
use cocoon_protocol::{
    CandidateQuery, ChatMessage, GenerateEvent, GenerateRequest, Input, RequestId, Role,
    SamplingParams, SealedHeader, UsageBounds,
};
use cocoon_testkit::backends::{Echo, MODEL, Scripted};
use cocoon_testkit::dev::{DevNetwork, DevOptions, ProxyTap, test_options};
use cocoon_testkit::http::*;
use serde_json::{Value, json};

/// In the prompt, in small letters; the echo worker answers it in capitals.
const PROMPT_CANARY: &str = "canary-prompt-7f3a9";
/// What the echo worker's answer holds and the prompt does not.
const ANSWER_CANARY: &str = "CANARY-ANSWER-C41E2";

/// Every byte the proxy read or wrote after TLS.
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<u8>>>);

impl Wire {
    fn tap(&self) -> ProxyTap {
        let seen = self.0.clone();
        ProxyTap(Arc::new(move |_, bytes: &[u8]| {
            seen.lock().unwrap().extend_from_slice(bytes)
        }))
    }

    fn holds(&self, needle: &str) -> bool {
        contains(&self.0.lock().unwrap(), needle)
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// What a logger writes, kept for the test to search.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every file under `dir` that holds `needle`.
fn stored(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if std::fs::read(&path).is_ok_and(|b| contains(&b, needle)) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

async fn echo_network(sealed: bool, wire: &Wire) -> DevNetwork {
    let net = DevNetwork::start(
        DevOptions {
            sealed,
            proxy_tap: Some(wire.tap()),
            ..test_options()
        },
        vec![Arc::new(Echo) as Arc<dyn Backend>],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    net
}

/// Asks for the canaries, streamed and not; each answer must hold the answer's canary.
async fn ask_for_canaries(net: &DevNetwork) {
    let http = reqwest::Client::new();
    let prompt = format!(
        "please repeat {PROMPT_CANARY} and {}",
        ANSWER_CANARY.to_lowercase()
    );
    let url = format!("{}/chat/completions", net.gateway_url());
    let answer = post_json(&http, &url, &chat_body(&prompt, json!({}))).await;
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains(ANSWER_CANARY), "{answer}");
    assert_eq!(answer["usage"]["bill_verified"], json!(true), "{answer}");
    let streamed = http
        .post(&url)
        .json(&chat_body(&prompt, json!({"stream": true})))
        .send()
        .await
        .unwrap();
    let events = sse_events(streamed).await;
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains(ANSWER_CANARY), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_sees_a_sealed_prompt_or_answer() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("cocoon_proxy=trace,cocoon_net=trace,cocoon_ledger=trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("this test's process has no logger yet");
    let wire = Wire::default();
    let net = echo_network(true, &wire).await;
    ask_for_canaries(&net).await;
    // The tap saw the requests go by, sealed, and the answers come back, sealed.
    assert!(
        wire.holds("\"recipients\""),
        "the tap saw no sealed request"
    );
    assert!(
        wire.holds("\"event\":\"sealed\""),
        "the tap saw no sealed answer"
    );
    for canary in [PROMPT_CANARY, ANSWER_CANARY] {
        assert!(!wire.holds(canary), "the proxy read {canary}");
        let logged = logs.0.lock().unwrap();
        assert!(
            !logged.is_empty(),
            "the proxy logged nothing: the capture is broken"
        );
        assert!(!contains(&logged, canary), "the proxy logged {canary}");
        let files = stored(net.dir(), canary);
        assert!(files.is_empty(), "{canary} is stored in {files:?}");
    }
}

/// The control: the same requests in clear, and the tap shows both canaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_request_is_read_by_the_proxy_which_is_why_requests_are_sealed() {
    let wire = Wire::default();
    let net = echo_network(false, &wire).await;
    ask_for_canaries(&net).await;
    assert!(wire.holds(PROMPT_CANARY));
    assert!(wire.holds(ANSWER_CANARY));
}

/// A client sealing by hand to a worker of the network, as its gateway would.
struct Sealer {
    link: cocoon_client::ProxyLink,
    to: Vec<Arc<cocoon_seal::Session>>,
}

async fn sealer(net: &DevNetwork) -> Sealer {
    use base64::Engine as _;
    let proxy = cocoon_tls::PeerPolicy {
        fingerprints: vec![net.proxy_fingerprint.to_string()],
        ..net.dev_policy()
    }
    .build("proxy_policy", "proxy")
    .unwrap();
    let identity = Arc::new(cocoon_tls::Identity::ephemeral("test-client").unwrap());
    let link = cocoon_client::ProxyLink::new(net.proxy_addr.to_string(), identity, proxy);
    let workers = net.dev_policy().build("worker_policy", "worker").unwrap();
    let offered = link
        .candidates(&CandidateQuery {
            model: MODEL.into(),
            max_price: None,
        })
        .await
        .unwrap();
    let to = offered
        .candidates
        .iter()
        .map(|c| {
            let der = base64::engine::general_purpose::STANDARD
                .decode(&c.certificate)
                .unwrap();
            let peer = cocoon_tls::PeerCertificate::parse(
                &rustls::pki_types::CertificateDer::from(der),
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
            let attested = workers.verify(&peer).unwrap().attestation.unwrap();
            let to = cocoon_seal::SealTo {
                worker: c.worker.clone(),
                encryption_key: attested.encryption_key.expect("workers name their key"),
                signing_key: peer.public_key.as_slice().try_into().unwrap(),
            };
            Arc::new(cocoon_seal::Session::new(to).unwrap())
        })
        .collect();
    Sealer { link, to }
}

fn request(text: &str) -> GenerateRequest {
    GenerateRequest {
        model: MODEL.into(),
        input: Input::Chat {
            messages: vec![ChatMessage::new(Role::User, text)],
            tools: None,
        },
        params: SamplingParams::default(),
        max_price: None,
        cache_scope: None,
    }
}

fn header(request: &GenerateRequest) -> SealedHeader {
    SealedHeader {
        request_id: RequestId(rand_id()),
        model: request.model.clone(),
        max_tokens: request.params.max_tokens,
        max_price: request.max_price,
        prompt_bound: UsageBounds::new(request, u32::MAX).prompt(),
        affinity: None,
        cache_hint: None,
    }
}

fn rand_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_handed_to_a_worker_outside_its_set_does_not_open_there() {
    let net = DevNetwork::start(
        DevOptions {
            payments: false,
            ..test_options()
        },
        vec![Arc::new(Echo) as Arc<dyn Backend>, Arc::new(Echo)],
    )
    .await
    .unwrap();
    net.wait_ready(2, Duration::from_secs(20)).await.unwrap();
    let s = sealer(&net).await;
    assert_eq!(s.to.len(), 2, "both workers are candidates");
    let (a, b) = (&s.to[0], &s.to[1]);
    let req = request("hello there");
    // Sealed for a alone, it is served by a and opens at the gateway.
    let (sealed, opener) =
        cocoon_seal::seal_request(header(&req), &req, std::slice::from_ref(a)).unwrap();
    let opener = Arc::new(Mutex::new(opener));
    let reader = opener.clone();
    let mut events = s
        .link
        .generate_sealed(&sealed, None)
        .await
        .unwrap()
        .with_unseal(Box::new(move |e| {
            reader
                .lock()
                .unwrap()
                .open(e)
                .map_err(cocoon_protocol::ProtocolError::from)
        }));
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event.unwrap().0 {
            GenerateEvent::Delta { text: t, .. } => text.push_str(&t),
            GenerateEvent::Done { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(text, "HELLO THERE");
    assert_eq!(
        opener.lock().unwrap().worker(),
        Some(a.to().worker.as_str())
    );
    // A proxy that hands it to b (its key entry renamed for b) gets a refusal, not an
    // answer: b cannot open what was sealed for a.
    let mut redirected = sealed.clone();
    redirected.recipients[0].worker = b.to().worker.clone();
    let refused = match s.link.generate_sealed(&redirected, None).await {
        Ok(_) => panic!("a worker outside the set answered"),
        Err(e) => e,
    };
    assert!(
        refused
            .message
            .contains(cocoon_protocol::NOT_SEALED_FOR_THIS_WORKER),
        "{}",
        refused.message
    );
}

/// A worker's configuration as `cocoon worker` measures it, serving the scripted model with
/// `weights`.
fn config_naming(weights: &str) -> cocoon_tls::MeasuredEvent {
    cocoon_tls::MeasuredEvent::config(
        json!({"role": "worker", "backends": [
            {"kind": "llama", "model_id": MODEL, "model_file": "m.gguf", "model_hash": weights}
        ]})
        .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serving_weights_the_gateway_does_not_list_is_never_sent_a_request() {
    let listed = Scripted::weights(2048, "listed weights");
    let other = Scripted::weights(2048, "other weights");
    let mut net = DevNetwork::start(
        DevOptions {
            gateway_sealing: SealingConfig {
                model_hashes: vec![listed.model_hash().to_owned()],
                candidates_ttl_secs: 0,
                ..SealingConfig::default()
            },
            ..test_options()
        },
        Vec::new(),
    )
    .await
    .unwrap();
    let attester = net.dev_attester();
    for (name, backend) in [("listed", &listed), ("other", &other)] {
        let config = config_naming(backend.model_hash());
        net.add_measured_worker(name, backend.clone(), &attester, Some(config))
            .await
            .unwrap();
    }
    net.wait_ready(2, Duration::from_secs(20)).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    for _ in 0..6 {
        let answer = post_json(&http, &url, &chat_body("hi", json!({"max_tokens": 2}))).await;
        assert_eq!(answer["usage"]["bill_verified"], json!(true), "{answer}");
    }
    assert_eq!(listed.served(), 6);
    assert_eq!(other.served(), 0, "a refused worker was sent a request");
    // With the listed worker gone, the request is not sent at all, and the app is told why.
    net.stop_worker_until_gone(0).await;
    let refused = http
        .post(&url)
        .json(&chat_body("hi", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("[worker_policy]") && message.contains(other.model_hash()),
        "{message}"
    );
    assert_eq!(other.served(), 0);
}

/// The gateway's own policy decides who may read: a worker the proxy admits, but whose
/// measured configuration (part of its image hash, COCOON's: RTMR3) the gateway's
/// `[worker_policy]` does not list, is never sent a request, though its weights are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_image_the_gateway_does_not_allow_is_never_sent_a_request() {
    let (listed, other) = (Scripted::new(2048), Scripted::new(2048));
    let weights = listed.model_hash().to_owned();
    let configs = [
        config_naming(&weights),
        cocoon_tls::MeasuredEvent::config(
            json!({"role": "worker", "upstream": "https://elsewhere.example/v1", "backends": [
                {"kind": "llama", "model_id": MODEL, "model_file": "m.gguf", "model_hash": weights}
            ]})
            .to_string(),
        ),
    ];
    let mut net = DevNetwork::start(
        DevOptions {
            gateway_worker_config_hashes: vec![configs[0].config_hash()],
            ..test_options()
        },
        Vec::new(),
    )
    .await
    .unwrap();
    let attester = net.dev_attester();
    for ((name, backend), config) in [("listed", &listed), ("other", &other)]
        .into_iter()
        .zip(configs)
    {
        net.add_measured_worker(name, backend.clone(), &attester, Some(config))
            .await
            .unwrap();
    }
    net.wait_ready(2, Duration::from_secs(20)).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", net.gateway_url());
    for _ in 0..6 {
        let answer = post_json(&http, &url, &chat_body("hi", json!({"max_tokens": 2}))).await;
        assert_eq!(answer["usage"]["bill_verified"], json!(true), "{answer}");
    }
    assert_eq!((listed.served(), other.served()), (6, 0));
    net.stop_worker_until_gone(0).await;
    let refused = http
        .post(&url)
        .json(&chat_body("hi", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("[worker_policy]") && message.contains("configuration"),
        "{message}"
    );
    assert_eq!(other.served(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_receipt_matches_the_bill_and_is_kept() {
    let backend = Scripted::new(2048);
    let net = DevNetwork::start(test_options(), vec![backend.clone() as Arc<dyn Backend>])
        .await
        .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("hi", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    let id = response
        .headers()
        .get(cocoon_protocol::REQUEST_ID_HEADER)
        .expect("a sealed answer names its request")
        .to_str()
        .unwrap()
        .to_owned();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["usage"]["bill_verified"], json!(true), "{answer}");
    let receipt = get_json(&http, format!("{}/receipts/{id}", net.gateway_url())).await;
    assert_eq!(receipt["request_id"], json!(id));
    assert_eq!(
        receipt["usage"]["prompt_tokens"],
        answer["usage"]["prompt_tokens"]
    );
    assert_eq!(receipt["usage"]["completion_tokens"], json!(3));
    assert_eq!(receipt["model_hash"], json!(backend.model_hash()));
    assert_eq!(
        receipt["model_hash"],
        answer["usage"]["billing"]["model_hash"]
    );
    assert_eq!(receipt["signature"].as_str().map(str::len), Some(128));
    // An id the gateway never sent has none.
    let missing = http
        .get(format!(
            "{}/receipts/{}",
            net.gateway_url(),
            "00".repeat(16)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// Fails as an OpenAI-compatible server behind an upstream backend does when it rejects a
/// request: FastAPI's 422 (vLLM's too) echoes the offending field's input, and the upstream
/// backend's `upstream_error` passes the body on as the error's message. At once, or after a
/// first delta.
struct EchoingError {
    after_delta: bool,
}

impl Backend for EchoingError {
    fn models(&self) -> Vec<cocoon_protocol::ModelCard> {
        cocoon_testkit::backends::model_card(4096)
    }

    fn capacity(&self) -> u32 {
        4
    }

    fn generate(&self, request: GenerateRequest) -> cocoon_engine::EventStream {
        let prompt = match &request.input {
            Input::Chat { messages, .. } => messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            Input::Text { prompt } => prompt.clone(),
            Input::Embed { texts } => texts.join(" "),
        };
        let error = GenerateEvent::Error {
            error: cocoon_protocol::ProtocolError::invalid(format!(
                "upstream server answered 422: {{\"detail\":[{{\"type\":\"string_too_long\",\
                 \"loc\":[\"body\",\"messages\",0,\"content\"],\"input\":{prompt:?}}}]}}"
            )),
        };
        let events = if self.after_delta {
            vec![
                GenerateEvent::Delta {
                    text: "ok".into(),
                    tokens: 1,
                    logprobs: Vec::new(),
                },
                error,
            ]
        } else {
            vec![error]
        };
        Box::pin(futures_util::stream::iter(events))
    }

    fn stats(&self) -> cocoon_engine::StatsSnapshot {
        cocoon_engine::StatsSnapshot::default()
    }
}

/// REVIEW, fixed: a sealed answer's errors travel in clear (`AnswerSealer::seal` leaves an `Error`
/// out, and a first event that is an error becomes the worker's HTTP error response), with
/// the backend's message as it is; an upstream server's rejection quotes the request (the
/// upstream backend copies its body), so the proxy reads the sealed prompt in the error, at
/// once or mid-answer. Fix: for a sealed request the worker sends the proxy only the error's
/// kind and a fixed wording, and the message itself sealed (a chunk the gateway opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_backends_error_does_not_carry_the_sealed_prompt_to_the_proxy() {
    for after_delta in [false, true] {
        let wire = Wire::default();
        let net = DevNetwork::start(
            DevOptions {
                sealed: true,
                proxy_tap: Some(wire.tap()),
                ..test_options()
            },
            vec![Arc::new(EchoingError { after_delta }) as Arc<dyn Backend>],
        )
        .await
        .unwrap();
        net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
        let http = reqwest::Client::new();
        let prompt = format!("please repeat {PROMPT_CANARY}");
        let answer = http
            .post(format!("{}/chat/completions", net.gateway_url()))
            .json(&chat_body(&prompt, json!({})))
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        assert!(!status.is_success(), "the backend failed, yet: {body}");
        assert!(
            wire.holds("\"recipients\""),
            "the tap saw no sealed request"
        );
        assert!(
            !wire.holds(PROMPT_CANARY),
            "the proxy read the sealed prompt in the worker's error (after a delta: \
             {after_delta}); the app got {status}: {body}"
        );
        // The worker's own words reach the app, sealed past the proxy, in place of the ones
        // the proxy read (mid-answer, beside what the proxy says it billed).
        assert!(body.contains(PROMPT_CANARY), "{body}");
        assert!(!body.contains("sealed for the client's gateway"), "{body}");
        if after_delta {
            assert!(body.contains("delivered were billed"), "{body}");
        }
    }
}
