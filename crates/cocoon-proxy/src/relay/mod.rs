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
//! here (over the workers the client's cover [`reach`]es), [`failover`] (the attempts up to a first token), then [`answer`] (the stream, its
//! bill, the worker's record). [`errors`] words the refusals that are the proxy's own.

mod admit;
mod answer;
mod errors;
mod failover;
mod reach;
mod routed;

use std::sync::Arc;

use cocoon_net::{Body, error_response};
use cocoon_protocol::{
    GenerateRequest, ProtocolError, REQUEST_ID_HEADER, RequestId, SealedRequest,
};
use http::Response;
use hyper::body::Incoming;

use self::answer::Payload;
pub(crate) use self::answer::send_payout;
pub(crate) use self::errors::no_pick;
use self::reach::{Ceiling, Reach};
pub(crate) use self::routed::Routed;
use crate::billing::Hold;
use crate::server::State;

/// Serves a generation request from `client`: a clear one, or with `sealed` one encrypted to
/// the workers it names ([`SealedRequest`]), which is routed only among them and relayed
/// without being read.
pub(crate) async fn generate(
    state: &Arc<State>,
    client: [u8; 32],
    request: http::Request<Incoming>,
    sealed: bool,
) -> Response<Body> {
    match serve(state, client, request, sealed).await {
        Ok(response) => response,
        Err(error) => {
            state.metrics.refused(&error);
            error_response(&error)
        }
    }
}

async fn serve(
    state: &Arc<State>,
    client: [u8; 32],
    request: http::Request<Incoming>,
    sealed: bool,
) -> Result<Response<Body>, ProtocolError> {
    // Counted before the drain's flag is read: a drain that starts after this waits for it.
    let in_flight = state.request_in_flight();
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ProtocolError {
            retry_after_secs: Some(1),
            ..ProtocolError::unavailable("this proxy is shutting down: try another")
        });
    }
    // The client's slot first: a client over its rate or its requests in flight costs no body
    // read (bodies are up to max_request_bytes, on many streams at once).
    let permit = state.limiter.permit(client)?;
    let id = request_id(&request)?;
    // Open before anything can bill it: the client may ask for the bill of a request whose
    // answer it lost, and must not be told there is none while one is yet to be written.
    let opened = match (&state.billing, id) {
        (Some(billing), Some(id)) => Some(billing.opening(client, id)?),
        _ => None,
    };
    let body = request.into_body();
    let limits = state.limiter.config();
    // Workers share prompt caches only within a scope: this client's, under the gateway's
    // hint (an app's key, or a fresh value that opts out). The client cannot name another's.
    let (payload, request) = if sealed {
        let read = cocoon_net::read_json::<SealedRequest>(body, state.max_request_bytes);
        let mut request = admit::read(read, &limits).await?;
        request.validate()?;
        request.cache_scope =
            Some(state.cache_scope(&client, request.header.cache_hint.as_deref()));
        let routed = Routed::sealed(&request)?;
        (Payload::Sealed(request), routed)
    } else {
        let read = cocoon_net::read_json::<GenerateRequest>(body, state.max_request_bytes);
        let mut request = admit::read(read, &limits).await?;
        request.validate()?;
        request.cache_scope = Some(state.cache_scope(&client, request.cache_scope.as_deref()));
        let routed = Routed::clear(&request);
        (Payload::Clear(request), routed)
    };
    admit::check(&state.limiter, &state.workers, &request)?;
    // What the worker may bill is fixed now, from the request itself and the workers it may
    // go to: the reservation covers exactly that, the routing keeps to those workers, and the
    // worker's report is held to the bounds.
    let (hold, reach) = reserve(state, client, &request).await?;
    let (ceiling, bounds) = match &reach {
        Some(reach) => (reach.ceiling(&request), reach.bounds),
        None => {
            let context = state.workers.context_length(&request.model);
            let bounds = request.bounds(context.unwrap_or(u32::MAX));
            (Ceiling::of(&request), bounds)
        }
    };
    let routing = state.routing.read().clone();
    let begun = failover::run(&state.workers, &routing, &request, ceiling, |worker| {
        answer::start(worker, &payload)
    })
    .await?;
    let bill = answer::BillTo {
        hold,
        id,
        opened,
        model: request.model.clone(),
    };
    Ok(answer::stream(
        state.clone(),
        begun,
        (permit, in_flight),
        bill,
        bounds,
    ))
}

/// The client's id for the request, if it sent one.
fn request_id(request: &http::Request<Incoming>) -> Result<Option<RequestId>, ProtocolError> {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .map(|v| {
            v.to_str()
                .map_err(|_| ProtocolError::invalid("a request id is 32 hex digits"))?
                .parse()
        })
        .transpose()
}

/// Reserves what the request may cost (nothing, and no reach, without payments). It must
/// cover the dearest worker the request may end up on, since failover may move it to any of
/// them: every worker within the client's `max_price` if the contract covers that, else the
/// widest [`Reach`] it covers.
async fn reserve(
    state: &State,
    client: [u8; 32],
    request: &Routed,
) -> Result<(Option<Hold>, Option<Reach>), ProtocolError> {
    let Some(billing) = &state.billing else {
        return Ok((None, None));
    };
    // Admission found a worker; one that left since must not let the request through
    // unreserved (it would be served unbilled).
    let widest = Reach::widest(&state.workers, request).ok_or_else(|| {
        ProtocolError::unavailable(format!(
            "no worker serves model '{}' within the request's max_price any more",
            request.model
        ))
    })?;
    let mut narrower = Vec::new();
    let (hold, choice) = billing
        .reserve(client, (&widest.bounds, widest.price), || {
            narrower = Reach::narrower(&state.workers, request, &widest);
            narrower.iter().map(|r| (r.bounds, r.price)).collect()
        })
        .await?;
    let reach = choice.map_or(widest, |i| narrower[i]);
    if reach != widest {
        tracing::debug!(price = reach.price, context = ?reach.context, "the client's cover reaches only some workers; routing among them");
    }
    Ok((Some(hold), Some(reach)))
}
