//! The scheduler thread: admits requests into free sequences, builds one batch per step from
//! every running sequence, decodes it, and samples each sequence's next token.
//!
//! Generating sequences go into the batch first (one token each), then prompt slices fill the
//! rest, so a long prompt arriving never stalls the streams already running by more than one
//! batch. Requests start in arrival order once a sequence and enough KV cells are free.
//!
//! The prompt cache: a finished sequence's cells stay on its (now free) id, with the tokens
//! they hold. A request starts on the free id whose tokens share the longest prefix with its
//! prompt, keeps those cells and decodes only the rest. Cells kept are counted against the
//! cache like running sequences' and dropped, least recently used first, when a request needs
//! the room.

use std::collections::VecDeque;
use std::sync::{Arc, mpsc as std_mpsc};

use cocoon_protocol::{ErrorKind, GenerateEvent, GenerateRequest, Input, ProtocolError};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::mpsc;

use super::sequence::{self, Next, Prepared, Sequence};
use super::{BATCH_TOKENS, Shared};

/// A request handed to the scheduler.
pub(super) struct Job {
    pub request: GenerateRequest,
    pub tx: mpsc::UnboundedSender<GenerateEvent>,
}

/// A request that passed its checks and waits for room.
struct Waiting {
    job: Job,
    prepared: Prepared,
}

