//! JSON Schema to a llama.cpp grammar (GBNF), for `response_format` on engines that sample
//! under a grammar.
//!
//! The grammar admits only JSON that the schema accepts, so a model sampling under it cannot
//! answer anything else. It may admit less than the schema does (properties come in the
//! schema's order; an object whose schema lists properties (even none) gets no others, which JSON Schema
//! allows), never more. What this subset cannot honour (a `pattern`, numeric bounds, …) is
//! refused by name rather than dropped: an answer that breaks the app's schema would be worse
//! than a clear 400.
//!
//! llama.cpp has its own converter, in its `common` library; that library is not built here
//! (it would add minutes of C++ to every build), and this one is small and testable without a
//! model.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// The rules every grammar shares: JSON's values (RFC 8259), with whitespace between tokens
/// bounded so that a model cannot spend its whole allowance on it.
const PRIMITIVES: &str = r#"value   ::= object | array | string | number | ("true" | "false" | "null") ws
object  ::= "{" ws ( member ( "," ws member )* )? "}" ws
member  ::= string ":" ws value
array   ::= "[" ws ( value ( "," ws value )* )? "]" ws
string  ::= "\"" char* "\"" ws
char    ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] )
number  ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )? ws
integer ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ws
boolean ::= ("true" | "false") ws
null    ::= "null" ws
ws      ::= ( " " | "\n" [ ]{0,8} )?
"#;

/// Keywords that describe a schema without constraining it.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    // OpenAI's structured outputs: every property must be listed in `required` there, which
    // this converter honours anyway.
    "strict",
];

/// Most rules one schema may produce: a bound on the work a request can ask of the sampler.
const MAX_RULES: usize = 4096;
/// Deepest nesting of schemas inside schemas (references are rules, so they do not count).
const MAX_DEPTH: usize = 64;
/// Most items a bounded array may spell out, and most characters a bounded string may:
/// llama.cpp spells a repetition out as that many rules.
const MAX_BOUNDED_ITEMS: u64 = 256;
const MAX_BOUNDED_LENGTH: u64 = 4096;

/// The grammar (root rule `root`) of the JSON values `schema` accepts.
///
/// Refuses, naming the keyword and where it is, what this subset cannot make the grammar
/// honour.
pub fn schema_to_gbnf(schema: &Value) -> Result<String, String> {
    let mut converter = Converter {
        root: schema,
        rules: BTreeMap::new(),
        refs: BTreeMap::new(),
        pending: Vec::new(),
    };
    let root = converter.visit(schema, "#", 0)?;
    while let Some((pointer, name)) = converter.pending.pop() {
        let target = converter.resolve(&pointer)?;
        let body = converter.visit(target, &pointer, 0)?;
        converter.rules.insert(name, body);
    }
    let mut out = format!("root ::= {root}\n");
    for (name, body) in &converter.rules {
        let _ = writeln!(out, "{name} ::= {body}");
    }
    out.push_str(PRIMITIVES);
    Ok(out)
}

/// The grammar of any JSON object (`response_format: json_object`).
pub fn json_object_gbnf() -> String {
    format!("root ::= object\n{PRIMITIVES}")
}

struct Converter<'a> {
    root: &'a Value,
    /// Named rules made so far, by name.
    rules: BTreeMap<String, String>,
    /// Rule names given to `$ref` targets, by JSON pointer.
    refs: BTreeMap<String, String>,
    /// References named but not yet converted.
    pending: Vec<(String, String)>,
}

