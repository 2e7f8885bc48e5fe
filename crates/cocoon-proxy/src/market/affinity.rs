//! Cache affinity: requests that share a long prefix (a system prompt, the start of a long
//! document) go, load permitting, to the worker that served that prefix last, whose prefix
//! cache (vLLM's, SGLang's, llama.cpp server's) may still hold it.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use cocoon_protocol::GenerateRequest;
pub use cocoon_protocol::MIN_PREFIX_BYTES;

/// Prefixes remembered; the oldest are forgotten first.
const CAPACITY: usize = 65_536;

/// The key of the request's long prefix ([`cocoon_protocol::Input::long_prefix`]), if it has
/// one.
pub fn prefix_key(request: &GenerateRequest) -> Option<u64> {
    let prefix = request.input.long_prefix()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    request.model.hash(&mut h);
    prefix.hash(&mut h);
    Some(h.finish())
}

/// Which worker served each recent prefix: a bounded table that forgets the oldest first.
#[derive(Debug, Default)]
pub struct Affinity {
    owner: HashMap<u64, u64>,
    order: VecDeque<u64>,
}

impl Affinity {
    /// The id of the worker that last served `prefix`, if still remembered.
    pub fn get(&self, prefix: u64) -> Option<u64> {
        self.owner.get(&prefix).copied()
    }

    /// Remembers `worker` as the last to serve `prefix`, forgetting the oldest prefix when
    /// full.
    pub fn set(&mut self, prefix: u64, worker: u64) {
        if self.owner.insert(prefix, worker).is_none() {
            self.order.push_back(prefix);
            while self.order.len() > CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.owner.remove(&old);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.owner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::{ChatMessage, SamplingParams};
    use cocoon_protocol::{Input, Role};

    fn chat(system: &str, user: &str) -> GenerateRequest {
        let mut messages = vec![ChatMessage::new(Role::User, user)];
        if !system.is_empty() {
            messages.insert(0, ChatMessage::new(Role::System, system));
        }
        GenerateRequest {
            max_price: None,
            cache_scope: None,
            model: "m".into(),
            input: Input::Chat {
                messages,
                tools: None,
            },
            params: SamplingParams::default(),
        }
    }

    #[test]
    fn long_system_prompts_key_requests_short_ones_do_not() {
        let long = "You are a careful assistant. ".repeat(20);
        let a = prefix_key(&chat(&long, "first question"));
        assert!(a.is_some());
        assert_eq!(a, prefix_key(&chat(&long, "another question")));
        assert_ne!(a, prefix_key(&chat(&format!("{long}!"), "first question")));
        assert_eq!(prefix_key(&chat("Be brief.", "hi")), None);
        assert_eq!(prefix_key(&chat("", &long)), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut a = Affinity::default();
        for i in 0..(CAPACITY as u64 + 10) {
            a.set(i, i);
        }
        assert_eq!(a.len(), CAPACITY);
        assert_eq!(a.get(0), None);
        assert_eq!(a.get(CAPACITY as u64 + 9), Some(CAPACITY as u64 + 9));
    }
}
