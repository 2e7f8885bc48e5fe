//! Routing one generation to a worker and relaying its events back to the client.
//!
//! The [`market`](crate::market) picks the worker. One that refuses, fails or stays silent
//! before its first token is replaced by the next pick (at most `max_attempts`, all within
//! `start_deadline_secs`), so the client sees one answer and pays once. Once a token has been
//! relayed the answer belongs to that worker: if it fails or goes silent mid-stream the
//! stream ends with an error event and the client is charged only for the tokens it was
//! sent. Every attempt's outcome goes into the worker's record.
//!
//! A request goes through one step per module, each refusing with the error the client
//! gets: [`admit`] (body, limits, validity, some worker able to serve it), the reservation
//! here, [`failover`] (the attempts up to a first token), then [`answer`] (the stream, its
//! bill, the worker's record). [`errors`] words the refusals that are the proxy's own.

mod admit;
mod answer;
mod errors;
mod failover;

use std::sync::Arc;

use cocoon_net::{Body, error_response};
use cocoon_protocol::{GenerateRequest, ProtocolError};
use http::Response;
use hyper::body::Incoming;

pub(crate) use self::answer::send_payout;
use crate::billing::{Hold, UsageBounds};
use crate::server::State;

pub(crate) async fn generate(
    state: &Arc<State>,
    client: [u8; 32],
    body: Incoming,
) -> Response<Body> {
    match serve(state, client, body).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    }
}

async fn serve(
    state: &Arc<State>,
    client: [u8; 32],
    body: Incoming,
) -> Result<Response<Body>, ProtocolError> {
    // The client's slot first: a client over its rate or its requests in flight costs no body
    // read (bodies are up to max_request_bytes, on many streams at once).
    let permit = state.limiter.permit(client)?;
    let read = cocoon_net::read_json(body, state.max_request_bytes);
    let request = admit::read(read, state.limiter.config()).await?;
    admit::check(&state.limiter, &state.workers, &request)?;
    // What the worker may bill is fixed now, from the request itself: the reservation covers
    // exactly that, and the worker's report is held to it.
    let context = state.workers.context_length(&request.model);
    let bounds = UsageBounds::new(&request, context.unwrap_or(u32::MAX));
    let hold = reserve(state, client, &request, &bounds).await?;
    let begun = failover::run(&state.workers, &state.routing, &request, |worker| {
        answer::start(worker, &request)
    })
    .await?;
    Ok(answer::stream(state.clone(), begun, permit, hold, bounds))
}

/// Reserves what the request may cost (nothing without payments). It must cover the
/// dearest worker the request may end up on, since failover may move it to any of them.
async fn reserve(
    state: &State,
    client: [u8; 32],
    request: &GenerateRequest,
    bounds: &UsageBounds,
) -> Result<Option<Hold>, ProtocolError> {
    match (
        &state.billing,
        state
            .workers
            .highest_price(&request.model, request.max_price),
    ) {
        (Some(billing), Some(price)) => billing.reserve(client, bounds, price).await.map(Some),
        _ => Ok(None),
    }
}
