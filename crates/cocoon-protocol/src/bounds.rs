//! What an answer's token counts may say. The proxy bills what a worker reports, so a worker
//! (or the upstream server behind it) that reports more than it could have used would take
//! the client's money; each count is held to a bound computed from the request and from what
//! was relayed, by the proxy (which bills at the bound) and again by the client's gateway
//! (which cannot be billed for more than the request could have used, whatever the proxy
//! says):
//!
//! - prompt tokens: at most the prompt's bytes plus the template's overhead (a token of a
//!   byte-level tokenizer covers at least one byte), as the reservation assumed;
//! - completion tokens: at most `max_tokens` (or the context). A cut-off answer is billed
//!   what its deltas claimed, within the same bound and within the bytes they carried (plus
//!   a stop sequence and a few tokens that leave no text).
//!
//! The relayed text does not bound a finished answer's completion: an honest worker counts
//! tokens it does not relay as text (a reasoning model's thinking, which the upstream backend
//! does not pass on yet; control tokens under `ignore_eos`), so such a bound would bar honest
//! workers.
//!
//! At the proxy a report over a bound is billed at the bound and is a breach: the worker
//! loses reputation, and after repeated breaches it is disconnected. At the gateway a bill
//! whose usage is over a bound is a bad bill.

use crate::{GenerateRequest, Input, Usage};

/// Template tokens a chat message may add beside its text (role markers, separators), and a
/// text prompt beside its own (a begin-of-sequence token).
const TEMPLATE_TOKENS_PER_MESSAGE: u64 = 8;
/// Template tokens a conversation may add once: the generation prompt, and the default system
/// prompt or date line some templates insert (Qwen's and Llama 3's are 20 to 30 tokens).
const TEMPLATE_TOKENS_PER_CONVERSATION: u64 = 64;

/// Generated tokens that may leave no text behind: an end-of-generation token some servers
/// count, a few special tokens, and a UTF-8 sequence still incomplete when the answer ended.
const SILENT_TOKENS: u64 = 8;

/// An upper bound on the prompt's tokens: a token of a byte-level tokenizer covers at least
/// one byte, and the chat template adds a few per message and some once.
fn prompt_bound(input: &Input) -> u64 {
    match input {
        Input::Text { prompt } => prompt.len() as u64 + TEMPLATE_TOKENS_PER_MESSAGE,
        // Each text may gain a begin and an end token.
        Input::Embed { texts } => texts
            .iter()
            .map(|t| t.len() as u64 + TEMPLATE_TOKENS_PER_MESSAGE)
            .sum(),
        Input::Chat { messages, tools } => messages
            .iter()
            .map(|m| {
                // REVIEW, fixed: templates print calls' arguments as JSON again (`", "`
                // between items: up to twice the bytes), and a tool's result may go into the
                // prompt as a JSON string (a control character six bytes).
                let calls: u64 = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        (c.id.len() + c.name.len() + 2 * c.arguments.len()) as u64
                            + TEMPLATE_TOKENS_PER_MESSAGE
                    })
                    .sum();
                let id = m.tool_call_id.as_ref().map_or(0, |id| id.len() as u64);
                let content = match m.role {
                    crate::Role::Tool => json_escaped_len(&m.content),
                    _ => m.content.len() as u64,
                };
                content + calls + id + TEMPLATE_TOKENS_PER_MESSAGE
            })
            .sum::<u64>()
            .saturating_add(TEMPLATE_TOKENS_PER_CONVERSATION)
            .saturating_add(tools.as_ref().map_or(0, tools_bound)),
    }
}

/// Bytes of `text` as a JSON string's contents (`"` and `\\` take two, a control character up
/// to six).
fn json_escaped_len(text: &str) -> u64 {
    serde_json::to_string(text).map_or(u64::MAX, |s| s.len() as u64 - 2)
}

