//! Reading and printing the per-role TOML files.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Reads `path` if given, else the role's defaults. Unknown keys are errors, so a typo never
/// silently falls back to a default.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The role's defaults as TOML, for `cocoon config ROLE`.
pub fn print_defaults<T: Serialize + Default>() -> anyhow::Result<String> {
    Ok(toml::to_string_pretty(&T::default())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_client::ClientConfig;
    use cocoon_proxy::ProxyConfig;
    use cocoon_worker::WorkerConfig;

    fn round_trip<T: Serialize + DeserializeOwned + Default>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, print_defaults::<T>().unwrap()).unwrap();
        load::<T>(Some(&path)).unwrap();
    }

    #[test]
    fn printed_defaults_load_back() {
        round_trip::<WorkerConfig>();
        round_trip::<ProxyConfig>();
        round_trip::<ClientConfig>();
    }

    #[test]
    fn typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nproxy_adr = \"x\"\n").unwrap();
        let err = load::<ClientConfig>(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("proxy_adr"), "{err}");
    }

    #[test]
    fn shipped_example_configs_load() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config");
        load::<WorkerConfig>(Some(&docs.join("worker.toml"))).unwrap();
        load::<ProxyConfig>(Some(&docs.join("proxy.toml"))).unwrap();
        load::<ClientConfig>(Some(&docs.join("client.toml"))).unwrap();
    }
}
