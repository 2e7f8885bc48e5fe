use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Most stop sequences a request may carry (OpenAI allows four).
pub(crate) const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in bytes.
pub(crate) const MAX_STOP_BYTES: usize = 256;

/// Author of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person (or app) asking.
    User,
    /// The model's own earlier replies.
    Assistant,
    /// The result of a tool call the model asked for (`tool_call_id` names the call).
    Tool,
}

impl Role {
    /// The role's name as written in OpenAI's API and in chat templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote the message.
    pub role: Role,
    /// The message's text.
    pub content: String,
    /// An assistant's: the tool calls it made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool's: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of plain text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A call of one of the request's tools, as the model made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the tool's result names (`call_…`).
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments: a JSON object, as text (OpenAI's shape).
    pub arguments: String,
}

/// Functions the model may call, and how it must choose (OpenAI's `tools` and `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tools {
    /// The functions, at least one.
    pub functions: Vec<Function>,
    /// Whether the model must call one, may, or must call a named one.
    pub choice: ToolChoice,
    /// Whether one answer may call several (OpenAI's `parallel_tool_calls`, default true).
    #[serde(default = "yes")]
    pub parallel: bool,
}

fn yes() -> bool {
    true
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Function {
    /// Its name: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its arguments (an object's).
    #[serde(default = "empty_object")]
    pub parameters: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// How the model must choose among the tools (`none` is a request without them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// Call tools or answer in text, as the model sees fit.
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this function.
    Function(String),
}

/// Most functions a request may offer.
pub const MAX_TOOLS: usize = 128;
/// Most bytes the functions' definitions may take.
pub const MAX_TOOLS_BYTES: usize = 64 * 1024;

impl Tools {
    /// Checks names, the named choice and the sizes.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.functions.is_empty() || self.functions.len() > MAX_TOOLS {
            return Err(ProtocolError::invalid(format!(
                "tools must list 1 to {MAX_TOOLS} functions, got {}",
                self.functions.len()
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for f in &self.functions {
            if f.name.is_empty()
                || f.name.len() > 64
                || !f
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ProtocolError::invalid(format!(
                    "tool name {:?} must be 1 to 64 letters, digits, _ or -",
                    f.name
                )));
            }
            if !names.insert(f.name.as_str()) {
                return Err(ProtocolError::invalid(format!(
                    "tool {:?} is listed twice",
                    f.name
                )));
            }
            if !f.parameters.is_object() {
                return Err(ProtocolError::invalid(format!(
                    "tool {:?}: parameters must be a JSON schema object",
                    f.name
                )));
            }
        }
        if let ToolChoice::Function(name) = &self.choice
            && !names.contains(name.as_str())
        {
            return Err(ProtocolError::invalid(format!(
                "tool_choice names function {name:?}, which tools does not list"
            )));
        }
        if serde_json::to_string(self).map_or(usize::MAX, |s| s.len()) > MAX_TOOLS_BYTES {
            return Err(ProtocolError::invalid(format!(
                "tools take at most {MAX_TOOLS_BYTES} bytes"
            )));
        }
        Ok(())
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Input {
    /// A conversation, rendered by the worker with the model's own chat template.
    Chat {
        /// The conversation so far, oldest message first.
        messages: Vec<ChatMessage>,
        /// Functions the model may call; `None`: it answers in text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tools: Option<Tools>,
    },
    /// Raw text, tokenized as is.
    Text {
        /// The text to continue.
        prompt: String,
    },
    /// Texts to embed (OpenAI's `/v1/embeddings`): the answer is one
    /// [`GenerateEvent::Embedding`] per text, in order, and generates nothing (the request's
    /// `max_tokens` is 0).
    Embed {
        /// The texts, 1 to [`MAX_EMBED_INPUTS`], none empty.
        texts: Vec<String>,
    },
}

/// Most texts one embedding request may hold (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// Leading system messages shorter than this in all are cheap to recompute: they tie a request
/// to no worker's prompt cache.
pub const MIN_PREFIX_BYTES: usize = 256;
/// Of a text prompt, this much is its long prefix.
const TEXT_PREFIX_BYTES: usize = 1024;

impl Input {
    /// The long prefix requests may share in a worker's prompt cache, if there is one: the
    /// leading system messages of a chat (at least [`MIN_PREFIX_BYTES`] of them), or the first
    /// kilobyte of a longer text prompt. What cache affinity keys on: the proxy hashes it in
    /// clear, a gateway under its own secret for a sealed request.
    pub fn long_prefix(&self) -> Option<Vec<&str>> {
        match self {
            Input::Chat { messages, .. } => {
                let system: Vec<&str> = messages
                    .iter()
                    .take_while(|m| m.role == Role::System)
                    .map(|m| m.content.as_str())
                    .collect();
                (system.iter().map(|s| s.len()).sum::<usize>() >= MIN_PREFIX_BYTES)
                    .then_some(system)
            }
            // Embeddings share no cells.
            Input::Embed { .. } => None,
            Input::Text { prompt } => {
                if prompt.len() <= TEXT_PREFIX_BYTES {
                    return None;
                }
                let mut end = TEXT_PREFIX_BYTES;
                while !prompt.is_char_boundary(end) {
                    end -= 1;
                }
                Some(vec![&prompt[..end]])
            }
        }
    }
}

/// Sampling parameters, with OpenAI's meaning and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most tokens to generate; `None` means "up to the end of the context window".
    pub max_tokens: Option<u32>,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling: sample only among the most likely tokens whose probabilities add up
    /// to this; in (0, 1], 1 disables it.
    pub top_p: f32,
    /// Seed of the sampler's random generator, for reproducible output; `None`: a random seed.
    pub seed: Option<u64>,
    /// Sequences that end the generation when produced (at most 4, each 1 to 256 bytes).
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (an extension vLLM and llama.cpp share;
    /// benchmarks use it to get a fixed number of tokens).
    pub ignore_eos: bool,
    /// OpenAI's: lowers (positive) or raises (negative) a token's logit by this much for each
    /// time it was generated already; -2 to 2, 0 is off.
    #[serde(skip_serializing_if = "is_zero_f32")]
    pub frequency_penalty: f32,
    /// OpenAI's: lowers (positive) or raises (negative) a token's logit by this much once it
    /// was generated at all; -2 to 2, 0 is off.
    #[serde(skip_serializing_if = "is_zero_f32")]
    pub presence_penalty: f32,
    /// vLLM's and llama.cpp's: divides the logit of every token generated already by this
    /// (multiplies a negative one); above 0, 1 is off.
    #[serde(skip_serializing_if = "is_one_f32")]
    pub repetition_penalty: f32,
    /// Sample only among this many most likely tokens; 0 is off (vLLM's -1 too).
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub top_k: u32,
    /// Sample only among tokens at least this likely relative to the most likely one; 0 to
    /// 1, 0 is off.
    #[serde(skip_serializing_if = "is_zero_f32")]
    pub min_p: f32,
    /// OpenAI's: added to the logit of each token (by its id in the serving model's
    /// vocabulary), -100 to 100; at most [`MAX_LOGIT_BIASES`] tokens.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub logit_bias: std::collections::BTreeMap<u32, f32>,
    /// OpenAI's: the answer must be JSON (any object, or one that matches a schema); `None`:
    /// free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Return each generated token's log-probability, with this many of the most likely
    /// tokens in its place (0 to [`MAX_TOP_LOGPROBS`]); `None`: no log-probabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
}

/// Most alternatives a token's log-probability may come with (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A generated token's log-probability under the model (before sampling's filters and
/// temperature, as vLLM and llama.cpp's server report it), and the most likely tokens in its
/// place: OpenAI's `logprobs.content[]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (a piece of a multi-byte character shows as U+FFFD).
    pub token: String,
    /// Its natural log-probability, at most 0.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position, and its log-probability.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural log-probability.
    pub logprob: f32,
}

// Events compare exactly (tests replay them); a log-probability compares by its bits.
impl PartialEq for TokenLogprob {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token
            && self.logprob.to_bits() == other.logprob.to_bits()
            && self.top == other.top
    }
}
impl Eq for TokenLogprob {}
impl PartialEq for TopLogprob {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token && self.logprob.to_bits() == other.logprob.to_bits()
    }
}
impl Eq for TopLogprob {}

