//! The embedded engine on the real SmolLM2 model (fetched by scripts/fetch-model.sh).

use std::path::PathBuf;
use std::time::Duration;

use cocoon_engine::{Backend, LlamaConfig};
use cocoon_llama::LlamaBackend;
use cocoon_protocol::{
    ChatMessage, ErrorKind, FinishReason, GenerateEvent, GenerateRequest, Input, Role,
    SamplingParams, Usage,
};
use futures_util::StreamExt;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

fn model_path() -> PathBuf {
    std::env::var_os("COCOON_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

fn backend() -> LlamaBackend {
    let config = LlamaConfig {
        model_path: model_path(),
        threads: 2,
        ..Default::default()
    };
    LlamaBackend::load(&config).expect("model loads; run scripts/fetch-model.sh first")
}

fn chat(content: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        max_price: None,
        cache_scope: None,
        model: "SmolLM2-135M-Instruct".into(),
        input: Input::Chat {
            messages: vec![ChatMessage::new(Role::User, content)],
            tools: None,
        },
        params,
    }
}

struct Collected {
    text: String,
    embeddings: Vec<(u32, String)>,
    calls: Vec<cocoon_protocol::ToolCall>,
    delta_tokens: u32,
    logprobs: Vec<cocoon_protocol::TokenLogprob>,
    done: Option<(FinishReason, Usage)>,
    error: Option<cocoon_protocol::ProtocolError>,
}

async fn collect(backend: &LlamaBackend, req: GenerateRequest) -> Collected {
    let mut stream = backend.generate(req);
    let mut c = Collected {
        text: String::new(),
        embeddings: Vec::new(),
        calls: Vec::new(),
        delta_tokens: 0,
        logprobs: Vec::new(),
        done: None,
        error: None,
    };
    while let Some(ev) = stream.next().await {
        match ev {
            GenerateEvent::Delta {
                text,
                tokens,
                logprobs,
            } => {
                c.text.push_str(&text);
                c.delta_tokens += tokens;
                c.logprobs.extend(logprobs);
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
                ..
            } => c.done = Some((finish_reason, usage)),
            GenerateEvent::Error { error } => c.error = Some(error),
            GenerateEvent::Reasoning { .. } => panic!("this model does not reason"),
            GenerateEvent::Sealed { .. } => panic!("an engine never seals: its worker does"),
            GenerateEvent::Embedding { index, embedding } => c.embeddings.push((index, embedding)),
            GenerateEvent::ToolCall { call, tokens } => {
                c.delta_tokens += tokens;
                c.calls.push(call);
            }
        }
    }
    c
}

#[tokio::test]
async fn greedy_chat_is_deterministic_and_counts_real_tokens() {
    let b = backend();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(24),
        ..Default::default()
    };
    let req = chat("Tell me the capital of France.", params);
    let a = collect(&b, req.clone()).await;
    let (finish, usage) = a.done.expect("done event");
    assert!(a.error.is_none());
    assert!(a.text.contains("Paris"), "model answered {:?}", a.text);
    // The prompt count is the tokenizer's count of the templated prompt.
    let rendered = b.render_prompt(&req.input).unwrap();
    assert!(
        rendered.contains("<|im_start|>user"),
        "SmolLM2's own chat template: {rendered:?}"
    );
    assert_eq!(usage.prompt_tokens as usize, b.count_tokens(&rendered));
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 24);
    if finish == FinishReason::Length {
        assert_eq!(usage.completion_tokens, 24);
    }
    assert_eq!(a.delta_tokens, usage.completion_tokens);
    let again = collect(&b, req).await;
    assert_eq!(again.text, a.text, "greedy decoding is deterministic");
}

#[tokio::test]
async fn seed_makes_sampling_reproducible() {
    let b = backend();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        max_tokens: Some(16),
        ..Default::default()
    };
    let x = collect(&b, chat("Tell me a story.", params.clone())).await;
    let y = collect(&b, chat("Tell me a story.", params)).await;
    assert_eq!(x.text, y.text);
    assert!(!x.text.is_empty());
}

#[tokio::test]
async fn max_tokens_and_ignore_eos_give_exact_lengths() {
    let b = backend();
    let params = SamplingParams {
        max_tokens: Some(10),
        ignore_eos: true,
        temperature: 0.0,
        ..Default::default()
    };
    let c = collect(&b, chat("Hi", params.clone())).await;
    let (finish, usage) = c.done.unwrap();
    assert_eq!(finish, FinishReason::Length);
    assert_eq!(usage.completion_tokens, 10);
    assert_eq!(c.delta_tokens, 10);

    // Ending on a token that prints nothing: the answer's own end-of-turn token, generated
    // under ignore_eos as its last. The deltas still account for it, or the relays would see
    // an honest bill exceed what they passed on.
    let ended = collect(
        &b,
        chat(
            "Hi",
            SamplingParams {
                max_tokens: Some(64),
                ignore_eos: false,
                ..params.clone()
            },
        ),
    )
    .await;
    let (finish, natural) = ended.done.unwrap();
    assert_eq!(finish, FinishReason::Stop, "{:?}", ended.text);
    let n = natural.completion_tokens + 1;
    let c = collect(
        &b,
        chat(
            "Hi",
            SamplingParams {
                max_tokens: Some(n),
                ..params
            },
        ),
    )
    .await;
    assert_eq!(
        c.text, ended.text,
        "the same answer, then the end-of-turn token"
    );
    let (_, usage) = c.done.unwrap();
    assert_eq!((usage.completion_tokens, c.delta_tokens), (n, n));
}

#[tokio::test]
async fn stop_sequence_ends_generation_without_leaking_it() {
    let b = backend();
    let base = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(40),
        ..Default::default()
    };
    let full = collect(
        &b,
        chat("Count from 1 to 20, separated by commas.", base.clone()),
    )
    .await;
    assert!(
        full.text.contains('5'),
        "expected counting, got {:?}",
        full.text
    );
    let params = SamplingParams {
        stop: vec!["5".into()],
        ..base
    };
    let cut = collect(&b, chat("Count from 1 to 20, separated by commas.", params)).await;
    let (finish, _) = cut.done.unwrap();
    assert_eq!(finish, FinishReason::Stop);
    assert!(!cut.text.contains('5'));
    assert_eq!(cut.text, full.text[..full.text.find('5').unwrap()]);
}

#[tokio::test]
async fn oversize_request_is_refused_with_context_error() {
    let b = backend();
    let params = SamplingParams {
        max_tokens: Some(100_000),
        ..Default::default()
    };
    let c = collect(&b, chat("Hi", params)).await;
    let err = c.error.expect("error event");
    assert_eq!(err.kind, ErrorKind::ContextLengthExceeded);
    assert!(
        err.message.contains("maximum context length is 4096"),
        "{}",
        err.message
    );
    assert!(c.done.is_none());
}

