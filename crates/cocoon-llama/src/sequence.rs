//! One request inside the batch: its prompt, position, sampler and the text it has sent.

use cocoon_protocol::{
    FinishReason, GenerateEvent, GenerateRequest, ProtocolError, SamplingParams, TokenLogprob,
    Tools, TopLogprob, Usage,
};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use tokio::sync::mpsc;

use cocoon_engine::{
    ActiveGuard, Outcome, Piece, StopMatcher, ToolCallReader, ToolStyle, Utf8Accumulator,
};

/// A request made ready to run: its prompt's tokens, its completion allowance and its sampler.
pub(crate) struct Prepared {
    pub prompt: Vec<LlamaToken>,
    pub max_tokens: u32,
    pub sampler: LlamaSampler,
    /// The request's cache scope: which retained cells it may start from and leave.
    pub scope: Option<String>,
    /// With tools offered: how the model writes its calls.
    pub tools: Option<ToolStyle>,
}

/// What a sequence does after a sampled token.
pub(super) enum Next {
    /// Feed the token back and generate another.
    Continue,
    /// Done was sent; the sequence's cells can go.
    Finished,
    /// The requester left; nothing more is sent.
    Cancelled,
}

pub(super) struct Sequence<'a> {
    /// llama.cpp's sequence id: which cells of the shared cache are this request's.
    pub id: i32,
    pub tx: mpsc::UnboundedSender<GenerateEvent>,
    /// KV cells set aside for this request: prompt plus max_tokens.
    pub reserved: u32,
    /// The prompt; `prompt[read..]` has not been decoded yet.
    pub prompt: Vec<LlamaToken>,
    pub read: usize,
    /// Position of the next token fed to the model.
    pub pos: i32,
    /// The token sampled last, fed in the next step.
    pub pending: Option<LlamaToken>,
    /// Where this sequence's logits sit in the batch just decoded, if it asked for any.
    pub logits_at: Option<i32>,
    /// Tokens guessed by prompt lookup, decoded after `pending` in the batch just decoded
    /// (their logits from `draft_at` on), not yet kept.
    pub drafted: Vec<LlamaToken>,
    pub draft_at: i32,
    /// How many tokens to guess next: grows while guesses are kept whole, shrinks when they
    /// are not (each guess costs a slot in the pass, kept or not).
    draft_len: usize,
    /// Generated tokens fed back to the model (their cells follow the prompt's).
    pub fed: Vec<LlamaToken>,
    /// Prompt tokens whose cells came from an earlier request's (the prompt cache).
    cached: u32,
    /// The request's cache scope.
    pub scope: Option<String>,
    max_tokens: u32,
    ignore_eos: bool,
    sampler: LlamaSampler,
    utf8: Utf8Accumulator,
    stops: StopMatcher,
    completion_tokens: u32,
    unsent_tokens: u32,
    piece: Vec<u8>,
    /// With how many alternatives each token's log-probability is reported, if asked.
    logprobs: Option<u32>,
    /// Log-probabilities of the tokens not yet sent in a delta.
    unsent_logprobs: Vec<TokenLogprob>,
    /// With tools offered: reads the calls out of the answer.
    tool_calls: Option<ToolCallReader>,
    /// Whether the answer made a call (it then ends with `tool_calls`).
    called: bool,
    /// When the requester last got an event: while a call is held back, an empty delta a
    /// second says the worker is at work (the proxy cuts off one that is silent).
    last_sent: std::time::Instant,
    guard: ActiveGuard<'a>,
}

/// Most bytes of text one delta carries.
const MAX_DELTA_BYTES: usize = 64 << 10;

/// `text` in pieces of at most [`MAX_DELTA_BYTES`], cut between characters.
fn split(text: String) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while rest.len() > MAX_DELTA_BYTES {
        let mut cut = MAX_DELTA_BYTES;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(rest[..cut].to_owned());
        rest = &rest[cut..];
    }
    out.push(rest.to_owned());
    out
}

