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

/// Most rules one grammar may produce, counting what llama.cpp spells out for a bounded
/// repetition (`x{0,n}` is n rules there): a bound on the memory and parsing a request can
/// ask of the worker.
const MAX_EXPANSION: u64 = 1 << 15;
/// Deepest nesting of schemas inside schemas (references are rules, so they do not count).
const MAX_DEPTH: usize = 64;
/// Most items a bounded array may spell out.
const MAX_BOUNDED_ITEMS: u64 = 256;
/// Most characters a bounded string may spell out: llama.cpp reads a repetition past 2000 as
/// unbounded, or refuses it.
const MAX_BOUNDED_LENGTH: u64 = 2000;
/// Most values an `enum`, and most properties an object, may list: each is a way of reading
/// the same text that the sampler keeps alive at once.
const MAX_ALTERNATIVES: usize = 256;

/// The grammar (root rule `root`) of the JSON values `schema` accepts.
///
/// Refuses, naming the keyword and where it is, what this subset cannot make the grammar
/// honour, and what would make llama.cpp's grammar engine work without bound: alternatives
/// that can read the same text (two `anyOf` options of one kind, unless objects told apart by
/// a first property's constant), and repetitions or rules past a total.
pub fn schema_to_gbnf(schema: &Value) -> Result<String, String> {
    let mut budget = Budget::default();
    let (root, rules) = schema_rules(schema, "", &mut budget)?;
    Ok(render(&root, &rules))
}

/// The grammar of any JSON object (`response_format: json_object`).
pub fn json_object_gbnf() -> String {
    format!("root ::= object\n{PRIMITIVES}")
}

/// A grammar text: `root ::= root`, the rules, then the JSON primitives.
pub(crate) fn render(root: &str, rules: &[(String, String)]) -> String {
    let mut out = format!("root ::= {root}\n");
    for (name, body) in rules {
        let _ = writeln!(out, "{name} ::= {body}");
    }
    out.push_str(PRIMITIVES);
    out
}

/// What the schemas of one grammar may spend together (the tools' parameters share one).
#[derive(Debug, Default)]
pub(crate) struct Budget {
    expansion: u64,
}

impl Budget {
    fn spend(&mut self, n: u64) -> Result<(), String> {
        self.expansion = self.expansion.saturating_add(n);
        if self.expansion > MAX_EXPANSION {
            return Err(format!(
                "the schema needs more than {MAX_EXPANSION} grammar rules (bounded lengths \
                 and counts spell out one rule each)"
            ));
        }
        Ok(())
    }
}

/// The expression for `schema`'s values and the rules it uses, their names prefixed with
/// `prefix` (so that several schemas share one grammar); `$ref`s resolve inside `schema`.
pub(crate) fn schema_rules(
    schema: &Value,
    prefix: &str,
    budget: &mut Budget,
) -> Result<(String, Vec<(String, String)>), String> {
    refuse_left_recursion(schema)?;
    let mut converter = Converter {
        root: schema,
        prefix,
        rules: Vec::new(),
        refs: BTreeMap::new(),
        pending: Vec::new(),
        budget,
    };
    let root = converter.visit(schema, "#", 0)?;
    while let Some((pointer, name)) = converter.pending.pop() {
        let target = converter.resolve(&pointer)?;
        let body = converter.visit(target, &pointer, 0)?;
        converter.rules.push((name, body));
    }
    Ok((root, converter.rules))
}

struct Converter<'a, 'b> {
    root: &'a Value,
    prefix: &'b str,
    /// Named rules made so far.
    rules: Vec<(String, String)>,
    /// Rule names given to `$ref` targets, by JSON pointer.
    refs: BTreeMap<String, String>,
    /// References named but not yet converted.
    pending: Vec<(String, String)>,
    budget: &'b mut Budget,
}

/// The kinds of JSON value, told apart by their first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Object,
    Array,
    String,
    Number,
    Boolean,
    Null,
}

const ALL_KINDS: [Kind; 6] = [
    Kind::Object,
    Kind::Array,
    Kind::String,
    Kind::Number,
    Kind::Boolean,
    Kind::Null,
];

fn kind_of_value(v: &Value) -> Kind {
    match v {
        Value::Object(_) => Kind::Object,
        Value::Array(_) => Kind::Array,
        Value::String(_) => Kind::String,
        Value::Number(_) => Kind::Number,
        Value::Bool(_) => Kind::Boolean,
        Value::Null => Kind::Null,
    }
}