impl<'a> Converter<'a> {
    /// The grammar expression for values `schema` (found at `at`) accepts.
    fn visit(&mut self, schema: &'a Value, at: &str, depth: usize) -> Result<String, String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "the schema nests deeper than {MAX_DEPTH} levels at {at}"
            ));
        }
        let schema = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => return Err(format!("the schema at {at} accepts nothing")),
            Value::Object(map) => map,
            _ => return Err(format!("the schema at {at} is not an object")),
        };
        if let Some(key) = schema.keys().find(|k| !Self::understood(k)) {
            return Err(format!(
                "the schema keyword '{key}' at {at} cannot be enforced by this engine's grammar"
            ));
        }
        if let Some(reference) = schema.get("$ref") {
            if schema.len() > 1 + self.annotations(schema) {
                return Err(format!("$ref beside other constraints at {at}"));
            }
            return self.reference(reference, at);
        }
        if let Some(value) = schema.get("const") {
            return Ok(literal(value));
        }
        if let Some(values) = schema.get("enum") {
            let values = values
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("enum at {at} must be a non-empty array"))?;
            return Ok(group(values.iter().map(literal)));
        }
        for keyword in ["anyOf", "oneOf", "allOf"] {
            if let Some(options) = schema.get(keyword) {
                let options = options
                    .as_array()
                    .filter(|o| !o.is_empty())
                    .ok_or_else(|| format!("{keyword} at {at} must be a non-empty array"))?;
                if keyword == "allOf" && options.len() > 1 {
                    return Err(format!("allOf with more than one schema at {at}"));
                }
                let mut alternatives = Vec::with_capacity(options.len());
                for (i, option) in options.iter().enumerate() {
                    alternatives.push(self.visit(
                        option,
                        &format!("{at}/{keyword}/{i}"),
                        depth + 1,
                    )?);
                }
                // A grammar cannot say "exactly one of": oneOf admits what any option admits,
                // as llama.cpp's own converter does.
                return Ok(group(alternatives));
            }
        }
        match schema.get("type") {
            None => {
                if schema.contains_key("properties") {
                    self.object(schema, at, depth)
                } else if schema.contains_key("items") {
                    self.array(schema, at, depth)
                } else {
                    Ok("value".into())
                }
            }
            Some(Value::String(kind)) => self.typed(kind, schema, at, depth),
            Some(Value::Array(kinds)) if !kinds.is_empty() => {
                let mut alternatives = Vec::with_capacity(kinds.len());
                for kind in kinds {
                    let kind = kind
                        .as_str()
                        .ok_or_else(|| format!("type at {at} must name types"))?;
                    alternatives.push(self.typed(kind, schema, at, depth)?);
                }
                Ok(group(alternatives))
            }
            Some(_) => Err(format!("type at {at} must be a string or a list of them")),
        }
    }

    fn understood(key: &str) -> bool {
        ANNOTATIONS.contains(&key)
            || matches!(
                key,
                "$ref"
                    | "type"
                    | "const"
                    | "enum"
                    | "anyOf"
                    | "oneOf"
                    | "allOf"
                    | "properties"
                    | "required"
                    | "additionalProperties"
                    | "items"
                    | "minItems"
                    | "maxItems"
                    | "minLength"
                    | "maxLength"
                    | "format"
            )
    }

    fn annotations(&self, schema: &Map<String, Value>) -> usize {
        schema
            .keys()
            .filter(|k| ANNOTATIONS.contains(&k.as_str()))
            .count()
    }

    fn typed(
        &mut self,
        kind: &str,
        schema: &'a Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, String> {
        match kind {
            "object" => self.object(schema, at, depth),
            "array" => self.array(schema, at, depth),
            "string" => string(schema, at),
            "number" => Ok("number".into()),
            "integer" => Ok("integer".into()),
            "boolean" => Ok("boolean".into()),
            "null" => Ok("null".into()),
            other => Err(format!("unknown type '{other}' at {at}")),
        }
    }

    fn object(
        &mut self,
        schema: &'a Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, String> {
        static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
        let properties = match schema.get("properties") {
            None => &*EMPTY,
            Some(Value::Object(p)) => p,
            Some(_) => return Err(format!("properties at {at} must be an object")),
        };
        let required: Vec<&str> = match schema.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("required at {at} must list names"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("required at {at} must be an array")),
        };
        if let Some(missing) = required.iter().find(|r| !properties.contains_key(**r)) {
            if properties.is_empty() {
                return Err(format!(
                    "required names '{missing}' at {at}, which lists no properties"
                ));
            }
            return Err(format!(
                "required names '{missing}' at {at}, which is not among its properties"
            ));
        }
        let additional = schema.get("additionalProperties");
        if properties.is_empty() && schema.contains_key("properties") {
            // Properties listed, and none of them: an empty object (a tool that takes no
            // arguments), unless others are allowed as a schema says.
            if matches!(additional, None | Some(Value::Bool(_))) {
                return Ok(r#""{" ws "}" ws"#.into());
            }
        }
        if properties.is_empty() {
            // A map: any keys, each value as `additionalProperties` says.
            let value = match additional {
                None | Some(Value::Bool(true)) => return Ok("object".into()),
                Some(Value::Bool(false)) => return Ok(r#""{" ws "}" ws"#.into()),
                Some(s) => self.visit(s, &format!("{at}/additionalProperties"), depth + 1)?,
            };
            let member = self.rule(format!(r#"string ":" ws {value}"#))?;
            return Ok(format!(
                r#""{{" ws ( {member} ( "," ws {member} )* )? "}}" ws"#
            ));
        }
        if matches!(additional, Some(v) if !matches!(v, Value::Bool(_))) {
            return Err(format!(
                "additionalProperties as a schema beside properties at {at}"
            ));
        }
        // Each property as `"name": value`, in the schema's order.
        let mut members = Vec::with_capacity(properties.len());
        for (name, property) in properties {
            let value = self.visit(
                property,
                &format!("{at}/properties/{}", pointer_escape(name)),
                depth + 1,
            )?;
            let member = self.rule(format!(
                r#"{} ws ":" ws {value}"#,
                literal_text(&Value::String(name.clone()).to_string())
            ))?;
            members.push((required.contains(&name.as_str()), member));
        }
        // Required members in order, each optional one maybe, commas between what is there:
        // the members after the last one written form a tail, so that an optional member
        // never leaves a dangling comma.
        let mut body = String::new();
        let first_required = members.iter().position(|(r, _)| *r);
        match first_required {
            Some(first) => {
                // Optional members before the first required one each carry their comma after.
                for (_, member) in &members[..first] {
                    let _ = write!(body, r#"( {member} "," ws )? "#);
                }
                body.push_str(&members[first].1);
                for (required, member) in &members[first + 1..] {
                    if *required {
                        let _ = write!(body, r#" "," ws {member}"#);
                    } else {
                        let _ = write!(body, r#" ( "," ws {member} )?"#);
                    }
                }
            }
            None => {
                // All optional: the object starts at any member, and the rest follow it.
                let mut next: Option<String> = None;
                for (_, member) in members.iter().rev() {
                    let rest = next
                        .as_ref()
                        .map(|n| format!(r#" ( "," ws {n} )?"#))
                        .unwrap_or_default();
                    // A tail that starts at this member: it, then maybe the tails after it.
                    let mut alternatives = vec![format!("{member}{rest}")];
                    if let Some(n) = &next {
                        alternatives.push(n.clone());
                    }
                    next = Some(self.rule(group(alternatives))?);
                }
                body = format!("{}?", next.expect("at least one property"));
            }
        }
        Ok(format!(r#""{{" ws {body} "}}" ws"#))
    }

    fn array(
        &mut self,
        schema: &'a Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, String> {
        let item = match schema.get("items") {
            None => "value".to_owned(),
            Some(items) => {
                let expr = self.visit(items, &format!("{at}/items"), depth + 1)?;
                self.rule(expr)?
            }
        };
        let min = count(schema, "minItems", at)?.unwrap_or(0);
        let max = count(schema, "maxItems", at)?;
        if let Some(max) = max {
            if max < min {
                return Err(format!("maxItems is below minItems at {at}"));
            }
            if max > MAX_BOUNDED_ITEMS {
                return Err(format!(
                    "maxItems above {MAX_BOUNDED_ITEMS} at {at} cannot be enforced by this engine's grammar"
                ));
            }
        }
        if min > MAX_BOUNDED_ITEMS {
            return Err(format!(
                "minItems above {MAX_BOUNDED_ITEMS} at {at} cannot be enforced by this engine's grammar"
            ));
        }
        let rest = format!(r#"( "," ws {item} )"#);
        let body = match (min, max) {
            (_, Some(0)) => String::new(),
            (0, Some(1)) => format!("{item}? "),
            (1, Some(1)) => format!("{item} "),
            (0, max) => format!("( {item} {rest}{} )? ", times(0, max.map(|m| m - 1))),
            (min, max) => format!("{item} {rest}{} ", times(min - 1, max.map(|m| m - 1))),
        };
        Ok(format!(r#""[" ws {body}"]" ws"#))
    }

    /// A rule named for the expression (or the expression's own name if it is one already).
    fn rule(&mut self, expr: String) -> Result<String, String> {
        if is_name(&expr) {
            return Ok(expr);
        }
        if self.rules.len() >= MAX_RULES {
            return Err(format!(
                "the schema needs more than {MAX_RULES} grammar rules"
            ));
        }
        let name = format!("r{}", self.rules.len());
        self.rules.insert(name.clone(), expr);
        Ok(name)
    }

    fn reference(&mut self, reference: &Value, at: &str) -> Result<String, String> {
        let pointer = reference
            .as_str()
            .filter(|p| p.starts_with("#/") || *p == "#")
            .ok_or_else(|| format!("$ref at {at} must point inside the schema (\"#/...\")"))?;
        if let Some(name) = self.refs.get(pointer) {
            return Ok(name.clone());
        }
        if self.refs.len() >= MAX_RULES {
            return Err(format!(
                "the schema needs more than {MAX_RULES} grammar rules"
            ));
        }
        self.resolve(pointer)?;
        let name = format!("ref{}", self.refs.len());
        self.refs.insert(pointer.to_owned(), name.clone());
        self.pending.push((pointer.to_owned(), name.clone()));
        Ok(name)
    }

    fn resolve(&self, pointer: &str) -> Result<&'a Value, String> {
        self.root
            .pointer(&pointer[1..])
            .ok_or_else(|| format!("$ref {pointer} points at nothing in the schema"))
    }
}

/// The grammar of strings `schema` accepts: any, of a bounded length, or of a known format.
fn string(schema: &Map<String, Value>, at: &str) -> Result<String, String> {
    let min = count(schema, "minLength", at)?;
    let max = count(schema, "maxLength", at)?;
    if let Some(format) = schema.get("format") {
        if min.is_some() || max.is_some() {
            return Err(format!("format beside a length at {at}"));
        }
        let digits = |n: usize| vec!["[0-9]"; n].join(" ");
        let hex = |n: usize| vec!["[0-9a-fA-F]"; n].join(" ");
        let date = format!(
            r#"{} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )"#,
            digits(4)
        );
        let time = r#"( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,9} )? ( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )"#;
        let inner = match format.as_str() {
            Some("date") => date,
            Some("time") => time.to_owned(),
            Some("date-time") => format!(r#"{date} "T" {time}"#),
            Some("uuid") => format!(
                r#"{} "-" {} "-" {} "-" {} "-" {}"#,
                hex(8),
                hex(4),
                hex(4),
                hex(4),
                hex(12)
            ),
            Some(other) => {
                return Err(format!(
                    "string format '{other}' at {at} cannot be enforced by this engine's grammar \
                     (date, time, date-time and uuid can)"
                ));
            }
            None => return Err(format!("format at {at} must be a string")),
        };
        return Ok(format!(r#""\"" {inner} "\"" ws"#));
    }
    if let (Some(min), Some(max)) = (min, max)
        && max < min
    {
        return Err(format!("maxLength is below minLength at {at}"));
    }
    if min.max(max).is_some_and(|n| n > MAX_BOUNDED_LENGTH) {
        return Err(format!(
            "a string length above {MAX_BOUNDED_LENGTH} at {at} cannot be enforced by this engine's grammar"
        ));
    }
    Ok(match (min, max) {
        (None, None) => "string".into(),
        (min, max) => format!(r#""\"" char{} "\"" ws"#, times(min.unwrap_or(0), max)),
    })
}

/// A non-negative integer keyword, if present.
fn count(schema: &Map<String, Value>, key: &str, at: &str) -> Result<Option<u64>, String> {
    match schema.get(key) {
        None => Ok(None),
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| format!("{key} at {at} must be a non-negative integer"))?;
            if n > 1 << 20 {
                return Err(format!("{key} at {at} is too large to enforce"));
            }
            Ok(Some(n))
        }
    }
}

/// GBNF's repetition: `*`, `{min,}` or `{min,max}`.
fn times(min: u64, max: Option<u64>) -> String {
    match (min, max) {
        (0, None) => "*".into(),
        (min, None) => format!("{{{min},}}"),
        (min, Some(max)) => format!("{{{min},{max}}}"),
    }
}

/// `(a | b | …)`, or `a` alone.
fn group(alternatives: impl IntoIterator<Item = String>) -> String {
    let alternatives: Vec<String> = alternatives.into_iter().collect();
    if alternatives.len() == 1 {
        return alternatives.into_iter().next().expect("one");
    }
    format!("( {} )", alternatives.join(" | "))
}

/// The grammar of exactly `value`, as compact JSON, then whitespace.
fn literal(value: &Value) -> String {
    format!("{} ws", literal_text(&value.to_string()))
}

/// `text` as a GBNF string literal.
fn literal_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn is_name(expr: &str) -> bool {
    !expr.is_empty() && expr.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn pointer_escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
