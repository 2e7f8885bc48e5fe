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
            "string length above 2000",
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

// ---------------------------------------------------------------------------------------------
// Review harness: llama.cpp's grammar engine as its source (llama.cpp/src/llama-grammar.cpp, in
// llama-cpp-sys-2 0.1.161) reads and runs a GBNF text, so that what the converter's grammars
// admit, and what they cost the sampler, can be checked without a model: the parser with its
// checks (unknown escapes, undefined rules, `MAX_REPETITION_THRESHOLD`, left recursion) and
// its rewrite of repetitions into rules (`handle_repetitions`), and the pushdown stacks it
// keeps while reading (`llama_grammar_advance_stack`, `llama_grammar_accept`). The sampler
// tests every candidate token of the vocabulary against each live stack
// (`llama_grammar_reject_candidates`), and dedups stacks with a linear search per stack, so a
// token costs about stacks × vocabulary, plus stacks², on the scheduler thread that serves every
// request.
// ---------------------------------------------------------------------------------------------

use std::collections::HashSet;

/// llama.cpp's `MAX_REPETITION_THRESHOLD`: `{m,n}` with m above it is a parse error, and n
/// above it is read as no bound at all.
const LLAMA_REPETITION_THRESHOLD: u64 = 2000;

/// Most parse stacks a grammar should keep alive at once: 128 offered tools keep about 400
/// alive at the start of a call.
const MOST_LIVE_STACKS: usize = 1024;

/// Most rules llama.cpp should make of one request's grammar (each costs it a rule vector and
/// a named symbol, some 150 to 250 bytes, built on the scheduler thread before any token).
const MOST_EXPANDED_RULES: u64 = 1 << 17;

#[derive(Clone, Debug)]
enum Elem {
    /// A character class (a literal's character is a class of one): inclusive ranges of code
    /// points, maybe negated.
    Chars {
        negated: bool,
        ranges: Vec<(u32, u32)>,
    },
    /// A rule, by index.
    Rule(usize),
}

type Alternative = Vec<Elem>;
/// A place in the grammar: rule, alternative, element.
type Pos = (usize, usize, usize);
/// llama.cpp's `llama_grammar_stack`, from the bottom up.
type Stack = Vec<Pos>;