/// At most this many tokens in a `logit_bias` (OpenAI's limit).
pub const MAX_LOGIT_BIASES: usize = 300;

/// What shape the answer must take (OpenAI's `response_format`, less `text`, which is `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON that matches a schema: OpenAI's `{"name", "schema", "strict", "description"}`,
    /// kept as sent so that upstream servers get it unchanged.
    JsonSchema {
        /// The `json_schema` object.
        json_schema: serde_json::Value,
    },
}

impl ResponseFormat {
    /// The JSON schema the answer must match, for `json_schema`.
    pub fn schema(&self) -> Option<&serde_json::Value> {
        match self {
            Self::JsonObject => None,
            Self::JsonSchema { json_schema } => json_schema.get("schema"),
        }
    }
}

fn is_zero_f32(v: &f32) -> bool {
    *v == 0.0
}

fn is_one_f32(v: &f32) -> bool {
    *v == 1.0
}

impl GenerateEvent {
    /// A sealed chunk with `receipt` attached (the worker's, on its last chunk); any other
    /// event as it is.
    pub fn with_receipt(self, receipt: crate::Receipt) -> Self {
        match self {
            Self::Sealed {
                seq,
                last,
                tokens,
                reasoning,
                data,
                salt,
                ..
            } => Self::Sealed {
                seq,
                last,
                tokens,
                reasoning,
                data,
                salt,
                receipt: Some(Box::new(receipt)),
            },
            other => other,
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            top_k: 0,
            min_p: 0.0,
            logit_bias: std::collections::BTreeMap::new(),
            response_format: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges. Both the client gateway (to answer early) and the worker (not to trust its
    /// peers) call this.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(ProtocolError::invalid(format!(
                "temperature must be between 0 and 2, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ProtocolError::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(ProtocolError::invalid(format!(
                    "{name} must be between -2 and 2, got {value}"
                )));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return Err(ProtocolError::invalid(format!(
                "repetition_penalty must be in (0, 2], got {}",
                self.repetition_penalty
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ProtocolError::invalid(format!(
                "min_p must be between 0 and 1, got {}",
                self.min_p
            )));
        }
        if let Some(n) = self.logprobs.filter(|n| *n > MAX_TOP_LOGPROBS) {
            return Err(ProtocolError::invalid(format!(
                "top_logprobs (a completion's logprobs) must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"
            )));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIASES {
            return Err(ProtocolError::invalid(format!(
                "logit_bias may name at most {MAX_LOGIT_BIASES} tokens, got {}",
                self.logit_bias.len()
            )));
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(*b))
        {
            return Err(ProtocolError::invalid(format!(
                "logit_bias for token {token} must be between -100 and 100, got {bias}"
            )));
        }
        if let Some(ResponseFormat::JsonSchema { json_schema }) = &self.response_format {
            if !json_schema.is_object() {
                return Err(ProtocolError::invalid(
                    "response_format.json_schema must be an object with name and schema",
                ));
            }
            if !json_schema
                .get("schema")
                .is_none_or(serde_json::Value::is_object)
            {
                return Err(ProtocolError::invalid(
                    "response_format.json_schema.schema must be a JSON object",
                ));
            }
            if json_schema.to_string().len() > MAX_SCHEMA_BYTES {
                return Err(ProtocolError::invalid(format!(
                    "response_format.json_schema is at most {MAX_SCHEMA_BYTES} bytes"
                )));
            }
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(ProtocolError::invalid(format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}",
                self.stop.len()
            )));
        }
        for s in &self.stop {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(ProtocolError::invalid(format!(
                    "each stop sequence must be 1 to {MAX_STOP_BYTES} bytes long"
                )));
            }
        }
        Ok(())
    }
}