#[tokio::test]
async fn unknown_model_is_refused() {
    let b = backend();
    let mut req = chat("Hi", SamplingParams::default());
    req.model = "gpt-7".into();
    let c = collect(&b, req).await;
    assert_eq!(c.error.unwrap().kind, ErrorKind::ModelNotFound);
}

#[tokio::test]
async fn dropping_the_stream_stops_generation() {
    let b = backend();
    let params = SamplingParams {
        max_tokens: Some(2000),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = b.generate(chat("Write a long essay.", params));
    for _ in 0..3 {
        assert!(matches!(
            stream.next().await,
            Some(GenerateEvent::Delta { .. })
        ));
    }
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.stats().active > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "generation still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = b.stats();
    assert_eq!(stats.cancelled, 1);
    assert!(
        stats.generated_tokens < 200,
        "stopped early, made {}",
        stats.generated_tokens
    );
}

#[tokio::test]
async fn concurrent_requests_all_complete() {
    let b = std::sync::Arc::new(backend());
    let params = SamplingParams {
        max_tokens: Some(8),
        ignore_eos: true,
        ..Default::default()
    };
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let b = b.clone();
            let req = chat(&format!("Say the number {i}"), params.clone());
            tokio::spawn(async move { collect(&b, req).await })
        })
        .collect();
    for t in tasks {
        let c = t.await.unwrap();
        assert_eq!(c.done.unwrap().1.completion_tokens, 8);
    }
    assert_eq!(b.stats().completed, 6);
}

fn batched_backend(
    parallel: u32,
    context_length: u32,
    kv_cache_tokens: u32,
) -> std::sync::Arc<LlamaBackend> {
    std::sync::Arc::new(
        LlamaBackend::load(&LlamaConfig {
            model_path: model_path(),
            threads: 2,
            parallel,
            context_length,
            kv_cache_tokens,
            ..Default::default()
        })
        .expect("model loads"),
    )
}

#[tokio::test]
async fn batched_requests_each_get_their_own_answer() {
    // Eight requests in one batch, four of them the same question: every answer must be the
    // model's answer to its own prompt, whatever it shares a forward pass with.
    let b = batched_backend(8, 0, 0);
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(20),
        ..Default::default()
    };
    let prompts = [
        "Tell me the capital of France.",
        "Count from 1 to 10.",
        "Tell me the capital of France.",
        "Name three colours.",
        "Tell me the capital of France.",
        "Count from 1 to 10.",
        "Tell me the capital of France.",
        "Name three colours.",
    ];
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (b, req) = (b.clone(), chat(p, params.clone()));
            tokio::spawn(async move { collect(&b, req).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        let c = t.await.unwrap();
        assert!(c.error.is_none(), "{:?}", c.error);
        let (_, usage) = c.done.expect("done");
        assert_eq!(c.delta_tokens, usage.completion_tokens);
        answers.push(c.text);
    }
    for (p, a) in prompts.iter().zip(&answers) {
        if p.contains("France") {
            assert!(a.contains("Paris"), "{p:?} answered {a:?}");
        }
        if p.contains("Count") {
            assert!(a.contains('3') && a.contains('4'), "{p:?} answered {a:?}");
        }
    }
    let stats = b.stats();
    assert_eq!((stats.completed, stats.active), (8, 0));
}

#[tokio::test]
async fn requests_beyond_the_kv_cache_wait_their_turn() {
    // Room for one whole context only: two requests that each need most of it run one after
    // the other, and both finish.
    let b = batched_backend(4, 512, 512);
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(400),
        ignore_eos: true,
        ..Default::default()
    };
    let mut first = b.generate(chat("Write a long essay.", params.clone()));
    let second = {
        let (b, req) = (b.clone(), chat("Write another long essay.", params));
        tokio::spawn(async move { collect(&b, req).await })
    };
    // The first streams while the second waits for cells, not for a sequence.
    assert!(matches!(
        first.next().await,
        Some(GenerateEvent::Delta { .. })
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.stats().active, 1, "the second request must wait");
    drop(first);
    let c = second.await.unwrap();
    assert!(c.error.is_none(), "{:?}", c.error);
    assert_eq!(c.done.unwrap().1.completion_tokens, 400);
    let stats = b.stats();
    assert_eq!((stats.cancelled, stats.completed), (1, 1));
}

#[tokio::test]
async fn one_stream_leaving_does_not_disturb_the_others() {
    let b = batched_backend(4, 0, 0);
    let long = SamplingParams {
        max_tokens: Some(2000),
        ignore_eos: true,
        ..Default::default()
    };
    let short = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(24),
        ignore_eos: true,
        ..Default::default()
    };
    let mut leaving = b.generate(chat("Write a long essay.", long));
    let stayers: Vec<_> = (0..3)
        .map(|_| {
            let (b, req) = (
                b.clone(),
                chat("Tell me the capital of France.", short.clone()),
            );
            tokio::spawn(async move { collect(&b, req).await })
        })
        .collect();
    for _ in 0..3 {
        assert!(matches!(
            leaving.next().await,
            Some(GenerateEvent::Delta { .. })
        ));
    }
    drop(leaving);
    for s in stayers {
        let c = s.await.unwrap();
        let (finish, usage) = c.done.expect("done");
        assert_eq!(
            (finish, usage.completion_tokens),
            (FinishReason::Length, 24)
        );
        assert!(c.text.contains("Paris"), "{:?}", c.text);
    }
    let stats = b.stats();
    assert_eq!((stats.cancelled, stats.completed, stats.active), (1, 3, 0));
}

/// Each penalty takes effect: greedy decoding of a prompt that invites repetition gives
/// another answer under a frequency, a presence or a repetition penalty than without one (the
/// sampler sees each token it picks), and the same answer again with none. top_k and min_p
/// keep a seeded draw reproducible.
#[tokio::test]
async fn penalties_change_greedy_answers_and_samplers_stay_reproducible() {
    let b = backend();
    let prompt = "Write the word banana twenty times, separated by spaces.";
    let greedy = |params: SamplingParams| SamplingParams {
        temperature: 0.0,
        max_tokens: Some(40),
        ignore_eos: true,
        ..params
    };
    let plain = collect(&b, chat(prompt, greedy(SamplingParams::default()))).await;
    assert!(plain.error.is_none(), "{:?}", plain.error);
    let again = collect(&b, chat(prompt, greedy(SamplingParams::default()))).await;
    assert_eq!(plain.text, again.text, "greedy decoding is deterministic");
    for (name, params) in [
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: 2.0,
                ..SamplingParams::default()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 2.0,
                ..SamplingParams::default()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 1.8,
                ..SamplingParams::default()
            },
        ),
    ] {
        let penalised = collect(&b, chat(prompt, greedy(params))).await;
        assert!(penalised.error.is_none(), "{name}: {:?}", penalised.error);
        assert_ne!(
            penalised.text, plain.text,
            "{name} did not change the answer: {}",
            plain.text
        );
    }
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 20,
        min_p: 0.05,
        seed: Some(7),
        max_tokens: Some(12),
        ..SamplingParams::default()
    };
    let one = collect(&b, chat(prompt, sampled.clone())).await;
    let two = collect(&b, chat(prompt, sampled)).await;
    assert!(one.error.is_none(), "{:?}", one.error);
    assert_eq!(one.text, two.text);
}

