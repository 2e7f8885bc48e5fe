//! The connected workers: the [`Market`] over their connections, and the health check each
//! connection runs.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use cocoon_net::Channel;
use cocoon_protocol::{WorkerHello, paths};
use cocoon_tls::{Fingerprint, Verified};
use tokio_util::sync::CancellationToken;

use crate::config::RoutingConfig;
use crate::market::{Market, Outcome, Seller};

/// How the proxy reaches one worker, and what the worker proved.
#[derive(Debug)]
pub struct WorkerLink {
    /// The worker's key fingerprint.
    pub fingerprint: Fingerprint,
    /// The worker's certificate (DER): the one of its handshake, then the one its latest
    /// hello carried (renewed before the first expires). Offered to gateways that seal
    /// requests.
    pub certificate: parking_lot::Mutex<Vec<u8>>,
    /// What the worker proved in its handshake.
    pub attestation: Verified,
    pub(crate) channel: Channel,
    /// Cancelled to disconnect the worker.
    pub(crate) evict: CancellationToken,
    /// Answers on this connection whose counts broke the proxy's bounds.
    pub(crate) overreports: AtomicU32,
    /// The models admitted at join and their weights' hashes, which the registry is asked
    /// about again every `[payments] registry_refresh_secs`.
    pub(crate) model_hashes: Vec<(String, String)>,
}

impl WorkerLink {
    /// Takes the certificate `hello` carries if it is this worker's (same key).
    pub(crate) fn renew_certificate(&self, hello: &WorkerHello) {
        use base64::Engine as _;
        let Some(der) = hello
            .certificate
            .as_deref()
            .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
        else {
            return;
        };
        let same = cocoon_tls::PeerCertificate::parse_any_time(
            &rustls::pki_types::CertificateDer::from(der.as_slice()),
        )
        .is_ok_and(|c| c.fingerprint == self.fingerprint);
        if same {
            *self.certificate.lock() = der;
        } else {
            tracing::warn!(worker = %self.fingerprint, "a worker's hello carried another key's certificate; ignored");
        }
    }

    /// The hash of the weights this worker serves `model` with, if it announced one.
    pub(crate) fn model_hash(&self, model: &str) -> Option<String> {
        self.model_hashes
            .iter()
            .find(|(id, _)| id == model)
            .map(|(_, h)| h.clone())
    }
}

/// The live set of workers.
pub type WorkerSet = Market<WorkerLink>;
/// A connected worker.
pub type WorkerEntry = Seller<WorkerLink>;

/// Asks `worker` for its hello every `health_interval`: one that does not answer in time gets
/// no new requests and loses reputation (a stall), and after `evict_after_failed_checks` in a
/// row it is disconnected, which fails its open streams at once instead of at the end of a
/// keep-alive timeout. Each hello is also handed to `hello` (a worker may change its prices
/// while connected). Returns when the worker is evicted or its connection closes.
pub(crate) async fn watch(
    workers: &WorkerSet,
    worker: &WorkerEntry,
    routing: &RoutingConfig,
    hello: impl Fn(&WorkerHello),
) {
    let interval = Duration::from_secs(routing.health_interval_secs);
    let timeout = Duration::from_secs(routing.health_timeout_secs);
    let mut failed = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = worker.link.evict.cancelled() => return,
        }
        if worker.link.channel.is_closed() {
            return;
        }
        match worker
            .link
            .channel
            .get_json::<WorkerHello>(paths::HELLO, timeout)
            .await
        {
            Ok(said) => {
                worker.link.renew_certificate(&said);
                hello(&said);
                let hello = said;
                if failed > 0 {
                    tracing::info!(worker = %worker.name, "worker answers health checks again");
                }
                failed = 0;
                // A stopping worker stays connected until its answers end: it gets no new one.
                worker.set_healthy(!hello.draining);
            }
            Err(e) => {
                failed += 1;
                worker.set_healthy(false);
                workers.record(worker, Outcome::Stalled);
                tracing::warn!(worker = %worker.name, error = %e, failed, "worker failed a health check");
                if failed >= routing.evict_after_failed_checks {
                    tracing::warn!(worker = %worker.name, "disconnecting an unresponsive worker");
                    worker.link.evict.cancel();
                    return;
                }
            }
        }
    }
}