/// Starts the scheduler thread; its context is made before this returns, so a model that
/// cannot get one fails at load.
pub(super) fn start(shared: Arc<Shared>) -> Result<std_mpsc::Sender<Job>, ProtocolError> {
    let (submit, jobs) = std_mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("llama-scheduler".into())
        .spawn(move || {
            let ctx = match shared.new_context() {
                Ok(ctx) => {
                    let _ = ready_tx.send(Ok(()));
                    ctx
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            Scheduler::new(&shared, ctx).run(&jobs);
        })
        .map_err(|e| ProtocolError::internal(format!("cannot start the llama.cpp thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| ProtocolError::internal("the llama.cpp thread died while starting"))??;
    Ok(submit)
}

struct Scheduler<'a> {
    shared: &'a Shared,
    ctx: LlamaContext<'a>,
    batch: LlamaBatch<'static>,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<'a>>,
    free_ids: Vec<i32>,
    /// KV cells promised to running sequences.
    reserved: u32,
    /// Cells finished sequences left on free ids (the prompt cache).
    retained: Vec<Retained>,
    /// Counts releases, to tell which retained cells were used least recently.
    tick: u64,
}

/// Where a request starts: on free id `id`, from the cells retained on `from` (the same id, or
/// another whose first `keep` cells are copied), `keep` prompt tokens in.
struct Plan {
    id: i32,
    from: Option<i32>,
    keep: usize,
}

/// The cells a finished sequence left on its free id.
struct Retained {
    id: i32,
    /// The cache scope of the request that left them: only its scope may reuse them.
    scope: String,
    /// The tokens at positions 0, 1, … of `id`'s cells.
    tokens: Vec<llama_cpp_2::token::LlamaToken>,
    last_used: u64,
}

/// How many leading tokens two sequences share.
fn common_prefix(
    a: &[llama_cpp_2::token::LlamaToken],
    b: &[llama_cpp_2::token::LlamaToken],
) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Samples `seq`'s next token from the logits at `at`, then, while it is the next of the
/// guesses decoded after it, keeps that guess (its cell holds it already) and samples the next
/// from the guess's own logits. Each token is sampled after exactly the tokens before it, by
/// the same sampler in the same order (seeded draws, penalties and grammars included), from
/// the logits of the same context. Those logits equal decoding without guesses up to
/// floating-point rounding only: llama.cpp computes a batch of several tokens in another
/// order than one token alone (its CPU attention splits a lone token's cells across threads),
/// as it does whenever other requests share the batch. So the answer is the same except where
/// two tokens are all but tied (see `review_lookup_answer_matches_decoding_alone_past_256_cells`).
/// Returns what the sequence does next and how many guesses it kept.
fn verify(
    seq: &mut Sequence<'_>,
    ctx: &LlamaContext<'_>,
    model: &LlamaModel,
    at: i32,
) -> (Next, usize) {
    let mut next = seq.advance(ctx, model, at);
    let mut kept = 0;
    // The guess's logits sit where the guess sat in the batch.
    let mut guess_at = seq.draft_at;
    while matches!(next, Next::Continue)
        && let Some(&guess) = seq.drafted.get(kept)
        && seq.pending == Some(guess)
    {
        seq.pending = None;
        seq.fed.push(guess);
        seq.pos += 1;
        next = seq.advance(ctx, model, guess_at);
        kept += 1;
        guess_at += 1;
    }
    (next, kept)
}

impl<'a> Scheduler<'a> {
    fn new(shared: &'a Shared, ctx: LlamaContext<'a>) -> Self {
        Self {
            shared,
            ctx,
            batch: LlamaBatch::new(BATCH_TOKENS, 1),
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_ids: (0..i32::try_from(shared.parallel).unwrap_or(i32::MAX))
                .rev()
                .collect(),
            reserved: 0,
            retained: Vec::new(),
            tick: 0,
        }
    }

    fn retained_cells(&self) -> u32 {
        self.retained.iter().map(|r| r.tokens.len() as u32).sum()
    }

    /// Drops the retained cells of the least recently used id other than those in `keep`;
    /// false when there are none.
    fn evict_one(&mut self, keep: &[i32]) -> bool {
        let Some(at) = self
            .retained
            .iter()
            .enumerate()
            .filter(|(_, r)| !keep.contains(&r.id))
            .min_by_key(|(_, r)| r.last_used)
            .map(|(at, _)| at)
        else {
            return false;
        };
        let r = self.retained.swap_remove(at);
        self.clear_cells(r.id, 0);
        true
    }

    /// Removes `id`'s cells from position `from` on; false if they could not be (a model whose
    /// state cannot be cut back part way).
    fn clear_cells(&mut self, id: i32, from: u32) -> bool {
        match self
            .ctx
            .clear_kv_cache_seq(Some(id as u32), Some(from), None)
        {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "cannot clear a sequence's cells");
                false
            }
        }
    }

    /// Where to start `prompt`, of cache `scope`: the free id, the retained cells to start
    /// from and how many of its leading tokens they hold (at most all but the last: its
    /// logits are needed).
    fn plan(&self, prompt: &[llama_cpp_2::token::LlamaToken], scope: Option<&str>) -> Plan {
        let bare = self
            .free_ids
            .iter()
            .copied()
            .find(|id| self.retained.iter().all(|r| r.id != *id));
        let best = scope.and_then(|scope| {
            self.retained
                .iter()
                .filter(|r| r.scope == scope)
                .map(|r| (r, common_prefix(&r.tokens, prompt).min(prompt.len() - 1)))
                .filter(|(_, n)| *n > 0)
                .max_by_key(|(_, n)| *n)
        });
        match (best, bare) {
            // All the kept tokens are the prompt's: continue on that id, nothing is lost.
            (Some((r, n)), _) if n == r.tokens.len() => Plan {
                id: r.id,
                from: Some(r.id),
                keep: n,
            },
            // Part of them: copy that part onto a bare id (cells are shared, not duplicated),
            // so that the rest stays for whoever continues that conversation.
            (Some((r, n)), Some(bare)) => Plan {
                id: bare,
                from: Some(r.id),
                keep: n,
            },
            // No bare id: cut the kept cells back to the shared part.
            (Some((r, n)), None) => Plan {
                id: r.id,
                from: Some(r.id),
                keep: n,
            },
            // Nothing to share: a bare id, or else the least recently used kept one.
            (None, Some(bare)) => Plan {
                id: bare,
                from: None,
                keep: 0,
            },
            (None, None) => Plan {
                id: self
                    .retained
                    .iter()
                    .min_by_key(|r| r.last_used)
                    .map_or(self.free_ids[0], |r| r.id),
                from: None,
                keep: 0,
            },
        }
    }

    fn run(mut self, jobs: &std_mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                // Nothing to do: sleep until a request comes (or the backend is dropped).
                match jobs.recv() {
                    Ok(job) => self.check(job),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.check(job),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_departed();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Renders and counts a request's prompt; a request that can never run is answered now.
    fn check(&mut self, job: Job) {
        match self.prepare(&job.request) {
            Ok(prepared) => {
                self.shared
                    .stats
                    .add_prompt_tokens(prepared.prompt.len() as u64);
                self.waiting.push_back(Waiting { job, prepared });
            }
            Err(error) => {
                let _guard = self.shared.stats.start();
                tracing::debug!(%error, "generation refused");
                let _ = job.tx.send(GenerateEvent::Error { error });
            }
        }
    }

    fn prepare(&self, request: &GenerateRequest) -> Result<Prepared, ProtocolError> {
        let prompt = self.shared.render(&request.input)?;
        let tokens = self.shared.tokenize(&prompt);
        if tokens.is_empty() {
            return Err(ProtocolError::invalid("the prompt is empty"));
        }
        let n_ctx = self.shared.card.context_length as usize;
        let n_prompt = tokens.len();
        let max_tokens = match request.params.max_tokens {
            Some(m) => m as usize,
            None => n_ctx.saturating_sub(n_prompt),
        };
        if n_prompt + max_tokens > n_ctx || max_tokens == 0 {
            return Err(ProtocolError::new(
                ErrorKind::ContextLengthExceeded,
                format!(
                    "This model's maximum context length is {n_ctx} tokens. However, you requested \
                     {} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). \
                     Please reduce the length of the prompt or max_tokens.",
                    n_prompt + max_tokens
                ),
            ));
        }
        let tools = match &request.input {
            Input::Chat {
                tools: Some(tools), ..
            } => Some((tools, self.shared.tool_style())),
            _ => None,
        };
        let sampler = sequence::sampler(
            &request.params,
            tools,
            max_tokens as u32,
            &self.shared.model,
        )?;
        Ok(Prepared {
            prompt: tokens,
            max_tokens: max_tokens as u32,
            sampler,
            scope: request.cache_scope.clone(),
            tools: tools.map(|(_, style)| style),
        })
    }

    /// Forgets queued requests whose requester left, and stops running ones.
    fn drop_departed(&mut self) {
        self.waiting.retain(|w| !w.job.tx.is_closed());
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let mut seq = self.running.swap_remove(i);
                seq.cancel();
                self.release(seq);
            } else {
                i += 1;
            }
        }
    }

    /// Starts waiting requests, in order, while a sequence and their KV cells are free.
    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            let need = next.prepared.prompt.len() as u32 + next.prepared.max_tokens;
            if self.free_ids.is_empty() || self.reserved + need > self.shared.kv_cache_tokens {
                return;
            }
            let Plan { id, from, mut keep } =
                self.plan(&next.prepared.prompt, next.prepared.scope.as_deref());
            // Cells kept on the request's own id become part of its reservation; other
            // retained cells give way, least recently used first, until the request fits (the
            // ones it copies from last: counted in full, they make the count err on the safe
            // side).
            let own = self
                .retained
                .iter()
                .find(|r| r.id == id)
                .map_or(0, |r| r.tokens.len() as u32);
            let protect = [id, from.unwrap_or(id)];
            while self.reserved + (self.retained_cells() - own) + need > self.shared.kv_cache_tokens
            {
                if !self.evict_one(&protect) {
                    break;
                }
            }
            if self.reserved + (self.retained_cells() - own) + need > self.shared.kv_cache_tokens
                && let Some(src) = from.filter(|src| *src != id)
            {
                // Only the cells it would copy from are in the way: drop them, start bare.
                if let Some(at) = self.retained.iter().position(|r| r.id == src) {
                    self.retained.swap_remove(at);
                    self.clear_cells(src, 0);
                }
                keep = 0;
            }
            let Waiting { job, prepared } = self.waiting.pop_front().expect("front exists");
            self.free_ids.retain(|f| *f != id);
            match from {
                Some(src) if src != id && keep > 0 => {
                    if let Err(e) = self
                        .ctx
                        .copy_kv_cache_seq(src, id, Some(0), Some(keep as u32))
                    {
                        tracing::error!(error = %e, "cannot copy cached cells");
                        self.clear_cells(id, 0);
                        keep = 0;
                    }
                }
                _ => {}
            }
            if let Some(at) = self.retained.iter().position(|r| r.id == id) {
                self.retained.swap_remove(at);
                if !self.clear_cells(id, keep as u32) {
                    // A state that cannot be cut back part way: start from nothing.
                    self.clear_cells(id, 0);
                    keep = 0;
                }
            }
            let guard = self.shared.stats.start();
            let seq = Sequence::new(id, &job.request, prepared, keep as u32, job.tx, guard);
            self.reserved += seq.reserved;
            self.running.push(seq);
        }
    }

    /// One forward pass for every running sequence.
    fn step(&mut self) {
        self.batch.clear();
        let mut budget = BATCH_TOKENS;
        let mut failure = None;
        // Generating sequences first: one token each keeps every stream moving.
        for seq in &mut self.running {
            seq.logits_at = None;
            if let Some(token) = seq.pending.take() {
                seq.logits_at = Some(self.batch.n_tokens());
                if let Err(e) = self.batch.add(token, seq.pos, &[seq.id], true) {
                    failure = Some(e.to_string());
                }
                seq.fed.push(token);
                seq.pos += 1;
                budget -= 1;
            }
        }
        // Which sequences are generating (their next token is in), before prompts join.
        let generating: Vec<bool> = match self.shared.lookup_draft_tokens {
            0 => Vec::new(),
            _ => self.running.iter().map(|q| q.logits_at.is_some()).collect(),
        };
        // Then prompts, as much as fits.
        for seq in &mut self.running {
            if budget == 0 {
                break;
            }
            let left = seq.prompt.len() - seq.read;
            if left == 0 {
                continue;
            }
            let take = left.min(budget);
            for k in 0..take {
                let last = seq.read + k + 1 == seq.prompt.len();
                if last {
                    seq.logits_at = Some(self.batch.n_tokens());
                }
                if let Err(e) = self
                    .batch
                    .add(seq.prompt[seq.read + k], seq.pos, &[seq.id], last)
                {
                    failure = Some(e.to_string());
                }
                seq.pos += 1;
            }
            seq.read += take;
            budget -= take;
        }
        // Last, prompt lookup's guesses at what follows each stream's next token, checked in
        // this same pass with what room is left: speculative work never delays a prompt.
        if self.shared.lookup_draft_tokens > 0 {
            for (seq, generating) in self.running.iter_mut().zip(generating) {
                if !generating || budget == 0 {
                    continue;
                }
                seq.drafted = seq.lookup(self.shared.lookup_draft_tokens.min(budget));
                debug_assert!(
                    seq.pos as u32 + seq.drafted.len() as u32 <= seq.reserved,
                    "guesses past the sequence's reserved cells"
                );
                seq.draft_at = self.batch.n_tokens();
                for (pos, &token) in (seq.pos..).zip(&seq.drafted) {
                    if let Err(e) = self.batch.add(token, pos, &[seq.id], true) {
                        failure = Some(e.to_string());
                    }
                }
                budget -= seq.drafted.len();
            }
        }
        let result = match failure {
            Some(e) => Err(e),
            None => self.ctx.decode(&mut self.batch).map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            // The cache's state is unknown after a failed decode: end everything that runs.
            tracing::error!(error = %e, "llama.cpp decode failed");
            for mut seq in std::mem::take(&mut self.running) {
                seq.fail(ProtocolError::internal(format!(
                    "llama.cpp decode failed: {e}"
                )));
                self.release(seq);
            }
            self.ctx.clear_kv_cache();
            self.retained.clear();
            return;
        }
        let mut i = 0;
        while i < self.running.len() {
            let Some(at) = self.running[i].logits_at else {
                i += 1;
                continue;
            };
            let seq = &mut self.running[i];
            let (next, kept) = verify(seq, &self.ctx, &self.shared.model, at);
            let drafted = std::mem::take(&mut seq.drafted).len();
            if drafted > 0 {
                seq.judge_draft(drafted, kept);
                use std::sync::atomic::Ordering::Relaxed;
                let speculation = &self.shared.speculation;
                speculation.drafted.fetch_add(drafted as u64, Relaxed);
                speculation.accepted.fetch_add(kept as u64, Relaxed);
                if kept < drafted {
                    // The guesses after the first wrong one hold cells past the answer.
                    let (id, pos) = (seq.id, seq.pos as u32);
                    self.clear_cells(id, pos);
                }
            }
            match next {
                Next::Continue => i += 1,
                Next::Finished | Next::Cancelled => {
                    let seq = self.running.swap_remove(i);
                    self.release(seq);
                }
            }
        }
    }

    /// Frees a sequence's id and reservation; its cells stay for the prompt cache (when on
    /// and their tokens are known exactly), or are cleared.
    fn release(&mut self, seq: Sequence<'a>) {
        self.shared
            .stats
            .add_generated_tokens(u64::from(seq.completion_tokens()));
        // Only a request with a cache scope leaves cells, for its scope alone.
        let kept = match (&seq.scope, self.shared.prompt_cache) {
            (Some(scope), true) => seq
                .tokens_in_cache()
                .filter(|t| !t.is_empty())
                .map(|t| (scope.clone(), t)),
            _ => None,
        };
        match kept {
            Some((scope, tokens)) => {
                self.tick += 1;
                self.retained.push(Retained {
                    id: seq.id,
                    scope,
                    tokens,
                    last_used: self.tick,
                });
            }
            None => {
                self.clear_cells(seq.id, 0);
            }
        }
        self.reserved -= seq.reserved;
        self.free_ids.push(seq.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::{ModelCard, SamplingParams};
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::token::LlamaToken;

    fn shared(lookup_draft_tokens: usize, parallel: u32) -> Shared {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let path = std::env::var_os("COCOON_MODEL").map_or(path, std::path::PathBuf::from);
        let model = LlamaModel::load_from_file(
            crate::runtime().expect("llama.cpp"),
            &path,
            &LlamaModelParams::default(),
        )
        .expect("model loads; run scripts/fetch-model.sh first");
        Shared {
            model,
            template: None,
            card: ModelCard {
                id: "m".into(),
                context_length: 4096,
                min_price: 0,
                model_hash: None,
            },
            threads: 2,
            parallel,
            kv_cache_tokens: 4096,
            prompt_cache: false,
            lookup_draft_tokens,
            speculation: crate::Speculation::default(),
            stats: cocoon_engine::BackendStats::default(),
        }
    }

    /// A request for `prompt`'s tokens exactly (no template, no tokenizer), and its events.
    fn waiting(
        shared: &Shared,
        prompt: Vec<LlamaToken>,
        params: SamplingParams,
    ) -> (Waiting, mpsc::UnboundedReceiver<GenerateEvent>) {
        let max_tokens = params.max_tokens.expect("max_tokens");
        let request = GenerateRequest {
            model: "m".into(),
            input: Input::Text {
                prompt: String::new(),
            },
            params,
            max_price: None,
            cache_scope: None,
        };
        let sampler =
            sequence::sampler(&request.params, None, max_tokens, &shared.model).expect("sampler");
        let (tx, rx) = mpsc::unbounded_channel();
        let prepared = Prepared {
            prompt,
            max_tokens,
            sampler,
            scope: None,
            tools: None,
        };
        (
            Waiting {
                job: Job { request, tx },
                prepared,
            },
            rx,
        )
    }

    /// Sixteen streams and one waiting prompt of 100 tokens, all admitted at once; returns how
    /// much of the waiting prompt the second step read (the first is filled by the streams'
    /// own prompts). Each stream's first token is forced (a logit bias) to X, and its prompt
    /// holds `a b X` followed by 27 tokens and ends with `a b`, so on its first generating
    /// step prompt lookup finds 30 tokens to guess.
    fn prompt_read_beside_guessing_streams(shared: &Shared) -> usize {
        let tok = LlamaToken::new;
        let (a, b, x) = (1001, 1002, 1003);
        let mut stream_prompt = vec![tok(a), tok(b), tok(x)];
        stream_prompt.extend((2000..2027).map(tok));
        stream_prompt.extend([tok(a), tok(b)]);
        assert_eq!(stream_prompt.len(), 32, "16 of them fill one batch of 512");
        let forced = SamplingParams {
            temperature: 0.0,
            max_tokens: Some(64),
            logit_bias: [(x as u32, 100.0)].into_iter().collect(),
            ..Default::default()
        };
        let victim_prompt: Vec<LlamaToken> = (3000..3100).map(tok).collect();
        let plain = SamplingParams {
            temperature: 0.0,
            max_tokens: Some(16),
            ..Default::default()
        };

        let ctx = shared.new_context().expect("context");
        let mut s = Scheduler::new(shared, ctx);
        let mut receivers = Vec::new();
        for _ in 0..16 {
            let (w, rx) = waiting(shared, stream_prompt.clone(), forced.clone());
            s.waiting.push_back(w);
            receivers.push(rx);
        }
        let (w, rx) = waiting(shared, victim_prompt, plain);
        s.waiting.push_back(w);
        receivers.push(rx);
        s.admit();
        assert_eq!(s.running.len(), 17, "all admitted");
        // Step 1: the streams' prompts fill the batch; each samples X.
        s.step();
        assert!(
            s.running
                .iter()
                .filter(|q| q.prompt.len() == 32)
                .all(|q| q.pending == Some(tok(x))),
            "every stream is generating, its next token X"
        );
        // Step 2: the streams' next tokens (16), their guesses, and the waiting prompt.
        s.step();
        let victim = s
            .running
            .iter()
            .find(|q| q.prompt.len() == 100)
            .expect("the waiting request runs");
        victim.read
    }

    /// REVIEW, fixed: prompt lookup's guesses took batch slots before prompts still to be
    /// read. Sixteen streams that each find 30 tokens to guess took 16 + 480 of the 512 slots,
    /// so a request waiting for its first token read 16 of its 100 prompt tokens in that pass
    /// instead of all of them (with 17 or more streams at 32 guesses, none at all for as long
    /// as their guesses lasted). Guesses now take only the room prompts leave.
    #[test]
    fn review_guesses_do_not_crowd_out_waiting_prompts() {
        let without = prompt_read_beside_guessing_streams(&shared(0, 17));
        assert_eq!(
            without, 100,
            "without lookup the whole prompt fits beside 16 streams"
        );
        let lookup = shared(32, 17);
        let with = prompt_read_beside_guessing_streams(&lookup);
        use std::sync::atomic::Ordering::Relaxed;
        let drafted = lookup.speculation.drafted.load(Relaxed);
        assert_eq!(
            with, 100,
            "with lookup the waiting prompt got {with} of its 100 tokens in the pass, while \
             the streams' guesses took {drafted} slots"
        );
    }
}