/// `response_format: json_object`: the grammar holds the answer to one JSON object, which
/// parses, and ends it there.
#[tokio::test]
async fn json_object_answers_are_one_json_object() {
    let b = backend();
    let params = SamplingParams {
        max_tokens: Some(160),
        temperature: 0.0,
        response_format: Some(cocoon_protocol::ResponseFormat::JsonObject),
        ..SamplingParams::default()
    };
    let free = collect(
        &b,
        chat(
            "Write a JSON object with a cat's name and age.",
            SamplingParams {
                response_format: None,
                ..params.clone()
            },
        ),
    )
    .await;
    let c = collect(
        &b,
        chat("Write a JSON object with a cat's name and age.", params),
    )
    .await;
    assert!(c.error.is_none(), "{:?}", c.error);
    let (finish, usage) = c.done.unwrap();
    assert_eq!(finish, FinishReason::Stop, "{:?}: {}", usage, c.text);
    let value: serde_json::Value =
        serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", c.text));
    assert!(value.is_object(), "{value}");
    // The grammar made the difference: the free answer is not one JSON object.
    assert!(
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&free.text).is_err(),
        "{}",
        free.text
    );
}

/// `logit_bias`: a token pushed up by 100 is all a greedy answer says; one outside the
/// vocabulary, or a JSON schema (served by upstreams, not this engine), is refused by name.
#[tokio::test]
async fn logit_bias_steers_and_what_cannot_be_served_is_refused() {
    let b = backend();
    let greedy = |bias: &[(u32, f32)]| SamplingParams {
        max_tokens: Some(8),
        temperature: 0.0,
        logit_bias: bias.iter().copied().collect(),
        ..SamplingParams::default()
    };
    let plain = collect(&b, chat("Name a fruit.", greedy(&[]))).await;
    // Token 1000 of this vocabulary, forced: eight times the same piece.
    let forced = collect(&b, chat("Name a fruit.", greedy(&[(1000, 100.0)]))).await;
    assert!(forced.error.is_none(), "{:?}", forced.error);
    assert_eq!(forced.done.unwrap().1.completion_tokens, 8);
    assert_ne!(forced.text, plain.text);
    let piece = &forced.text[..forced.text.len() / 8];
    assert!(!piece.is_empty());
    assert_eq!(forced.text, piece.repeat(8), "{:?}", forced.text);

    let outside = collect(&b, chat("Hi", greedy(&[(10_000_000, 1.0)]))).await;
    let e = outside.error.expect("refused");
    assert!(
        e.message.contains("outside this model's vocabulary"),
        "{}",
        e.message
    );
    let schema = collect(
        &b,
        chat(
            "Hi",
            SamplingParams {
                response_format: Some(cocoon_protocol::ResponseFormat::JsonSchema {
                    json_schema: serde_json::json!({"name": "x", "schema": {
                        "type": "object",
                        "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}
                    }}),
                }),
                ..greedy(&[])
            },
        ),
    )
    .await;
    let e = schema.error.expect("refused");
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert!(
        e.message.contains(
            "response_format.json_schema: the schema keyword 'pattern' at #/properties/id"
        ),
        "{}",
        e.message
    );
}

