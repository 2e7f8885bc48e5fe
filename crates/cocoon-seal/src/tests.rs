//! Sealing and opening, and every way a proxy in the middle could try to read or bend them.

use cocoon_protocol::{
    ChatMessage, FinishReason, GenerateEvent, GenerateRequest, Input, RequestId, Role,
    SamplingParams, SealedHeader, Usage,
};
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::*;

struct Worker {
    name: String,
    keys: WorkerKeys,
    signer: Ed25519KeyPair,
}

fn worker(name: &str) -> Worker {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Worker {
        name: format!("{name:0>64}"),
        keys: WorkerKeys::generate(),
        signer: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
    }
}

/// A fresh session with `w`, as a gateway opens one per candidate it verified.
fn to(w: &Worker) -> std::sync::Arc<Session> {
    std::sync::Arc::new(
        Session::new(SealTo {
            worker: w.name.clone(),
            encryption_key: w.keys.public_key(),
            signing_key: w.signer.public_key().as_ref().try_into().unwrap(),
        })
        .unwrap(),
    )
}

fn request() -> GenerateRequest {
    GenerateRequest {
        model: "m".into(),
        input: Input::Chat {
            messages: vec![ChatMessage::new(
                Role::User,
                "CANARY-7f3a: the secret prompt",
            )],
            tools: None,
        },
        params: SamplingParams {
            max_tokens: Some(8),
            ..Default::default()
        },
        max_price: Some(100),
        cache_scope: None,
    }
}

fn header() -> SealedHeader {
    SealedHeader {
        request_id: RequestId([9; 16]),
        model: "m".into(),
        max_tokens: Some(8),
        max_price: Some(100),
        prompt_bound: cocoon_protocol::UsageBounds::new(&request(), u32::MAX).prompt(),
        affinity: None,
        cache_hint: None,
    }
}

/// The worker's answer for `sealer`: two deltas and its `Done`, the last with its receipt.
fn answer(w: &Worker, sealer: &mut AnswerSealer) -> Vec<GenerateEvent> {
    let mut out = Vec::new();
    for text in ["Hello", " CANARY-answer"] {
        out.push(
            sealer
                .seal(&GenerateEvent::Delta {
                    text: text.into(),
                    tokens: 1,
                    logprobs: Vec::new(),
                })
                .unwrap(),
        );
    }
    let usage = Usage::new(12, 2);
    let chunk = sealer
        .seal(&GenerateEvent::Done {
            finish_reason: FinishReason::Stop,
            usage,
            billing: None,
        })
        .unwrap();
    let receipt = sign_receipt(
        cocoon_protocol::Receipt {
            request_id: RequestId([9; 16]),
            worker: w.name.clone(),
            model: "m".into(),
            model_hash: None,
            answer_sha256: sealer.answer_sha256(),
            usage,
            signature: String::new(),
        },
        &w.signer,
    );
    out.push(chunk.with_receipt(receipt));
    out.push(GenerateEvent::Done {
        finish_reason: FinishReason::Stop,
        usage,
        billing: None,
    });
    out
}

/// Everything the app would see, or the first error.
fn read(opener: &mut AnswerOpener, events: Vec<GenerateEvent>) -> Result<String, SealError> {
    let mut text = String::new();
    let mut done = false;
    for e in events {
        match opener.open(e)? {
            Some(GenerateEvent::Delta { text: t, .. }) => text.push_str(&t),
            Some(GenerateEvent::Done { .. }) => done = true,
            _ => {}
        }
    }
    assert!(done, "no Done reached the app");
    Ok(text)
}

#[test]
fn the_chosen_candidate_reads_the_request_and_the_gateway_its_answer() {
    let (a, b) = (worker("a"), worker("b"));
    let (sealed, mut opener) = seal_request(header(), &request(), &[to(&a), to(&b)]).unwrap();
    let wire = serde_json::to_string(&sealed).unwrap();
    assert!(!wire.contains("CANARY"), "the prompt is in clear: {wire}");
    // Either candidate can open it; say b serves.
    let mut opened = open_request(&sealed, &b.name, &b.keys).unwrap();
    assert_eq!(opened.request, request());
    assert!(open_request(&sealed, &a.name, &a.keys).is_ok());
    let events = answer(&b, &mut opened.answer);
    assert!(
        !serde_json::to_string(&events).unwrap().contains("CANARY"),
        "the answer is in clear"
    );
    assert_eq!(read(&mut opener, events).unwrap(), "Hello CANARY-answer");
    assert_eq!(opener.worker(), Some(b.name.as_str()));
    assert_eq!(opener.receipt().unwrap().usage, Usage::new(12, 2));
}

#[test]
fn a_worker_outside_the_set_cannot_open_the_request() {
    let (a, outsider) = (worker("a"), worker("x"));
    let (sealed, _) = seal_request(header(), &request(), &[to(&a)]).unwrap();
    assert_eq!(
        open_request(&sealed, &outsider.name, &outsider.keys).unwrap_err(),
        SealError::NotARecipient
    );
    // Handed a's entry under its own name, it still cannot.
    let mut forged = sealed.clone();
    forged.recipients[0].worker = outsider.name.clone();
    assert_eq!(
        open_request(&forged, &outsider.name, &outsider.keys).unwrap_err(),
        SealError::DoesNotOpen("the request's key")
    );
}

