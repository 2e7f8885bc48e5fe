use super::*;
use cocoon_protocol::{Function, ToolCall, ToolChoice};

/// SmolLM2-Instruct's template, as its GGUF carries it (Apache-2.0, Hugging Face): a default
/// system prompt when the conversation has none.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A template in the Hermes style, written for these tests: it prints the tools, an
/// assistant's calls with their arguments as JSON, and tool results; it calls Python's string
/// methods and refuses a conversation it cannot render, as real templates do.
const HERMES: &str = r#"{{ bos_token }}{% if tools %}<|system|>Tools:
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|end|>
{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|tool|>{{ m.tool_call_id }}: {{ m.content.strip() }}<|end|>
{% elif m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|end|>
{% elif m.role == 'user' or m.role == 'system' or m.role == 'assistant' %}<|{{ m.role }}|>{{ m.content.strip() }}<|end|>
{% else %}{{ raise_exception("unknown role " + m.role) }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"#;

fn tools(choice: ToolChoice) -> Tools {
    Tools {
        functions: vec![Function {
            name: "get_weather".into(),
            description: Some("The weather".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }],
        choice,
        parallel: true,
    }
}

fn round_trip() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(Role::User, "  Weather in Paris?  "),
        ChatMessage {
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            }],
            ..ChatMessage::new(Role::Assistant, "")
        },
        ChatMessage {
            tool_call_id: Some("call_1".into()),
            ..ChatMessage::new(Role::Tool, " 18 C, sunny ")
        },
    ]
}

#[test]
fn the_models_own_template_is_rendered_with_its_default_system_prompt() {
    let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(t.tool_style(), ToolStyle::Generic);
    let prompt = t
        .render(&[ChatMessage::new(Role::User, "Hi")], None)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let own = t
        .render(
            &[
                ChatMessage::new(Role::System, "Be brief."),
                ChatMessage::new(Role::User, "Hi"),
            ],
            None,
        )
        .unwrap();
    assert!(
        own.starts_with("<|im_start|>system\nBe brief.<|im_end|>"),
        "{own}"
    );
}

/// A Hermes template gets the tools, the calls (arguments as an object, printed by `tojson`)
/// and the results, and Python's `strip` works.
#[test]
fn a_hermes_template_prints_tools_calls_and_results() {
    let t = ChatTemplate::new(HERMES, "<s>", "</s>").unwrap();
    assert_eq!(t.tool_style(), ToolStyle::Hermes);
    let prompt = t
        .render(&round_trip(), Some(&tools(ToolChoice::Auto)))
        .unwrap();
    assert!(
        prompt.starts_with("<s><|system|>Tools:\n{\"name\": \"get_weather\", \"description\""),
        "{prompt}"
    );
    assert!(
        prompt.contains(r#"<|user|>Weather in Paris?<|end|>"#),
        "{prompt}"
    );
    assert!(
        prompt.contains(
            r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#
        ),
        "{prompt}"
    );
    assert!(
        prompt.contains("<|tool|>call_1: 18 C, sunny<|end|>"),
        "{prompt}"
    );
    assert!(prompt.ends_with("<|assistant|>"), "{prompt}");
    // Without tools offered, the template prints none, and the calls made stay as they were.
    let plain = t.render(&round_trip(), None).unwrap();
    assert!(
        !plain.contains("Tools:") && plain.contains("<tool_call>"),
        "{plain}"
    );
}

/// A template with no place for tools gets them as instructions in the system message; calls
/// made are the JSON the model was asked for, and results come back as the user's.
#[test]
fn a_template_without_tools_gets_instructions_and_json() {
    let t = ChatTemplate::new(SMOLLM2, "", "").unwrap();
    let prompt = t
        .render(&round_trip(), Some(&tools(ToolChoice::Required)))
        .unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\nYou can call these functions:"),
        "{prompt}"
    );
    assert!(prompt.contains("Call one or more of them"), "{prompt}");
    assert!(
        prompt.contains(
            r#"<|im_start|>assistant
{"tool_calls":[{"arguments":{"city":"Paris"},"name":"get_weather"}]}<|im_end|>"#
        ) || prompt.contains(
            r#"<|im_start|>assistant
{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}<|im_end|>"#
        ),
        "{prompt}"
    );
    assert!(
        prompt.contains(
            r#"<|im_start|>user
{"tool_result":{"id":"call_1","content":" 18 C, sunny "}}<|im_end|>"#
        ),
        "{prompt}"
    );
}