/// A request for one completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Id of the model to run, as listed in [`ModelCard::id`].
    pub model: String,
    /// What the model should continue.
    pub input: Input,
    /// How to sample; OpenAI's defaults when omitted.
    #[serde(default)]
    pub params: SamplingParams,
    /// The most the client will pay per weighted token, in nanoton: the proxy routes only to
    /// workers whose price is at or below it. `None`: any price the network allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price: Option<u64>,
    /// Whose prompt cache this request may share: a worker reuses cells only between requests
    /// of the same scope, and leaves none for, nor reuses any in, a request without one. From
    /// the gateway, a hint (its app's key, or a fresh value to opt out); the proxy replaces
    /// it with a keyed hash of the client's key and the hint, so no client can name another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_scope: Option<String>,
}

/// The longest `cache_scope` accepted.
pub const MAX_CACHE_SCOPE_BYTES: usize = 128;

/// The largest JSON schema a `response_format` may carry, serialized.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

impl GenerateRequest {
    /// Checks the request is well-formed (a model, a non-empty chat, parameters in range);
    /// called before a request is routed or run.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.model.is_empty() {
            return Err(ProtocolError::invalid("model must not be empty"));
        }
        if let Input::Chat { messages, tools } = &self.input {
            if messages.is_empty() {
                return Err(ProtocolError::invalid(
                    "messages must contain at least one message",
                ));
            }
            for (i, m) in messages.iter().enumerate() {
                if (m.role == Role::Tool) != m.tool_call_id.is_some() {
                    return Err(ProtocolError::invalid(format!(
                        "messages[{i}]: a tool's message, and only a tool's, names its tool_call_id"
                    )));
                }
                if !m.tool_calls.is_empty() && m.role != Role::Assistant {
                    return Err(ProtocolError::invalid(format!(
                        "messages[{i}]: only an assistant's message holds tool_calls"
                    )));
                }
            }
            if let Some(tools) = tools {
                tools.validate()?;
                if self.params.response_format.is_some() {
                    return Err(ProtocolError::invalid(
                        "tools and response_format cannot be asked together",
                    ));
                }
            }
        }
        match &self.input {
            Input::Embed { texts } => {
                if texts.is_empty() || texts.len() > MAX_EMBED_INPUTS {
                    return Err(ProtocolError::invalid(format!(
                        "input must hold 1 to {MAX_EMBED_INPUTS} texts, got {}",
                        texts.len()
                    )));
                }
                if let Some(i) = texts.iter().position(String::is_empty) {
                    return Err(ProtocolError::invalid(format!(
                        "input[{i}] is empty: there is nothing to embed"
                    )));
                }
                if self.params.max_tokens != Some(0) {
                    return Err(ProtocolError::invalid(
                        "an embedding request generates nothing: its max_tokens is 0",
                    ));
                }
            }
            _ if self.params.max_tokens == Some(0) => {
                return Err(ProtocolError::invalid("max_tokens must be at least 1"));
            }
            _ => {}
        }
        if self
            .cache_scope
            .as_ref()
            .is_some_and(|s| s.len() > MAX_CACHE_SCOPE_BYTES)
        {
            return Err(ProtocolError::invalid(format!(
                "cache_scope is at most {MAX_CACHE_SCOPE_BYTES} bytes"
            )));
        }
        self.params.validate()
    }
}

