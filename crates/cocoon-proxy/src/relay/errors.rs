//! The errors a client gets when its request is not started, in one place so that the
//! message, status and `Retry-After` a client sees for each way of not being served can be
//! read (and checked) side by side.

use cocoon_protocol::{ErrorKind, ProtocolError};

use crate::market::NoPick;

/// Why the market had no worker for `model` within `max_price`, in the client's terms.
pub(crate) fn no_pick(no: NoPick, model: &str, max_price: Option<u64>) -> ProtocolError {
    match no {
        NoPick::UnknownModel => ProtocolError::new(
            ErrorKind::ModelNotFound,
            format!(
                "The model '{}' does not exist or no worker serves it",
                model
            ),
        ),
        NoPick::TooExpensive { cheapest } => ProtocolError::invalid(format!(
            "no worker serves '{}' at or below max_price {} nanoton per token; the cheapest \
             asks {cheapest}",
            model,
            max_price.unwrap_or(0)
        )),
        NoPick::NoneAvailable => ProtocolError::unavailable(format!(
            "no worker for model '{}' can take the request now",
            model
        )),
    }
}

/// A sealed request none of whose recipients can take it now: the gateway asks for candidates
/// again (the set it sealed for may have left).
pub(crate) fn none_sealed_for(model: &str) -> ProtocolError {
    ProtocolError::unavailable(format!(
        "none of the workers this request was sealed for can take it now (model '{model}'); \
         ask for candidates again"
    ))
}

/// The one error a client gets after failover gave up: the last reason, and how many
/// workers were tried, so that a client seeing it knows the proxy did try others. The
/// failures hidden behind it were the workers', so an `Unavailable` one invites a retry soon.
pub(super) fn exhausted(
    last_error: Option<ProtocolError>,
    tried: usize,
    model: &str,
    start_deadline_secs: u64,
) -> ProtocolError {
    let error = last_error.unwrap_or_else(|| {
        ProtocolError::unavailable(format!(
            "no worker for model '{model}' answered within {start_deadline_secs} s"
        ))
    });
    let retry_after_secs = match error.kind {
        // Workers come and go: soon another may take it.
        ErrorKind::Unavailable => error.retry_after_secs.or(Some(1)),
        _ => error.retry_after_secs,
    };
    ProtocolError {
        message: format!("{} (workers tried: {tried})", error.message),
        retry_after_secs,
        ..error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_no_pick_names_its_reason_and_status() {
        let unknown = no_pick(NoPick::UnknownModel, "m", None);
        assert_eq!(unknown.kind, ErrorKind::ModelNotFound);
        assert_eq!(
            unknown.message,
            "The model 'm' does not exist or no worker serves it"
        );
        let dear = no_pick(NoPick::TooExpensive { cheapest: 25 }, "m", Some(20));
        assert_eq!(dear.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            dear.message,
            "no worker serves 'm' at or below max_price 20 nanoton per token; the cheapest asks 25"
        );
        let busy = no_pick(NoPick::NoneAvailable, "m", None);
        assert_eq!(busy.kind, ErrorKind::Unavailable);
        assert_eq!(
            busy.message,
            "no worker for model 'm' can take the request now"
        );
        // Nothing here says when to retry: that is for the caller to decide.
        assert!(
            [unknown, dear, busy]
                .iter()
                .all(|e| e.retry_after_secs.is_none())
        );
    }

    #[test]
    fn an_unavailable_end_says_how_many_were_tried_and_to_retry_in_a_second() {
        let e = exhausted(
            Some(ProtocolError::unavailable("worker 'b' is gone")),
            3,
            "m",
            60,
        );
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert_eq!(e.message, "worker 'b' is gone (workers tried: 3)");
        assert_eq!(e.retry_after_secs, Some(1));
    }

    #[test]
    fn a_retry_time_the_reason_carries_is_kept() {
        let mut busy = ProtocolError::unavailable("busy");
        busy.retry_after_secs = Some(7);
        assert_eq!(exhausted(Some(busy), 1, "m", 60).retry_after_secs, Some(7));
    }

    #[test]
    fn other_kinds_get_no_invented_retry_time() {
        let e = exhausted(Some(ProtocolError::internal("boom")), 2, "m", 60);
        assert_eq!(e.kind, ErrorKind::Internal);
        assert_eq!(e.message, "boom (workers tried: 2)");
        assert_eq!(e.retry_after_secs, None);
        let e = exhausted(
            Some(ProtocolError::new(ErrorKind::ContextLengthExceeded, "long")),
            1,
            "m",
            60,
        );
        assert_eq!(e.kind, ErrorKind::ContextLengthExceeded);
        assert_eq!(e.retry_after_secs, None);
    }

    #[test]
    fn without_any_reason_the_deadline_is_the_reason() {
        let e = exhausted(None, 0, "m", 45);
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert_eq!(
            e.message,
            "no worker for model 'm' answered within 45 s (workers tried: 0)"
        );
        assert_eq!(e.retry_after_secs, Some(1));
    }
}
