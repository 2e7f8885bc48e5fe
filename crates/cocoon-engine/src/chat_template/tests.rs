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
        prompt.starts_with("<s><|system|>Tools:\n{\"name\":\"get_weather\""),
        "{prompt}"
    );
    assert!(
        prompt.contains(r#"<|user|>Weather in Paris?<|end|>"#),
        "{prompt}"
    );
    assert!(
        prompt.contains(
            r#"<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>"#
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