fn kind_of_type(t: &str) -> Option<Kind> {
    Some(match t {
        "object" => Kind::Object,
        "array" => Kind::Array,
        "string" => Kind::String,
        "number" | "integer" => Kind::Number,
        "boolean" => Kind::Boolean,
        "null" => Kind::Null,
        _ => return None,
    })
}

/// Keywords that apply to one kind of value: a schema without `type` that carries them is of
/// that kind (JSON Schema applies them to values of it).
const KIND_KEYWORDS: &[(&str, &str)] = &[
    ("properties", "object"),
    ("required", "object"),
    ("additionalProperties", "object"),
    ("items", "array"),
    ("minItems", "array"),
    ("maxItems", "array"),
    ("minLength", "string"),
    ("maxLength", "string"),
    ("format", "string"),
];

/// Refuses a schema in which a reference reaches itself before any character is read (`{"$ref":
/// "#"}`, an `anyOf` that lists itself): llama.cpp refuses such a grammar.
fn refuse_left_recursion(root: &Value) -> Result<(), String> {
    fn leading(schema: &Value, out: &mut Vec<String>) {
        let Value::Object(map) = schema else { return };
        if let Some(r) = map.get("$ref").and_then(Value::as_str) {
            out.push(r.to_owned());
        }
        for keyword in ["anyOf", "oneOf", "allOf"] {
            for alt in map
                .get(keyword)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                leading(alt, out);
            }
        }
    }
    fn all_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                    out.push(r.to_owned());
                }
                map.values().for_each(|v| all_refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| all_refs(v, out)),
            _ => {}
        }
    }
    let mut nodes = vec!["#".to_owned()];
    all_refs(root, &mut nodes);
    nodes.sort();
    nodes.dedup();
    let edges: BTreeMap<&str, Vec<String>> = nodes
        .iter()
        .map(|n| {
            let mut out = Vec::new();
            if let Some(target) = n.strip_prefix('#').and_then(|p| root.pointer(p)) {
                leading(target, &mut out);
            }
            (n.as_str(), out)
        })
        .collect();
    // Depth-first, with the path on a stack: a pointer met again on its own path is a cycle.
    fn visit<'e>(
        node: &'e str,
        edges: &'e BTreeMap<&str, Vec<String>>,
        path: &mut Vec<&'e str>,
        done: &mut std::collections::BTreeSet<&'e str>,
    ) -> Result<(), String> {
        if path.contains(&node) {
            return Err(format!(
                "$ref {node} reaches itself before any character: a grammar cannot say that"
            ));
        }
        if !done.insert(node) {
            return Ok(());
        }
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some((key, _)) = edges.get_key_value(next.as_str()) {
                visit(key, edges, path, done)?;
            }
        }
        path.pop();
        Ok(())
    }
    let mut done = std::collections::BTreeSet::new();
    for node in edges.keys() {
        visit(node, &edges, &mut Vec::new(), &mut done)?;
    }
    Ok(())
}