/// `logprobs`: one entry per generated token, naming it, with the model's own distribution;
/// under greedy decoding the chosen token is the most likely alternative. Unasked, none come.
#[tokio::test]
async fn logprobs_name_each_token_with_the_models_distribution() {
    let b = backend();
    let params = SamplingParams {
        max_tokens: Some(10),
        temperature: 0.0,
        logprobs: Some(3),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let c = collect(&b, chat("Name three colors.", params.clone())).await;
    assert!(c.error.is_none(), "{:?}", c.error);
    let (_, usage) = c.done.unwrap();
    assert_eq!(c.logprobs.len() as u32, usage.completion_tokens);
    let joined: String = c.logprobs.iter().map(|l| l.token.as_str()).collect();
    assert_eq!(joined, c.text);
    for l in &c.logprobs {
        assert!(l.logprob <= 0.0 && l.logprob.is_finite(), "{l:?}");
        assert_eq!(l.top.len(), 3, "{l:?}");
        assert_eq!(
            l.top[0].token, l.token,
            "greedy picks the most likely: {l:?}"
        );
        assert!((l.top[0].logprob - l.logprob).abs() < 1e-6, "{l:?}");
        assert!(
            l.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "{l:?}"
        );
        // Three alternatives cannot hold more than all the probability there is.
        let mass: f32 = l.top.iter().map(|t| t.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{l:?}");
    }
    // Pushing a token up by a bias moves the choice, not the model's log-probabilities: the
    // report is of the model, before the sampler.
    let biased = collect(
        &b,
        chat(
            "Name three colors.",
            SamplingParams {
                logit_bias: [(1000, 100.0)].into_iter().collect(),
                ..params.clone()
            },
        ),
    )
    .await;
    assert_eq!(biased.logprobs[0].top, c.logprobs[0].top);
    assert!(biased.logprobs[0].logprob < c.logprobs[0].logprob);
    let none = collect(
        &b,
        chat(
            "Name three colors.",
            SamplingParams {
                logprobs: None,
                ..params
            },
        ),
    )
    .await;
    assert_eq!(none.text, c.text);
    assert!(none.logprobs.is_empty());
}

/// Whether llama.cpp, sampling `model` under `grammar`, could write `text` and stop there:
/// each of its tokens in turn must survive the grammar, then the end of generation must.
fn grammar_admits(model: &LlamaModel, grammar: &str, text: &str) -> bool {
    let mut sampler = LlamaSampler::grammar(model, grammar, "root").expect("llama.cpp parses it");
    let survives = |sampler: &mut LlamaSampler, token: LlamaToken| {
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
        one.apply_sampler(sampler);
        one.data[0].logit().is_finite()
    };
    for token in model.vocab().tokenize(text.as_bytes(), false, false) {
        if !survives(&mut sampler, token) {
            return false;
        }
        sampler.accept(token);
    }
    survives(&mut sampler, model.vocab().eos())
}

/// The converter's grammars, run by llama.cpp's grammar engine on this model's tokens: each
/// admits the documents its schema accepts and none that it refuses (a missing required
/// member, a member out of order or unknown, a wrong type, an enum outside its values, a string
/// or an array too long, a broken format).
#[test]
fn schema_grammars_admit_what_the_schema_accepts_and_nothing_else() {
    let model = LlamaModel::load_from_file(
        cocoon_llama::runtime().unwrap(),
        model_path(),
        &llama_cpp_2::model::params::LlamaModelParams::default(),
    )
    .expect("model loads; run scripts/fetch-model.sh first");
    let cases = [
        (
            serde_json::json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 5},
                    "nick": {"type": "string"},
                    "age": {"type": "integer"},
                    "color": {"enum": ["black", "white"]}
                },
                "required": ["name", "age", "color"],
                "additionalProperties": false
            }),
            vec![
                r#"{"name": "Tom", "age": 3, "color": "black"}"#,
                r#"{"name":"Tom","nick":"T","age":-12,"color":"white"}"#,
                "{\n  \"name\": \"\",\n  \"age\": 0,\n  \"color\": \"white\"\n}",
            ],
            vec![
                r#"{"name": "Tom", "color": "black"}"#,
                r#"{"age": 3, "name": "Tom", "color": "black"}"#,
                r#"{"name": "Tom", "age": 3, "color": "black", "x": 1}"#,
                r#"{"name": "Tom", "age": 3.5, "color": "black"}"#,
                r#"{"name": "Tom", "age": 3, "color": "red"}"#,
                r#"{"name": "Tommy!", "age": 3, "color": "black"}"#,
                r#"{"name": "Tom", "age": 3, "color": "black""#,
            ],
        ),
        (
            serde_json::json!({
                "$defs": {"tree": {"type": "object", "properties": {
                    "value": {"type": ["number", "null"]},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2}
                }}},
                "$ref": "#/$defs/tree"
            }),
            vec![
                "{}",
                r#"{"value": 1.5e3}"#,
                r#"{"children": [{"value": null}, {}]}"#,
                r#"{"value": 2, "children": [{"children": [{"value": -0.25}]}]}"#,
            ],
            vec![
                r#"{"children": [{}, {}, {}]}"#,
                r#"{"children": [], "value": 1}"#,
                r#"{"value": "1"}"#,
                "[]",
            ],
        ),
        (
            serde_json::json!({"type": "array", "items": {"type": "string", "format": "date"}, "minItems": 1}),
            vec![r#"["2026-12-07"]"#, r#"["2026-01-31", "1999-10-01"]"#],
            vec!["[]", r#"["2026-13-07"]"#, r#"["07.12.2026"]"#],
        ),
    ];
    for (schema, good, bad) in cases {
        let grammar = cocoon_engine::schema_to_gbnf(&schema).unwrap();
        for doc in good {
            assert!(
                grammar_admits(&model, &grammar, doc),
                "{schema}\nrefused {doc}\n{grammar}"
            );
        }
        for doc in bad {
            assert!(
                !grammar_admits(&model, &grammar, doc),
                "{schema}\nadmitted {doc}\n{grammar}"
            );
        }
    }
    assert!(grammar_admits(
        &model,
        &cocoon_engine::json_object_gbnf(),
        r#"{"a": [1, {"b": null}]}"#
    ));
    assert!(!grammar_admits(
        &model,
        &cocoon_engine::json_object_gbnf(),
        "[1]"
    ));
}

/// `response_format: json_schema` on the real model: the answer is a document of the schema,
/// where the same request without it is not.
#[tokio::test]
async fn json_schema_answers_match_the_schema() {
    let b = backend();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer"},
            "color": {"enum": ["black", "white", "orange"]}
        },
        "required": ["name", "age", "color"],
        "additionalProperties": false
    });
    let params = SamplingParams {
        max_tokens: Some(60),
        temperature: 0.0,
        response_format: Some(cocoon_protocol::ResponseFormat::JsonSchema {
            json_schema: serde_json::json!({"name": "cat", "strict": true, "schema": schema}),
        }),
        ..SamplingParams::default()
    };
    let prompt = "Describe a cat as JSON with its name, age and color.";
    let c = collect(&b, chat(prompt, params.clone())).await;
    assert!(c.error.is_none(), "{:?}", c.error);
    let (finish, _) = c.done.unwrap();
    assert_eq!(finish, FinishReason::Stop, "{}", c.text);
    let value: serde_json::Value =
        serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", c.text));
    let object = value.as_object().unwrap();
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        ["name", "age", "color"],
        "{value}"
    );
    assert!(object["name"].as_str().unwrap().chars().count() <= 12);
    assert!(object["age"].is_i64(), "{value}");
    assert!(["black", "white", "orange"].contains(&object["color"].as_str().unwrap()));
    let free = collect(
        &b,
        chat(
            prompt,
            SamplingParams {
                response_format: None,
                ..params
            },
        ),
    )
    .await;
    assert_ne!(free.text, c.text);
}

fn conversation(turns: &[(&str, &str)], next: &str) -> GenerateRequest {
    let mut messages = vec![ChatMessage::new(
        Role::System,
        "You are a helpful assistant who answers briefly and kindly.",
    )];
    for (user, assistant) in turns {
        messages.push(ChatMessage::new(Role::User, *user));
        messages.push(ChatMessage::new(Role::Assistant, *assistant));
    }
    messages.push(ChatMessage::new(Role::User, next));
    GenerateRequest {
        max_price: None,
        // One client's conversation: its turns may share cells.
        cache_scope: Some("one client".into()),
        model: "SmolLM2-135M-Instruct".into(),
        input: Input::Chat {
            messages,
            tools: None,
        },
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(12),
            ..Default::default()
        },
    }
}

