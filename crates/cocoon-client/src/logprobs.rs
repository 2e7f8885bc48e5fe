//! Log-probabilities in OpenAI's two shapes: a chat's `logprobs.content` (one object per
//! token) and the legacy completions' parallel lists (`tokens`, `token_logprobs`,
//! `top_logprobs`, `text_offset`).
//!
//! What a worker sends is held to what the app asked: no more alternatives per token than
//! `top_logprobs`, and the whole kept within the bytes the gateway gathers for an answer.

use cocoon_protocol::TokenLogprob;
use serde_json::{Map, Value, json};

/// Renders one answer's log-probabilities, delta by delta.
#[derive(Debug)]
pub(crate) struct Logprobs {
    chat: bool,
    /// Alternatives the app asked for per token.
    top: usize,
    /// Characters of the answer before the next token (the legacy `text_offset`).
    offset: usize,
}

impl Logprobs {
    /// For an answer whose request asked `top` alternatives per token; `None` if it asked no
    /// log-probabilities.
    pub(crate) fn new(chat: bool, top: Option<u32>) -> Option<Self> {
        top.map(|top| Self {
            chat,
            top: top as usize,
            offset: 0,
        })
    }

    /// The `logprobs` of a choice holding `entries`.
    pub(crate) fn render(&mut self, entries: &[TokenLogprob]) -> Value {
        if self.chat {
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let top: Vec<Value> = e
                        .top
                        .iter()
                        .take(self.top)
                        .map(|t| token(&t.token, t.logprob))
                        .collect();
                    let mut one = token(&e.token, e.logprob);
                    one["top_logprobs"] = Value::Array(top);
                    one
                })
                .collect();
            return json!({"content": content, "refusal": null});
        }
        let mut tokens = Vec::with_capacity(entries.len());
        let mut token_logprobs = Vec::with_capacity(entries.len());
        let mut top_logprobs = Vec::with_capacity(entries.len());
        let mut text_offset = Vec::with_capacity(entries.len());
        for e in entries {
            tokens.push(json!(e.token));
            token_logprobs.push(json!(e.logprob));
            top_logprobs.push(Value::Object(
                e.top
                    .iter()
                    .take(self.top)
                    .map(|t| (t.token.clone(), json!(t.logprob)))
                    .collect::<Map<_, _>>(),
            ));
            text_offset.push(json!(self.offset));
            self.offset += e.token.chars().count();
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        })
    }
}

/// A token as OpenAI's chat shape has it: its text, log-probability and UTF-8 bytes.
fn token(text: &str, logprob: f32) -> Value {
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

/// About how many bytes `entries` take once rendered, to hold them to the gathering bound.
pub(crate) fn size(entries: &[TokenLogprob], top: usize) -> usize {
    entries
        .iter()
        .map(|e| {
            64 + 3 * e.token.len()
                + e.top
                    .iter()
                    .take(top)
                    .map(|t| 48 + 3 * t.token.len())
                    .sum::<usize>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::TopLogprob;

    fn entries() -> Vec<TokenLogprob> {
        vec![
            TokenLogprob {
                token: "Hé".into(),
                logprob: -0.5,
                top: vec![
                    TopLogprob {
                        token: "Hé".into(),
                        logprob: -0.5,
                    },
                    TopLogprob {
                        token: "Hi".into(),
                        logprob: -1.5,
                    },
                    TopLogprob {
                        token: "Yo".into(),
                        logprob: -3.0,
                    },
                ],
            },
            TokenLogprob {
                token: "!".into(),
                logprob: -0.25,
                top: vec![],
            },
        ]
    }

    #[test]
    fn chat_shape_has_bytes_and_no_more_alternatives_than_asked() {
        let mut l = Logprobs::new(true, Some(2)).unwrap();
        let v = l.render(&entries());
        assert_eq!(v["content"][0]["token"], "Hé");
        assert_eq!(v["content"][0]["bytes"], json!([72, 195, 169]));
        assert_eq!(v["content"][0]["logprob"], -0.5);
        let top = v["content"][0]["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "a worker's third alternative is dropped");
        assert_eq!(top[1]["token"], "Hi");
        assert_eq!(v["content"][1]["top_logprobs"], json!([]));
        assert!(Logprobs::new(true, None).is_none());
    }

    #[test]
    fn legacy_shape_is_parallel_lists_with_offsets_across_deltas() {
        let mut l = Logprobs::new(false, Some(1)).unwrap();
        let first = l.render(&entries());
        assert_eq!(first["tokens"], json!(["Hé", "!"]));
        assert_eq!(first["token_logprobs"], json!([-0.5, -0.25]));
        assert_eq!(first["top_logprobs"], json!([{"Hé": -0.5}, {}]));
        assert_eq!(first["text_offset"], json!([0, 2]));
        let second = l.render(&entries()[1..]);
        assert_eq!(second["text_offset"], json!([3]));
    }
}
