//! The bench's OpenAI client: one streamed request, with the arrival time of every chunk.
//!
//! Every HTTP path (the synthetic server, the gateway, llama-server) is read by this same
//! code, so the client's own cost is the same on each side of a ratio.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

/// One streamed answer as the app saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// When the request was sent (before any retry).
    pub start: Instant,
    /// Time to the first non-empty content chunk.
    pub ttft: Duration,
    /// Time to the end of the stream.
    pub latency: Duration,
    /// Arrival time and text of each content chunk.
    pub chunks: Vec<(Instant, String)>,
    /// Prompt and completion tokens from `usage`; counted chunks when the server gives none.
    pub prompt_tokens: u32,
    /// Completion tokens from `usage`, or the content chunks counted when the server gives none.
    pub completion_tokens: u32,
    /// Prompt tokens served from a prompt cache (`prompt_tokens_details.cached_tokens`, or
    /// llama.cpp's server's `timings.cache_n`), when the server says.
    pub cached_tokens: u32,
}

impl Answer {
    /// Completion tokens after the first per second after the first chunk: the decode rate.
    pub fn gen_tokens_per_s(&self) -> f64 {
        f64::from(self.completion_tokens.saturating_sub(1))
            / (self.latency - self.ttft).as_secs_f64()
    }

    /// Prompt tokens per second of time to first token: the prompt rate.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        f64::from(self.prompt_tokens) / self.ttft.as_secs_f64()
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<UsageField>,
    #[serde(default)]
    timings: Option<Timings>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct UsageField {
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u32,
}

/// llama.cpp's server reports what its cache served here.
#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: u32,
}

/// POSTs `body` (a chat completion with `"stream": true`) and reads the whole stream.
pub async fn stream_chat(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<Answer> {
    let start = Instant::now();
    // A kept-alive connection the server closed just as the request left (llama-server closes
    // them now and then) fails before any answer; like the OpenAI SDKs, send it again once.
    let response = match http.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) if e.is_request() || e.is_connect() => http.post(url).json(body).send().await?,
        Err(e) => return Err(e.into()),
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("{url} answered {status}: {text}");
    }
    let mut stream = response.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunks = Vec::new();
    let mut usage = None;
    let mut cached = 0;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes?;
        let arrived = Instant::now();
        buf.extend_from_slice(&bytes);
        let mut used = 0;
        while let Some(end) = find_event_end(&buf[used..]) {
            let event = &buf[used..used + end];
            used += end + 2;
            let Some(data) = event.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                continue;
            }
            let chunk: Chunk = serde_json::from_slice(data)
                .map_err(|e| anyhow::anyhow!("{url} sent an unreadable chunk: {e}"))?;
            if let Some(u) = chunk.usage {
                let details = u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
                cached = cached.max(details);
                usage = Some((u.prompt_tokens, u.completion_tokens));
            }
            if let Some(t) = chunk.timings {
                cached = cached.max(t.cache_n);
            }
            let text = chunk.choices.into_iter().next().and_then(|c| {
                c.delta
                    .and_then(|d| d.content)
                    .or(c.text)
                    .filter(|t| !t.is_empty())
            });
            if let Some(text) = text {
                chunks.push((arrived, text));
            }
        }
        buf.drain(..used);
    }
    let latency = start.elapsed();
    let ttft = chunks.first().map_or(latency, |(t, _)| *t - start);
    let (prompt_tokens, completion_tokens) = usage.unwrap_or((0, chunks.len() as u32));
    Ok(Answer {
        start,
        ttft,
        latency,
        chunks,
        prompt_tokens,
        completion_tokens,
        cached_tokens: cached,
    })
}

fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}
