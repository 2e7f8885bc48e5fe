//! Reloading a running proxy's configuration (SIGHUP, or `POST /reload` on the operator's
//! listener), and the operator's runtime controls (disable or enable a worker).
//!
//! A reload puts in force what can change without a restart: the worker and client policies
//! (pins, images, configurations), `[limits]` and `[routing]`. Nothing is dropped: streams in
//! flight go on, and a connected worker the new worker policy no longer admits gets no new
//! request and is let go once its answers end. A file that does not parse or validate, or
//! that changes what only a restart can (the listener, the key, the attester, the ledger and
//! book, the operator's listener, the connection pools' sizes), is refused whole with the
//! reason, and the configuration in force stays. On an attested proxy the policies are part
//! of the measured configuration (RTMR3) and a TD serves one configuration, so changing them
//! takes a restart of the TD; `[limits]` and `[routing]` are not measured and reload there
//! too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_tls::Fingerprint;

use crate::config::ProxyConfig;
use crate::server::State;

/// Workers the operator may keep disabled at once.
const MAX_DISABLED: usize = 10_000;

/// The configuration in force and where it was read from, for reloads.
#[derive(Debug)]
pub(crate) struct Reloadable {
    pub(crate) current: parking_lot::Mutex<ProxyConfig>,
    pub(crate) file: std::sync::OnceLock<PathBuf>,
    /// Whether this proxy's certificates carry a quote, whose RTMR3 holds the policies.
    pub(crate) attested: bool,
    pub(crate) store: Arc<cocoon_collateral::CollateralStore>,
    /// Workers the operator disabled, by fingerprint: kept across their reconnections.
    pub(crate) disabled: parking_lot::Mutex<std::collections::HashSet<Fingerprint>>,
}

/// A handle on a running proxy for its operator: reload its configuration file, disable or
/// enable a worker.
#[derive(Clone)]
pub struct Controls {
    pub(crate) state: Arc<State>,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Controls")
    }
}

impl Controls {
    /// Reads the configuration file again (the one given to [`crate::Proxy::with_config_file`])
    /// and puts it in force ([`Self::reload`]).
    pub fn reload_file(&self) -> Result<Vec<&'static str>, String> {
        let path = self
            .state
            .reloadable
            .file
            .get()
            .ok_or("this proxy was not started from a configuration file")?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config: ProxyConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.reload(config)
    }

    /// Puts `new` in force if it changes only what a reload may; returns the sections that
    /// changed. Refused whole, the configuration in force staying, when it does not validate
    /// or changes anything else.
    pub fn reload(&self, new: ProxyConfig) -> Result<Vec<&'static str>, String> {
        let state = &self.state;
        let mut current = state.reloadable.current.lock();
        let changed = reloadable_changes(&current, &new, state.reloadable.attested)?;
        if changed.is_empty() {
            return Ok(changed);
        }
        new.limits.check().map_err(|e| e.to_string())?;
        new.routing.check().map_err(|e| e.to_string())?;
        let from_registry = new.payments.worker_images_from_registry;
        let store = &state.reloadable.store;
        let workers = new
            .worker_policy
            .registry_images(from_registry)
            .build_with("worker_policy", "worker", store)
            .map_err(|e| e.to_string())?;
        let clients = new
            .client_policy
            .build_with("client_policy", "client", store)
            .map_err(|e| e.to_string())?;
        // Everything validated: from here on nothing fails.
        state.admission.replace(workers, clients);
        state.limiter.set_config(new.limits.clone());
        *state.routing.write() = Arc::new(new.routing.clone());
        *current = new;
        drop(current);
        if changed.contains(&"worker_policy") {
            self.recheck_workers();
        }
        tracing::info!(changed = ?changed, "configuration reloaded");
        Ok(changed)
    }

    /// Checks every connected worker against the worker policy now in force: one it no
    /// longer admits gets no new request, and is disconnected once its answers end.
    fn recheck_workers(&self) {
        for worker in self.state.workers.snapshot() {
            if let Err(why) = self.state.still_admitted(&worker) {
                tracing::warn!(worker = %worker.name, reason = %why, "the reloaded worker policy no longer admits a connected worker: it is let go once its answers end");
                worker.exclude();
                tokio::spawn(async move {
                    while worker.in_flight() > 0 && !worker.link.evict.is_cancelled() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    worker.link.evict.cancel();
                });
            }
        }
    }

    /// Keeps the worker with `fingerprint` (hex) out of routing (`disabled`), or lets it back
    /// in: its answers in flight finish, and the setting holds across its reconnections until
    /// changed (not across a restart of the proxy). Returns how many of its connections are
    /// up now (0: it applies when it connects).
    pub fn set_worker_disabled(&self, fingerprint: &str, disabled: bool) -> Result<usize, String> {
        let fingerprint = Fingerprint::from_hex(fingerprint).ok_or_else(|| {
            format!("{fingerprint:?} is not a worker's key fingerprint (64 hex digits)")
        })?;
        {
            let mut set = self.state.reloadable.disabled.lock();
            if disabled {
                if set.len() >= MAX_DISABLED && !set.contains(&fingerprint) {
                    return Err(format!(
                        "{MAX_DISABLED} workers are disabled already: enable some first (or \
                         unpin them in [worker_policy])"
                    ));
                }
                set.insert(fingerprint);
            } else {
                set.remove(&fingerprint);
            }
        }
        let mut connected = 0;
        for worker in self.state.workers.snapshot() {
            if worker.link.fingerprint == fingerprint {
                worker.set_disabled(disabled);
                connected += 1;
            }
        }
        tracing::info!(worker = %fingerprint, disabled, connected, "operator's control");
        Ok(connected)
    }
}