#[test]
fn a_header_bent_by_the_proxy_makes_the_request_unreadable() {
    let a = worker("a");
    let (sealed, _) = seal_request(header(), &request(), &[to(&a)]).unwrap();
    for bend in [
        |h: &mut SealedHeader| h.max_tokens = Some(4000),
        |h: &mut SealedHeader| h.max_price = Some(1_000_000),
        |h: &mut SealedHeader| h.model = "other".into(),
        |h: &mut SealedHeader| h.request_id = RequestId([1; 16]),
        |h: &mut SealedHeader| h.prompt_bound += 1000,
    ] {
        let mut bent = sealed.clone();
        bend(&mut bent.header);
        assert!(matches!(
            open_request(&bent, &a.name, &a.keys),
            Err(SealError::DoesNotOpen(_))
        ));
    }
    // A body or a wrapped key swapped for another request's of the same session (the same
    // HPKE context) is refused too: each request has a secret of its own.
    let session = to(&a);
    let (one, _) = seal_request(header(), &request(), std::slice::from_ref(&session)).unwrap();
    let (other, _) = seal_request(header(), &request(), &[session]).unwrap();
    assert_eq!(one.recipients[0].enc, other.recipients[0].enc);
    let mut swapped = one.clone();
    swapped.body = other.body.clone();
    assert!(open_request(&swapped, &a.name, &a.keys).is_err());
    let mut swapped = one.clone();
    swapped.recipients[0].key = other.recipients[0].key.clone();
    assert!(open_request(&swapped, &a.name, &a.keys).is_err());
    assert!(open_request(&one, &a.name, &a.keys).is_ok());
}

#[test]
fn a_gateway_cannot_seal_a_body_its_header_misstates() {
    let a = worker("a");
    let mut h = header();
    h.max_tokens = Some(1);
    assert!(matches!(
        seal_request(h, &request(), &[to(&a)]),
        Err(SealError::HeaderMismatch(_))
    ));
    // Nor understate its prompt, to be billed less than it uses.
    let mut h = header();
    h.prompt_bound -= 1;
    assert!(matches!(
        seal_request(h, &request(), &[to(&a)]),
        Err(SealError::HeaderMismatch(_))
    ));
}

fn served() -> (Worker, AnswerOpener, Vec<GenerateEvent>) {
    let a = worker("a");
    let (sealed, opener) = seal_request(header(), &request(), &[to(&a)]).unwrap();
    let mut opened = open_request(&sealed, &a.name, &a.keys).unwrap();
    let events = answer(&a, &mut opened.answer);
    (a, opener, events)
}

#[test]
fn dropped_reordered_replayed_or_truncated_chunks_are_caught() {
    type Bend = fn(&mut Vec<GenerateEvent>);
    let cases: [(&str, Bend); 5] = [
        ("dropped", |e| {
            e.remove(1);
        }),
        ("reordered", |e| e.swap(0, 1)),
        ("replayed", |e| {
            let first = e[0].clone();
            e.insert(1, first);
        }),
        ("truncated", |e| {
            e.remove(2);
        }),
        ("clear text injected", |e| {
            e.insert(
                1,
                GenerateEvent::Delta {
                    text: "x".into(),
                    tokens: 1,
                    logprobs: Vec::new(),
                },
            )
        }),
    ];
    for (what, bend) in cases {
        let (_, mut opener, mut events) = served();
        bend(&mut events);
        assert!(
            matches!(read(&mut opener, events), Err(SealError::Tampered(_))),
            "{what} went unnoticed"
        );
    }
}

#[test]
fn clear_counts_and_ciphertexts_cannot_be_bent() {
    let (_, mut opener, mut events) = served();
    if let GenerateEvent::Sealed { tokens, .. } = &mut events[0] {
        *tokens = 50;
    }
    assert!(matches!(
        read(&mut opener, events),
        Err(SealError::Tampered(_))
    ));
    let (_, mut opener, mut events) = served();
    if let GenerateEvent::Sealed { data, .. } = &mut events[1] {
        let mut raw = unb64(data, "").unwrap();
        raw[0] ^= 1;
        *data = b64(&raw);
    }
    assert!(matches!(
        read(&mut opener, events),
        Err(SealError::Tampered(_))
    ));
}

