//! Bills a client asks for after the answer they belonged to ended without them: an answer
//! cut off, a connection lost between the proxy's last frame and the client. The ledger
//! charges every counter up to the latest charge, so a client that never saw one of its bills
//! would find a gap it cannot tell from an overcharge. Each settlement of a request that came
//! with the client's id ([`REQUEST_ID_HEADER`](cocoon_protocol::REQUEST_ID_HEADER)) writes a
//! receipt in the book, in the settlement's own transaction, and the client asks for it by id
//! ([`paths::BILL`](cocoon_protocol::paths::BILL)). A request still being answered is
//! `pending`; one with no receipt was never charged (or is older than
//! [`BILL_RETENTION_SECS`]).

use std::sync::Arc;

use cocoon_ledger::{PublicKey, unix_now};
use cocoon_protocol::{BILL_RETENTION_SECS, LateBill, ProtocolError, RequestId};

use super::Billing;

/// A request with a client's id, from its first byte until it is settled or dropped: asked
/// for meanwhile, its bill is pending. Taken before anything can bill the request, so that
/// no ask can be told `not_billed` for a request a settlement is yet to bill.
pub(crate) struct Opened {
    billing: Arc<Billing>,
    key: (PublicKey, RequestId),
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.billing.open.lock().remove(&self.key);
    }
}

impl Billing {
    /// Marks the client's request `id` as being answered; refused while another request of
    /// the client's has the same id (two bills under one id would hide one of them).
    pub(crate) fn opening(
        self: &Arc<Self>,
        client: PublicKey,
        id: RequestId,
    ) -> Result<Opened, ProtocolError> {
        if !self.open.lock().insert((client, id)) {
            return Err(ProtocolError::invalid(format!(
                "request id {id} is already in use by a request being answered"
            )));
        }
        Ok(Opened {
            billing: self.clone(),
            key: (client, id),
        })
    }

    /// What the proxy billed the client's request `id`.
    pub(crate) async fn late_bill(
        self: &Arc<Self>,
        client: PublicKey,
        id: RequestId,
    ) -> Result<LateBill, ProtocolError> {
        // Open first: a settlement writes its receipt before its request stops being open, so
        // a request seen closed after its receipt was looked for had none.
        let open = self.open.lock().contains(&(client, id));
        let billing = self.clone();
        let receipt = tokio::task::spawn_blocking(move || {
            billing.with_book(|book| book.receipt(&client, &id.0))
        })
        .await
        .map_err(|e| ProtocolError::internal(e.to_string()))??
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
        match receipt {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ProtocolError::internal(format!("a receipt does not read: {e}"))),
            None if open => Ok(LateBill::Pending),
            None => Ok(LateBill::NotBilled),
        }
    }

    /// Forgets the receipts older than [`BILL_RETENTION_SECS`].
    pub(crate) async fn prune_receipts(self: &Arc<Self>) {
        let before = unix_now().saturating_sub(BILL_RETENTION_SECS);
        let billing = self.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            billing.with_book(|book| book.prune_receipts(before))
        })
        .await;
        match pruned {
            Ok(Ok(Ok(n))) if n > 0 => tracing::debug!(n, "old receipts pruned"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "old receipts could not be pruned"),
            _ => {}
        }
    }
}