/// Tokens the tools' definitions may add to the prompt: their JSON (which templates print,
/// one token per byte at most), and the instructions an engine adds for a model whose own
/// template has no place for tools.
fn tools_bound(tools: &crate::Tools) -> u64 {
    const TOOL_INSTRUCTIONS_TOKENS: u64 = 256;
    // Printed as JSON with `", "` and `": "` between items: at most twice the compact text.
    2 * serde_json::to_string(tools).map_or(u64::MAX / 2, |s| s.len() as u64)
        + tools.functions.len() as u64 * TEMPLATE_TOKENS_PER_MESSAGE
        + TOOL_INSTRUCTIONS_TOKENS
}

/// The most a request's answer may be counted as, fixed when the request is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageBounds {
    prompt: u64,
    completion: u64,
    /// The request's `max_tokens`: what bounds the completion whatever the context.
    max_tokens: Option<u32>,
    /// Bytes of a stop sequence the engine matched and did not relay (its tokens count).
    withheld: u64,
}

/// What the proxy relayed of an answer: the tokens its deltas claimed and their text's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Tokens the deltas (answer and reasoning) said they carry.
    pub tokens: u64,
    /// Bytes of the deltas' text.
    pub bytes: u64,
    /// Of `tokens`, those the reasoning deltas claimed.
    pub reasoning: u64,
}

impl Relayed {
    /// Adds one delta of the answer.
    pub fn add(&mut self, tokens: u32, text: &str) {
        self.tokens = self.tokens.saturating_add(u64::from(tokens));
        self.bytes = self.bytes.saturating_add(text.len() as u64);
    }

    /// Adds one sealed chunk of `tokens` (`reasoning` of them thinking) whose ciphertext is
    /// `base64_len` characters of base64: its text is at most that many bytes (less the tag).
    pub fn add_sealed(&mut self, tokens: u32, reasoning: u32, base64_len: usize) {
        let reasoning = reasoning.min(tokens);
        let bytes =
            ((base64_len as u64).div_ceil(4) * 3).saturating_sub(crate::SEAL_TAG_BYTES as u64);
        self.tokens = self.tokens.saturating_add(u64::from(tokens));
        self.bytes = self.bytes.saturating_add(bytes);
        self.reasoning = self.reasoning.saturating_add(u64::from(reasoning));
    }

    /// Adds one tool call: its name and arguments are the text it carries, and the format the
    /// model wrapped them in (`<tool_call>{"name": …, "arguments": …}</tool_call>`, or the
    /// generic JSON) took tokens too.
    pub fn add_tool_call(&mut self, tokens: u32, call: &crate::ToolCall) {
        // REVIEW, fixed: an honest answer cut off after small calls was a breach.
        const CALL_WRAPPER_BYTES: u64 = 64;
        self.tokens = self.tokens.saturating_add(u64::from(tokens));
        self.bytes = self
            .bytes
            .saturating_add((call.name.len() + call.arguments.len()) as u64 + CALL_WRAPPER_BYTES);
    }

    /// Adds one delta of reasoning.
    pub fn add_reasoning(&mut self, tokens: u32, text: &str) {
        self.add(tokens, text);
        self.reasoning = self.reasoning.saturating_add(u64::from(tokens));
    }
}

/// A worker's report held to the bounds: what is billed and recorded, and the breach, if the
/// report broke a bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded {
    /// The usage held to the bounds: what is billed.
    pub usage: Usage,
    /// What the report claimed beyond a bound, if anything.
    pub breach: Option<String>,
}

impl UsageBounds {
    /// The bounds of `request` on a model with `context_length` tokens of context (the
    /// completion's bound when the request sets no `max_tokens`).
    pub fn new(request: &GenerateRequest, context_length: u32) -> Self {
        // A schema sent upstream may be put into the model's context (OpenAI's servers do),
        // and its tokens counted as the prompt's.
        let schema = match &request.params.response_format {
            Some(crate::ResponseFormat::JsonSchema { json_schema }) => {
                json_schema.to_string().len() as u64 + TEMPLATE_TOKENS_PER_MESSAGE
            }
            Some(crate::ResponseFormat::JsonObject) => TEMPLATE_TOKENS_PER_MESSAGE,
            None => 0,
        };
        Self {
            prompt: prompt_bound(&request.input).saturating_add(schema),
            completion: 0,
            max_tokens: request.params.max_tokens,
            withheld: request
                .params
                .stop
                .iter()
                .map(|s| s.len() as u64)
                .max()
                .unwrap_or(0),
        }
        .within(context_length)
    }