/// The sampler chain `params` ask for: the app's logit biases, penalties on what this answer
/// generated so far (the sampler sees each token it picks), the JSON grammar when the answer
/// must be JSON or a tool call is forced, then greedy choice, or the candidate filters, the
/// temperature and a seeded draw. Refuses what this engine cannot serve: a token outside the
/// vocabulary, a JSON schema its grammar cannot enforce.
pub(crate) fn sampler(
    params: &SamplingParams,
    tools: Option<(&Tools, ToolStyle)>,
    max_tokens: u32,
    model: &LlamaModel,
) -> Result<LlamaSampler, ProtocolError> {
    let n_vocab = model.n_vocab();
    let mut chain = Vec::new();
    if !params.logit_bias.is_empty() {
        let biases = params
            .logit_bias
            .iter()
            .map(|(&token, &bias)| {
                i32::try_from(token)
                    .ok()
                    .filter(|t| *t < n_vocab)
                    .map(|t| LlamaLogitBias::new(LlamaToken::new(t), bias))
                    .ok_or_else(|| {
                        ProtocolError::invalid(format!(
                            "logit_bias names token {token}, outside this model's vocabulary \
                             of {n_vocab} tokens"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    if params.frequency_penalty != 0.0
        || params.presence_penalty != 0.0
        || params.repetition_penalty != 1.0
    {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            i32::try_from(max_tokens).unwrap_or(i32::MAX),
            params.repetition_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ));
    }
    let grammar = match (&params.response_format, tools) {
        (Some(format), _) => Some(match format.schema() {
            Some(schema) => cocoon_engine::schema_to_gbnf(schema)
                .map_err(|e| ProtocolError::invalid(format!("response_format.json_schema: {e}")))?,
            // json_object, or a json_schema without a schema: any object.
            None => cocoon_engine::json_object_gbnf(),
        }),
        (None, Some((tools, style))) => {
            cocoon_engine::tools_grammar(style, tools).map_err(ProtocolError::invalid)?
        }
        (None, None) => None,
    };
    if let Some(grammar) = grammar {
        chain.push(
            LlamaSampler::grammar(model, &grammar, "root")
                .map_err(|e| ProtocolError::internal(format!("the JSON grammar: {e}")))?,
        );
    }
    if params.temperature == 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if params.top_k > 0 {
            chain.push(LlamaSampler::top_k(
                i32::try_from(params.top_k).unwrap_or(i32::MAX),
            ));
        }
        chain.push(LlamaSampler::top_p(params.top_p, 1));
        if params.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(params.min_p, 1));
        }
        chain.push(LlamaSampler::temp(params.temperature));
        // OpenAI takes a 64-bit seed, llama.cpp a 32-bit one: use its low bits.
        let seed = params.seed.map_or_else(rand::random::<u32>, |s| s as u32);
        chain.push(LlamaSampler::dist(seed));
    }
    Ok(if chain.len() == 1 {
        chain.pop().expect("one sampler")
    } else {
        LlamaSampler::chain_simple(chain)
    })
}

impl<'a> Sequence<'a> {
    /// Starts `prepared` on sequence `id`, whose cells hold its first `cached` tokens already.
    pub(crate) fn new(
        id: i32,
        request: &GenerateRequest,
        prepared: Prepared,
        cached: u32,
        tx: mpsc::UnboundedSender<GenerateEvent>,
        guard: ActiveGuard<'a>,
    ) -> Self {
        let params = &request.params;
        let Prepared {
            prompt,
            max_tokens,
            sampler,
            scope,
            tools,
        } = prepared;
        Self {
            id,
            tx,
            reserved: prompt.len() as u32 + max_tokens,
            prompt,
            // The cached prefix's cells are there already: reading starts after it.
            read: cached as usize,
            pos: i32::try_from(cached).unwrap_or(i32::MAX),
            pending: None,
            logits_at: None,
            drafted: Vec::new(),
            draft_at: 0,
            draft_len: usize::MAX,
            fed: Vec::new(),
            cached,
            scope,
            max_tokens,
            ignore_eos: params.ignore_eos,
            sampler,
            utf8: Utf8Accumulator::default(),
            stops: StopMatcher::new(params.stop.clone()),
            completion_tokens: 0,
            unsent_tokens: 0,
            piece: Vec::with_capacity(16),
            logprobs: params.logprobs,
            unsent_logprobs: Vec::new(),
            tool_calls: tools.map(ToolCallReader::new),
            called: false,
            last_sent: std::time::Instant::now(),
            guard,
        }
    }

    pub(crate) fn prompt_tokens(&self) -> u32 {
        self.prompt.len() as u32
    }

    pub(crate) fn completion_tokens(&self) -> u32 {
        self.completion_tokens
    }

    /// The tokens whose cells this sequence holds, in order (positions 0, 1, …), if they are
    /// known exactly: what a later request may start from.
    pub(crate) fn tokens_in_cache(&self) -> Option<Vec<LlamaToken>> {
        let held: Vec<LlamaToken> = self.prompt[..self.read]
            .iter()
            .chain(&self.fed)
            .copied()
            .collect();
        (held.len() == usize::try_from(self.pos).ok()?).then_some(held)
    }

    /// Up to `want` tokens guessed to come next: where the answer's last few tokens (what was
    /// fed, the prompt before it) appeared before, what followed them there, the latest such
    /// place and the longest tail first. Never more than the answer may still grow, so the
    /// guesses' cells stay within the reservation.
    pub(crate) fn lookup(&self, want: usize) -> Vec<LlamaToken> {
        let room = self.max_tokens.saturating_sub(self.completion_tokens) as usize;
        let want = want.min(room).min(self.draft_len);
        if want == 0 || self.read < self.prompt.len() {
            return Vec::new();
        }
        let history: Vec<LlamaToken> = self.prompt.iter().chain(&self.fed).copied().collect();
        lookup(&history, want)
    }

    /// Adjusts how many tokens to guess next after `kept` of `drafted` guesses were kept: two
    /// more after a guess kept whole, one fewer otherwise (at least one).
    pub(crate) fn judge_draft(&mut self, drafted: usize, kept: usize) {
        self.draft_len = if kept == drafted {
            drafted.saturating_add(2)
        } else {
            drafted.saturating_sub(1).max(1)
        };
    }

    /// Samples the next token from the logits decoded for this sequence and sends what text
    /// it completes.
    pub(crate) fn advance(&mut self, ctx: &LlamaContext<'_>, model: &LlamaModel, at: i32) -> Next {
        let token = self.sampler.sample(ctx, at);
        let vocab = model.vocab();
        if vocab.is_eog(token) && !self.ignore_eos {
            return self.finish(FinishReason::Stop, false);
        }
        self.completion_tokens += 1;
        self.unsent_tokens += 1;
        self.piece.clear();
        vocab.token_to_piece_into(token, &mut self.piece, false, None);
        if let Some(top) = self.logprobs {
            let entry = token_logprob(ctx.get_logits_ith(at), token, &self.piece, top, model);
            self.unsent_logprobs.push(entry);
        }
        let scan = self.stops.push(&self.utf8.push(&self.piece));
        if !scan.emit.is_empty() && !self.emit(scan.emit) {
            return self.cancel();
        }
        if scan.stopped {
            return self.finish(FinishReason::Stop, true);
        }
        if self.completion_tokens >= self.max_tokens {
            return self.finish(FinishReason::Length, false);
        }
        self.pending = Some(token);
        Next::Continue
    }

    /// Counts a generation stopped because its requester left.
    pub(crate) fn cancel(&mut self) -> Next {
        self.guard.set_outcome(Outcome::Cancelled);
        Next::Cancelled
    }

    /// Ends the sequence with an error event.
    pub(crate) fn fail(&mut self, error: ProtocolError) {
        let _ = self.tx.send(GenerateEvent::Error { error });
    }

    /// Sends `text`, the answer's next, as the app sees it: as a delta, or, with tools, as the
    /// text and calls it completes. False when the requester left.
    fn emit(&mut self, text: String) -> bool {
        let Some(reader) = &mut self.tool_calls else {
            // Without tools the text is the answer's, as it comes: one delta, nothing held.
            return self.send_piece(Piece::Text(text));
        };
        let pieces = reader.push(&text);
        if !pieces.is_empty() {
            self.last_sent = std::time::Instant::now();
            return self.send(pieces);
        }
        // REVIEW, fixed: a call held back must not look like silence.
        if self.last_sent.elapsed() >= std::time::Duration::from_secs(1) {
            self.last_sent = std::time::Instant::now();
            let sign = GenerateEvent::Delta {
                text: String::new(),
                tokens: 0,
                logprobs: Vec::new(),
            };
            return self.tx.send(sign).is_ok();
        }
        true
    }

    /// Sends `pieces` in order. False when the requester left.
    fn send(&mut self, pieces: Vec<Piece>) -> bool {
        pieces.into_iter().all(|piece| self.send_piece(piece))
    }

    /// Sends one piece; the tokens not yet accounted for go with it. Text let go at once (a
    /// generic answer that did not read as calls) goes in deltas that each fit in a frame.
    /// False when the requester left.
    fn send_piece(&mut self, piece: Piece) -> bool {
        let tokens = std::mem::take(&mut self.unsent_tokens);
        let event = match piece {
            Piece::Text(text) if text.len() > MAX_DELTA_BYTES => {
                self.unsent_tokens = tokens;
                return split(text)
                    .into_iter()
                    .all(|part| self.send_piece(Piece::Text(part)));
            }
            Piece::Text(text) => GenerateEvent::Delta {
                text,
                tokens,
                logprobs: std::mem::take(&mut self.unsent_logprobs),
            },
            Piece::Call(call) => {
                self.called = true;
                GenerateEvent::ToolCall { call, tokens }
            }
        };
        self.tx.send(event).is_ok()
    }

    fn finish(&mut self, finish_reason: FinishReason, matched_stop: bool) -> Next {
        if !matched_stop {
            // Flush what was held back: an incomplete character, or text that looked like the
            // start of a stop sequence.
            let scan = self.stops.push(&self.utf8.finish());
            let mut rest = scan.emit;
            if !scan.stopped {
                rest.push_str(&self.stops.finish());
            }
            if !rest.is_empty() && !self.emit(rest) {
                return self.cancel();
            }
        }
        // What the tool reader still holds: calls, or the text that did not read as one.
        if let Some(reader) = self.tool_calls.take()
            && !self.send(reader.finish())
        {
            return self.cancel();
        }
        // Tokens that printed nothing (a special token under ignore_eos, say) and came last
        // are accounted for too: the deltas' counts must add up to the usage, or an honest
        // answer looks overbilled to whoever relays it.
        if (self.unsent_tokens > 0 || !self.unsent_logprobs.is_empty())
            && !self.send_piece(Piece::Text(String::new()))
        {
            return self.cancel();
        }
        // A finished answer that called tools waits for their results; one cut off by its
        // length says so.
        let finish_reason = match finish_reason {
            FinishReason::Stop if self.called => FinishReason::ToolCalls,
            other => other,
        };
        let usage = Usage {
            cached_tokens: self.cached,
            ..Usage::new(self.prompt_tokens(), self.completion_tokens)
        };
        let done = GenerateEvent::Done {
            finish_reason,
            usage,
            billing: None,
        };
        if self.tx.send(done).is_err() {
            return self.cancel();
        }
        self.guard.set_outcome(Outcome::Completed);
        Next::Finished
    }
}

/// How many of the answer's last tokens prompt lookup looks for. Measured on the bench's edit
/// (`cocoon bench --sections lookup`): falling back to two when three are not found kept 58 %
/// of the guesses and sped generation ×1.15; three alone kept 72 % for ×1.30 (llama.cpp's
/// `ngram-simple` looks for three too).
const NGRAM: usize = 3;

/// Up to `want` tokens that followed the latest earlier occurrence of `history`'s last
/// [`NGRAM`] tokens.
fn lookup(history: &[LlamaToken], want: usize) -> Vec<LlamaToken> {
    let len = history.len();
    if len <= NGRAM {
        return Vec::new();
    }
    let tail = &history[len - NGRAM..];
    match (0..len - NGRAM)
        .rev()
        .find(|&s| &history[s..s + NGRAM] == tail)
    {
        Some(start) => history[start + NGRAM..(start + NGRAM + want).min(len)].to_vec(),
        None => Vec::new(),
    }
}

/// The log-probability of `token` (whose text is `piece`) under the model's distribution at
/// this position, from its raw `logits` (before the sampler's biases, penalties, grammar and
/// temperature, as vLLM and llama.cpp's server report them), and the `top` most likely tokens.
fn token_logprob(
    logits: &[f32],
    token: LlamaToken,
    piece: &[u8],
    top: u32,
    model: &LlamaModel,
) -> TokenLogprob {
    // log softmax: logit - log(sum(exp(logit))), shifted by the largest for stability.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let logprob = |id: usize| (logits[id] - log_sum).min(0.0);
    let mut best: Vec<usize> = Vec::new();
    let top = (top as usize).min(logits.len());
    if top > 0 {
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
        ids.select_nth_unstable_by(top - 1, by_logit);
        ids.truncate(top);
        ids.sort_unstable_by(by_logit);
        best = ids;
    }
    let text = |id: usize| {
        let mut bytes = Vec::with_capacity(16);
        model.vocab().token_to_piece_into(
            LlamaToken::new(i32::try_from(id).unwrap_or(0)),
            &mut bytes,
            false,
            None,
        );
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let own = usize::try_from(token.0)
        .unwrap_or(0)
        .min(logits.len().saturating_sub(1));
    TokenLogprob {
        token: String::from_utf8_lossy(piece).into_owned(),
        logprob: logprob(own),
        top: best
            .into_iter()
            .map(|id| TopLogprob {
                token: text(id),
                logprob: logprob(id),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().copied().map(LlamaToken::new).collect()
    }

    #[test]
    fn lookup_takes_what_followed_the_latest_earlier_tail() {
        // The tail 1 2 3 occurs twice before; the later one was followed by 7 8.
        let history = tokens(&[1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3]);
        assert_eq!(lookup(&history, 2), tokens(&[7, 8]));
        assert_eq!(lookup(&history, 5), tokens(&[7, 8, 9, 1, 2]));
        // It never runs past the history's end.
        assert_eq!(lookup(&tokens(&[5, 6, 7, 5, 6, 7]), 8), tokens(&[5, 6, 7]));
    }

    #[test]
    fn lookup_guesses_nothing_without_a_match() {
        assert!(lookup(&tokens(&[1, 2, 3, 4, 5, 6]), 4).is_empty());
        assert!(lookup(&tokens(&[1, 2, 3]), 4).is_empty());
        assert!(lookup(&tokens(&[]), 4).is_empty());
        // Two tokens alone are not enough to guess from.
        assert!(lookup(&tokens(&[1, 2, 9, 1, 2]), 4).is_empty());
    }
}