impl<'a> Converter<'a, '_> {
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
        if schema.contains_key("const") || schema.contains_key("enum") {
            return self.literals(schema, at);
        }
        let combinators: Vec<&str> = ["anyOf", "oneOf", "allOf"]
            .into_iter()
            .filter(|k| schema.contains_key(*k))
            .collect();
        if let Some(&keyword) = combinators.first() {
            // REVIEW, fixed: what stands beside a combinator was dropped; it is refused.
            if combinators.len() > 1 || schema.len() > 1 + self.annotations(schema) {
                return Err(format!(
                    "{keyword} beside other constraints at {at} cannot be enforced by this \
                     engine's grammar"
                ));
            }
            let options = schema[keyword]
                .as_array()
                .filter(|o| !o.is_empty())
                .ok_or_else(|| format!("{keyword} at {at} must be a non-empty array"))?;
            if keyword == "allOf" && options.len() > 1 {
                return Err(format!("allOf with more than one schema at {at}"));
            }
            // REVIEW, fixed: options that can read the same text keep one llama.cpp stack
            // per way of reading it (doubling per level of nesting); they are refused, so
            // that oneOf is exactly anyOf.
            self.disjoint(options, &format!("{at}/{keyword}"))?;
            let mut alternatives = Vec::with_capacity(options.len());
            for (i, option) in options.iter().enumerate() {
                alternatives.push(self.visit(option, &format!("{at}/{keyword}/{i}"), depth + 1)?);
            }
            return Ok(group(alternatives));
        }
        let kinds = self.types(schema, at)?;
        match kinds.as_slice() {
            [] => Ok("value".into()),
            kinds => {
                let mut alternatives = Vec::with_capacity(kinds.len());
                for kind in kinds {
                    alternatives.push(self.typed(kind, schema, at, depth)?);
                }
                Ok(group(alternatives))
            }
        }
    }

    /// The types a schema without `const`, `enum` or combinators admits, each once
    /// (`integer` within `number`): its `type`, or the kind its keywords apply to; none for
    /// any value.
    fn types(&self, schema: &Map<String, Value>, at: &str) -> Result<Vec<&'static str>, String> {
        let mut types: Vec<&'static str> = match schema.get("type") {
            None => {
                // REVIEW, fixed: keywords without a type were dropped (any value admitted).
                let mut implied: Vec<&'static str> = KIND_KEYWORDS
                    .iter()
                    .filter(|(k, _)| schema.contains_key(*k))
                    .map(|(_, t)| *t)
                    .collect();
                implied.sort_unstable();
                implied.dedup();
                if implied.len() > 1 {
                    return Err(format!(
                        "the schema at {at} has keywords of {} without a type: say its type",
                        implied.join(" and ")
                    ));
                }
                implied
            }
            Some(Value::String(t)) => vec![known_type(t, at)?],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| format!("type at {at} must name types"))
                        .and_then(|t| known_type(t, at))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("type at {at} must be a string or a list of them")),
        };
        // REVIEW, fixed: a type listed twice converted its schema twice.
        types.sort_unstable();
        types.dedup();
        if types.contains(&"number") {
            types.retain(|t| *t != "integer");
        }
        Ok(types)
    }

    /// `const` or `enum`: the values, each as exactly its JSON, of the schema's `type` if it
    /// says one.
    fn literals(&mut self, schema: &Map<String, Value>, at: &str) -> Result<String, String> {
        let values: Vec<&Value> = match (schema.get("const"), schema.get("enum")) {
            (Some(_), Some(_)) => return Err(format!("const beside enum at {at}")),
            (Some(v), None) => vec![v],
            (None, Some(e)) => e
                .as_array()
                .filter(|v| !v.is_empty() && v.len() <= MAX_ALTERNATIVES)
                .ok_or_else(|| format!("enum at {at} must list 1 to {MAX_ALTERNATIVES} values"))?
                .iter()
                .collect(),
            (None, None) => unreachable!("called for const or enum"),
        };
        // REVIEW, fixed: what stood beside const or enum was dropped.
        if let Some(key) = schema.keys().find(|k| {
            !ANNOTATIONS.contains(&k.as_str()) && !matches!(k.as_str(), "const" | "enum" | "type")
        }) {
            return Err(format!(
                "'{key}' beside const or enum at {at} cannot be enforced by this engine's grammar"
            ));
        }
        if schema.contains_key("type") {
            let types = self.types(schema, at)?;
            if let Some(v) = values.iter().find(|v| !types.iter().any(|t| of_type(v, t))) {
                return Err(format!("the value {v} at {at} is not of the schema's type"));
            }
        }
        Ok(group(values.into_iter().map(literal)))
    }

    /// Refuses options that can read the same text: of one kind, unless objects told apart
    /// by a first property whose value each fixes (a discriminated union, as the tools' calls
    /// are).
    fn disjoint(&self, options: &[Value], at: &str) -> Result<(), String> {
        let kinds: Vec<Vec<Kind>> = options
            .iter()
            .map(|o| self.kinds(o, &mut Vec::new()))
            .collect::<Result<_, _>>()?;
        for i in 0..options.len() {
            for j in i + 1..options.len() {
                let shared: Vec<Kind> = kinds[i]
                    .iter()
                    .filter(|k| kinds[j].contains(k))
                    .copied()
                    .collect();
                if shared.is_empty() {
                    continue;
                }
                if shared == [Kind::Object] {
                    let (a, b) = (
                        self.discriminant(&options[i]),
                        self.discriminant(&options[j]),
                    );
                    if let (Some((ka, va)), Some((kb, vb))) = (a, b)
                        && ka == kb
                        && va != vb
                    {
                        continue;
                    }
                }
                return Err(format!(
                    "options {i} and {j} of {at} can both be {:?}: this engine's grammar \
                     enforces only options of different kinds (or objects told apart by the \
                     constant of their first property)",
                    shared[0]
                ));
            }
        }
        Ok(())
    }

    /// The kinds of value a schema admits (by first character).
    fn kinds(&self, schema: &'a Value, seen: &mut Vec<&'a str>) -> Result<Vec<Kind>, String> {
        let map = match schema {
            Value::Bool(true) => return Ok(ALL_KINDS.to_vec()),
            Value::Object(map) => map,
            _ => return Ok(Vec::new()),
        };
        if let Some(r) = map.get("$ref").and_then(Value::as_str) {
            if seen.contains(&r) {
                return Ok(Vec::new());
            }
            seen.push(r);
            let target = self.resolve(r)?;
            return self.kinds(target, seen);
        }
        if let Some(v) = map.get("const") {
            return Ok(vec![kind_of_value(v)]);
        }
        if let Some(values) = map.get("enum").and_then(Value::as_array) {
            let mut kinds: Vec<Kind> = values.iter().map(kind_of_value).collect();
            kinds.sort_unstable();
            kinds.dedup();
            return Ok(kinds);
        }
        for keyword in ["anyOf", "oneOf", "allOf"] {
            if let Some(options) = map.get(keyword).and_then(Value::as_array) {
                let mut kinds = Vec::new();
                for o in options {
                    kinds.extend(self.kinds(o, seen)?);
                }
                kinds.sort_unstable();
                kinds.dedup();
                return Ok(kinds);
            }
        }
        let types = self.types(map, "#")?;
        if types.is_empty() {
            return Ok(ALL_KINDS.to_vec());
        }
        Ok(types.iter().filter_map(|t| kind_of_type(t)).collect())
    }

    /// An object schema's first property and the one value it fixes, if it does.
    fn discriminant(&self, schema: &'a Value) -> Option<(&'a str, &'a Value)> {
        let mut schema = schema;
        while let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            schema = self.resolve(r).ok()?;
        }
        let (name, property) = schema.get("properties")?.as_object()?.iter().next()?;
        let required = schema.get("required")?.as_array()?;
        if !required.iter().any(|r| r == name.as_str()) {
            return None;
        }
        let value = match (property.get("const"), property.get("enum")) {
            (Some(v), _) => v,
            (None, Some(Value::Array(values))) if values.len() == 1 => &values[0],
            _ => return None,
        };
        Some((name.as_str(), value))
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
            "string" => string(schema, at, self.budget),
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
            Some(Value::Object(p)) if p.len() <= MAX_ALTERNATIVES => p,
            Some(Value::Object(_)) => {
                return Err(format!(
                    "properties at {at} lists more than {MAX_ALTERNATIVES}: too many ways to \
                     read an object for this engine's grammar"
                ));
            }
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
        self.budget.spend(max.unwrap_or(min))?;
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
        self.budget.spend(1)?;
        let name = format!("{}r{}", self.prefix, self.rules.len());
        self.rules.push((name.clone(), expr));
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
        self.budget.spend(1)?;
        self.resolve(pointer)?;
        let name = format!("{}ref{}", self.prefix, self.refs.len());
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
fn string(schema: &Map<String, Value>, at: &str, budget: &mut Budget) -> Result<String, String> {
    let min = count(schema, "minLength", at)?;
    let max = count(schema, "maxLength", at)?;
    if let Some(format) = schema.get("format") {
        if min.is_some() || max.is_some() {
            return Err(format!("format beside a length at {at}"));
        }
        let digits = |n: usize| vec!["[0-9]"; n].join(" ");
        let hex = |n: usize| vec!["[0-9a-fA-F]"; n].join(" ");
        // REVIEW, fixed: each month's days (February's 29, leap year or not).
        let day = |last: &str| format!(r#"( "0" [1-9] | "1" [0-9] | "2" [0-9] {last})"#);
        let date = format!(
            r#"{} "-" ( ( "0" [13578] | "1" [02] ) "-" {} | ( "0" [469] | "11" ) "-" {} | "02" "-" {} )"#,
            digits(4),
            day(r#"| "3" [01] "#),
            day(r#"| "30" "#),
            day(""),
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
    budget.spend(max.or(min).unwrap_or(0))?;
    Ok(match (min, max) {
        (None, None) => "string".into(),
        (min, max) => format!(r#""\"" char{} "\"" ws"#, times(min.unwrap_or(0), max)),
    })
}

/// A type this converter knows.
fn known_type(t: &str, at: &str) -> Result<&'static str, String> {
    Ok(match t {
        "object" => "object",
        "array" => "array",
        "string" => "string",
        "number" => "number",
        "integer" => "integer",
        "boolean" => "boolean",
        "null" => "null",
        other => return Err(format!("unknown type '{other}' at {at}")),
    })
}

/// Whether `v` is of JSON Schema type `t`.
fn of_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
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
pub(crate) fn literal_text(text: &str) -> String {
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
pub(crate) mod tests;
