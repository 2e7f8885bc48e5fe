//! A model's own chat template (the Jinja text in its GGUF's `tokenizer.chat_template`),
//! rendered by minijinja as Hugging Face's `apply_chat_template` renders it: with the
//! messages, the tools, `add_generation_prompt`, the special tokens, and the Python string
//! methods templates call.
//!
//! Rendering the template itself, rather than matching it against a list of known formats,
//! gives the model the prompt it was trained on (a default system prompt, tool definitions,
//! tool calls and results) for templates no list knows.

use cocoon_protocol::{ChatMessage, ProtocolError, Role, Tools};
use minijinja::{Environment, Error, ErrorKind, context};
use serde_json::{Value, json};

use crate::tool_calls::{ToolStyle, generic_instructions};

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    style: ToolStyle,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("style", &self.style)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the model's begin- and end-of-sequence tokens'
    /// text, which templates print.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        // transformers compiles chat templates with these two set.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        // REVIEW, fixed: minijinja's own `tojson` escapes `<`, `>`, `&` and `'` for HTML, six
        // bytes each, past the prompt's bound; transformers' is Python's `json.dumps`.
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(Self {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
            style: ToolStyle::of_template(source),
        })
    }

    /// How this model is asked to call tools, and how it writes its calls.
    pub fn tool_style(&self) -> ToolStyle {
        self.style
    }

    /// The prompt for `messages`, with the assistant's turn opened, and `tools` offered (as
    /// the template prints them, or as instructions in the system message for a template
    /// that has no place for them).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Tools>,
    ) -> Result<String, ProtocolError> {
        let mut rendered: Vec<Value> = messages.iter().map(|m| message(m, self.style)).collect();
        let mut offered = Value::Null;
        if let Some(tools) = tools {
            match self.style {
                ToolStyle::Hermes => {
                    offered = Value::Array(
                        tools
                            .functions
                            .iter()
                            .map(|f| {
                                json!({"type": "function", "function": {
                                    "name": f.name,
                                    "description": f.description.clone().unwrap_or_default(),
                                    "parameters": f.parameters,
                                }})
                            })
                            .collect(),
                    );
                }
                ToolStyle::Generic => {
                    let instructions = generic_instructions(tools);
                    match rendered.first_mut() {
                        Some(first) if first["role"] == "system" => {
                            prepend(first, &instructions);
                        }
                        _ => {
                            let mut with_system = rendered.clone();
                            with_system
                                .insert(0, json!({"role": "system", "content": instructions}));
                            // REVIEW, fixed: a template without a system role (Gemma's) refuses
                            // one; the instructions then open the first message instead.
                            if let Ok(prompt) = self.render_values(with_system, &offered) {
                                return Ok(prompt);
                            }
                            if let Some(first) = rendered.first_mut() {
                                prepend(first, &instructions);
                            }
                        }
                    }
                }
            }
        }
        self.render_values(rendered, &offered)
    }

    fn render_values(&self, messages: Vec<Value>, tools: &Value) -> Result<String, ProtocolError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ProtocolError::internal(format!("chat template: {e}")))?;
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| {
                // A template's own refusal (raise_exception) is about the conversation's shape.
                match e.kind() {
                    ErrorKind::InvalidOperation => ProtocolError::invalid(format!(
                        "the model's chat template refuses this conversation: {}",
                        e.detail().unwrap_or("no reason given")
                    )),
                    _ => ProtocolError::internal(format!("the chat template failed: {e}")),
                }
            })
    }
}

/// Puts `text` before a message's content.
fn prepend(message: &mut Value, text: &str) {
    let content = format!(
        "{text}\n\n{}",
        message["content"].as_str().unwrap_or_default()
    );
    message["content"] = json!(content);
}

/// `tojson` as transformers has it: Python's `json.dumps` (`", "` and `": "` between items,
/// no HTML escaping, `indent` if asked).
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, Error> {
    use serde::Serialize as _;
    let indent: Option<usize> = kwargs.get("indent")?;
    // transformers passes these through to json.dumps; their defaults are what is written.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let indent = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, Python,
        )),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(minijinja::Value::from_safe_string(text))
}

/// Python's `json.dumps` separators: `", "` between items, `": "` after a key.
struct Python;

fn between_items<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for Python {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        between_items(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        between_items(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// A message as templates read it. For a template with no place for tools, tool calls are the
/// JSON the model was asked to write, and results come back as the user's.
fn message(m: &ChatMessage, style: ToolStyle) -> Value {
    let generic = style == ToolStyle::Generic;
    if m.role == Role::Tool && generic {
        let result = json!({"tool_result": {"id": m.tool_call_id, "content": m.content}});
        return json!({"role": "user", "content": result.to_string()});
    }
    if !m.tool_calls.is_empty() && generic {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| json!({"name": c.name, "arguments": arguments(&c.arguments)}))
            .collect();
        let content = json!({"tool_calls": calls}).to_string();
        return json!({"role": "assistant", "content": content});
    }
    let mut out = json!({"role": m.role.as_str(), "content": m.content});
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = Value::Array(
            m.tool_calls
                .iter()
                .map(|c| {
                    // Templates print the arguments with `tojson`: an object, not its text.
                    json!({"id": c.id, "type": "function", "function": {
                        "name": c.name, "arguments": arguments(&c.arguments)
                    }})
                })
                .collect(),
        );
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    out
}

/// A call's arguments as a JSON value (their text when it is not JSON).
fn arguments(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| json!(text))
}

/// `strftime_now(format)`, which some templates call for today's date (Llama 3's), in UTC, for
/// the specifiers templates use.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(format, secs)
}

fn strftime(format: &str, unix: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];
    let weekday = DAYS[(days % 7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&day.to_string()),
                Some('m') => out.push_str(&month.to_string()),
                Some(other) => out.extend(['%', '-', other]),
                None => out.push_str("%-"),
            },
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => out.extend(['%', other]),
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests;
