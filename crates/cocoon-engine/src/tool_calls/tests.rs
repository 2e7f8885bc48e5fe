use super::*;
use crate::json_grammar::tests::llama_repetition_rules;
use cocoon_protocol::Function;

fn tools(choice: ToolChoice, parallel: bool) -> Tools {
    Tools {
        functions: vec![
            Function {
                name: "get_weather".into(),
                description: Some("The weather in a city".into()),
                parameters: json!({"type": "object", "properties": {
                    "city": {"type": "string", "maxLength": 20}
                }, "required": ["city"]}),
            },
            Function {
                name: "get_time".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {}}),
            },
        ],
        choice,
        parallel,
    }
}

fn texts_and_calls(pieces: &[Piece]) -> (String, Vec<(String, String)>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => text.push_str(t),
            Piece::Call(c) => {
                assert!(c.id.starts_with("call_") && c.id.len() == 29, "{}", c.id);
                calls.push((c.name.clone(), c.arguments.clone()));
            }
        }
    }
    (text, calls)
}

/// Hermes answers stream their text; a call is read once closed, wherever the pushes split it,
/// and a marker's beginning is held back until it is known not to be one.
#[test]
fn hermes_calls_are_read_across_pushes_and_text_streams() {
    let mut reader = ToolCallReader::new(ToolStyle::Hermes);
    let mut pieces = Vec::new();
    for part in [
        "Let me check. <",
        "tool_",
        "call>\n{\"name\": \"get_weather\", \"argu",
        "ments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\"}\n</tool_call>",
        " Done <b>",
    ] {
        pieces.extend(reader.push(part));
    }
    // Before the first call: the text, and nothing of the marker.
    assert_eq!(pieces[0], Piece::Text("Let me check. ".into()));
    pieces.extend(reader.finish());
    let (text, calls) = texts_and_calls(&pieces);
    assert_eq!(text, "Let me check.  Done <b>");
    assert_eq!(
        calls,
        [
            ("get_weather".into(), r#"{"city":"Paris"}"#.into()),
            ("get_time".into(), "{}".into())
        ]
    );
}

/// An answer cut off inside a call, or a "call" that is not JSON, is the model's text.
#[test]
fn what_does_not_read_as_a_call_is_text() {
    let mut reader = ToolCallReader::new(ToolStyle::Hermes);
    let mut pieces = reader.push("<tool_call>not json</tool_call><tool_call>{\"name\": \"get_");
    pieces.extend(reader.finish());
    let (text, calls) = texts_and_calls(&pieces);
    assert!(calls.is_empty());
    assert_eq!(
        text,
        "<tool_call>not json</tool_call><tool_call>{\"name\": \"get_"
    );
}

#[test]
fn generic_answers_are_calls_or_a_response() {
    let read = |text: &str| {
        let mut r = ToolCallReader::new(ToolStyle::Generic);
        assert!(r.push(text).is_empty(), "held until the end");
        texts_and_calls(&r.finish())
    };
    assert_eq!(
        read(
            r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]}"#
        ),
        (
            String::new(),
            vec![
                ("get_weather".into(), r#"{"city":"Oslo"}"#.into()),
                ("get_time".into(), "{}".into())
            ]
        )
    );
    assert_eq!(
        read(r#"{"response": "It is sunny."}"#),
        ("It is sunny.".into(), vec![])
    );
    // Cut off: the raw text, for the app to see what the model wrote.
    assert_eq!(read(r#"{"tool_calls": [{"na"#).0, r#"{"tool_calls": [{"na"#);
}

/// The generic grammar admits a response only where the model may answer in text, only the
/// named function when one is named, and one call unless several are allowed; a Hermes
/// grammar exists only where a call is forced.
#[test]
fn grammars_follow_the_choice() {
    let auto = tools_grammar(ToolStyle::Generic, &tools(ToolChoice::Auto, true))
        .unwrap()
        .unwrap();
    assert!(auto.contains(r#""\"response\"""#), "{auto}");
    assert!(auto.contains(" ){0,15}"), "up to 16 calls: {auto}");
    let required = tools_grammar(ToolStyle::Generic, &tools(ToolChoice::Required, false))
        .unwrap()
        .unwrap();
    assert!(!required.contains(r#""\"response\"""#), "{required}");
    assert!(required.contains(r#""\"get_time\"""#), "{required}");
    assert!(!required.contains(" ){0,15}"), "one call: {required}");
    let named = tools_grammar(
        ToolStyle::Generic,
        &tools(ToolChoice::Function("get_weather".into()), true),
    )
    .unwrap()
    .unwrap();
    assert!(!named.contains("get_time"), "{named}");
    assert_eq!(
        tools_grammar(ToolStyle::Hermes, &tools(ToolChoice::Auto, true)).unwrap(),
        None
    );
    let forced = tools_grammar(ToolStyle::Hermes, &tools(ToolChoice::Required, false))
        .unwrap()
        .unwrap();
    assert!(
        forced.starts_with(r#"root ::= "<tool_call>\n" call "\n</tool_call>""#),
        "{forced}"
    );
    let mut bad = tools(ToolChoice::Required, true);
    bad.functions[0].parameters = json!({"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Z]"}
    }});
    let e = tools_grammar(ToolStyle::Generic, &bad).unwrap_err();
    assert!(
        e.starts_with("tool get_weather: ") && e.contains("'pattern'"),
        "{e}"
    );
}

#[test]
fn the_style_comes_from_the_template() {
    assert_eq!(
        ToolStyle::of_template("{% if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}"),
        ToolStyle::Hermes
    );
    assert_eq!(
        ToolStyle::of_template("{% for m in messages %}{{ m.content }}{% endfor %}"),
        ToolStyle::Generic
    );
}

/// REVIEW, fixed: functionality. `tools_grammar` nests each function's parameters inside a schema of
/// its own, so a `$ref` in them resolves against that wrapper: `#/$defs/…`, which pydantic's
/// `model_json_schema` writes for every nested model, points at nothing there, and every such
/// tool is refused with a 400 ("$ref #/$defs/Place points at nothing in the schema").
/// References should resolve inside the function's own parameters.
#[test]
fn review_tool_parameters_may_use_their_own_defs() {
    let mut t = tools(ToolChoice::Required, false);
    t.functions[0].parameters = json!({
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "$defs": {"Place": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"]
        }}
    });
    for style in [ToolStyle::Generic, ToolStyle::Hermes] {
        let g = tools_grammar(style, &t);
        assert!(g.is_ok(), "{style:?}: {g:?}");
    }
}

/// REVIEW, fixed: DoS. Every offered function goes into one grammar, held only by the converter's
/// MAX_RULES, which counts its own rules and not llama.cpp's: 128 functions of 8 string
/// parameters with `maxLength: 2000` (a valid `tools` of about 50 KB) make llama.cpp spell
/// out some 2 million rules (hundreds of MB and seconds of parsing on the scheduler thread,
/// for every such request, before its first token). The grammar's expansion should be
/// bounded across all the functions (here at 2^17 rules, as for one schema).
#[test]
fn review_many_tools_make_one_unbounded_grammar() {
    let parameters: serde_json::Map<String, Value> = (0..8)
        .map(|j| {
            (
                format!("s{j}"),
                json!({"type": "string", "maxLength": 2000}),
            )
        })
        .collect();
    let t = Tools {
        functions: (0..128)
            .map(|i| Function {
                name: format!("f{i}"),
                description: None,
                parameters: json!({"type": "object", "properties": parameters}),
            })
            .collect(),
        choice: ToolChoice::Required,
        parallel: true,
    };
    assert!(t.validate().is_ok(), "a valid tools");
    if let Ok(Some(g)) = tools_grammar(ToolStyle::Generic, &t) {
        let rules = llama_repetition_rules(&g);
        assert!(rules <= 1 << 17, "llama.cpp would make {rules} rules");
    }
}