/// The sections `new` changes against `current`, if a reload may change them all; else why
/// not (the first section that takes a restart).
pub(crate) fn reloadable_changes(
    current: &ProxyConfig,
    new: &ProxyConfig,
    attested: bool,
) -> Result<Vec<&'static str>, String> {
    let value = |c: &ProxyConfig| serde_json::to_value(c).expect("configs serialize");
    let (old, next) = (value(current), value(new));
    let restart = |what: &str| {
        Err(format!(
            "{what} changed, which takes a restart; the configuration in force stays"
        ))
    };
    let object = next.as_object().expect("a config is a table");
    for (key, value) in object {
        if old.get(key) == Some(value) {
            continue;
        }
        match key.as_str() {
            "worker_policy" | "client_policy" | "limits" | "routing" => {}
            other => return restart(other),
        }
    }
    // Sized when the proxy started.
    for (field, a, b) in [
        (
            "[limits] handshaking_connections",
            current.limits.handshaking_connections,
            new.limits.handshaking_connections,
        ),
        (
            "[limits] worker_connections",
            current.limits.worker_connections,
            new.limits.worker_connections,
        ),
    ] {
        if a != b {
            return restart(field);
        }
    }
    if current.routing.reputation_file != new.routing.reputation_file {
        return restart("[routing] reputation_file");
    }
    if attested && current.measured() != new.measured() {
        return Err(
            "the worker or client policy changed: on this attested proxy they are part of the \
             measured configuration (RTMR3), and a TD serves one configuration, so changing \
             them takes a restart of the TD; the configuration in force stays"
                .into(),
        );
    }
    Ok(["worker_policy", "client_policy", "limits", "routing"]
        .into_iter()
        .filter(|k| old.get(*k) != next.get(*k))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload changes the policies, `[limits]` and `[routing]`; anything else (the
    /// listener, the ledger, a pool's size) is refused with its name; on an attested proxy a
    /// policy change is refused too (it is measured), while limits still reload.
    #[test]
    fn only_what_a_reload_may_change_is_taken() {
        let current = ProxyConfig::default();
        let mut new = current.clone();
        assert_eq!(reloadable_changes(&current, &new, false), Ok(vec![]));
        new.worker_policy.fingerprints.push("ab".repeat(32));
        new.limits.burst += 1;
        assert_eq!(
            reloadable_changes(&current, &new, false),
            Ok(vec!["worker_policy", "limits"])
        );
        let refused = reloadable_changes(&current, &new, true).unwrap_err();
        assert!(refused.contains("measured configuration"), "{refused}");
        let mut limits_only = current.clone();
        limits_only.limits.burst += 1;
        assert_eq!(
            reloadable_changes(&current, &limits_only, true),
            Ok(vec!["limits"])
        );
        for (change, named) in [
            (
                Box::new(|c: &mut ProxyConfig| c.listen = "127.0.0.1:1".into())
                    as Box<dyn Fn(&mut ProxyConfig)>,
                "listen",
            ),
            (
                Box::new(|c: &mut ProxyConfig| c.payments.ledger = Some("http://x".into())),
                "payments",
            ),
            (
                Box::new(|c: &mut ProxyConfig| c.limits.worker_connections += 1),
                "[limits] worker_connections",
            ),
            (
                Box::new(|c: &mut ProxyConfig| c.routing.reputation_file = Some("r".into())),
                "[routing] reputation_file",
            ),
        ] {
            let mut new = current.clone();
            change(&mut new);
            let refused = reloadable_changes(&current, &new, false).unwrap_err();
            assert!(refused.starts_with(named), "{refused}");
        }
    }
}
