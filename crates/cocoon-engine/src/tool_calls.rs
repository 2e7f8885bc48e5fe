//! Tool calling on an engine that writes text: how a model is asked to call tools, the grammar
//! that holds a forced call to the tools' own schemas, and the reading of calls out of what
//! the model writes.
//!
//! Two styles, chosen from the model's chat template:
//! - **Hermes**: the template prints the tools itself and the model answers
//!   `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (Qwen 2.5 and 3, Hermes, and the
//!   many templates that copied them). Text around the calls streams as it comes.
//! - **Generic**, for every other model: the tools and the answer's shape go into the system
//!   message, and the answer is sampled under a grammar that admits only
//!   `{"tool_calls": [{"name", "arguments"}, …]}` or, where the model may answer in text,
//!   `{"response": "…"}` (llama.cpp's server does the same for such models).

use cocoon_protocol::{ToolCall, ToolChoice, Tools};
use serde_json::{Value, json};

use crate::json_grammar::{Budget, literal_text, render, schema_rules};

/// How a model is asked for tool calls, and how it writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolStyle {
    /// `<tool_call>` JSON `</tool_call>`, the tools printed by the template.
    Hermes,
    /// One JSON object, the tools described in the system message.
    Generic,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Most calls one answer may make when the tools allow several at once.
const MAX_PARALLEL_CALLS: u64 = 16;
/// Most bytes a call may hold: its event, escaped again and sealed, must fit in a frame.
const MAX_CALL_BYTES: usize = 256 << 10;

impl ToolStyle {
    /// The style of a chat template: Hermes when it prints tools and writes `<tool_call>`.
    pub fn of_template(source: &str) -> Self {
        if source.contains(OPEN) && source.contains("tools") {
            Self::Hermes
        } else {
            Self::Generic
        }
    }
}

/// The system message's part for a model whose template has no place for tools.
pub fn generic_instructions(tools: &Tools) -> String {
    let functions: Vec<Value> = tools
        .functions
        .iter()
        .map(|f| json!({"name": f.name, "description": f.description, "parameters": f.parameters}))
        .collect();
    let call = r#"{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}"#;
    let how = match &tools.choice {
        ToolChoice::Auto => format!(
            "To call functions, answer with {call}. To answer the user directly, answer with \
             {{\"response\": \"<your answer>\"}}."
        ),
        ToolChoice::Required => format!("Call one or more of them: answer with {call}."),
        ToolChoice::Function(name) => {
            format!("Call the function {name}: answer with {call}.")
        }
    };
    format!(
        "You can call these functions:\n{}\n{how} Answer with that JSON object only.",
        serde_json::to_string_pretty(&functions).unwrap_or_default()
    )
}