/// The prompt cache: each turn of a conversation starts from the cells the previous turn
/// left, reports them as `cached_tokens`, and answers exactly as an engine without the cache
/// does.
#[tokio::test]
async fn a_conversation_reuses_its_prefix_and_answers_the_same() {
    let load = |prompt_cache| {
        LlamaBackend::load(&LlamaConfig {
            model_path: model_path(),
            threads: 2,
            parallel: 2,
            prompt_cache,
            ..Default::default()
        })
        .expect("model loads")
    };
    let (cached, plain) = (load(true), load(false));
    let mut turns: Vec<(&str, String)> = Vec::new();
    let questions = [
        "What is the capital of France?",
        "And of Italy?",
        "Which is larger?",
    ];
    for (i, question) in questions.iter().enumerate() {
        let as_refs: Vec<(&str, &str)> = turns.iter().map(|(u, a)| (*u, a.as_str())).collect();
        let with = collect(&cached, conversation(&as_refs, question)).await;
        let without = collect(&plain, conversation(&as_refs, question)).await;
        let (_, used) = with.done.unwrap();
        let (_, fresh) = without.done.unwrap();
        assert_eq!(with.text, without.text, "turn {i}");
        assert_eq!(fresh.cached_tokens, 0);
        assert_eq!(used.prompt_tokens, fresh.prompt_tokens);
        if i == 0 {
            // The system prompt was never seen before.
            assert_eq!(used.cached_tokens, 0);
        } else {
            // Every turn after the first starts from the last one's cells: at least the system
            // prompt and the first question.
            assert!(
                used.cached_tokens > used.prompt_tokens / 2,
                "turn {i}: {used:?}"
            );
            assert!(used.cached_tokens < used.prompt_tokens);
        }
        turns.push((question, with.text));
    }
    // The same request again: all of its prompt but the last token comes from the cache.
    let as_refs: Vec<(&str, &str)> = turns.iter().map(|(u, a)| (*u, a.as_str())).collect();
    let first = collect(&cached, conversation(&as_refs, "Thanks!")).await;
    let again = collect(&cached, conversation(&as_refs, "Thanks!")).await;
    assert_eq!(first.text, again.text);
    let usage = again.done.unwrap().1;
    assert_eq!(usage.cached_tokens, usage.prompt_tokens - 1, "{usage:?}");
}

/// Cells kept for the cache give way to requests that need the room: a cache as small as one
/// request still serves every request, and never reports more cached tokens than it holds.
#[tokio::test]
async fn kept_cells_give_way_to_new_requests() {
    let b = batched_backend(2, 256, 256);
    for i in 0..6 {
        let mut request = chat(
            &format!("Count to {i}, please, one number per line."),
            SamplingParams {
                temperature: 0.0,
                max_tokens: Some(96),
                ..Default::default()
            },
        );
        request.cache_scope = Some("one client".into());
        let c = collect(&b, request).await;
        assert!(c.error.is_none(), "request {i}: {:?}", c.error);
        let usage = c.done.unwrap().1;
        assert!(usage.cached_tokens < usage.prompt_tokens, "{usage:?}");
    }
}

/// REVIEW, fixed: the prompt cache was shared by every client of the worker, and `cached_tokens`
/// reports exactly how many tokens of a prompt matched cells that another request left. So a
/// client that guesses how someone else's prompt goes on (a PIN, a name, a document) can read
/// from its own usage whether the guess was right, token by token. The `prompt_cache` doc
/// accepts a timing channel; this one is exact, free, and on by default, in a network whose
/// workers run in enclaves so that nobody sees a client's prompt. Fix: scope retained cells
/// to the client that made them (a cache key the proxy derives from the client, only
/// matched within that key; unscoped requests neither leave nor reuse cells), or report only
/// coarse blocks (OpenAI: 1024-token minimum, 128-token steps, per organisation).
#[tokio::test]
async fn review_cached_tokens_tell_a_client_what_another_clients_prompt_said() {
    let b = batched_backend(1, 512, 0);
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(4),
        ..Default::default()
    };
    // Two clients: the proxy gives each its own cache scope.
    let victim = || GenerateRequest {
        cache_scope: Some("victim".into()),
        ..chat("My bank PIN is 4721. Keep it secret.", params.clone())
    };
    let probe = |guess: &str| GenerateRequest {
        cache_scope: Some("attacker".into()),
        ..chat(
            &format!("My bank PIN is {guess}. Is that right?"),
            params.clone(),
        )
    };
    let victim_first = collect(&b, victim()).await;
    assert!(victim_first.error.is_none(), "{:?}", victim_first.error);
    let right = collect(&b, probe("4721")).await.done.expect("done").1;
    // The victim sends its prompt again (each turn of a chat sends the whole history).
    let victim_again = collect(&b, victim()).await;
    assert!(victim_again.error.is_none(), "{:?}", victim_again.error);
    let wrong = collect(&b, probe("9999")).await.done.expect("done").1;
    assert_eq!(
        right.cached_tokens, wrong.cached_tokens,
        "another client's PIN shows in the usage: a right guess is {right:?}, a wrong one \
         {wrong:?}"
    );
}

/// REVIEW, fixed: `pick` started a request on the retained id whose tokens share the longest prefix
/// with its prompt, however short (a chat template's header, a system prompt), and cuts that
/// id's cells back to the shared part, even when another id is free and the cache has room.
/// Two users taking turns on one worker then wipe each other's history at every turn: here a
/// second conversation in between leaves the first one's next turn only the system prompt,
/// with 8192 cells and a free id to spare. The cache's benefit vanishes exactly for the
/// traffic a shared worker serves (and each turn is billed and timed as uncached). Fix: when
/// a bare id is free (or room allows), start there and copy the shared prefix onto it with
/// `copy_kv_cache_seq` (cells are shared in the unified cache, so the retained entry stays
/// whole), or reuse a retained id only when the match covers most of its tokens (llama.cpp's
/// server uses a similarity threshold), else take a bare or least recently used one.
#[tokio::test]
async fn review_a_second_conversation_does_not_wipe_the_first_ones_cells() {
    let b = batched_backend(2, 0, 0);
    let question = "Tell me the capital of France.";
    let first = collect(&b, conversation(&[], question)).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    let first_usage = first.done.expect("done").1;
    // Another user, same system prompt, different question.
    let other = collect(&b, conversation(&[], "Name three colours.")).await;
    assert!(other.error.is_none(), "{:?}", other.error);
    let next = collect(
        &b,
        conversation(&[(question, first.text.as_str())], "And of Italy?"),
    )
    .await;
    assert!(next.error.is_none(), "{:?}", next.error);
    let next_usage = next.done.expect("done").1;
    // The first turn's whole prompt is a prefix of the second's, and its cells fit easily.
    assert!(
        next_usage.cached_tokens >= first_usage.prompt_tokens,
        "the next turn reused {} tokens; its first turn's prompt alone was {}",
        next_usage.cached_tokens,
        first_usage.prompt_tokens
    );
}

