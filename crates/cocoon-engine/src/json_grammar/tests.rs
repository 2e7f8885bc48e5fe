//! The converter's output shape and its refusals. Whether llama.cpp's grammar engine accepts
//! exactly the schema's documents is tested with the real engine, in cocoon-llama's tests.

use super::*;
use serde_json::json;

fn rules(grammar: &str) -> BTreeMap<&str, &str> {
    grammar
        .lines()
        .filter_map(|l| l.split_once(" ::= "))
        .map(|(n, b)| (n.trim(), b.trim()))
        .collect()
}

/// Required members come in the schema's order with commas between; an optional one comes
/// with its comma, so it can be left out without leaving one dangling.
#[test]
fn an_object_lists_its_members_in_order_required_or_maybe() {
    let g = schema_to_gbnf(&json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "nick": {"type": "string", "maxLength": 8},
            "age": {"type": "integer"}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    }))
    .unwrap();
    let r = rules(&g);
    assert_eq!(r["r0"], r#""\"name\"" ws ":" ws string"#);
    assert_eq!(r["r1"], r#""\"nick\"" ws ":" ws "\"" char{0,8} "\"" ws"#);
    assert_eq!(r["r2"], r#""\"age\"" ws ":" ws integer"#);
    assert_eq!(r["root"], r#""{" ws r0 ( "," ws r1 )? "," ws r2 "}" ws"#);
}

/// With every member optional, the object is empty or starts at any member and goes on with
/// later ones only.
#[test]
fn an_object_of_optional_members_starts_anywhere_and_keeps_the_order() {
    let g = schema_to_gbnf(&json!({
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}
    }))
    .unwrap();
    let r = rules(&g);
    // r0: "a"; r1: "b", which is also the tail from b; r2: the tail from a (a, then maybe
    // b's tail; or b's tail alone).
    assert_eq!(r["r0"], r#""\"a\"" ws ":" ws boolean"#);
    assert_eq!(r["r2"], r#"( r0 ( "," ws r1 )? | r1 )"#);
    assert_eq!(r["root"], r#""{" ws r2? "}" ws"#);
}

#[test]
fn enums_consts_unions_and_references_become_alternatives_and_rules() {
    let g = schema_to_gbnf(&json!({
        "$defs": {"node": {"type": "object", "properties": {
            "kind": {"enum": ["leaf", "tree \"x\"", 3, null]},
            "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}
        }, "required": ["kind", "next"]}},
        "$ref": "#/$defs/node"
    }))
    .unwrap();
    let r = rules(&g);
    assert_eq!(r["root"], "ref0");
    assert!(
        r["r0"].contains(r#"( "\"leaf\"" ws | "\"tree \\\"x\\\"\"" ws | "3" ws | "null" ws )"#),
        "{g}"
    );
    assert!(r["r1"].ends_with("( ref0 | null )"), "{g}");
    assert_eq!(r["ref0"], r#""{" ws r0 "," ws r1 "}" ws"#);
}

#[test]
fn arrays_are_bounded_as_asked() {
    let item = |g: &str| rules(g)["root"].to_owned();
    let any = schema_to_gbnf(&json!({"type": "array", "items": {"type": "number"}})).unwrap();
    assert_eq!(
        item(&any),
        r#""[" ws ( r0 ( "," ws r0 )* )? "]" ws"#.replace("r0", "number")
    );
    let two_to_four = schema_to_gbnf(&json!({
        "type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4
    }))
    .unwrap();
    assert_eq!(
        item(&two_to_four),
        r#""[" ws string ( "," ws string ){1,3} "]" ws"#
    );
    let at_most_one = schema_to_gbnf(&json!({"type": "array", "maxItems": 1})).unwrap();
    assert_eq!(item(&at_most_one), r#""[" ws value? "]" ws"#);
    let none = schema_to_gbnf(&json!({"type": "array", "maxItems": 0})).unwrap();
    assert_eq!(item(&none), r#""[" ws "]" ws"#);
}

/// What the grammar cannot honour is refused by name and place, never dropped.
#[test]
fn what_cannot_be_enforced_is_refused_by_name() {
    for (schema, expected) in [
        (
            json!({"type": "object", "properties": {"id": {"type": "string", "pattern": "^a"}}}),
            "'pattern' at #/properties/id",
        ),
        (json!({"type": "integer", "minimum": 0}), "'minimum' at #"),
        (
            json!({"type": "string", "format": "email"}),
            "format 'email' at #",
        ),
        (
            json!({"allOf": [{"type": "string"}, {"maxLength": 3}]}),
            "allOf with more than one",
        ),
        (
            json!({"$ref": "https://example.com/s.json"}),
            "must point inside",
        ),
        (json!({"$ref": "#/$defs/missing"}), "points at nothing"),
        (
            json!({"type": "array", "maxItems": 100_000}),
            "maxItems above 256",
        ),
        (
            json!({"type": "string", "maxLength": 100_000}),
            "string length above 4096",
        ),
        (
            json!({"type": "object", "properties": {"a": {}}, "required": ["b"]}),
            "required names 'b'",
        ),
        (json!({"type": "decimal"}), "unknown type 'decimal'"),
        (json!(false), "accepts nothing"),
        (
            json!({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}}),
            "additionalProperties as a schema beside properties",
        ),
    ] {
        let e = schema_to_gbnf(&schema).unwrap_err();
        assert!(e.contains(expected), "{schema}: {e}");
    }
}

/// A schema that refers to itself makes one recursive rule, not an endless expansion; one
/// nested past the depth bound is refused.
#[test]
fn recursion_is_a_rule_and_nesting_is_bounded() {
    let g = schema_to_gbnf(&json!({
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}
    }))
    .unwrap();
    assert!(rules(&g)["ref0"].starts_with(r#""{" ws"#), "{g}");
    let mut deep = json!({"type": "string"});
    for _ in 0..=MAX_DEPTH {
        deep = json!({"type": "array", "items": deep});
    }
    assert!(schema_to_gbnf(&deep).unwrap_err().contains("nests deeper"));
}

#[test]
fn maps_and_formats() {
    let map = schema_to_gbnf(&json!({
        "type": "object", "additionalProperties": {"type": "integer"}
    }))
    .unwrap();
    assert_eq!(
        rules(&map)["root"],
        r#""{" ws ( r0 ( "," ws r0 )* )? "}" ws"#
    );
    assert_eq!(rules(&map)["r0"], r#"string ":" ws integer"#);
    // Properties listed, none of them: an empty object (a tool without arguments); none
    // listed at all: any object.
    let none = schema_to_gbnf(&json!({"type": "object", "properties": {}})).unwrap();
    assert_eq!(rules(&none)["root"], r#""{" ws "}" ws"#);
    let any = schema_to_gbnf(&json!({"type": "object"})).unwrap();
    assert_eq!(rules(&any)["root"], "object");
    let uuid = schema_to_gbnf(&json!({"type": "string", "format": "uuid"})).unwrap();
    assert_eq!(rules(&uuid)["root"].matches("[0-9a-fA-F]").count(), 32);
    assert_eq!(
        rules(&json_object_gbnf())["root"],
        "object",
        "json_object is any object"
    );
}