/// The grammar an answer offering `tools` is sampled under, if any: always for the generic
/// style (the answer is one JSON object), and for the Hermes style when a call is forced.
/// Refuses tools whose parameter schemas the grammar cannot enforce, by name.
pub fn tools_grammar(style: ToolStyle, tools: &Tools) -> Result<Option<String>, String> {
    if style == ToolStyle::Hermes && tools.choice == ToolChoice::Auto {
        return Ok(None);
    }
    let offered: Vec<&cocoon_protocol::Function> = match &tools.choice {
        ToolChoice::Function(name) => tools.functions.iter().filter(|f| &f.name == name).collect(),
        _ => tools.functions.iter().collect(),
    };
    // One call: `{"name": "<function>", "arguments": <its parameters>}`, the function told by
    // its name before its arguments are read. REVIEW, fixed: each function's parameters are
    // converted as a schema of their own, so that their `$ref`s resolve inside them; they
    // share one budget of rules.
    let mut budget = Budget::default();
    let mut rules = Vec::new();
    let mut alternatives = Vec::with_capacity(offered.len());
    for (i, f) in offered.iter().enumerate() {
        let prefix = format!("t{i}-");
        let (arguments, own) = schema_rules(&f.parameters, &prefix, &mut budget)
            .map_err(|e| format!("tool {}: {e}", f.name))?;
        rules.extend(own);
        rules.push((format!("{prefix}args"), arguments));
        alternatives.push(format!(
            r#"{} ws "," ws "\"arguments\"" ws ":" ws {prefix}args"#,
            literal_text(&Value::String(f.name.clone()).to_string())
        ));
    }
    rules.push((
        "call".to_owned(),
        format!(
            r#""{{" ws "\"name\"" ws ":" ws ( {} ) "}}" ws"#,
            alternatives.join(" | ")
        ),
    ));
    let most = if tools.parallel {
        MAX_PARALLEL_CALLS
    } else {
        1
    };
    let root = match style {
        ToolStyle::Generic => {
            let more = if most > 1 {
                format!(r#" ( "," ws call ){{0,{}}}"#, most - 1)
            } else {
                String::new()
            };
            let calls =
                format!(r#""{{" ws "\"tool_calls\"" ws ":" ws "[" ws call{more} "]" ws "}}" ws"#);
            match tools.choice {
                ToolChoice::Auto => {
                    format!(r#"( {calls} | "{{" ws "\"response\"" ws ":" ws string "}}" ws )"#)
                }
                _ => calls,
            }
        }
        ToolStyle::Hermes => {
            let block = r#""<tool_call>\n" call "\n</tool_call>""#;
            let more = if most > 1 {
                format!(r#" ( "\n" {block} ){{0,{}}}"#, most - 1)
            } else {
                String::new()
            };
            format!("{block}{more}")
        }
    };
    Ok(Some(render(&root, &rules)))
}

/// What a piece of the model's answer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text for the app.
    Text(String),
    /// A tool call.
    Call(ToolCall),
}

/// Reads tool calls out of an answer as it is written.
#[derive(Debug)]
pub struct ToolCallReader {
    style: ToolStyle,
    /// What is held: the generic answer so far, or a Hermes call (or what may start one).
    held: String,
    /// Whether a Hermes call is open.
    in_call: bool,
    /// Of an open call, the bytes already searched for its end.
    searched: usize,
}

impl ToolCallReader {
    /// A reader for answers of `style`.
    pub fn new(style: ToolStyle) -> Self {
        Self {
            style,
            held: String::new(),
            in_call: false,
            searched: 0,
        }
    }

    /// The pieces `text`, the next of the answer, completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        if self.style == ToolStyle::Generic {
            // One JSON object: read whole at the end.
            return Vec::new();
        }
        let mut out = Vec::new();
        loop {
            if self.in_call {
                // REVIEW, fixed: only what came since the last search is searched (the end
                // may straddle it), not the whole call again at every token.
                let mut from = self.searched.saturating_sub(CLOSE.len() - 1);
                while !self.held.is_char_boundary(from) {
                    from -= 1;
                }
                let Some(end) = self.held[from..].find(CLOSE).map(|i| from + i) else {
                    self.searched = self.held.len();
                    // REVIEW, fixed: a call too big for one event is the model's text.
                    if self.held.len() > MAX_CALL_BYTES {
                        self.in_call = false;
                        self.searched = 0;
                        out.push(Piece::Text(format!(
                            "{OPEN}{}",
                            std::mem::take(&mut self.held)
                        )));
                    }
                    return out;
                };
                let body = self.held[..end].to_owned();
                self.held.drain(..end + CLOSE.len());
                self.in_call = false;
                self.searched = 0;
                match hermes_call(&body) {
                    Some(call) => out.push(Piece::Call(call)),
                    // Not a call after all: the model's text, as it wrote it.
                    None => out.push(Piece::Text(format!("{OPEN}{body}{CLOSE}"))),
                }
                continue;
            }
            if let Some(start) = self.held.find(OPEN) {
                let before = self.held[..start].to_owned();
                // Whitespace around calls is the format's, not the app's text.
                if !before.trim().is_empty() {
                    out.push(Piece::Text(before));
                }
                self.held.drain(..start + OPEN.len());
                self.in_call = true;
                continue;
            }
            // Keep back what may be the start of a call's opening.
            let keep = partial_suffix(&self.held, OPEN);
            let ready = self.held.len() - keep;
            if ready > 0 {
                let text: String = self.held.drain(..ready).collect();
                out.push(Piece::Text(text));
            }
            return out;
        }
    }

    /// The pieces still held when the answer ends. What does not read as calls (an answer cut
    /// off mid-call) is the model's text, as it wrote it.
    pub fn finish(mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        match self.style {
            ToolStyle::Generic => generic_answer(&held),
            ToolStyle::Hermes if self.in_call => vec![Piece::Text(format!("{OPEN}{held}"))],
            ToolStyle::Hermes if held.is_empty() => Vec::new(),
            ToolStyle::Hermes => vec![Piece::Text(held)],
        }
    }
}

/// A generic answer: `{"tool_calls": [...]}` or `{"response": "..."}`.
fn generic_answer(text: &str) -> Vec<Piece> {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return raw(text);
    };
    if let Some(response) = value.get("response").and_then(Value::as_str) {
        return vec![Piece::Text(response.to_owned())];
    }
    let calls: Option<Vec<Piece>> = value
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| calls.iter().map(|c| call(c).map(Piece::Call)).collect())
        .unwrap_or(None);
    match calls {
        Some(calls)
            if calls
                .iter()
                .all(|c| matches!(c, Piece::Call(c) if c.arguments.len() <= MAX_CALL_BYTES)) =>
        {
            calls
        }
        _ => raw(text),
    }
}

fn raw(text: &str) -> Vec<Piece> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Piece::Text(text.to_owned())]
    }
}

/// A Hermes call's body: `{"name": …, "arguments": {…}}`.
fn hermes_call(body: &str) -> Option<ToolCall> {
    call(&serde_json::from_str::<Value>(body.trim()).ok()?)
        .filter(|c| c.arguments.len() <= MAX_CALL_BYTES)
}

fn call(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?;
    let arguments = match value.get("arguments") {
        None | Some(Value::Null) => "{}".to_owned(),
        // Some models write the arguments as a string of JSON.
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    Some(ToolCall {
        id: format!("call_{:024x}", rand::random::<u128>() >> 32),
        name: name.to_owned(),
        arguments,
    })
}

/// The length of the longest end of `text` that begins `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
