//! The root registry: who may take part, and the network's prices. Only the owner changes it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::types::{Nanoton, Network, PublicKey, hex_32};

/// Multipliers are in basis points: 10 000 is ×1.
pub(crate) const MULTIPLIER_ONE: u64 = 10_000;

/// The kinds of token a request is billed for, each weighted by its multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Prompt tokens not served from the cache.
    Prompt,
    /// Prompt tokens served from the cache.
    Cached,
    /// Tokens the model generated as its answer.
    Completion,
    /// Tokens the model generated while reasoning.
    Reasoning,
}

/// The network's prices, token weights, minimum stakes and close delays, set by the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkParams {
    /// What a client pays per weighted token.
    pub price_per_token: Nanoton,
    /// What the worker earns per weighted token; the proxy keeps the rest.
    pub worker_fee_per_token: Nanoton,
    /// Weight of a prompt token, in basis points (10 000 is ×1).
    pub prompt_multiplier: u64,
    /// Weight of a cached prompt token, in basis points.
    pub cached_multiplier: u64,
    /// Weight of a completion token, in basis points.
    pub completion_multiplier: u64,
    /// Weight of a reasoning token, in basis points.
    pub reasoning_multiplier: u64,
    /// The least stake a client may lock in its contract, in nanoton.
    pub min_client_stake: Nanoton,
    /// The least stake a proxy may open its contract with, in nanoton.
    pub min_proxy_stake: Nanoton,
    /// Seconds between a client's close without the proxy and the release of its stake.
    pub client_close_delay: u64,
    /// Seconds between a proxy's close and the release of its stake, for workers to claim.
    pub proxy_close_delay: u64,
}

impl Default for NetworkParams {
    fn default() -> Self {
        Self {
            price_per_token: 20,
            worker_fee_per_token: 16,
            prompt_multiplier: MULTIPLIER_ONE,
            cached_multiplier: MULTIPLIER_ONE / 10,
            completion_multiplier: MULTIPLIER_ONE,
            reasoning_multiplier: MULTIPLIER_ONE,
            min_client_stake: 1_000_000_000,
            min_proxy_stake: 10_000_000_000,
            client_close_delay: 24 * 3600,
            proxy_close_delay: 48 * 3600,
        }
    }
}

impl NetworkParams {
    /// Refuses parameters under which a proxy would pay workers more than it charges.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.worker_fee_per_token > self.price_per_token {
            return Err(LedgerError::BadParams(
                "worker_fee_per_token is above price_per_token: the proxy would pay to serve"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The weight of one token of `kind`, in basis points.
    pub fn multiplier(&self, kind: TokenKind) -> u64 {
        match kind {
            TokenKind::Prompt => self.prompt_multiplier,
            TokenKind::Cached => self.cached_multiplier,
            TokenKind::Completion => self.completion_multiplier,
            TokenKind::Reasoning => self.reasoning_multiplier,
        }
    }

    /// Weighted tokens for a request's counts, rounded up (a fraction of a token is billed).
    pub fn weighted_tokens(&self, counts: &[(TokenKind, u64)]) -> Result<u64, LedgerError> {
        let mut total: u128 = 0;
        for &(kind, n) in counts {
            total = total
                .checked_add(u128::from(n) * u128::from(self.multiplier(kind)))
                .ok_or(LedgerError::Overflow)?;
        }
        u64::try_from(total.div_ceil(u128::from(MULTIPLIER_ONE))).map_err(|_| LedgerError::Overflow)
    }

    /// Weighted tokens of an answer whose tokens split into `prompt` computed and `cached`
    /// prompt tokens, and `completion` answer and `reasoning` tokens: each at its multiplier.
    pub fn weighted_answer(
        &self,
        prompt: u64,
        cached: u64,
        completion: u64,
        reasoning: u64,
    ) -> Result<u64, LedgerError> {
        self.weighted_tokens(&[
            (TokenKind::Prompt, prompt),
            (TokenKind::Cached, cached),
            (TokenKind::Completion, completion),
            (TokenKind::Reasoning, reasoning),
        ])
    }

    /// The most a request of at most `prompt` prompt tokens and `completion` generated tokens
    /// may weigh, however its counts turn out to split into cached and reasoning tokens (each
    /// side at the heavier of its two multipliers): what a reservation must cover.
    pub fn weighted_bound(&self, prompt: u64, completion: u64) -> Result<u64, LedgerError> {
        let heavier = |a, b| {
            if self.multiplier(a) >= self.multiplier(b) {
                a
            } else {
                b
            }
        };
        self.weighted_tokens(&[
            (heavier(TokenKind::Prompt, TokenKind::Cached), prompt),
            (
                heavier(TokenKind::Completion, TokenKind::Reasoning),
                completion,
            ),
        ])
    }

    /// What `tokens` weighted tokens cost the client.
    pub fn cost(&self, tokens: u64) -> Result<Nanoton, LedgerError> {
        u128::from(tokens)
            .checked_mul(self.price_per_token)
            .ok_or(LedgerError::Overflow)
    }

    /// What `tokens` weighted tokens earn the worker.
    pub fn worker_earnings(&self, tokens: u64) -> Result<Nanoton, LedgerError> {
        u128::from(tokens)
            .checked_mul(self.worker_fee_per_token)
            .ok_or(LedgerError::Overflow)
    }
}

fn unnamed() -> Network {
    Network::UNNAMED
}

/// The network's root of trust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// The only key that may change the registry.
    #[serde(with = "hex_32")]
    pub owner: PublicKey,
    /// The network every signed payment message and transaction must name; fixed when the
    /// ledger is created (a ledger written before networks had ids is [`Network::UNNAMED`]).
    #[serde(default = "unnamed")]
    pub network: Network,
    /// Image hashes (hex) allowed for workers and for proxies.
    pub worker_images: BTreeSet<String>,
    /// Image hashes (hex, lowercase) allowed for proxies.
    pub proxy_images: BTreeSet<String>,
    /// Model hashes (hex) workers may serve.
    pub models: BTreeSet<String>,
    /// Registered proxies: public key (hex) → network address.
    pub proxies: BTreeMap<String, String>,
    /// The network's prices, minimum stakes and close delays.
    pub params: NetworkParams,
    /// The key the owner proposed to hand the registry to (hex), until it accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_owner: Option<String>,
}

impl Registry {
    /// An empty registry of `network` owned by `owner`, with the default network parameters.
    pub fn new(owner: PublicKey, network: Network) -> Self {
        Self {
            owner,
            network,
            worker_images: BTreeSet::new(),
            proxy_images: BTreeSet::new(),
            models: BTreeSet::new(),
            proxies: BTreeMap::new(),
            params: NetworkParams::default(),
            pending_owner: None,
        }
    }

    /// Whether `key` is a registered proxy.
    pub fn is_proxy(&self, key: &PublicKey) -> bool {
        self.proxies.contains_key(&hex::encode(key))
    }
}