/// Token counts of one completion, as counted by the serving model's tokenizer. As in
/// OpenAI's `usage`, cached tokens are part of the prompt's and reasoning tokens part of the
/// completion's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Of the prompt's tokens, those served from a cache of an earlier prompt rather than
    /// computed (priced at the network's cached multiplier).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub cached_tokens: u32,
    /// Of the generated tokens, those of the model's reasoning (priced at the network's
    /// reasoning multiplier).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub reasoning_tokens: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// A usage's tokens by how each is priced; the parts add up to the usage's total (cached and
/// reasoning tokens held to the prompt's and completion's counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PricedTokens {
    /// Prompt tokens computed afresh.
    pub prompt: u64,
    /// Prompt tokens served from a cache.
    pub cached: u64,
    /// Generated tokens of the answer.
    pub completion: u64,
    /// Generated tokens of reasoning.
    pub reasoning: u64,
}

impl Usage {
    /// The usage of an answer with `prompt_tokens` and `completion_tokens`, none of them
    /// cached or reasoning.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            ..Self::default()
        }
    }

    /// Prompt plus completion tokens (saturating).
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// The tokens by how each is priced.
    pub fn priced(&self) -> PricedTokens {
        let cached = self.cached_tokens.min(self.prompt_tokens);
        let reasoning = self.reasoning_tokens.min(self.completion_tokens);
        PricedTokens {
            prompt: u64::from(self.prompt_tokens - cached),
            cached: u64::from(cached),
            completion: u64::from(self.completion_tokens - reasoning),
            reasoning: u64::from(reasoning),
        }
    }
}