    /// The bounds of a sealed request, which the proxy cannot read: its prompt is bounded by
    /// the gateway's stated bound (which the worker checks against the prompt) and by the size
    /// of its ciphertext (a token covers at least one byte, JSON encodes a byte of text in at
    /// least one, and a message's JSON costs more bytes than its template adds tokens), a
    /// withheld stop sequence by the longest one allowed.
    pub fn sealed(request: &crate::SealedRequest, context_length: u32) -> Self {
        Self {
            prompt: request
                .plaintext_bound()
                .saturating_add(TEMPLATE_TOKENS_PER_CONVERSATION)
                .min(request.header.prompt_bound),
            completion: 0,
            max_tokens: request.header.max_tokens,
            withheld: crate::messages::MAX_STOP_BYTES as u64,
        }
        .within(context_length)
    }

    /// The same request's bounds on a model with `context_length` tokens of context, without
    /// reading the request again (the prompt's bound is kept): what a reservation weighs for
    /// each worker it may go to.
    pub fn within(&self, context_length: u32) -> Self {
        Self {
            completion: u64::from(self.max_tokens.unwrap_or(context_length)),
            ..*self
        }
    }

    /// The most prompt tokens the request may be billed for.
    pub fn prompt(&self) -> u64 {
        self.prompt
    }

    /// The most completion tokens the request may be billed for.
    pub fn completion(&self) -> u64 {
        self.completion
    }

