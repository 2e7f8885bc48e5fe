//! Who may connect to the proxy: the client and worker policies, applied in the handshake and
//! again once ALPN says which role the peer asks for, and a short log of recent refusals that
//! the status page shows (so an operator sees why a worker never joined). A worker the proxy
//! caught cheating is barred until the proxy restarts, whatever its attestation says. The
//! policies can be replaced while the proxy runs (a reload): handshakes from then on use the
//! new ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cocoon_tls::{AnyOf, Fingerprint, PeerCertificate, PeerVerifier, Verified, VerifyError};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

const KEPT: usize = 32;

/// One refused peer, as shown in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `worker`, `client`, or `handshake` when the peer fit no policy at all.
    pub role: String,
    /// The peer's key fingerprint (hex).
    pub fingerprint: String,
    /// Why it was refused: the policy's error.
    pub reason: String,
}

/// The worker and client policies in force, shared with the TLS handshake's verifier.
#[derive(Debug)]
struct Policies {
    workers: RwLock<Arc<dyn PeerVerifier>>,
    clients: RwLock<Arc<dyn PeerVerifier>>,
    /// Bumped by each replacement: a connection admitted under an older generation is
    /// checked again before its next request.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Admission {
    policies: Arc<Policies>,
    refusals: Arc<Mutex<VecDeque<Refusal>>>,
    /// Workers barred for cheating, and why.
    barred: Mutex<HashMap<Fingerprint, String>>,
}

impl Admission {
    pub(crate) fn new(workers: Arc<dyn PeerVerifier>, clients: Arc<dyn PeerVerifier>) -> Self {
        Self {
            policies: Arc::new(Policies {
                workers: RwLock::new(workers),
                clients: RwLock::new(clients),
                generation: Default::default(),
            }),
            refusals: Arc::default(),
            barred: Mutex::default(),
        }
    }

    /// Puts new policies in force: every handshake and role check from now on uses them.
    pub(crate) fn replace(&self, workers: Arc<dyn PeerVerifier>, clients: Arc<dyn PeerVerifier>) {
        *self.policies.workers.write() = workers;
        *self.policies.clients.write() = clients;
        self.policies
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Which policies are in force: changes with each [`Self::replace`].
    pub(crate) fn generation(&self) -> u64 {
        self.policies
            .generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the client policy in force still admits a client admitted under generation
    /// `admitted_at` (checked again only when the policies changed since; then remembered).
    pub(crate) fn client_still(
        &self,
        peer: &PeerCertificate,
        admitted_at: &std::sync::atomic::AtomicU64,
    ) -> Result<(), VerifyError> {
        let now = self.generation();
        if admitted_at.load(std::sync::atomic::Ordering::SeqCst) == now {
            return Ok(());
        }
        self.client(peer)?;
        admitted_at.store(now, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The worker policy in force.
    pub(crate) fn workers(&self) -> Arc<dyn PeerVerifier> {
        self.policies.workers.read().clone()
    }

    /// Refuses the worker with `fingerprint` from now on, saying `why`.
    pub(crate) fn bar(&self, fingerprint: Fingerprint, why: String) {
        self.barred.lock().insert(fingerprint, why);
    }

    /// What the TLS handshake checks: that some role's policy in force admits the peer.
    pub(crate) fn handshake_verifier(&self) -> Arc<dyn PeerVerifier> {
        Arc::new(Recorded {
            policies: self.policies.clone(),
            refusals: self.refusals.clone(),
        })
    }

    pub(crate) fn worker(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        if let Some(why) = self.barred.lock().get(&peer.fingerprint) {
            let e = VerifyError::Policy(format!("barred: {why}"));
            record(&self.refusals, "worker", peer, &e);
            return Err(e);
        }
        self.check("worker", &*self.workers(), peer)
    }

    pub(crate) fn client(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        let clients = self.policies.clients.read().clone();
        self.check("client", &*clients, peer)
    }

    fn check(
        &self,
        role: &str,
        policy: &dyn PeerVerifier,
        peer: &PeerCertificate,
    ) -> Result<Verified, VerifyError> {
        policy
            .verify(peer)
            .inspect_err(|e| record(&self.refusals, role, peer, e))
    }

    pub(crate) fn recent_refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().iter().cloned().collect()
    }
}

impl Admission {
    /// Records that an admitted worker's offer was refused after its handshake (its model is
    /// not allowed, say), for the operator's status.
    pub(crate) fn refused_offer(&self, fingerprint: &Fingerprint, reason: String) {
        push(&self.refusals, "worker", fingerprint, reason);
    }
}

fn record(log: &Mutex<VecDeque<Refusal>>, role: &str, peer: &PeerCertificate, e: &VerifyError) {
    tracing::warn!(role, peer = %peer.fingerprint, error = %e, "peer refused");
    push(log, role, &peer.fingerprint, e.to_string());
}

fn push(log: &Mutex<VecDeque<Refusal>>, role: &str, fingerprint: &Fingerprint, reason: String) {
    let mut log = log.lock();
    if log.len() == KEPT {
        log.pop_front();
    }
    log.push_back(Refusal {
        at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        role: role.to_owned(),
        fingerprint: fingerprint.to_string(),
        reason,
    });
}

#[derive(Debug)]
struct Recorded {
    policies: Arc<Policies>,
    refusals: Arc<Mutex<VecDeque<Refusal>>>,
}

impl PeerVerifier for Recorded {
    fn verify(&self, peer: &PeerCertificate) -> Result<Verified, VerifyError> {
        let any = AnyOf(vec![
            self.policies.clients.read().clone(),
            self.policies.workers.read().clone(),
        ]);
        any.verify(peer)
            .inspect_err(|e| record(&self.refusals, "handshake", peer, e))
    }
}