/// What one request cost, as the proxy billed it. Amounts are in nanoton (10⁻⁹ TON).
///
/// The contract on the ledger counts in units of the network's floor price (`unit_price`); a
/// request served at a higher price is billed proportionally more units, rounded down, so
/// the client never pays more than `weighted_tokens × price_per_token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billing {
    /// The price paid per weighted token: the serving worker's price, never below the
    /// network's floor nor above the request's `max_price`.
    pub price_per_token: u64,
    /// The request's tokens, each kind weighted by the network's multiplier.
    #[serde(default)]
    pub weighted_tokens: u64,
    /// The network's floor price: what one unit of the contract's counter is worth.
    #[serde(default)]
    pub unit_price: u64,
    /// Counter units billed: `⌊weighted_tokens × price_per_token / unit_price⌋`.
    pub billed_tokens: u64,
    /// `billed_tokens × unit_price`.
    pub cost: u64,
    /// The client contract's counter after this request: weighted tokens charged in total.
    pub tokens_used: u64,
    /// The proxy's signed "charge this client up to `tokens_used`" message (hex), which the
    /// client can check against the proxy's key and keep.
    pub charge: String,
    /// SHA-256 (hex) of the weights that served the answer, as the serving worker announced
    /// them and the registry allowed them (the proxy's word: the charge does not sign it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
}

/// A client's id for one request ([`REQUEST_ID_HEADER`](crate::REQUEST_ID_HEADER)): 16
/// random bytes, written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub [u8; 16]);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for RequestId {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        let mut id = [0; 16];
        hex::decode_to_slice(s, &mut id)
            .map_err(|_| ProtocolError::invalid("a request id is 32 hex digits"))?;
        Ok(Self(id))
    }
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A client's ask for the bill of one of its requests ([`paths::BILL`](crate::paths::BILL)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillQuery {
    /// The id the request was sent with.
    pub id: RequestId,
}

/// What a proxy settled for one request of the asking client: the answer to a [`BillQuery`].
/// A client whose answer ended without its bill (cut off, or its connection lost) learns
/// here what the proxy charged for it, so that every counter the ledger charges is claimed by
/// a bill the client checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LateBill {
    /// The request was settled: its bill, and the usage billed (for a cut-off answer, the
    /// completion tokens relayed and no prompt).
    Billed {
        /// The bill, as the answer's end would have carried it.
        billing: Billing,
        /// The token counts billed.
        usage: Usage,
    },
    /// The request is still being answered or settled: ask again.
    Pending,
    /// No settlement names the id for this client: nothing was charged for it (or it was
    /// more than [`BILL_RETENTION_SECS`](crate::BILL_RETENTION_SECS) ago).
    NotBilled,
}

/// The proxy's signed promise to pay a worker (`POST` [`paths::PAYOUT`](crate::paths::PAYOUT)).
/// Cumulative: the latest one is all the worker needs to claim everything owed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    /// The proxy's public key (hex).
    pub proxy: String,
    /// Weighted tokens owed to the worker in total.
    pub tokens: u64,
    /// The signed "pay worker up to `tokens`" message (hex).
    pub message: String,
}

