//! OpenAI streaming chunks as server-sent events: one `data: {json}\n\n` per piece of text.
//!
//! This runs once per token for every streamed answer, so it is one of the hot spots of the
//! gateway (criterion: `cargo bench -p cocoon-cli --bench hot_path`): chunks are serialized
//! straight from borrowed fields into one buffer, never built as a `serde_json::Value` tree.

use bytes::Bytes;
use cocoon_protocol::ToolCall;
use serde::Serialize;
use serde_json::Value;

/// Encodes the chunks of one streamed answer.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    /// The answer's id (`chatcmpl-…` or `cmpl-…`), the same in every chunk.
    pub id: String,
    /// When the answer was started, in seconds since the Unix epoch.
    pub created: u64,
    /// The model the request named.
    pub model: String,
    /// `chat.completion.chunk` (delta) or legacy `text_completion` (text).
    pub chat: bool,
    /// Every chunk carries `usage` (null until the last) when the app asked for it.
    pub include_usage: bool,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    /// Absent, null, or the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Value>>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    /// Null unless the app asked for log-probabilities.
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    /// The model's thinking, under the name vLLM, SGLang, DeepSeek and llama.cpp's server use
    /// (the OpenAI SDKs pass unknown delta fields through to the app).
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    /// A tool call, whole, in OpenAI's streamed shape (the SDKs join a call's pieces, and
    /// take one piece as well as many).
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Value>,
}

fn event<T: Serialize>(value: &T, size_hint: usize) -> Bytes {
    let mut out = Vec::with_capacity(size_hint);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, value).expect("chunks always serialize");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl ChunkEncoder {
    fn chunk(&self, choices: &[Choice<'_>], usage: Option<&Value>, text_len: usize) -> Bytes {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = Chunk {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage: self.include_usage.then_some(usage),
        };
        event(&chunk, 160 + self.id.len() + self.model.len() + text_len)
    }

    /// Chat chunks carry a delta (with the role only in the first), legacy ones the text.
    fn choice<'a>(
        &self,
        index: u32,
        role: Option<&'static str>,
        text: Option<&'a str>,
        finish: Option<&'a str>,
        logprobs: Option<&'a Value>,
    ) -> Choice<'a> {
        let (delta, text) = match self.chat {
            true => (
                Some(Delta {
                    role,
                    content: text,
                    reasoning_content: None,
                    tool_calls: None,
                }),
                None,
            ),
            false => (None, Some(text.unwrap_or(""))),
        };
        Choice {
            index,
            delta,
            text,
            logprobs,
            finish_reason: finish,
        }
    }

    /// The chat stream's first chunk, naming the assistant role of each of its `n` choices.
    pub fn roles(&self, n: u32) -> Bytes {
        let choices: Vec<Choice<'_>> = (0..n)
            .map(|i| self.choice(i, Some("assistant"), Some(""), None, None))
            .collect();
        self.chunk(&choices, None, 0)
    }

    /// A piece of choice `index`'s text, with its tokens' log-probabilities if the app asked.
    pub fn delta(&self, index: u32, text: &str, logprobs: Option<&Value>) -> Bytes {
        self.chunk(
            &[self.choice(index, None, Some(text), None, logprobs)],
            None,
            text.len(),
        )
    }

    /// A piece of choice `index`'s reasoning, for a chat stream (`delta.reasoning_content`);
    /// `None` for a legacy completion, which has no place for it.
    pub fn reasoning(&self, index: u32, text: &str) -> Option<Bytes> {
        let delta = Delta {
            role: None,
            content: None,
            reasoning_content: Some(text),
            tool_calls: None,
        };
        self.chat_only(index, delta, text.len())
    }

    /// A chunk of choice `index` holding `delta`, for a chat stream; `None` for a legacy
    /// completion, which has no place for what a chat's delta alone carries.
    fn chat_only(&self, index: u32, delta: Delta<'_>, size_hint: usize) -> Option<Bytes> {
        if !self.chat {
            return None;
        }
        let choice = Choice {
            index,
            delta: Some(delta),
            text: None,
            logprobs: None,
            finish_reason: None,
        };
        Some(self.chunk(&[choice], None, size_hint))
    }

    /// Choice `index`'s tool call number `call` (from 0), for a chat stream; `None` for a
    /// legacy completion, which has no place for it.
    pub fn tool_call(&self, index: u32, call: u32, tool_call: &ToolCall) -> Option<Bytes> {
        let delta = Delta {
            role: None,
            content: None,
            reasoning_content: None,
            tool_calls: Some(serde_json::json!([{
                "index": call,
                "id": tool_call.id,
                "type": "function",
                "function": {"name": tool_call.name, "arguments": tool_call.arguments},
            }])),
        };
        self.chat_only(index, delta, tool_call.arguments.len())
    }

    /// The chunk that says why choice `index` ended.
    pub fn finish(&self, index: u32, reason: &str) -> Bytes {
        self.chunk(
            &[self.choice(index, None, None, Some(reason), None)],
            None,
            0,
        )
    }

    /// The last chunk: no choices, the usage.
    pub fn usage(&self, usage: Value) -> Bytes {
        self.chunk(&[], Some(&usage), 256)
    }
}

/// An error event: the SDKs raise it as an APIError.
pub fn error_event(body: &Value) -> Bytes {
    event(body, 256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(b: &Bytes) -> Value {
        let s = std::str::from_utf8(b).unwrap();
        let json = s
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(json).unwrap()
    }

    fn encoder(chat: bool, include_usage: bool) -> ChunkEncoder {
        ChunkEncoder {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            chat,
            include_usage,
        }
    }

    #[test]
    fn chat_chunks_have_openai_shape() {
        let e = encoder(true, true);
        assert_eq!(
            parse(&e.delta(0, "hi \"you\"", None)),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": "hi \"you\""}, "logprobs": null, "finish_reason": null}],
                   "usage": null})
        );
        assert_eq!(
            parse(&e.roles(1))["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let finish = parse(&e.finish(0, "length"));
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        let usage = parse(&e.usage(json!({"prompt_tokens": 3})));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn completion_chunks_carry_text_and_usage_only_when_asked() {
        let e = encoder(false, false);
        let v = parse(&e.delta(0, "x", None));
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "x");
        assert!(v.get("usage").is_none());
        assert_eq!(parse(&e.finish(0, "stop"))["choices"][0]["text"], "");
        assert_eq!(
            error_event(&json!({"error": {"message": "no"}})),
            Bytes::from_static(b"data: {\"error\":{\"message\":\"no\"}}\n\n")
        );
    }
}