#[test]
fn a_receipt_must_be_the_workers_over_this_answer() {
    // Counts raised after signing.
    let (_, mut opener, mut events) = served();
    if let GenerateEvent::Sealed {
        receipt: Some(r), ..
    } = &mut events[2]
    {
        r.usage.completion_tokens += 10;
    }
    assert!(matches!(
        read(&mut opener, events),
        Err(SealError::BadReceipt(_))
    ));
    // Re-signed by someone else.
    let (_, mut opener, mut events) = served();
    let other = worker("z");
    if let GenerateEvent::Sealed {
        receipt: Some(r), ..
    } = &mut events[2]
    {
        **r = sign_receipt((**r).clone(), &other.signer);
    }
    assert!(matches!(
        read(&mut opener, events),
        Err(SealError::BadReceipt(_))
    ));
    // Missing.
    let (_, mut opener, mut events) = served();
    if let GenerateEvent::Sealed { receipt, .. } = &mut events[2] {
        *receipt = None;
    }
    assert!(matches!(
        read(&mut opener, events),
        Err(SealError::BadReceipt(_))
    ));
}

#[test]
fn a_proxy_cannot_splice_another_answer_in() {
    // Two requests to the same worker: the second's chunks do not open under the first's key.
    let a = worker("a");
    let (s1, mut opener1) = seal_request(header(), &request(), &[to(&a)]).unwrap();
    let (s2, _) = seal_request(header(), &request(), &[to(&a)]).unwrap();
    let _ = open_request(&s1, &a.name, &a.keys).unwrap();
    let mut o2 = open_request(&s2, &a.name, &a.keys).unwrap();
    let events = answer(&a, &mut o2.answer);
    assert!(matches!(
        read(&mut opener1, events),
        Err(SealError::Tampered(_))
    ));
}

/// REVIEW, fixed: nothing stops a proxy from sending one sealed request twice to the same worker, and
/// both openings derive the same answer key (exported from the same HPKE context: same `enc`,
/// same worker key) and seal chunk `n` under the same nonce (`n`). ChaCha20's keystream
/// repeats, so the XOR of the two answers' ciphertexts is the XOR of their plaintexts: one
/// answer known or guessed (a resample at temperature > 0, JSON's fixed frame) reads the
/// other, and Poly1305's one-time key repeats too, which lets the proxy forge chunks. Fix: mix
/// fresh worker randomness into the answer key (a salt sent in clear with chunk 0, bound as
/// associated data), or refuse to open a request twice.
#[test]
fn review_a_replayed_request_does_not_reuse_the_answers_keystream() {
    let a = worker("a");
    let (sealed, _) = seal_request(header(), &request(), &[to(&a)]).unwrap();
    let mut first = open_request(&sealed, &a.name, &a.keys).unwrap();
    // The replay: the same bytes, to the same worker.
    let Ok(mut second) = open_request(&sealed, &a.name, &a.keys) else {
        return; // a replay that does not open is a fix too
    };
    let secret = GenerateEvent::Delta {
        text: "the SECRET answer".into(),
        tokens: 1,
        logprobs: Vec::new(),
    };
    let known = GenerateEvent::Delta {
        text: "x".repeat(17),
        tokens: 1,
        logprobs: Vec::new(),
    };
    let chunk = |e: Option<GenerateEvent>| match e {
        Some(GenerateEvent::Sealed { data, .. }) => unb64(&data, "a chunk").unwrap(),
        other => panic!("not a chunk: {other:?}"),
    };
    let c1 = chunk(first.answer.seal(&secret));
    let c2 = chunk(second.answer.seal(&known));
    let p1 = serde_json::to_vec(&secret).unwrap();
    let p2 = serde_json::to_vec(&known).unwrap();
    assert_eq!(p1.len(), p2.len());
    let recovered: Vec<u8> = c1
        .iter()
        .zip(&c2)
        .zip(&p2)
        .map(|((x, y), k)| x ^ y ^ k)
        .collect();
    assert_ne!(
        recovered,
        p1,
        "the proxy read the first answer from a replay: {}",
        String::from_utf8_lossy(&recovered)
    );
}

/// A tool call is sealed like text: the proxy sees its token count and size, not the call;
/// the gateway opens it whole; in clear where the answer is sealed, it is tampering.
#[test]
fn a_tool_call_is_sealed_and_opened_like_text() {
    let w = worker("a");
    let (sealed, mut opener) = seal_request(header(), &request(), &[to(&w)]).unwrap();
    let mut opened = open_request(&sealed, &w.name, &w.keys).unwrap();
    let call = GenerateEvent::ToolCall {
        call: cocoon_protocol::ToolCall {
            id: "call_1".into(),
            name: "CANARY_function".into(),
            arguments: "{\"city\": \"CANARY\"}".into(),
        },
        tokens: 3,
    };
    let chunk = opened.answer.seal(&call).unwrap();
    assert!(!serde_json::to_string(&chunk).unwrap().contains("CANARY"));
    let GenerateEvent::Sealed {
        tokens, reasoning, ..
    } = &chunk
    else {
        panic!("{chunk:?}")
    };
    assert_eq!((*tokens, *reasoning), (3, 0));
    assert_eq!(opener.open(chunk).unwrap(), Some(call.clone()));
    let (_, mut other) = seal_request(header(), &request(), &[to(&w)]).unwrap();
    assert!(matches!(other.open(call), Err(SealError::Tampered(_))));
}