/// What a cooperative close returned to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// Nanoton sent back: the whole balance left after the last charge.
    pub refunded: u64,
    /// Weighted tokens charged over the contract's life.
    pub tokens_used: u64,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The model called tools (the answer's `tool_call` events), and waits for their results.
    ToolCalls,
}

impl FinishReason {
    /// The reason as OpenAI's `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// One event of a streamed answer. A well-formed stream is zero or more `Delta`s followed by
/// exactly one `Done` or one `Error`; a stream that ends without either was cut off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GenerateEvent {
    /// New text, and how many generated tokens it accounts for.
    Delta {
        /// The text generated since the previous delta.
        text: String,
        /// How many generated tokens `text` accounts for.
        tokens: u32,
        /// When the request asked for them: the log-probabilities of the tokens this delta
        /// accounts for, in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprob>,
    },
    /// A tool call the model made, whole, and how many generated tokens it accounts for: part
    /// of the answer, relayed and billed like a [`GenerateEvent::Delta`].
    ToolCall {
        /// The call.
        call: ToolCall,
        /// How many generated tokens the call accounts for.
        tokens: u32,
    },
    /// The embedding of an embedding request's text number `index`: its floats, little-endian
    /// IEEE 754 single precision, base64 (as OpenAI's `encoding_format: base64`). Carries no
    /// generated tokens: the request's prompt tokens are its usage.
    Embedding {
        /// Which text, from 0.
        index: u32,
        /// The vector, base64 of its little-endian `f32`s.
        embedding: String,
    },
    /// New text of the model's reasoning (what OpenAI-compatible servers stream as
    /// `reasoning_content`), and how many generated tokens it accounts for: part of the
    /// answer, relayed and billed like a [`GenerateEvent::Delta`], shown to the app apart from
    /// its content.
    Reasoning {
        /// The reasoning generated since the previous event.
        text: String,
        /// How many generated tokens `text` accounts for.
        tokens: u32,
    },
    /// An event of a sealed answer, encrypted to the client's gateway (see
    /// [`SealedRequest`](crate::SealedRequest)): a `Delta` or `Reasoning`, or, in the `last`
    /// chunk, the worker's own `Done`. Its counts travel in clear (and are authenticated
    /// with it) so that the proxy can bill what it relays.
    Sealed {
        /// Position in the answer, from 0: a chunk dropped, repeated or moved fails to open.
        seq: u64,
        /// Whether this is the answer's last chunk (it holds the worker's `Done`); an answer
        /// that ends without one was cut.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        last: bool,
        /// Generated tokens the chunk accounts for.
        tokens: u32,
        /// Of `tokens`, those of the model's reasoning.
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        reasoning: u32,
        /// The encrypted event, base64.
        data: String,
        /// On the first chunk: the worker's fresh salt (base64), which the answer's key is
        /// derived with, so an answer's key is never used twice (a proxy that replays a request
        /// gets another).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        salt: Option<String>,
        /// On the last chunk: the worker's signed receipt over the answer and its counts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt: Option<Box<crate::Receipt>>,
    },
    /// The generation ended normally.
    Done {
        /// Why the generation stopped.
        finish_reason: FinishReason,
        /// Token counts of the whole request.
        usage: Usage,
        /// What the proxy charged for the request; added by a proxy that takes payments.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        billing: Option<Billing>,
    },
    /// The generation failed; no more events follow.
    Error {
        /// What went wrong.
        error: ProtocolError,
    },
}

/// A model as served by a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The model's id, which requests name in [`GenerateRequest::model`].
    pub id: String,
    /// Context window in tokens (prompt plus completion).
    pub context_length: u32,
    /// The least the worker takes per weighted token, in nanoton; 0: the network's floor.
    /// Backends leave it 0; the worker's `[prices]` set it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_price: u64,
    /// SHA-256 (hex) of the model's weights as the worker serves them: of the GGUF file the
    /// embedded engine loaded, or the hash an upstream backend's config declares. A proxy on a
    /// ledger admits the model only if the registry allows this hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
}

