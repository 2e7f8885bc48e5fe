use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Configuration of the embedded engine (run by `cocoon-llama`). Plain data, kept here so a
/// worker's configuration parses without linking llama.cpp.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlamaConfig {
    /// Path of the GGUF file.
    pub model_path: PathBuf,
    /// Model name announced to the network; defaults to the file name without extensions.
    pub model_id: Option<String>,
    /// Context window per request in tokens; 0 means the smaller of the model's training
    /// context and 4096.
    pub context_length: u32,
    /// CPU threads per decode; 0 means all available cores.
    pub threads: u32,
    /// Requests generated at once, batched into one forward pass per step; more wait in a
    /// queue.
    pub parallel: u32,
    /// Tokens of KV cache shared by the running requests; 0 means `context_length ×
    /// parallel`, so that every running request can use its whole context. A request is
    /// started only when its prompt plus `max_tokens` fits beside the others'.
    pub kv_cache_tokens: u32,
    /// Keep a finished request's KV cells, so that a later request sharing its prefix (the
    /// next turn of a chat, a long system prompt) starts from them instead of decoding them
    /// again; they are reported as `cached_tokens`. Cells kept are given back whenever a new
    /// request needs the room. A request's timing can then tell whether another with the same
    /// prefix ran on this worker shortly before: turn it off where that matters more than
    /// speed.
    pub prompt_cache: bool,
    /// Serve `/v1/embeddings` too: each text's hidden states pooled as the model says (mean
    /// pooling for a model that says nothing, as a chat model), normalized to length 1. A
    /// context of its own, `context_length` tokens, is set aside for it.
    pub embeddings: bool,
    /// A Jinja chat template to render chats with instead of the model's own (as
    /// llama-server's `--chat-template-file`): for a model whose template is broken, or has
    /// no place for tools. It must compile, or the model does not load.
    pub chat_template_file: Option<PathBuf>,
    /// Prompt-lookup speculative decoding: up to this many tokens a step are guessed by
    /// finding the answer's last three tokens earlier in the prompt or the answer and taking
    /// what followed them there; the model checks the guesses in the same pass as the next
    /// token and keeps those it would have chosen itself, so the answer is the one it gives
    /// without guesses (up to floating-point rounding, as when other requests share its
    /// batch), only sooner where it copies its input (edits, quotes, code changes). Guesses
    /// take only batch room that prompts leave; answers that copy nothing guess little.
    /// 0: off.
    pub lookup_draft_tokens: u32,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_id: None,
            context_length: 0,
            threads: 0,
            parallel: 4,
            kv_cache_tokens: 0,
            prompt_cache: true,
            embeddings: false,
            chat_template_file: None,
            lookup_draft_tokens: 0,
        }
    }
}

impl LlamaConfig {
    /// The model's name on the network: `model_id`, or the file name without extensions
    /// (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`). What the worker
    /// serves and measures.
    pub fn served_model_id(&self) -> String {
        if let Some(id) = &self.model_id {
            return id.clone();
        }
        let name = self
            .model_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model");
        let name = name.strip_suffix(".gguf").unwrap_or(name);
        match name.rsplit_once('.') {
            Some((stem, quant)) if quant.starts_with(['Q', 'q', 'F', 'f', 'I', 'B']) => {
                stem.to_owned()
            }
            _ => name.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LlamaConfig;

    fn id(path: &str) -> String {
        LlamaConfig {
            model_path: path.into(),
            ..LlamaConfig::default()
        }
        .served_model_id()
    }

    #[test]
    fn model_id_drops_quantization_and_extension() {
        assert_eq!(
            id("m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(id("llama-3.2-1b.gguf"), "llama-3.2-1b");
        assert_eq!(id("x.F16.gguf"), "x");
        let named = LlamaConfig {
            model_id: Some("mine".into()),
            ..LlamaConfig::default()
        };
        assert_eq!(named.served_model_id(), "mine");
    }
}
