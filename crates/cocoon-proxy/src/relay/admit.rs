//! What a request must pass before anything is reserved or any worker is asked: its body
//! in time, the client's limits, its own validity, and some worker able to serve it at the
//! client's price. Cheap refusals come first, and the client's in-flight slot is taken
//! before the checks that follow so that a flood of bad requests is still rate limited.

use std::future::Future;
#[cfg(test)]
use std::sync::Arc;

#[cfg(test)]
use cocoon_protocol::GenerateRequest;
use cocoon_protocol::ProtocolError;

use super::errors;
#[cfg(test)]
use crate::limits::RequestPermit;
use crate::limits::{Limiter, LimitsConfig};
use crate::market::Market;

/// The request, once `read` (the body being read and parsed) has finished within the body
/// timeout: a client that trickles its body does not hold a stream open for ever.
pub(super) async fn read<R>(
    read: impl Future<Output = Result<R, ProtocolError>>,
    limits: &LimitsConfig,
) -> Result<R, ProtocolError> {
    match tokio::time::timeout(limits.body_timeout(), read).await {
        Ok(read) => read,
        Err(_) => Err(ProtocolError::invalid(format!(
            "the request body did not arrive within {} s",
            limits.body_timeout_secs
        ))),
    }
}

/// Admits `request` from `client`: the permit counts it as in flight until dropped.
/// Refused here, before any reservation, when no worker could serve it at any rate.
#[cfg(test)]
pub(super) fn admit<T>(
    limiter: &Arc<Limiter>,
    market: &Market<T>,
    client: [u8; 32],
    request: &GenerateRequest,
) -> Result<RequestPermit, ProtocolError> {
    let permit = limiter.permit(client)?;
    request.validate()?;
    check(limiter, market, &super::Routed::clear(request))?;
    Ok(permit)
}

/// What the request must pass once read and validated (its slot taken already): this
/// proxy's limits, and some worker able to serve it at the client's price.
pub(super) fn check<T>(
    limiter: &Limiter,
    market: &Market<T>,
    request: &super::Routed,
) -> Result<(), ProtocolError> {
    limiter.check(request.max_tokens)?;
    market
        .can_serve(&request.model, request.max_price)
        .map_err(|no| errors::no_pick(no, &request.model, request.max_price))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cocoon_protocol::{ErrorKind, Input, SamplingParams};

    use super::*;
    use crate::market::Offer;

    fn request(model: &str, temperature: f32, max_price: Option<u64>) -> GenerateRequest {
        GenerateRequest {
            model: model.into(),
            input: Input::Text {
                prompt: "hi".into(),
            },
            params: SamplingParams {
                temperature,
                ..SamplingParams::default()
            },
            max_price,
            cache_scope: None,
        }
    }

    /// One request in flight per client, and a market with one worker for `m` at 20.
    fn setup() -> (Arc<Limiter>, Market<()>) {
        let limiter = Limiter::new(LimitsConfig {
            concurrent_requests: 1,
            ..LimitsConfig::default()
        });
        let market = Market::new();
        let offers = vec![Offer {
            model: "m".into(),
            context_length: 2048,
            price: 20,
        }];
        market.add([9; 32], "w".into(), 4, offers, ());
        (limiter, market)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_in_time_is_refused() {
        let limits = LimitsConfig {
            body_timeout_secs: 7,
            ..LimitsConfig::default()
        };
        let start = tokio::time::Instant::now();
        let error = read(
            std::future::pending::<Result<GenerateRequest, _>>(),
            &limits,
        )
        .await
        .unwrap_err();
        assert_eq!(tokio::time::Instant::now() - start, Duration::from_secs(7));
        assert_eq!(error.kind, ErrorKind::InvalidRequest);
        assert_eq!(error.message, "the request body did not arrive within 7 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_time_or_its_read_error_is_passed_on() {
        let limits = LimitsConfig::default();
        let slow = async {
            tokio::time::sleep(limits.body_timeout() - Duration::from_millis(1)).await;
            Ok(request("m", 1.0, None))
        };
        assert_eq!(read(slow, &limits).await.unwrap().model, "m");
        let broken = async {
            Err::<GenerateRequest, _>(ProtocolError::unavailable("request body broke off"))
        };
        let error = read(broken, &limits).await.unwrap_err();
        assert_eq!(error.message, "request body broke off");
    }

    #[test]
    fn an_admitted_request_holds_its_clients_slot() {
        let (limiter, market) = setup();
        let permit = admit(&limiter, &market, [1; 32], &request("m", 1.0, None)).unwrap();
        let refused = admit(&limiter, &market, [1; 32], &request("m", 1.0, None)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        drop(permit);
        admit(&limiter, &market, [1; 32], &request("m", 1.0, None)).unwrap();
    }

    #[test]
    fn limits_come_before_validation() {
        let (limiter, market) = setup();
        let _permit = admit(&limiter, &market, [1; 32], &request("m", 1.0, None)).unwrap();
        // Invalid too, but the client's limit is what it hears about.
        let refused = admit(&limiter, &market, [1; 32], &request("m", 5.0, None)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
    }

    #[test]
    fn an_invalid_request_is_refused_and_frees_its_slot() {
        let (limiter, market) = setup();
        let error = admit(&limiter, &market, [1; 32], &request("m", 5.0, None)).unwrap_err();
        assert_eq!(error.kind, ErrorKind::InvalidRequest);
        assert_eq!(error.message, "temperature must be between 0 and 2, got 5");
        admit(&limiter, &market, [1; 32], &request("m", 1.0, None)).unwrap();
    }

    #[test]
    fn a_request_no_worker_could_serve_is_refused_and_frees_its_slot() {
        let (limiter, market) = setup();
        let unknown = admit(&limiter, &market, [1; 32], &request("x", 1.0, None)).unwrap_err();
        assert_eq!(unknown.kind, ErrorKind::ModelNotFound);
        let dear = admit(&limiter, &market, [1; 32], &request("m", 1.0, Some(10))).unwrap_err();
        assert_eq!(dear.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            dear.message,
            "no worker serves 'm' at or below max_price 10 nanoton per token; the cheapest \
             asks 20"
        );
        // Busy or unhealthy workers are failover's business, not admission's.
        market.snapshot()[0].set_healthy(false);
        admit(&limiter, &market, [1; 32], &request("m", 1.0, None)).unwrap();
    }
}