fn weather_tools(choice: cocoon_protocol::ToolChoice) -> cocoon_protocol::Tools {
    cocoon_protocol::Tools {
        functions: vec![
            cocoon_protocol::Function {
                name: "get_weather".into(),
                description: Some("The weather now in a city".into()),
                parameters: serde_json::json!({"type": "object", "properties": {
                    "city": {"type": "string", "maxLength": 20}
                }, "required": ["city"], "additionalProperties": false}),
            },
            cocoon_protocol::Function {
                name: "get_time".into(),
                description: Some("The time now".into()),
                parameters: serde_json::json!({"type": "object", "properties": {}}),
            },
        ],
        choice,
        parallel: false,
    }
}

fn with_tools(
    messages: Vec<ChatMessage>,
    tools: Option<cocoon_protocol::Tools>,
    max_tokens: u32,
) -> GenerateRequest {
    GenerateRequest {
        input: Input::Chat { messages, tools },
        ..chat(
            "",
            SamplingParams {
                max_tokens: Some(max_tokens),
                temperature: 0.0,
                ..SamplingParams::default()
            },
        )
    }
}

/// A tool call round trip on the real model, whose template has no place for tools (the
/// generic style): a forced call is a call of an offered function with arguments of its
/// schema, ending with `tool_calls`, its tokens accounted for; its result, given back, gets an
/// answer in words. A named function is the one called.
#[tokio::test]
async fn a_tool_call_round_trip_on_the_real_model() {
    use cocoon_protocol::ToolChoice;
    let b = backend();
    let question = ChatMessage::new(Role::User, "What is the weather in Paris?");
    let asked = collect(
        &b,
        with_tools(
            vec![question.clone()],
            Some(weather_tools(ToolChoice::Required)),
            80,
        ),
    )
    .await;
    assert!(asked.error.is_none(), "{:?}", asked.error);
    let (finish, usage) = asked.done.unwrap();
    assert_eq!(
        finish,
        FinishReason::ToolCalls,
        "{:?} {}",
        asked.calls,
        asked.text
    );
    assert_eq!(asked.calls.len(), 1, "one call: parallel calls are off");
    assert_eq!(asked.text, "");
    assert_eq!(asked.delta_tokens, usage.completion_tokens);
    let call = &asked.calls[0];
    assert!(
        ["get_weather", "get_time"].contains(&call.name.as_str()),
        "{call:?}"
    );
    let arguments: serde_json::Value = serde_json::from_str(&call.arguments).unwrap();
    if call.name == "get_weather" {
        let city = arguments["city"].as_str().expect("city is a string");
        assert!(city.chars().count() <= 20, "{city}");
    }

    let answered = collect(
        &b,
        with_tools(
            vec![
                question,
                ChatMessage {
                    tool_calls: asked.calls.clone(),
                    ..ChatMessage::new(Role::Assistant, "")
                },
                ChatMessage {
                    tool_call_id: Some(call.id.clone()),
                    ..ChatMessage::new(Role::Tool, "18 degrees and sunny")
                },
            ],
            Some(weather_tools(ToolChoice::Auto)),
            60,
        ),
    )
    .await;
    assert!(answered.error.is_none(), "{:?}", answered.error);
    let (finish, _) = answered.done.unwrap();
    match finish {
        FinishReason::ToolCalls => assert!(!answered.calls.is_empty()),
        _ => assert!(answered.calls.is_empty() && !answered.text.is_empty()),
    }

    let named = collect(
        &b,
        with_tools(
            vec![ChatMessage::new(
                Role::User,
                "What is the weather in Paris?",
            )],
            Some(weather_tools(ToolChoice::Function("get_time".into()))),
            40,
        ),
    )
    .await;
    assert_eq!(named.calls.len(), 1, "{:?} {}", named.error, named.text);
    assert_eq!(named.calls[0].name, "get_time");
    assert_eq!(named.calls[0].arguments, "{}");

    // Without tools, the conversation holding a call and its result still renders.
    let plain = collect(
        &b,
        with_tools(
            vec![
                ChatMessage::new(Role::User, "Hi"),
                ChatMessage {
                    tool_calls: asked.calls.clone(),
                    ..ChatMessage::new(Role::Assistant, "")
                },
                ChatMessage {
                    tool_call_id: Some(call.id.clone()),
                    ..ChatMessage::new(Role::Tool, "done")
                },
            ],
            None,
            8,
        ),
    )
    .await;
    assert!(
        plain.error.is_none() && plain.calls.is_empty(),
        "{:?}",
        plain.error
    );
}

/// The generic tool grammar, on llama.cpp's engine: a call of an offered function with
/// arguments of its schema, or (where the model may) a response; nothing else.
#[test]
fn tool_grammars_admit_calls_of_offered_functions_only() {
    use cocoon_protocol::ToolChoice;
    let model = LlamaModel::load_from_file(
        cocoon_llama::runtime().unwrap(),
        model_path(),
        &llama_cpp_2::model::params::LlamaModelParams::default(),
    )
    .expect("model loads; run scripts/fetch-model.sh first");
    let style = cocoon_engine::ToolStyle::Generic;
    let auto = cocoon_engine::tools_grammar(style, &weather_tools(ToolChoice::Auto))
        .unwrap()
        .unwrap();
    let required = cocoon_engine::tools_grammar(style, &weather_tools(ToolChoice::Required))
        .unwrap()
        .unwrap();
    let call = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#;
    let response = r#"{"response": "Hello!"}"#;
    assert!(grammar_admits(&model, &auto, call));
    assert!(grammar_admits(&model, &auto, response));
    assert!(grammar_admits(&model, &required, call));
    assert!(!grammar_admits(&model, &required, response));
    for bad in [
        r#"{"tool_calls": [{"name": "get_news", "arguments": {}}]}"#,
        r#"{"tool_calls": [{"name": "get_weather", "arguments": {"town": "Oslo"}}]}"#,
        r#"{"tool_calls": []}"#,
        r#"{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]}"#,
    ] {
        assert!(!grammar_admits(&model, &required, bad), "{bad}");
    }
}

fn floats(b64: &str) -> Vec<f32> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn embed_request(texts: &[&str]) -> GenerateRequest {
    GenerateRequest {
        input: Input::Embed {
            texts: texts.iter().map(|t| (*t).to_owned()).collect(),
        },
        cache_scope: None,
        ..chat(
            "",
            SamplingParams {
                max_tokens: Some(0),
                ..SamplingParams::default()
            },
        )
    }
}