    /// Holds a finished answer's `reported` usage to the bounds, given what was `relayed`.
    pub fn apply(&self, reported: Usage, relayed: Relayed) -> Bounded {
        let mut breaches = Vec::new();
        let prompt = u64::from(reported.prompt_tokens);
        if prompt > self.prompt {
            breaches.push(format!(
                "{prompt} prompt tokens for a prompt that fits in {}",
                self.prompt
            ));
        }
        let completion = u64::from(reported.completion_tokens);
        if completion > self.completion {
            breaches.push(format!(
                "{completion} completion tokens where at most {} may be generated \
                 ({} tokens in {} bytes were relayed)",
                self.completion, relayed.tokens, relayed.bytes
            ));
        }
        // Parts of a count cannot exceed it: a report that says otherwise is inconsistent,
        // whichever way it would tip the price.
        if reported.cached_tokens > reported.prompt_tokens {
            breaches.push(format!(
                "{} cached of {} prompt tokens",
                reported.cached_tokens, reported.prompt_tokens
            ));
        }
        if reported.reasoning_tokens > reported.completion_tokens {
            breaches.push(format!(
                "{} reasoning of {} completion tokens",
                reported.reasoning_tokens, reported.completion_tokens
            ));
        }
        let clamp = |v: u64, cap: u64| u32::try_from(v.min(cap)).unwrap_or(u32::MAX);
        let prompt_tokens = clamp(prompt, self.prompt);
        let completion_tokens = clamp(completion, self.completion);
        // The answer deltas' own claims are answer tokens: reasoning fills only the room they
        // leave (thinking a server counted but did not stream still fits), a few silent tokens
        // aside. Relabelling answer tokens as reasoning, priced apart, is a breach.
        let answered = relayed.tokens.saturating_sub(relayed.reasoning);
        let room = u64::from(completion_tokens)
            .saturating_sub(answered)
            .saturating_add(SILENT_TOKENS);
        if u64::from(reported.reasoning_tokens) > room
            && reported.reasoning_tokens <= reported.completion_tokens
        {
            breaches.push(format!(
                "{} reasoning tokens where the {answered} tokens of answer relayed leave room \
                 for {room}",
                reported.reasoning_tokens
            ));
        }
        let reasoning_tokens = u32::try_from(room)
            .unwrap_or(u32::MAX)
            .min(reported.reasoning_tokens)
            .min(completion_tokens);
        Bounded {
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                cached_tokens: reported.cached_tokens.min(prompt_tokens),
                reasoning_tokens,
            },
            breach: (!breaches.is_empty()).then(|| breaches.join("; ")),
        }
    }

    /// The completion tokens a cut-off answer is billed for: what its deltas claimed, within
    /// the bounds and within the text they carried (plus a withheld stop sequence and a few
    /// tokens that leave no text).
    pub fn cut_off(&self, relayed: Relayed) -> Bounded {
        let by_text = relayed
            .bytes
            .saturating_add(self.withheld)
            .saturating_add(SILENT_TOKENS);
        let cap = self.completion.min(by_text);
        let completion_tokens = u32::try_from(relayed.tokens.min(cap)).unwrap_or(u32::MAX);
        Bounded {
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens,
                cached_tokens: 0,
                reasoning_tokens: u32::try_from(relayed.reasoning)
                    .unwrap_or(u32::MAX)
                    .min(completion_tokens),
            },
            breach: (relayed.tokens > cap).then(|| {
                format!(
                    "deltas claimed {} tokens in {} bytes of text",
                    relayed.tokens, relayed.bytes
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatMessage, Role, SamplingParams};

    fn request(prompt: &str, max_tokens: Option<u32>, stop: &[&str]) -> GenerateRequest {
        GenerateRequest {
            model: "m".into(),
            input: Input::Chat {
                messages: vec![ChatMessage::new(Role::User, prompt)],
                tools: None,
            },
            params: SamplingParams {
                max_tokens,
                stop: stop.iter().map(|s| s.to_string()).collect(),
                ..SamplingParams::default()
            },
            max_price: None,
            cache_scope: None,
        }
    }

    fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage::new(prompt_tokens, completion_tokens)
    }

    fn relayed(tokens: u64, bytes: u64) -> Relayed {
        Relayed {
            tokens,
            bytes,
            reasoning: 0,
        }
    }

    #[test]
    fn honest_counts_pass_unchanged() {
        let b = UsageBounds::new(&request("Hello there", Some(16), &["\n\n"]), 2048);
        // 11 bytes, one message's and one conversation's template overhead bound the prompt.
        assert_eq!(b.prompt(), 11 + 8 + 64);
        let honest = b.apply(usage(9, 16), relayed(16, 40));
        assert_eq!(
            honest,
            Bounded {
                usage: usage(9, 16),
                breach: None
            }
        );
        // A stop sequence's tokens count though its text was withheld.
        let stopped = b.apply(usage(9, 5), relayed(3, 3));
        assert_eq!(stopped.breach, None, "{stopped:?}");
        // Multi-byte text: fewer tokens than bytes.
        assert_eq!(b.apply(usage(83, 4), relayed(4, 16)).breach, None);
    }

    #[test]
    fn inflated_counts_are_billed_at_the_bound_and_named() {
        let b = UsageBounds::new(&request("Hi", Some(4), &[]), 2048);
        let lie = b.apply(usage(4_000_000_000, 4_000_000_000), relayed(4, 4));
        assert_eq!(lie.usage, usage(2 + 8 + 64, 4));
        let breach = lie.breach.unwrap();
        assert!(breach.contains("4000000000 prompt tokens"), "{breach}");
        assert!(breach.contains("4000000000 completion tokens"), "{breach}");
        // A finished answer may count tokens it did not relay as text (a reasoning model's
        // thinking), within max_tokens.
        let b = UsageBounds::new(&request("Hi", Some(100), &[]), 2048);
        assert_eq!(b.apply(usage(5, 50), relayed(1, 1)).breach, None);
        // A cut-off answer's deltas that claim more tokens than their text could hold.
        let b = UsageBounds::new(&request("Hi", Some(100_000), &[]), 2048);
        let cut = b.cut_off(relayed(90_000, 10));
        assert_eq!(cut.usage, usage(0, 10 + SILENT_TOKENS as u32));
        assert!(cut.breach.is_some());
        assert_eq!(
            b.cut_off(relayed(3, 3)),
            Bounded {
                usage: usage(0, 3),
                breach: None
            }
        );
    }

    /// Cached and reasoning tokens are parts of the prompt's and the completion's counts: held
    /// to them, and a report whose parts exceed its whole is a breach. A cut-off answer's
    /// reasoning is what its reasoning deltas claimed.
    #[test]
    fn cached_and_reasoning_tokens_are_parts_of_their_counts() {
        let b = UsageBounds::new(&request("Hello there", Some(16), &[]), 2048);
        let honest = Usage {
            cached_tokens: 60,
            reasoning_tokens: 10,
            ..usage(80, 16)
        };
        // 10 reasoning deltas and 6 answer deltas relayed.
        let mut thought_then_answered = relayed(0, 0);
        for _ in 0..10 {
            thought_then_answered.add_reasoning(1, "hm");
        }
        for _ in 0..6 {
            thought_then_answered.add(1, "ok");
        }
        assert_eq!(
            b.apply(honest, thought_then_answered),
            Bounded {
                usage: honest,
                breach: None
            }
        );
        assert_eq!(
            honest.priced(),
            crate::PricedTokens {
                prompt: 20,
                cached: 60,
                completion: 6,
                reasoning: 10
            }
        );
        let odd = Usage {
            cached_tokens: 81,
            reasoning_tokens: 17,
            ..usage(80, 16)
        };
        let held = b.apply(odd, relayed(0, 0));
        assert_eq!(
            (held.usage.cached_tokens, held.usage.reasoning_tokens),
            (80, 16)
        );
        let breach = held.breach.unwrap();
        assert!(breach.contains("81 cached of 80"), "{breach}");
        assert!(breach.contains("17 reasoning of 16"), "{breach}");
        // Over the prompt's bound, the cached part is held to the bounded prompt.
        let over = Usage {
            cached_tokens: 5000,
            ..usage(5000, 4)
        };
        assert_eq!(b.apply(over, relayed(4, 4)).usage.cached_tokens, 83);
        let mut thought = relayed(0, 0);
        thought.add_reasoning(5, "hmmmm");
        thought.add(2, "ok");
        let cut = b.cut_off(thought);
        assert_eq!(
            (cut.usage.completion_tokens, cut.usage.reasoning_tokens),
            (7, 5)
        );
    }

    /// Attack: where the network prices reasoning above the answer (`reasoning_multiplier` >
    /// `completion_multiplier`), a worker (or the upstream server behind it) streams its whole
    /// answer as answer deltas, no thinking at all, then reports every generated token as
    /// reasoning, and is paid (and the client billed) at the dearer multiplier. Only
    /// `reasoning_tokens <= completion_tokens` was checked, so the relabelling passed.
    /// Now: the answer deltas' own claims are answer tokens; reasoning may fill only the
    /// room they leave in the completion (which still lets a server count thinking it did not
    /// stream), a few silent tokens aside. A report beyond that is a breach, held to the room.
    #[test]
    fn review_reasoning_label_is_held_to_the_room_the_answer_deltas_leave() {
        let b = UsageBounds::new(&request("Hello there", Some(64), &[]), 2048);
        let mut answered = relayed(0, 0);
        for _ in 0..64 {
            answered.add(1, "ab");
        }
        assert_eq!(answered.reasoning, 0);
        let relabelled = Usage {
            reasoning_tokens: 64,
            ..usage(9, 64)
        };
        let held = b.apply(relabelled, answered);
        assert!(
            held.breach.is_some(),
            "64 answer deltas relayed, yet all 64 tokens billed as reasoning: {held:?}"
        );
        assert!(
            u64::from(held.usage.reasoning_tokens) <= SILENT_TOKENS,
            "{held:?}"
        );
        // Thinking the server counted but did not stream still fits the room the answer
        // deltas leave: 10 answer deltas, 54 reasoning tokens of 64.
        let mut short = relayed(0, 0);
        for _ in 0..10 {
            short.add(1, "ab");
        }
        let hidden = Usage {
            reasoning_tokens: 54,
            ..usage(9, 64)
        };
        assert_eq!(
            b.apply(hidden, short),
            Bounded {
                usage: hidden,
                breach: None
            }
        );
    }

    #[test]
    fn without_max_tokens_the_context_bounds_the_completion() {
        let b = UsageBounds::new(&request("Hi", None, &[]), 64);
        assert_eq!(b.completion(), 64);
        let lie = b.apply(usage(5, 5000), relayed(5000, 5000));
        assert_eq!(lie.usage.completion_tokens, 64);
        assert!(lie.breach.is_some());
    }

    /// REVIEW, fixed: `response_format` now goes upstream with its JSON schema, but the prompt's
    /// bound counts only the messages. An upstream that puts the schema into the model's
    /// context (OpenAI does, as it does with tool definitions) reports those tokens in
    /// `prompt_tokens`, so an honest worker's report is a breach (it loses reputation and,
    /// repeated, is disconnected), and the client pays for the messages only while the
    /// worker pays its upstream for the whole schema: a client can send "Hi" with a 100 KB
    /// schema at the price of "Hi". Fix: add the schema's serialized bytes (for
    /// `json_schema`, and a few tokens for `json_object`) to `prompt_bound`, and cap the
    /// schema's size in `SamplingParams::validate`.
    #[test]
    fn review_a_json_schema_sent_upstream_is_part_of_the_prompt_bound() {
        let properties: serde_json::Map<String, serde_json::Value> = (0..60)
            .map(|i| {
                (
                    format!("field_{i}"),
                    serde_json::json!({
                        "type": "string",
                        "description": "what the answer must say about this field"
                    }),
                )
            })
            .collect();
        let json_schema = serde_json::json!({
            "name": "form",
            "strict": true,
            "schema": {"type": "object", "properties": properties},
        });
        let schema_bytes = json_schema.to_string().len() as u64;
        let mut req = request("Fill in the form.", Some(16), &[]);
        req.params.response_format = Some(crate::ResponseFormat::JsonSchema { json_schema });
        assert!(req.validate().is_ok());
        let b = UsageBounds::new(&req, 2048);
        // The upstream's honest count: the messages, plus the schema at four bytes a token.
        let honest = usage(u32::try_from(schema_bytes / 4).unwrap() + 20, 16);
        let held = b.apply(honest, relayed(16, 40));
        assert_eq!(
            held.breach,
            None,
            "the prompt bound {} ignores the {schema_bytes}-byte schema",
            b.prompt()
        );
        assert_eq!(held.usage, honest);
    }

    /// REVIEW, fixed: an honest worker whose answer is cut off (the app leaves once it has read the
    /// calls, or the worker fails before its `Done`) after a few small tool calls is counted as
    /// overreporting. `Relayed::add_tool_call` counts only the call's name and arguments as
    /// its text, but the tokens the call accounts for are everything the model wrote for it:
    /// `<tool_call>`, the `{"name": …, "arguments": …}` wrapper, `</tool_call>` and the
    /// whitespace between calls (the embedded engine sends them all with the call, see
    /// `Sequence::send` in cocoon-llama; the generic style's `{"tool_calls": [...]}` wrapper the
    /// same). `<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>` is about 15
    /// tokens (62 bytes written) for 10 bytes of name and arguments, so four such calls claim 60
    /// tokens where the cut-off cap is 4 × 10 + 8 = 48: a breach (reputation lost, eviction
    /// after three) and the honest tokens go unpaid. Expected: a cut-off answer's honest tool
    /// calls are no breach, billed as claimed (a call's bound allows for its wrapper).
    #[test]
    fn review_an_honest_cut_off_after_small_tool_calls_is_no_breach() {
        let asked = request("What time is it here and there?", Some(256), &[]);
        let b = UsageBounds::new(&asked, 2048);
        let call = crate::ToolCall {
            id: "call_0123456789abcdef01234567".into(),
            name: "get_time".into(),
            arguments: "{}".into(),
        };
        let mut calls = relayed(0, 0);
        for _ in 0..4 {
            calls.add_tool_call(15, &call);
        }
        let cut = b.cut_off(calls);
        assert_eq!(
            cut,
            Bounded {
                usage: usage(0, 60),
                breach: None
            },
            "four honest calls of 15 tokens each, cut off before the answer's end"
        );
    }
}