/// Whether `hash` is a model hash as the network names them ([`ModelCard::model_hash`]): 64
/// lowercase hex digits, SHA-256.
pub fn is_model_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a worker tells its proxy right after connecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// The [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) the worker speaks; a proxy drops a
    /// worker that speaks another one.
    pub protocol_version: u32,
    /// The worker's name, shown in the proxy's status.
    pub name: String,
    /// The models the worker serves.
    pub models: Vec<ModelCard>,
    /// How many requests the worker runs at once; more are queued.
    pub capacity: u32,
    /// The worker's current certificate (DER, base64). It is renewed every 18 hours while
    /// its connection keeps the one of its handshake, so the proxy offers this one to gateways
    /// that seal requests to the worker (they verify it, quote and key, themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The worker is shutting down: it finishes its answers and takes no new request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// Models reachable through a proxy, with the number of connected workers serving each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Every model served by at least one connected worker.
    pub models: Vec<ListedModel>,
}

/// One model of a [`ModelList`], aggregated over the workers serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedModel {
    /// The largest context any worker offers; `min_price` is the lowest price asked.
    #[serde(flatten)]
    pub card: ModelCard,
    /// How many connected workers serve the model.
    pub workers: u32,
    /// The highest price asked by a worker serving the model.
    #[serde(default)]
    pub max_price: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape_is_stable() {
        let req = GenerateRequest {
            max_price: None,
            cache_scope: None,
            model: "m".into(),
            input: Input::Chat {
                messages: vec![ChatMessage::new(Role::User, "hi")],
                tools: None,
            },
            params: SamplingParams {
                max_tokens: Some(5),
                ..Default::default()
            },
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["input"]["type"], "chat");
        assert_eq!(json["input"]["messages"][0]["role"], "user");
        assert_eq!(json["params"]["max_tokens"], 5);
        let back: GenerateRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn validation_rejects_out_of_range_parameters() {
        let bad = [
            SamplingParams {
                temperature: 2.5,
                ..Default::default()
            },
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                stop: vec!["a".into(); 5],
                ..Default::default()
            },
            SamplingParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ];
        for p in bad {
            let err = p.validate().unwrap_err();
            assert_eq!(err.kind, crate::ErrorKind::InvalidRequest, "{p:?}");
        }
        SamplingParams::default().validate().unwrap();
    }

    #[test]
    fn empty_chat_is_refused() {
        let req = GenerateRequest {
            max_price: None,
            cache_scope: None,
            model: "m".into(),
            input: Input::Chat {
                messages: vec![],
                tools: None,
            },
            params: SamplingParams::default(),
        };
        assert!(req.validate().unwrap_err().message.contains("at least one"));
    }

    /// A generation asks for at least one token; an embedding request for none, and for 1 to
    /// 2048 texts, none empty.
    #[test]
    fn a_generation_asks_tokens_and_an_embedding_none() {
        let req = |input: Input, max_tokens: Option<u32>| GenerateRequest {
            max_price: None,
            cache_scope: None,
            model: "m".into(),
            input,
            params: SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            },
        };
        let text = || Input::Text { prompt: "x".into() };
        let embed = |texts: Vec<&str>| Input::Embed {
            texts: texts.into_iter().map(String::from).collect(),
        };
        let refused = |r: GenerateRequest| r.validate().unwrap_err().message;
        assert!(refused(req(text(), Some(0))).contains("at least 1"));
        assert!(req(text(), Some(1)).validate().is_ok());
        assert!(req(embed(vec!["a", "b"]), Some(0)).validate().is_ok());
        assert!(refused(req(embed(vec!["a"]), None)).contains("its max_tokens is 0"));
        assert!(refused(req(embed(vec![]), Some(0))).contains("1 to 2048 texts"));
        assert!(refused(req(embed(vec!["a", ""]), Some(0))).contains("input[1] is empty"));
    }
}