/// Embeddings on the real model: one vector per text, in order, of the model's width and
/// length 1, closer for texts that mean alike; the usage is the texts' tokens and nothing
/// generated. A backend that was not set to embed, or a text past the context, is refused.
#[tokio::test]
async fn embeddings_are_unit_vectors_that_tell_texts_apart() {
    let b = LlamaBackend::load(&LlamaConfig {
        model_path: model_path(),
        threads: 2,
        context_length: 256,
        embeddings: true,
        ..Default::default()
    })
    .expect("model loads");
    let texts = [
        "The cat sat on the mat.",
        "A cat is sitting on a mat.",
        "Stock markets fell sharply today.",
    ];
    let c = collect(&b, embed_request(&texts)).await;
    assert!(c.error.is_none(), "{:?}", c.error);
    let (finish, usage) = c.done.unwrap();
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(usage.completion_tokens, 0);
    let counted: usize = texts.iter().map(|t| b.count_tokens(t)).sum();
    assert_eq!(usage.prompt_tokens as usize, counted);
    assert_eq!(
        c.embeddings.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let vectors: Vec<Vec<f32>> = c.embeddings.iter().map(|(_, e)| floats(e)).collect();
    for v in &vectors {
        assert_eq!(v.len(), 576, "SmolLM2-135M's width");
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }
    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(
        cosine(&vectors[0], &vectors[1]) > cosine(&vectors[0], &vectors[2]),
        "the two sentences about a cat are closer than the one about markets"
    );
    // The same text, the same vector.
    let again = collect(&b, embed_request(&texts[..1])).await;
    assert_eq!(again.embeddings[0].1, c.embeddings[0].1);

    let long = "word ".repeat(400);
    let e = collect(&b, embed_request(&[&long])).await.error.unwrap();
    assert_eq!(e.kind, ErrorKind::ContextLengthExceeded, "{}", e.message);

    let plain = backend();
    let e = collect(&plain, embed_request(&texts)).await.error.unwrap();
    assert!(
        e.message.contains("does not serve embeddings"),
        "{}",
        e.message
    );
}

/// A prompt that starts with the begin-of-sequence token's text (a template that prints
/// `bos_token`, as Llama 3's does) is counted with one such token, not two.
#[test]
fn a_printed_bos_token_is_not_doubled() {
    let b = backend();
    let bos = b.bos_text();
    assert!(!bos.is_empty());
    let plain = b.count_tokens("Hello there");
    let printed = b.count_tokens(&format!("{bos}Hello there"));
    assert!(
        printed == plain || printed == plain + 1,
        "{plain} tokens, {printed} with the BOS text printed"
    );
    let twice = b.count_tokens(&format!("{bos}{bos}Hello there"));
    assert_eq!(
        twice,
        printed + 1,
        "a second printed BOS is the template's, kept"
    );
}

/// ChatML (SmolLM2's turns) with tools in the Hermes style, written for this test: the tools
/// in the system turn, calls as `<tool_call>` JSON, results as `<tool_response>`.
const CHATML_TOOLS: &str = r#"{%- if tools %}<|im_start|>system
You may call functions. The functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call one, answer <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// The Hermes style on the real model, through an operator's template
/// (`chat_template_file`): the tools are printed by the template, a forced call is held by
/// the grammar to `<tool_call>` JSON of an offered function, read out of the answer as a call,
/// and the answer ends with `tool_calls`; a named function is the one called.
#[tokio::test]
async fn hermes_calls_on_the_real_model_through_an_operators_template() {
    use cocoon_protocol::ToolChoice;
    let file =
        std::env::temp_dir().join(format!("cocoon-chatml-tools-{}.jinja", std::process::id()));
    std::fs::write(&file, CHATML_TOOLS).unwrap();
    let b = LlamaBackend::load(&LlamaConfig {
        model_path: model_path(),
        threads: 2,
        chat_template_file: Some(file.clone()),
        ..Default::default()
    })
    .expect("model loads with the operator's template");
    let question = vec![ChatMessage::new(
        Role::User,
        "What is the weather in Paris?",
    )];
    let prompt = b
        .render_prompt(&Input::Chat {
            messages: question.clone(),
            tools: Some(weather_tools(ToolChoice::Required)),
        })
        .unwrap();
    assert!(
        prompt.contains("<tools>") && prompt.contains("\"get_weather\""),
        "{prompt}"
    );
    let asked = collect(
        &b,
        with_tools(
            question.clone(),
            Some(weather_tools(ToolChoice::Required)),
            80,
        ),
    )
    .await;
    assert!(asked.error.is_none(), "{:?}", asked.error);
    let (finish, usage) = asked.done.unwrap();
    assert_eq!(
        finish,
        FinishReason::ToolCalls,
        "{:?} {}",
        asked.calls,
        asked.text
    );
    assert_eq!(asked.calls.len(), 1);
    assert!(asked.text.trim().is_empty(), "{:?}", asked.text);
    assert_eq!(asked.delta_tokens, usage.completion_tokens);
    assert!(["get_weather", "get_time"].contains(&asked.calls[0].name.as_str()));
    let _: serde_json::Value = serde_json::from_str(&asked.calls[0].arguments).unwrap();
    let named = collect(
        &b,
        with_tools(
            question,
            Some(weather_tools(ToolChoice::Function("get_time".into()))),
            40,
        ),
    )
    .await;
    assert_eq!(named.calls.len(), 1, "{:?} {}", named.error, named.text);
    assert_eq!(named.calls[0].name, "get_time");
    // A template that does not compile is a configuration error, not a silent fallback.
    std::fs::write(&file, "{% for %}").unwrap();
    let broken = LlamaBackend::load(&LlamaConfig {
        model_path: model_path(),
        threads: 2,
        chat_template_file: Some(file.clone()),
        ..Default::default()
    });
    let _ = std::fs::remove_file(&file);
    assert!(broken.is_err());
}

/// The engine with prompt lookup guessing up to `draft` tokens a step.
fn lookup_backend(draft: u32) -> LlamaBackend {
    LlamaBackend::load(&LlamaConfig {
        model_path: model_path(),
        threads: 2,
        lookup_draft_tokens: draft,
        ..Default::default()
    })
    .expect("model loads")
}

/// A request that copies its input, as edits and quotes do: what prompt lookup speeds up.
fn copy_request(params: SamplingParams) -> GenerateRequest {
    chat(
        "Repeat this text word for word: The quick brown fox jumps over the lazy dog. \
         The early bird catches the worm. Every cloud has a silver lining. \
         Actions speak louder than words.",
        params,
    )
}

#[tokio::test]
async fn prompt_lookup_keeps_the_answer_and_skips_passes() {
    let plain = backend();
    let lookup = lookup_backend(8);
    let cases = [
        // Greedy, as a copying task runs.
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(64),
            ..Default::default()
        },
        // A seeded draw: each kept guess is the token the draw would have picked anyway.
        SamplingParams {
            temperature: 0.7,
            seed: Some(3),
            max_tokens: Some(64),
            ..Default::default()
        },
        // A penalty: the sampler sees each kept token before it picks the next.
        SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.5,
            max_tokens: Some(64),
            ..Default::default()
        },
    ];
    for params in cases {
        let before = lookup.speculation();
        let want = collect(&plain, copy_request(params.clone())).await;
        let got = collect(&lookup, copy_request(params.clone())).await;
        let after = lookup.speculation();
        assert!(want.error.is_none() && got.error.is_none());
        assert_eq!(got.text, want.text, "{params:?}");
        assert_eq!(got.done, want.done, "the same counts: {params:?}");
        assert_eq!(got.delta_tokens, want.delta_tokens);
        assert!(
            after.drafted > before.drafted,
            "guesses were checked: {params:?}"
        );
        assert!(after.accepted <= after.drafted);
        eprintln!("{params:?}: {:?} -> {:?}: {:?}", before, after, got.text);
    }
    // On the greedy copy, guesses were kept: tokens that cost no pass of their own.
    let s = lookup.speculation();
    assert!(s.accepted > 10, "{s:?}");
    assert_eq!(plain.speculation().drafted, 0, "off by default");
}

