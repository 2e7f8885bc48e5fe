//! What a node was told to do, measured into RTMR3 before it serves. A quote proves which
//! firmware and kernel run; the node's configuration (its role, which peers it admits, where
//! its backends send prompts, which ledger it settles on) decides where prompts go, so the node
//! measures a canonical serialization of it into RTMR3 and names the event in its certificate's
//! claims. A verifier replays the events to the quote's RTMR3, refuses a mismatch, and may allow
//! only listed configuration hashes. RTMR3 is part of the [`ImageHash`](crate::ImageHash).

use serde::{Deserialize, Serialize};

/// Where recent Linux kernels (6.16+) expose RTMR3 of a TDX guest: reading gives its value,
/// writing 48 bytes extends it.
pub const RTMR3_SYSFS: &str = "/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384";

/// The label of the event that measures a node's configuration.
pub const CONFIG_EVENT: &str = "cocoon-config";

/// One measurement extended into RTMR3: what was measured, in the exact bytes hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasuredEvent {
    /// What the content is (e.g. [`CONFIG_EVENT`]).
    pub label: String,
    /// The measured content: canonical JSON, with no secrets (it travels in certificates).
    pub content: String,
}

impl MeasuredEvent {
    /// The node's configuration as `content` (canonical JSON) states it.
    pub fn config(content: String) -> Self {
        Self {
            label: CONFIG_EVENT.to_owned(),
            content,
        }
    }

    /// What is extended into RTMR3: SHA-384 of the label, a zero byte and the content.
    pub fn digest(&self) -> [u8; 48] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA384);
        ctx.update(self.label.as_bytes());
        ctx.update(&[0]);
        ctx.update(self.content.as_bytes());
        ctx.finish()
            .as_ref()
            .try_into()
            .expect("SHA-384 is 48 bytes")
    }

    /// For a [`CONFIG_EVENT`]: the configuration hash policies list, hex SHA-256 of the content.
    pub fn config_hash(&self) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            self.content.as_bytes(),
        ))
    }
}

/// An RTMR extended with `digest`, as the TDX module does it: SHA-384(RTMR ‖ digest).
pub fn extend(rtmr: &[u8; 48], digest: &[u8; 48]) -> [u8; 48] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA384);
    ctx.update(rtmr);
    ctx.update(digest);
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-384 is 48 bytes")
}

/// RTMR3 after `events`, from zero at boot.
pub fn replay(events: &[MeasuredEvent]) -> [u8; 48] {
    events
        .iter()
        .fold([0; 48], |rtmr, e| extend(&rtmr, &e.digest()))
}

/// The configuration hash `events` measured, if one of them is a [`CONFIG_EVENT`] (the last,
/// if several).
pub fn config_hash(events: &[MeasuredEvent]) -> Option<String> {
    events
        .iter()
        .rev()
        .find(|e| e.label == CONFIG_EVENT)
        .map(MeasuredEvent::config_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replay is the fold of extends from zero; order and content both matter, and the
    /// label is part of what is measured.
    #[test]
    fn replay_folds_extends_in_order() {
        let a = MeasuredEvent::config("{\"role\":\"worker\"}".into());
        let b = MeasuredEvent {
            label: "other".into(),
            content: "x".into(),
        };
        let expected = extend(&extend(&[0; 48], &a.digest()), &b.digest());
        assert_eq!(replay(&[a.clone(), b.clone()]), expected);
        assert_ne!(replay(&[b.clone(), a.clone()]), expected);
        let relabelled = MeasuredEvent {
            label: "other".into(),
            ..a.clone()
        };
        assert_ne!(relabelled.digest(), a.digest());
        assert_eq!(replay(&[]), [0; 48]);
        assert_eq!(config_hash(&[a.clone(), b]), Some(a.config_hash()));
        assert_eq!(
            a.config_hash(),
            hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                b"{\"role\":\"worker\"}"
            ))
        );
    }
}
