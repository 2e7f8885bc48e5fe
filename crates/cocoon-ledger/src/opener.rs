//! How a role comes by its ledger: it is handed a [`LedgerOpener`] by whoever starts it (the
//! binary), so the roles name no backend and the chain code is linked only where it is chosen.

use std::sync::Arc;

use crate::ledger::Ledger;
use crate::wallet::Wallet;

/// Opens the ledger a `[payments] ledger` setting names, acting as the party whose key is
/// `key_pkcs8` (`wallet` is the same key, for the embedded ledger's signed transactions).
/// The error names the setting and what is wrong with it.
#[async_trait::async_trait]
pub trait LedgerOpener: Send + Sync {
    /// Opens the ledger that `spec`, the setting's value, names; `Err` says what is wrong.
    async fn open(
        &self,
        spec: &str,
        wallet: Arc<Wallet>,
        key_pkcs8: &[u8],
    ) -> Result<Arc<dyn Ledger>, String>;
}

/// Opens only the embedded ledger's [`service`](crate::service) (an `http(s)://` URL), as a
/// [`RemoteLedger`](crate::RemoteLedger); any other setting is refused.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceOpener;

#[cfg(feature = "http")]
#[async_trait::async_trait]
impl LedgerOpener for ServiceOpener {
    async fn open(
        &self,
        spec: &str,
        wallet: Arc<Wallet>,
        _key_pkcs8: &[u8],
    ) -> Result<Arc<dyn Ledger>, String> {
        if !(spec.starts_with("http://") || spec.starts_with("https://")) {
            return Err(format!(
                "[payments] ledger {spec}: only the embedded ledger's service (http(s)://…) \
                 can be opened here"
            ));
        }
        Ok(Arc::new(crate::remote::RemoteLedger::new(
            spec,
            Some(wallet),
        )))
    }
}

#[cfg(all(test, feature = "http"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn service_opener_refuses_what_is_not_the_service() {
        let wallet = Arc::new(Wallet::from_seed([1; 32]));
        for bad in ["ton:0:00@http://127.0.0.1:1", "127.0.0.1:9100", ""] {
            let refused = ServiceOpener.open(bad, wallet.clone(), &[]).await;
            assert!(refused.is_err(), "{bad} opened");
        }
        assert!(
            ServiceOpener
                .open("http://127.0.0.1:9100", wallet, &[])
                .await
                .is_ok()
        );
    }
}