/// A request whose answer repeats itself to the end: guesses all the way.
fn repeating(params: SamplingParams) -> GenerateRequest {
    chat(
        "Continue this list: red green blue yellow orange purple white, red green blue yellow \
         orange purple white, red green blue yellow orange purple white,",
        params,
    )
}

#[tokio::test]
async fn prompt_lookup_in_a_full_cache_stays_within_each_reservation() {
    // Four answers that repeat themselves (guesses longer than the room left near the end)
    // at once, each using every cell it reserved (ignore_eos, the whole
    // max_tokens), in a cache that holds exactly the four reservations: guesses near an
    // answer's end must stop at its room (the scheduler asserts it in debug builds; a guess
    // past it would take a cell another answer reserved).
    let probe = backend();
    let prompt_tokens = probe.count_tokens(
        &probe
            .render_prompt(&repeating(SamplingParams::default()).input)
            .unwrap(),
    ) as u32;
    drop(probe);
    // llama.cpp rounds its cache up to a multiple of 256 cells: four reservations of a
    // multiple of 64 leave it no spare cell.
    let max_tokens = (prompt_tokens + 40).div_ceil(64) * 64 - prompt_tokens;
    let b = std::sync::Arc::new(
        LlamaBackend::load(&LlamaConfig {
            model_path: model_path(),
            threads: 2,
            parallel: 4,
            context_length: prompt_tokens + max_tokens,
            kv_cache_tokens: 4 * (prompt_tokens + max_tokens),
            prompt_cache: false,
            lookup_draft_tokens: 16,
            ..Default::default()
        })
        .unwrap(),
    );
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (b, req) = (b.clone(), repeating(params.clone()));
            tokio::spawn(async move { collect(&b, req).await })
        })
        .collect();
    for t in tasks {
        let c = t.await.unwrap();
        assert!(c.error.is_none(), "{:?}", c.error);
        let (finish, usage) = c.done.expect("done");
        assert_eq!(
            (finish, usage.completion_tokens, c.delta_tokens),
            (FinishReason::Length, max_tokens, max_tokens)
        );
    }
    let s = b.speculation();
    assert!(s.accepted > 0 && s.accepted <= s.drafted, "{s:?}");
}

/// A passage long enough that its copy request's prompt alone passes 256 tokens.
const LONG_PASSAGE: &str = "The lighthouse on the northern cape was built in the spring of a \
    wet year, when the road from the village was still mud and every stone had to be carried up \
    the hill by cart. The keeper who first lit its lamp was a quiet man who kept a careful log \
    of the weather, the ships that passed, and the birds that rested on the gallery rail during \
    storms. Each evening he climbed the one hundred and twelve steps, trimmed the wick, wound \
    the clockwork that turned the lens, and wrote the time in his book. In winter the wind came \
    off the sea so hard that the windows hummed, and he stuffed the gaps in the frames with old \
    sailcloth. In summer the fog rolled in most mornings and he sounded the horn every thirty \
    seconds until it lifted. His daughter learned to read from the log book, sounding out the \
    names of schooners and the words for clouds: cirrus, stratus, cumulus, nimbus. When she was \
    twelve she kept the light alone for a week while he was ill, and she wrote in the book in a \
    round careful hand that the lamp had not once gone out. Years later, when the light was \
    changed to electricity and the keepers were sent away, she asked the lighthouse board for \
    the old books, and they gave her all thirty volumes in a wooden crate. She read them again \
    by her own window, facing the sea, and she found that her father had written, on the last \
    page of the last volume, a single line about the morning she was born: calm sea, light \
    wind from the south, and a small new keeper in the house.";

/// REVIEW, fixed (the claim, not the engine): prompt lookup was said to keep the answer
/// exactly the one decoding alone gives. The logits of a token depend on what else is in its
/// batch: llama.cpp's CPU flash attention splits a lone token's cells across threads once 512
/// or more are in view, and computes a batch of several tokens in one pass, which rounds
/// differently. Past 256 cells a step with guesses therefore differs from the same step
/// without them in the last bits, as any step does that other requests share. The claim is now
/// "the same up to floating-point rounding": here the text is the same and every token's
/// probability agrees to within 0.05 (most differ by about 3e-4; the f16 accumulation moved
/// one token from 0.74 to 0.70 in one run).
#[tokio::test]
async fn review_lookup_answer_matches_decoding_alone_past_256_cells() {
    let plain = backend();
    let lookup = lookup_backend(8);
    let req = chat(
        &format!("Repeat this text word for word: {LONG_PASSAGE}"),
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(96),
            ignore_eos: true,
            logprobs: Some(0),
            ..Default::default()
        },
    );
    let prompt_tokens = plain.count_tokens(&plain.render_prompt(&req.input).unwrap());
    assert!(prompt_tokens > 256, "{prompt_tokens} prompt tokens");
    let want = collect(&plain, req.clone()).await;
    let before = lookup.speculation();
    let got = collect(&lookup, req).await;
    let after = lookup.speculation();
    assert!(want.error.is_none() && got.error.is_none());
    assert!(
        after.drafted > before.drafted,
        "guesses were checked: {before:?} -> {after:?}"
    );
    assert_eq!(got.text, want.text, "the same answer");
    assert_eq!(got.logprobs.len(), want.logprobs.len());
    for (g, w) in got.logprobs.iter().zip(&want.logprobs) {
        assert_eq!(g.token, w.token);
        assert!(
            (g.logprob.exp() - w.logprob.exp()).abs() < 0.05,
            "{g:?} with lookup, {w:?} without"
        );
    }
}