struct Llama {
    rules: Vec<Vec<Alternative>>,
    names: BTreeMap<String, usize>,
    defined: Vec<bool>,
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

fn skip_space(s: &[char], at: &mut usize) {
    while s.get(*at).is_some_and(|&c| c == ' ' || c == '\t') {
        *at += 1;
    }
}

/// llama.cpp's `parse_char`: one character of a literal or a class, with its escapes.
fn parse_char(s: &[char], at: &mut usize) -> Result<u32, String> {
    let c = *s.get(*at).ok_or("unexpected end of input")?;
    *at += 1;
    if c != '\\' {
        return Ok(u32::from(c));
    }
    let e = *s.get(*at).ok_or("unexpected end of input")?;
    *at += 1;
    let hex = |at: &mut usize, n: usize| -> Result<u32, String> {
        let digits: String = s
            .get(*at..*at + n)
            .ok_or("expecting hex chars")?
            .iter()
            .collect();
        *at += n;
        u32::from_str_radix(&digits, 16).map_err(|_| format!("expecting {n} hex chars"))
    };
    match e {
        'x' => hex(at, 2),
        'u' => hex(at, 4),
        'U' => hex(at, 8),
        't' => Ok(u32::from('\t')),
        'r' => Ok(u32::from('\r')),
        'n' => Ok(u32::from('\n')),
        '\\' | '"' | '[' | ']' | '-' => Ok(u32::from(e)),
        other => Err(format!("unknown escape \\{other}")),
    }
}

fn parse_integer(s: &[char], at: &mut usize) -> Result<u64, String> {
    let begin = *at;
    while s.get(*at).is_some_and(char::is_ascii_digit) {
        *at += 1;
    }
    s[begin..*at]
        .iter()
        .collect::<String>()
        .parse()
        .map_err(|_| "expecting an integer".to_owned())
}

/// A repetition operator at `at` (`*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`) as llama.cpp reads
/// it: (min, max), no max for no bound.
fn parse_repetition(s: &[char], at: &mut usize) -> Result<(u64, Option<u64>), String> {
    let c = s[*at];
    *at += 1;
    match c {
        '*' => Ok((0, None)),
        '+' => Ok((1, None)),
        '?' => Ok((0, Some(1))),
        _ => {
            skip_space(s, at);
            let min = parse_integer(s, at)?;
            skip_space(s, at);
            let max = match s.get(*at).copied() {
                Some('}') => Some(min),
                Some(',') => {
                    *at += 1;
                    skip_space(s, at);
                    if s.get(*at).is_some_and(char::is_ascii_digit) {
                        Some(parse_integer(s, at)?)
                    } else {
                        None
                    }
                }
                _ => return Err("expecting ',' or '}'".into()),
            };
            skip_space(s, at);
            if s.get(*at).copied() != Some('}') {
                return Err("expecting '}'".into());
            }
            *at += 1;
            if min > LLAMA_REPETITION_THRESHOLD {
                return Err(format!(
                    "llama.cpp: number of repetitions ({min}) exceeds sane defaults"
                ));
            }
            // llama.cpp: `if (max_times > MAX_REPETITION_THRESHOLD) max_times = UINT64_MAX;`
            Ok((min, max.filter(|&m| m <= LLAMA_REPETITION_THRESHOLD)))
        }
    }
}

impl Llama {
    /// Parses `text` as llama.cpp's `llama_grammar_parser::parse` and `llama_grammar_init_impl`
    /// do, refusing what they refuse.
    fn parse(text: &str) -> Result<Self, String> {
        let mut g = Llama {
            rules: Vec::new(),
            names: BTreeMap::new(),
            defined: Vec::new(),
        };
        for line in text.split('\n') {
            if line.trim().is_empty() {
                continue;
            }
            let (name, body) = line
                .split_once("::=")
                .ok_or_else(|| format!("expecting ::= in {line}"))?;
            let name = name.trim();
            if name.is_empty() || !name.chars().all(word_char) {
                return Err(format!("expecting a rule name, got {name:?}"));
            }
            let id = g.symbol(name);
            let chars: Vec<char> = body.chars().collect();
            let mut at = 0;
            let alternatives = g.alternatives(&chars, &mut at)?;
            skip_space(&chars, &mut at);
            if at != chars.len() {
                let rest: String = chars[at..].iter().collect();
                return Err(format!("expecting newline or end at {rest}"));
            }
            g.rules[id] = alternatives;
            g.defined[id] = true;
        }
        if let Some((name, _)) = g.names.iter().find(|(_, id)| !g.defined[**id]) {
            return Err(format!("undefined rule identifier '{name}'"));
        }
        if !g.names.contains_key("root") {
            return Err("grammar does not contain a 'root' symbol".into());
        }
        g.check_left_recursion()?;
        Ok(g)
    }

    fn fresh(&mut self, defined: bool) -> usize {
        self.rules.push(Vec::new());
        self.defined.push(defined);
        self.rules.len() - 1
    }

    fn symbol(&mut self, name: &str) -> usize {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.fresh(false);
        self.names.insert(name.to_owned(), id);
        id
    }

    fn alternatives(&mut self, s: &[char], at: &mut usize) -> Result<Vec<Alternative>, String> {
        let mut out = vec![self.sequence(s, at)?];
        while s.get(*at).copied() == Some('|') {
            *at += 1;
            out.push(self.sequence(s, at)?);
        }
        Ok(out)
    }