/// A template's own refusal (`raise_exception`) is the request's fault, named; a template
/// that does not compile is the model's.
#[test]
fn refusals_and_broken_templates() {
    let strict = ChatTemplate::new(
        "{% for m in messages %}{% if m.content == 'forbidden' %}{{ raise_exception('no such words') }}{% endif %}{{ m.content }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let e = strict
        .render(&[ChatMessage::new(Role::User, "forbidden")], None)
        .unwrap_err();
    assert_eq!(e.kind, cocoon_protocol::ErrorKind::InvalidRequest);
    assert!(e.message.contains("no such words"), "{}", e.message);
    assert_eq!(
        strict
            .render(&[ChatMessage::new(Role::User, "fine")], None)
            .unwrap(),
        "fine"
    );
    assert!(ChatTemplate::new("{% for %}", "", "").is_err());
}

#[test]
fn strftime_formats_the_specifiers_templates_use() {
    // 2026-12-07 21:53:47 UTC, a Monday.
    let t = 1_796_680_427;
    assert_eq!(strftime("%d %b %Y", t), "07 Dec 2026");
    assert_eq!(
        strftime("%-d %B %y, %A %a %H:%M:%S %m %%", t),
        "7 December 26, Monday Mon 21:53:47 12 %"
    );
}

/// The most prompt tokens a chat of `messages` offering `tools` may be billed for (the bound
/// the proxy bills at and the gateway checks, a token per byte of what the app sent).
fn prompt_bound(messages: &[ChatMessage], tools: Option<&Tools>) -> u64 {
    let request = cocoon_protocol::GenerateRequest {
        model: "m".into(),
        input: cocoon_protocol::Input::Chat {
            messages: messages.to_vec(),
            tools: tools.cloned(),
        },
        params: cocoon_protocol::SamplingParams::default(),
        max_price: None,
        cache_scope: None,
    };
    cocoon_protocol::UsageBounds::new(&request, u32::MAX).prompt()
}

/// REVIEW, fixed: a client can make an honest embedded-engine worker overreport its prompt, and get
/// it barred. minijinja's `tojson` (which Hermes-style templates such as Qwen 2.5's print the
/// tools and each call's arguments with) writes each of `<`, `>`, `&` and `'` as a six-byte
/// `\u003c`-style escape (3 to 6 tokens: Qwen's tokenizer splits digits), while the prompt
/// bound counts the app's JSON, one byte (one token) per character. A tool description or
/// call arguments full of apostrophes (or `<`) render 5 bytes more per character than the
/// bound allows for: the worker's true count is a breach at the proxy (billed at the bound,
/// reputation lost, disconnected and barred after `evict_after_overreports` = 3), and the
/// client pays a fraction of what it used. Expected: whatever the rendering adds over the
/// same request with plain letters, the bound adds too (or the rendering does not escape).
#[test]
fn review_tojson_escapes_in_a_hermes_prompt_are_within_the_prompt_bound() {
    let t = ChatTemplate::new(HERMES, "<s>", "</s>").unwrap();
    // The same conversation, with 2000 copies of `c` in a tool's description and in the
    // arguments of an earlier call.
    let chat = |c: char| {
        let many = c.to_string().repeat(2000);
        let mut offered = tools(ToolChoice::Auto);
        offered.functions[0].description = Some(many.clone());
        let messages = vec![
            ChatMessage::new(Role::User, "Weather in Paris?"),
            ChatMessage {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: json!({ "city": many }).to_string(),
                }],
                ..ChatMessage::new(Role::Assistant, "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::new(Role::Tool, "18 C")
            },
        ];
        let prompt = t.render(&messages, Some(&offered)).unwrap();
        (prompt.len() as u64, prompt_bound(&messages, Some(&offered)))
    };
    let (plain, plain_bound) = chat('a');
    let (escaped, escaped_bound) = chat('\'');
    assert!(
        escaped.saturating_sub(plain) <= escaped_bound.saturating_sub(plain_bound),
        "apostrophes render {} bytes more than letters; the bound allows {} more",
        escaped.saturating_sub(plain),
        escaped_bound.saturating_sub(plain_bound)
    );
}

/// REVIEW, fixed: the same for a template without tools (the generic style, SmolLM2's): a tool's
/// result goes into the prompt as `{"tool_result": {"id": …, "content": …}}`, its content
/// escaped as JSON, so each control character of it becomes a six-byte `\u0001` escape (and
/// each quote or backslash two bytes), while the bound counts the content's own bytes. A tool
/// result of 2000 control characters renders 10 000 bytes more than 2000 letters under the
/// same bound: the honest worker's count is a breach. Expected: the bound covers what the
/// rendering adds.
#[test]
fn review_generic_tool_results_escaped_as_json_are_within_the_prompt_bound() {
    let t = ChatTemplate::new(SMOLLM2, "", "").unwrap();
    let chat = |result: String| {
        let messages = vec![
            ChatMessage::new(Role::User, "Run it."),
            ChatMessage {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "run".into(),
                    arguments: "{}".into(),
                }],
                ..ChatMessage::new(Role::Assistant, "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::new(Role::Tool, result)
            },
        ];
        let prompt = t.render(&messages, None).unwrap();
        (prompt.len() as u64, prompt_bound(&messages, None))
    };
    let (plain, plain_bound) = chat("a".repeat(2000));
    let (escaped, escaped_bound) = chat("\u{1}".repeat(2000));
    assert!(
        escaped.saturating_sub(plain) <= escaped_bound.saturating_sub(plain_bound),
        "control characters render {} bytes more than letters; the bound allows {} more",
        escaped.saturating_sub(plain),
        escaped_bound.saturating_sub(plain_bound)
    );
}

/// A template in the shape of Gemma 2's: no system role (it refuses one), and roles that
/// alternate from the user.
const NO_SYSTEM: &str = r#"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"#;

/// REVIEW, fixed: tools on a template without a system role. For a template with no place for
/// tools, the instructions become a system message of their own when the conversation has
/// none, and a template that refuses one (Gemma's, Mistral's first instruct templates) then
/// refuses every request that offers tools: a 400, "System role not supported", although the
/// same conversation renders without tools. The instructions should go where the template
/// takes them (into the first user message, as llama.cpp's chat code does for templates
/// without a system role).
#[test]
fn review_generic_tools_on_a_template_that_refuses_system_messages() {
    let t = ChatTemplate::new(NO_SYSTEM, "<bos>", "<eos>").unwrap();
    assert_eq!(t.tool_style(), ToolStyle::Generic);
    let ask = [ChatMessage::new(Role::User, "Weather in Paris?")];
    assert!(t.render(&ask, None).is_ok(), "renders without tools");
    let prompt = t
        .render(&ask, Some(&tools(ToolChoice::Required)))
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert!(prompt.contains("You can call these functions"), "{prompt}");
    assert!(prompt.contains("Weather in Paris?"), "{prompt}");
}
