//! What the proxy reads of a request to admit, reserve and route it. A clear request gives it
//! all; a sealed one only its clear header and the size of its ciphertext, so the rest of the
//! relay works from this and never from the prompt.

use std::hash::{Hash, Hasher};

use cocoon_protocol::{GenerateRequest, ProtocolError, SealedRequest, UsageBounds};

use crate::market::affinity;

/// A request as routing, limits and the reservation see it.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) model: String,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) max_price: Option<u64>,
    /// The key of its long prefix, for cache affinity.
    pub(crate) prefix: Option<u64>,
    /// Its bounds on a model of unlimited context (see [`Self::bounds`]).
    bounds: UsageBounds,
    /// For a sealed request, the key fingerprints of the workers it was sealed for: no other
    /// worker can read it, so none other is asked.
    pub(crate) only: Option<Vec<[u8; 32]>>,
}

impl Routed {
    /// A clear request, which the proxy reads in full.
    pub(crate) fn clear(request: &GenerateRequest) -> Self {
        Self {
            model: request.model.clone(),
            max_tokens: request.params.max_tokens,
            max_price: request.max_price,
            prefix: affinity::prefix_key(request),
            bounds: UsageBounds::new(request, u32::MAX),
            only: None,
        }
    }

    /// A sealed request: its header, its recipients and the size of its ciphertext.
    pub(crate) fn sealed(request: &SealedRequest) -> Result<Self, ProtocolError> {
        let only = request
            .recipients
            .iter()
            .map(|r| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(&r.worker, &mut out).map_err(|_| {
                    ProtocolError::invalid(format!(
                        "recipient {:?} is not a worker's fingerprint (64 hex digits)",
                        r.worker
                    ))
                })?;
                Ok(out)
            })
            .collect::<Result<Vec<_>, ProtocolError>>()?;
        let header = &request.header;
        // The gateway's keyed hash stands for the prefix: repeats meet, the text stays hidden.
        let prefix = header.affinity.as_ref().map(|a| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            header.model.hash(&mut h);
            a.hash(&mut h);
            h.finish()
        });
        Ok(Self {
            model: header.model.clone(),
            max_tokens: header.max_tokens,
            max_price: header.max_price,
            prefix,
            bounds: UsageBounds::sealed(request, u32::MAX),
            only: Some(only),
        })
    }

    /// Its bounds on a model with `context` tokens of context.
    pub(crate) fn bounds(&self, context: u32) -> UsageBounds {
        self.bounds.within(context)
    }
}