    fn sequence(&mut self, s: &[char], at: &mut usize) -> Result<Alternative, String> {
        let mut seq: Alternative = Vec::new();
        // Where the last item starts, and how many rules it stands for (llama.cpp's
        // `last_sym_start` and `n_prev_rules`).
        let mut last: Option<usize> = None;
        let mut n_prev: u64 = 1;
        loop {
            skip_space(s, at);
            let Some(c) = s.get(*at).copied() else {
                break;
            };
            match c {
                '"' => {
                    *at += 1;
                    last = Some(seq.len());
                    n_prev = 1;
                    loop {
                        match s.get(*at).copied() {
                            None => return Err("unexpected end of input".into()),
                            Some('"') => {
                                *at += 1;
                                break;
                            }
                            Some(_) => {
                                let ch = parse_char(s, at)?;
                                seq.push(Elem::Chars {
                                    negated: false,
                                    ranges: vec![(ch, ch)],
                                });
                            }
                        }
                    }
                }
                '[' => {
                    *at += 1;
                    let negated = s.get(*at).copied() == Some('^');
                    if negated {
                        *at += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        match s.get(*at).copied() {
                            None => return Err("unexpected end of input".into()),
                            Some(']') => {
                                *at += 1;
                                break;
                            }
                            Some(_) => {
                                let lo = parse_char(s, at)?;
                                let range = s.get(*at).copied() == Some('-')
                                    && s.get(*at + 1).is_some_and(|&n| n != ']');
                                let hi = if range {
                                    *at += 1;
                                    parse_char(s, at)?
                                } else {
                                    lo
                                };
                                ranges.push((lo, hi));
                            }
                        }
                    }
                    last = Some(seq.len());
                    n_prev = 1;
                    seq.push(Elem::Chars { negated, ranges });
                }
                '(' => {
                    *at += 1;
                    let before = self.rules.len();
                    let id = self.fresh(true);
                    let body = self.alternatives(s, at)?;
                    skip_space(s, at);
                    if s.get(*at).copied() != Some(')') {
                        return Err("expecting ')'".into());
                    }
                    *at += 1;
                    self.rules[id] = body;
                    n_prev = u64::try_from(self.rules.len() - before)
                        .unwrap_or(u64::MAX)
                        .max(1);
                    last = Some(seq.len());
                    seq.push(Elem::Rule(id));
                }
                '*' | '+' | '?' | '{' => {
                    let (min, max) = parse_repetition(s, at)?;
                    let start = last.ok_or("expecting preceding item to */+/?/{")?;
                    n_prev = self.repeat(&mut seq, start, min, max, n_prev)?;
                }
                ')' | '|' => break,
                c if word_char(c) => {
                    let begin = *at;
                    while s.get(*at).is_some_and(|&c| word_char(c)) {
                        *at += 1;
                    }
                    let name: String = s[begin..*at].iter().collect();
                    let id = self.symbol(&name);
                    last = Some(seq.len());
                    n_prev = 1;
                    seq.push(Elem::Rule(id));
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        Ok(seq)
    }

    /// llama.cpp's `handle_repetitions`: `S{m,n}` is S m times, then a chain of n - m rules
    /// (`S'(x) ::= S S'(x-1) |`); `S{m,}` is S m times, then `S' ::= S S' |`.
    fn repeat(
        &mut self,
        seq: &mut Alternative,
        start: usize,
        min: u64,
        max: Option<u64>,
        n_prev: u64,
    ) -> Result<u64, String> {
        let item: Alternative = seq[start..].to_vec();
        let total = match max {
            Some(m) if m > 0 => m,
            _ => min.max(1),
        };
        if n_prev.saturating_mul(total) > LLAMA_REPETITION_THRESHOLD {
            return Err(
                "llama.cpp: number of rules that are going to be repeated multiplied by the new \
                 repetition exceeds sane defaults"
                    .into(),
            );
        }
        if min == 0 {
            seq.truncate(start);
        } else {
            for _ in 1..min {
                seq.extend(item.iter().cloned());
            }
        }
        let optional = max.map_or(1, |m| m.saturating_sub(min));
        let mut previous: Option<usize> = None;
        for _ in 0..optional {
            let id = self.fresh(true);
            let mut alternative = item.clone();
            match (max, previous) {
                (None, _) => alternative.push(Elem::Rule(id)),
                (Some(_), Some(p)) => alternative.push(Elem::Rule(p)),
                (Some(_), None) => {}
            }
            self.rules[id] = vec![alternative, Vec::new()];
            previous = Some(id);
        }
        if let Some(p) = previous {
            seq.push(Elem::Rule(p));
        }
        Ok(n_prev.saturating_mul(total))
    }

    /// llama.cpp's `llama_grammar_detect_left_recursion`, which makes `llama_grammar_init_impl`
    /// return no grammar.
    fn check_left_recursion(&self) -> Result<(), String> {
        let n = self.rules.len();
        let mut visited = vec![false; n];
        let mut in_progress = vec![false; n];
        let mut may_be_empty = vec![false; n];
        for i in 0..n {
            if !visited[i]
                && self.left_recursive(i, &mut visited, &mut in_progress, &mut may_be_empty)
            {
                return Err(format!(
                    "llama.cpp: unsupported grammar, left recursion detected for nonterminal at index {i}"
                ));
            }
        }
        Ok(())
    }

    fn left_recursive(
        &self,
        i: usize,
        visited: &mut [bool],
        in_progress: &mut [bool],
        may_be_empty: &mut [bool],
    ) -> bool {
        if in_progress[i] {
            return true;
        }
        if visited[i] {
            return false;
        }
        in_progress[i] = true;
        if self.rules[i].iter().any(Vec::is_empty) {
            may_be_empty[i] = true;
        }
        for alternative in &self.rules[i] {
            for elem in alternative {
                match elem {
                    Elem::Rule(r) => {
                        if self.left_recursive(*r, visited, in_progress, may_be_empty) {
                            return true;
                        }
                        if !may_be_empty[*r] {
                            break;
                        }
                    }
                    Elem::Chars { .. } => break,
                }
            }
        }
        in_progress[i] = false;
        visited[i] = true;
        false
    }

    /// llama.cpp's `llama_grammar_advance_stack`: the stacks `stack` stands for, each ending at
    /// a character class, or empty (where the document may end).
    fn advance(&self, stack: Stack, out: &mut HashSet<Stack>) {
        let mut todo = vec![stack];
        let mut seen: HashSet<Stack> = HashSet::new();
        while let Some(stack) = todo.pop() {
            if !seen.insert(stack.clone()) {
                continue;
            }
            assert!(seen.len() < 1_000_000, "the harness's expansion runs away");
            let Some(&(rule, alternative, element)) = stack.last() else {
                out.insert(stack);
                continue;
            };
            match &self.rules[rule][alternative][element] {
                Elem::Chars { .. } => {
                    out.insert(stack);
                }
                Elem::Rule(sub) => {
                    let more = element + 1 < self.rules[rule][alternative].len();
                    for (i, body) in self.rules[*sub].iter().enumerate() {
                        let mut next = stack[..stack.len() - 1].to_vec();
                        if more {
                            next.push((rule, alternative, element + 1));
                        }
                        if !body.is_empty() {
                            next.push((*sub, i, 0));
                        }
                        todo.push(next);
                    }
                }
            }
        }
    }

    /// The stacks before the first character (`llama_grammar_init_impl`).
    fn start(&self) -> HashSet<Stack> {
        let root = self.names["root"];
        let mut stacks = HashSet::new();
        for (i, body) in self.rules[root].iter().enumerate() {
            let stack = if body.is_empty() {
                Vec::new()
            } else {
                vec![(root, i, 0)]
            };
            self.advance(stack, &mut stacks);
        }
        stacks
    }

    /// llama.cpp's `llama_grammar_accept`: the stacks after character `c`.
    fn accept(&self, stacks: &HashSet<Stack>, c: char) -> HashSet<Stack> {
        let c = u32::from(c);
        let mut out = HashSet::new();
        for stack in stacks {
            let Some(&(rule, alternative, element)) = stack.last() else {
                continue;
            };
            let Elem::Chars { negated, ranges } = &self.rules[rule][alternative][element] else {
                continue;
            };
            if ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&c)) == *negated {
                continue;
            }
            let mut next = stack[..stack.len() - 1].to_vec();
            if element + 1 < self.rules[rule][alternative].len() {
                next.push((rule, alternative, element + 1));
            }
            self.advance(next, &mut out);
        }
        out
    }

    /// Whether a model sampling under the grammar could write `text` and stop there.
    fn admits(&self, text: &str) -> bool {
        let mut stacks = self.start();
        for c in text.chars() {
            stacks = self.accept(&stacks, c);
            if stacks.is_empty() {
                return false;
            }
        }
        stacks.iter().any(Vec::is_empty)
    }

    /// The most stacks alive at once while reading `text` (a prefix of a document), stopping
    /// once past `limit`.
    fn most_stacks(&self, text: &str, limit: usize) -> usize {
        let mut stacks = self.start();
        let mut most = stacks.len();
        for c in text.chars() {
            if most > limit || stacks.is_empty() {
                break;
            }
            stacks = self.accept(&stacks, c);
            most = most.max(stacks.len());
        }
        most
    }
}

/// The converter's grammar for `schema`, as llama.cpp would read it.
fn llama(schema: &Value) -> Llama {
    let g = schema_to_gbnf(schema).unwrap();
    Llama::parse(&g).unwrap_or_else(|e| panic!("llama.cpp refuses the grammar: {e}\n{g}"))
}

/// How many rules llama.cpp makes of a grammar's bounded repetitions (`handle_repetitions`):
/// `S{m,n}` copies S m times and adds n - m rules; `S{m,}`, and a bound past its threshold,
/// add one. Literals and classes are skipped. (The tool grammars' tests count with it too.)
pub(crate) fn llama_repetition_rules(grammar: &str) -> u64 {
    let s: Vec<char> = grammar.chars().collect();
    let mut total = 0u64;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            open @ ('"' | '[') => {
                let close = if open == '"' { '"' } else { ']' };
                i += 1;
                while i < s.len() && s[i] != close {
                    i += if s[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => {
                i += 1;
                let mut at = i;
                let min = parse_integer(&s, &mut at).unwrap_or(0);
                let max = match s.get(at).copied() {
                    Some(',') => {
                        at += 1;
                        parse_integer(&s, &mut at).ok()
                    }
                    _ => Some(min),
                };
                total += match max {
                    Some(n) if n <= LLAMA_REPETITION_THRESHOLD => n,
                    _ => min + 1,
                };
                i = at;
            }
            _ => i += 1,
        }
    }
    total
}

/// The harness reads and runs the converter's grammars as llama.cpp does (the documents of
/// cocoon-llama's `schema_grammars_admit_what_the_schema_accepts_and_nothing_else`), and
/// refuses what llama.cpp refuses.
#[test]
fn harness_runs_grammars_as_llama_cpp_does() {
    let person = llama(&json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "nick": {"type": "string"},
            "age": {"type": "integer"},
            "color": {"enum": ["black", "white"]}
        },
        "required": ["name", "age", "color"],
        "additionalProperties": false
    }));
    for good in [
        r#"{"name": "Tom", "age": 3, "color": "black"}"#,
        r#"{"name":"Tom","nick":"T","age":-12,"color":"white"}"#,
        "{\n  \"name\": \"\",\n  \"age\": 0,\n  \"color\": \"white\"\n}",
    ] {
        assert!(person.admits(good), "refused {good}");
    }
    for bad in [
        r#"{"name": "Tom", "color": "black"}"#,
        r#"{"age": 3, "name": "Tom", "color": "black"}"#,
        r#"{"name": "Tom", "age": 3.5, "color": "black"}"#,
        r#"{"name": "Tommy!", "age": 3, "color": "black"}"#,
        r#"{"name": "Tom", "age": 3, "color": "black""#,
    ] {
        assert!(!person.admits(bad), "admitted {bad}");
    }
    let dates = llama(&json!({"type": "array", "items": {"type": "string", "format": "date"}}));
    assert!(dates.admits(r#"["2026-01-31", "1999-10-01"]"#));
    assert!(!dates.admits(r#"["2026-13-07"]"#));
    // What llama.cpp itself refuses or reads otherwise.
    assert!(Llama::parse("root ::= \"a\"{2001}").is_err());
    assert!(Llama::parse("root ::= root \"a\" | \"b\"").is_err());
    assert!(Llama::parse("root ::= \"\\q\"").is_err());
    let unbounded = Llama::parse("root ::= \"a\"{0,2500}").unwrap();
    assert!(unbounded.admits(&"a".repeat(2600)));
    assert_eq!(
        llama_repetition_rules(
            r#"root ::= "{" char{0,8} ( "," x ){1,3} "[x]{9}" [a-z]{2,} y{0,3000}"#
        ),
        8 + 3 + 3 + 1
    );
}

/// REVIEW, fixed: DoS. Alternatives that overlap and recurse (two `anyOf` options that both accept
/// `[…]`, or a node and a node with one more optional member) keep one llama.cpp stack per
/// way of reading the nesting so far: 2^depth. A 200-byte schema and a model (or an app's
/// logit_bias) writing `[[[[…` make the sampler hold millions of stacks within 20 characters
/// and test each against the whole vocabulary per token: the scheduler thread, which serves
/// every request, stalls for good, and the proxy's first-token timeout then sends the same
/// request to the next worker. The converter should refuse (or merge) alternatives that can
/// read the same text, or bound the stacks its grammar can keep alive.
#[test]
fn review_overlapping_recursive_alternatives_double_the_stacks_per_level() {
    let arrays = json!({
        "$defs": {"n": {"anyOf": [
            {"type": "array", "items": {"$ref": "#/$defs/n"}},
            {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 4}
        ]}},
        "$ref": "#/$defs/n"
    });
    let objects = json!({
        "$defs": {"node": {"anyOf": [
            {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}},
            {"type": "object", "properties": {
                "next": {"$ref": "#/$defs/node"}, "weight": {"type": "integer"}
            }}
        ]}},
        "$ref": "#/$defs/node"
    });
    for (schema, prefix) in [
        (arrays, "[".repeat(40)),
        (objects, r#"{"next": "#.repeat(40)),
    ] {
        let Ok(g) = schema_to_gbnf(&schema) else {
            continue; // refused: fine
        };
        let l = Llama::parse(&g).unwrap();
        let most = l.most_stacks(&prefix, MOST_LIVE_STACKS);
        assert!(
            most <= MOST_LIVE_STACKS,
            "{schema}: over {most} live stacks within {prefix}\n{g}"
        );
    }
}

/// REVIEW, fixed: DoS. A `type` list may repeat a type (JSON Schema wants its items unique), and
/// each repeat converts the keywords of that type again: `"type": ["array" × M]` over
/// `"items": {"type": ["array" × N], …}` writes M rules of N alternatives each (M × N × ~55
/// bytes: at 64 KiB, M = N = 3600, some 700 MB of grammar text built on the scheduler
/// thread, then some 50 million rules in llama.cpp), and `"type": ["string" × 7000]` with
/// `"maxLength": 2000` spells out 7000 bounded strings (14 million llama.cpp rules, some
/// 3 GB) and keeps 7000 stacks alive through the string. The converter should refuse or
/// merge repeated types, and keep the grammar linear in the schema.
#[test]
fn review_repeated_types_multiply_the_grammar() {
    let arrays = vec!["array"; 300];
    let schema = json!({
        "type": arrays, "items": {"type": arrays, "items": {"type": "integer"}}
    });
    if let Ok(g) = schema_to_gbnf(&schema) {
        let bound = 64 * schema.to_string().len();
        assert!(
            g.len() <= bound,
            "{} bytes of grammar for {} bytes of schema",
            g.len(),
            schema.to_string().len()
        );
    }
    let strings = json!({"type": vec!["string"; 7000], "maxLength": 2000});
    if let Ok(g) = schema_to_gbnf(&strings) {
        let rules = llama_repetition_rules(&g);
        assert!(
            rules <= MOST_EXPANDED_RULES,
            "llama.cpp would make {rules} rules of a {}-byte schema",
            strings.to_string().len()
        );
    }
}

/// REVIEW, fixed: DoS. MAX_BOUNDED_LENGTH bounds one string and MAX_RULES counts the converter's own
/// rules, but llama.cpp spells `char{0,n}` out as n rules of its own, and nothing bounds the
/// sum: 1500 properties of distinct bounded lengths (a 63 KB schema, well under MAX_RULES)
/// make some 2.1 million llama.cpp rules (about 400 MB and seconds of parsing on the
/// scheduler thread, per request, before its first token). The same holds for strings in
/// bounded arrays in bounded arrays (each level a rule, each adding its own expansion) and
/// for 128 tools in one grammar. The converter should bound the total expansion.
#[test]
fn review_bounded_lengths_expand_past_any_budget() {
    let properties: Map<String, Value> = (0..1500)
        .map(|i| {
            (
                format!("p{i}"),
                json!({"type": "string", "maxLength": 1000 + i % 1000}),
            )
        })
        .collect();
    let schema = json!({"type": "object", "properties": properties});
    assert!(schema.to_string().len() <= 64 * 1024);
    if let Ok(g) = schema_to_gbnf(&schema) {
        let rules = llama_repetition_rules(&g);
        assert!(
            rules <= MOST_EXPANDED_RULES,
            "llama.cpp would make {rules} rules of a {}-byte schema",
            schema.to_string().len()
        );
    }
}

/// REVIEW, fixed: DoS. Wide alternatives that share a prefix stay alive together: an `enum` of 3000
/// values that start alike (45 KB) keeps 3000 stacks through its prefix, and an object of
/// 2000 optional properties (4000 rules, under MAX_RULES) keeps one stack per property at
/// every member's start. Each such token costs the sampler stacks × vocabulary (3000 × 150k
/// candidate checks, about a second), repeatedly inside an array. The converter should factor
/// literal alternatives (a trie) and bound the optional members or the live stacks.
#[test]
fn review_wide_alternatives_keep_thousands_of_stacks_alive() {
    let values: Vec<String> = (0..3000).map(|i| format!("option-{i:05}")).collect();
    let options: Map<String, Value> = (0..2000).map(|i| (format!("p{i}"), json!({}))).collect();
    for (schema, prefix) in [
        (
            json!({"type": "array", "items": {"enum": values}}),
            r#"["option-0"#,
        ),
        (json!({"type": "object", "properties": options}), r#"{"p"#),
    ] {
        let Ok(g) = schema_to_gbnf(&schema) else {
            continue; // refused: fine
        };
        let l = Llama::parse(&g).unwrap();
        let most = l.most_stacks(prefix, MOST_LIVE_STACKS);
        assert!(
            most <= MOST_LIVE_STACKS,
            "over {most} live stacks within {prefix}"
        );
    }
}

/// REVIEW, fixed: soundness and refusals. MAX_BOUNDED_LENGTH (4096) is above llama.cpp's
/// MAX_REPETITION_THRESHOLD (2000): llama.cpp reads `char{0,2500}` as `char{0,}`, so a
/// `maxLength` from 2001 to 4096 is silently dropped and longer strings are admitted; and it
/// refuses `char{2500,}` outright, so a `minLength` from 2001 to 4096 fails on the worker as
/// an internal error (which the proxy counts against the worker, and retries elsewhere)
/// instead of a 400. The converter should refuse bounds past 2000 or spell them so that
/// llama.cpp keeps them.
#[test]
fn review_lengths_past_llamas_repetition_threshold_are_kept() {
    let too_long = format!("\"{}\"", "a".repeat(2600));
    for schema in [
        json!({"type": "string", "maxLength": 2500}),
        json!({"type": "string", "minLength": 10, "maxLength": 4096}),
        json!({"type": "string", "minLength": 2500}),
        json!({"type": "string", "minLength": 2100, "maxLength": 2200}),
    ] {
        let Ok(g) = schema_to_gbnf(&schema) else {
            continue; // refused: fine
        };
        let l = Llama::parse(&g).unwrap_or_else(|e| panic!("{schema}: {e}"));
        assert!(!l.admits(&too_long), "{schema} admits 2600 characters");
    }
}

/// REVIEW, fixed: refusals. A reference that reaches itself before any character (`{"$ref": "#"}`,
/// an `anyOf` that lists itself, two definitions that name each other) makes a left-recursive
/// grammar, which llama.cpp refuses: the worker answers an internal error (counted against it
/// by the proxy, which retries the request on another worker) instead of a 400. The converter
/// should refuse such schemas.
#[test]
fn review_left_recursive_references_are_refused() {
    for schema in [
        json!({"$ref": "#"}),
        json!({
            "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
            "$ref": "#/$defs/a"
        }),
        json!({
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
            "$ref": "#/$defs/a"
        }),
    ] {
        if let Ok(g) = schema_to_gbnf(&schema) {
            assert!(Llama::parse(&g).is_ok(), "{schema}: llama.cpp refuses\n{g}");
        }
    }
}

/// REVIEW, fixed: soundness. `const`, `enum` and the combinators return before the schema's other
/// keywords are read, so those are dropped: `type` beside `enum`, everything beside `anyOf`
/// (an object schema with an "at least one of" `anyOf` admits `42`), `oneOf` beside `anyOf`,
/// `maxLength` beside `allOf`. Each should be enforced or refused.
#[test]
fn review_keywords_beside_const_enum_and_combinators_are_enforced() {
    for (schema, doc) in [
        (
            json!({"type": "string", "enum": ["small", "large", 3]}),
            "3",
        ),
        (
            json!({
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "additionalProperties": false,
                "anyOf": [{"required": ["a"]}, {"required": ["b"]}]
            }),
            "42",
        ),
        (
            json!({"anyOf": [{"type": "integer"}, {"type": "string"}], "oneOf": [{"type": "integer"}]}),
            r#""x""#,
        ),
        (
            json!({"allOf": [{"type": "string"}], "maxLength": 2}),
            r#""abc""#,
        ),
        (json!({"const": "abc", "maxLength": 2}), r#""abc""#),
    ] {
        if schema_to_gbnf(&schema).is_ok() {
            assert!(!llama(&schema).admits(doc), "{schema} admits {doc}");
        }
    }
}

/// REVIEW, fixed: soundness. Without `type` (and without `properties` or `items`) a schema becomes
/// `value`, so the keywords it does carry are dropped: `maxLength`, `required`, `minItems`,
/// `additionalProperties`, `format`. JSON Schema applies each to values of its kind; the
/// grammar should too (or refuse).
#[test]
fn review_keywords_without_a_type_are_enforced() {
    for (schema, doc) in [
        (json!({"maxLength": 3}), r#""abcdef""#),
        (json!({"required": ["a"]}), "{}"),
        (json!({"minItems": 2}), "[]"),
        (json!({"additionalProperties": false}), r#"{"x": 1}"#),
        (
            json!({"additionalProperties": {"type": "integer"}}),
            r#"{"x": "s"}"#,
        ),
        (json!({"format": "uuid"}), r#""nope""#),
    ] {
        if schema_to_gbnf(&schema).is_ok() {
            assert!(!llama(&schema).admits(doc), "{schema} admits {doc}");
        }
    }
}

/// REVIEW, fixed: soundness (documented in the code, against the module's "never more"). `oneOf`
/// is read as `anyOf`, so a value that matches two options, which `oneOf` refuses, is
/// admitted. The converter should refuse `oneOf` unless its options cannot overlap (distinct
/// types or constants).
#[test]
fn review_one_of_with_overlapping_options_is_refused() {
    for (schema, doc) in [
        (
            json!({"oneOf": [{"type": "integer"}, {"type": "number"}]}),
            "1",
        ),
        (
            json!({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}),
            r#""ab""#,
        ),
    ] {
        if schema_to_gbnf(&schema).is_ok() {
            assert!(!llama(&schema).admits(doc), "{schema} admits {doc}");
        }
    }
}

/// REVIEW, fixed: soundness (minor). `format: date` takes any day 01 to 31 in any month, so
/// February 30th and April 31st pass as RFC 3339 full-dates. The grammar should bound the
/// day by the month (29 for February).
#[test]
fn review_date_format_admits_only_real_days() {
    let date = llama(&json!({"type": "string", "format": "date"}));
    for doc in [r#""2023-02-30""#, r#""2023-04-31""#, r#""2023-11-31""#] {
        assert!(!date.admits(doc), "admits {doc}");
    }
}

/// REVIEW, fixed: soundness. `tools_grammar` nests each function's parameters inside a schema of its
/// own, so their `$ref`s resolve against that wrapper: `"#"` in a recursive tool (a tree whose
/// children are trees) means the whole answer, and the children admitted are `{"response": …}`
/// or `{"tool_calls": …}` objects that the tool's schema refuses (and `#/$defs/…`, as pydantic
/// writes, points at nothing). References should resolve inside the function's own parameters.
#[test]
fn review_tool_parameter_refs_resolve_inside_their_own_schema() {
    use crate::tool_calls::{ToolStyle, tools_grammar};
    use cocoon_protocol::{Function, ToolChoice, Tools};
    let tools = Tools {
        functions: vec![Function {
            name: "tree".into(),
            description: None,
            parameters: json!({
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#"}}
                },
                "required": ["label"],
                "additionalProperties": false
            }),
        }],
        choice: ToolChoice::Auto,
        parallel: false,
    };
    let Ok(Some(g)) = tools_grammar(ToolStyle::Generic, &tools) else {
        return; // refused: fine
    };
    let l = Llama::parse(&g).unwrap();
    let bad = r#"{"tool_calls": [{"name": "tree", "arguments": {"label": "a", "children": [{"response": "x"}]}}]}"#;
    assert!(!l.admits(bad), "admits {bad}\n{g}");
}
