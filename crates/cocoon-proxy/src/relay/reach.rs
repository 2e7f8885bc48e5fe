//! Where a request may go, as its reservation sees it. A request is reserved for the most it
//! could cost on the workers it may be routed to: their highest price and, without
//! `max_tokens`, their longest context (the completion may run to it). One worker announcing
//! a long context at a high price would make that worst case more than many clients' cover,
//! so a client that cannot cover every worker is held to the workers it can cover: the
//! widest reach (price and context ceilings) its cover allows, and the routing keeps to it.
//! The reaches it chooses from grow worker by worker, cheapest worst case first, so a covered
//! reach holds every cheaper worker too (a refusal there still has somewhere to go).

use cocoon_protocol::UsageBounds;

use super::Routed;

use crate::workers::WorkerSet;

/// A ceiling on the workers a request may go to, and the bounds of its answer under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reach {
    /// The highest price (nanoton per weighted token, the floor applied) of those workers.
    pub(crate) price: u64,
    /// The longest context of those workers; `None` when it does not matter (the request
    /// sets `max_tokens`) or no worker serves the model.
    pub(crate) context: Option<u32>,
    /// The most the answer may be counted as under this reach.
    pub(crate) bounds: UsageBounds,
}

impl Reach {
    /// Every worker serving the request's model within its `max_price`: today's highest price
    /// and longest context. `None` when no worker serves it within the price.
    pub(crate) fn widest(workers: &WorkerSet, request: &Routed) -> Option<Self> {
        let price = workers.highest_price(&request.model, request.max_price)?;
        let context = workers.context_length(&request.model);
        Some(Self::at(request, price, context))
    }

    /// What a client that cannot cover the widest reach chooses from: the workers serving the
    /// request's model within its `max_price`, cheapest worst case first, and for each one
    /// the reach of it and all before it (their highest price and longest context). The
    /// dearest of these the client covers leaves it the most workers (several reaches may
    /// share one ceiling: they come once). `widest`'s bounds are reused, so the prompt is not
    /// read again per worker.
    pub(crate) fn narrower(workers: &WorkerSet, request: &Routed, widest: &Reach) -> Vec<Self> {
        let mut offers = workers.offers_within(&request.model, request.max_price);
        let open = request.max_tokens.is_none();
        let prompt = u128::from(widest.bounds.prompt());
        // The worst case's order without the network's multipliers: what a worker's own
        // reservation grows with, its price times its tokens.
        offers.sort_by_key(|&(price, context)| {
            u128::from(price) * (prompt + u128::from(widest.bounds.within(context).completion()))
        });
        let mut reaches: Vec<Self> = Vec::with_capacity(offers.len());
        let (mut price, mut context) = (0, 0);
        for (p, c) in offers {
            price = price.max(p);
            context = context.max(c);
            let reach = Self {
                price,
                context: open.then_some(context),
                bounds: widest.bounds.within(context),
            };
            if reaches.last() != Some(&reach) {
                reaches.push(reach);
            }
        }
        reaches
    }

    fn at(request: &Routed, price: u64, context: Option<u32>) -> Self {
        // With max_tokens the context bounds nothing: no ceiling on it.
        let context = context.filter(|_| request.max_tokens.is_none());
        Self {
            price,
            context,
            bounds: request.bounds(context.unwrap_or(u32::MAX)),
        }
    }

    /// What the routing keeps to under this reach: at most this price (and the client's own
    /// cap), at most this context.
    pub(crate) fn ceiling(&self, request: &Routed) -> Ceiling {
        Ceiling {
            max_price: Some(request.max_price.map_or(self.price, |m| m.min(self.price))),
            max_context: self.context,
        }
    }
}

/// The workers a request may be routed to: at most this price and context (`None`: any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ceiling {
    pub(crate) max_price: Option<u64>,
    pub(crate) max_context: Option<u32>,
}

impl Ceiling {
    /// The request's own: its `max_price`, any context (without payments, nothing is reserved
    /// to keep to).
    pub(crate) fn of(request: &Routed) -> Self {
        Self {
            max_price: request.max_price,
            max_context: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::{Input, SamplingParams};

    fn request(max_tokens: Option<u32>, max_price: Option<u64>) -> Routed {
        Routed::clear(&cocoon_protocol::GenerateRequest {
            model: "m".into(),
            input: Input::Text {
                prompt: "hi".into(),
            },
            params: SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            },
            max_price,
            cache_scope: None,
        })
    }

    #[test]
    fn the_context_is_a_ceiling_only_without_max_tokens() {
        let open = Reach::at(&request(None, None), 40, Some(4096));
        assert_eq!(open.context, Some(4096));
        assert_eq!(open.bounds.completion(), 4096);
        let capped = Reach::at(&request(Some(16), None), 40, Some(4096));
        assert_eq!(capped.context, None);
        assert_eq!(capped.bounds.completion(), 16);
        // Routed under the reach: never above it, nor above the client's own cap.
        assert_eq!(open.ceiling(&request(None, None)).max_price, Some(40));
        assert_eq!(open.ceiling(&request(None, Some(30))).max_price, Some(30));
        assert_eq!(open.ceiling(&request(None, Some(90))).max_price, Some(40));
        assert_eq!(open.ceiling(&request(None, None)).max_context, Some(4096));
    }
}
