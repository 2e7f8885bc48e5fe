//! Which ledger a `ledger = "…"` setting names, and opening it with a party's key. One string
//! serves every role's config: an `http(s)://` URL is the embedded ledger's service, and
//! `ton:<root address>@<toncenter API base>` is the root contract on a TON chain. [`Opener`]
//! is how a binary hands both to the roles.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cocoon_ledger::{Ledger, LedgerError, LedgerOpener, RemoteLedger};
use tonlib_core::TonAddress;

use crate::ledger::TonLedger;
use crate::toncenter::{self, Client};
use crate::wallet::Wallet;

/// The environment variable that holds the toncenter API key a `ton:` ledger sends (as
/// `X-API-Key`); a key has no place in a config file that is shared or logged.
pub const API_KEY_VAR: &str = "COCOON_TONCENTER_API_KEY";

/// A parsed `ledger` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerSpec {
    /// The embedded ledger behind `cocoon ledger serve`.
    Service(String),
    /// The root contract at `root`, reached through a toncenter-shaped API at `api`.
    Ton {
        /// Address of the network's root contract.
        root: TonAddress,
        /// Base URL of the toncenter v2 API, without a trailing slash.
        api: String,
    },
}

impl FromStr for LedgerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("ton:") {
            let (root, api) = rest.split_once('@').ok_or_else(|| {
                format!("'{s}': a TON ledger is ton:<root address>@<toncenter API URL>")
            })?;
            let root = TonAddress::from_str(root)
                .map_err(|e| format!("'{root}' is not a TON address: {e}"))?;
            if !(api.starts_with("http://") || api.starts_with("https://")) {
                return Err(format!("'{api}': the TON API must be an http(s) URL"));
            }
            return Ok(Self::Ton {
                root,
                api: api.trim_end_matches('/').to_owned(),
            });
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Self::Service(s.to_owned()));
        }
        Err(format!(
            "'{s}' names no ledger: use http(s)://… for the embedded ledger's service or \
             ton:<root address>@<toncenter API URL> for TON"
        ))
    }
}

impl fmt::Display for LedgerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(url) => f.write_str(url),
            Self::Ton { root, api } => write!(f, "ton:{}@{api}", toncenter::raw(root)),
        }
    }
}

impl LedgerSpec {
    /// Opens the ledger as the party whose key is `key_pkcs8` (`wallet` is the same key, for
    /// the embedded ledger's signed transactions). A TON ledger reads the root's parameters
    /// first, so an unreachable chain or a wrong root fails here, not at the first payment; it
    /// sends the API key in [`API_KEY_VAR`] when that is set.
    pub async fn open(
        &self,
        wallet: Arc<cocoon_ledger::Wallet>,
        key_pkcs8: &[u8],
    ) -> Result<Arc<dyn Ledger>, LedgerError> {
        match self {
            Self::Service(url) => Ok(Arc::new(RemoteLedger::new(url, Some(wallet)))),
            Self::Ton { .. } => {
                let ledger = self.open_ton(key_pkcs8).await?;
                if ledger.wallet_key() != wallet.public_key() {
                    return Err(LedgerError::BadTransaction(
                        "the TON wallet's key is not the party's key".into(),
                    ));
                }
                Ok(Arc::new(ledger))
            }
        }
    }

    /// Opens a TON root as the party whose key is `key_pkcs8`, as the concrete [`TonLedger`]
    /// (for what only a chain does, such as the owner's code upgrades); an error for the
    /// embedded ledger's service.
    pub async fn open_ton(&self, key_pkcs8: &[u8]) -> Result<TonLedger, LedgerError> {
        let Self::Ton { root, api } = self else {
            return Err(LedgerError::BadTransaction(format!(
                "{self} is the embedded ledger's service, not a TON root"
            )));
        };
        let mut client = Client::new(api);
        if let Ok(key) = std::env::var(API_KEY_VAR)
            && !key.is_empty()
        {
            client = client
                .with_api_key(&key)
                .map_err(|e| LedgerError::BadTransaction(format!("{API_KEY_VAR}: {e}")))?;
        }
        // The wallet's id, hence its address, depends on the network the root is on.
        let network = TonLedger::network_of(&client, root).await?;
        let ton_wallet = Wallet::from_pkcs8(key_pkcs8, network)
            .map_err(|e| LedgerError::BadTransaction(e.to_string()))?;
        Ok(TonLedger::connect(client, ton_wallet, root.clone())
            .await?
            .with_confirm_timeout(Duration::from_secs(60)))
    }
}

/// Parses the `[payments] ledger` setting `spec` and opens it (see [`LedgerSpec::open`]); the
/// error names the setting and what is wrong with it.
pub async fn open_ledger(
    spec: &str,
    wallet: Arc<cocoon_ledger::Wallet>,
    key_pkcs8: &[u8],
) -> Result<Arc<dyn Ledger>, String> {
    let parsed: LedgerSpec = spec
        .parse()
        .map_err(|e| format!("[payments] ledger: {e}"))?;
    parsed
        .open(wallet, key_pkcs8)
        .await
        .map_err(|e| format!("[payments] ledger {spec}: {e}"))
}

/// Opens every ledger a setting can name, as [`open_ledger`] does: the embedded ledger's
/// service and TON roots.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opener;

#[async_trait::async_trait]
impl LedgerOpener for Opener {
    async fn open(
        &self,
        spec: &str,
        wallet: Arc<cocoon_ledger::Wallet>,
        key_pkcs8: &[u8],
    ) -> Result<Arc<dyn Ledger>, String> {
        open_ledger(spec, wallet, key_pkcs8).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let root = format!("0:{}", "ab".repeat(32));
        let ton: LedgerSpec = format!("ton:{root}@http://127.0.0.1:8081/")
            .parse()
            .unwrap();
        assert_eq!(ton.to_string(), format!("ton:{root}@http://127.0.0.1:8081"));
        assert!(matches!(ton, LedgerSpec::Ton { ref api, .. } if api == "http://127.0.0.1:8081"));
        let service: LedgerSpec = "http://127.0.0.1:9100".parse().unwrap();
        assert_eq!(service, LedgerSpec::Service("http://127.0.0.1:9100".into()));
        for bad in [
            "ton:http://127.0.0.1:8081",
            "ton:nonsense@http://x",
            &format!("ton:{root}@ftp://x"),
            "127.0.0.1:9100",
        ] {
            assert!(bad.parse::<LedgerSpec>().is_err(), "{bad} parsed");
        }
    }
}
