//! Keys from key files, and the ledgers the dev network's parties open with them.

use std::path::Path;
use std::sync::Arc;

use cocoon_ledger::{Ledger, LedgerOpener, Wallet};

/// The ledgers a dev network can be on: its embedded ledger's service, or a TON root on its
/// local chain.
pub const LEDGERS: &dyn LedgerOpener = &cocoon_ton::Opener;

/// The key in `key_file` (created if missing) as a wallet and as PKCS#8 (for a chain wallet).
pub fn key_party(key_file: &Path) -> anyhow::Result<(Arc<Wallet>, Vec<u8>)> {
    let identity = cocoon_tls::Identity::load_or_create(key_file, "cocoon")?;
    Ok((
        Arc::new(Wallet::new(identity.signing_key())),
        identity.key_pkcs8(),
    ))
}

/// The key in `key_file` as a wallet, created if missing.
pub fn key_wallet(key_file: &Path) -> anyhow::Result<Arc<Wallet>> {
    Ok(key_party(key_file)?.0)
}

/// The ledger `spec` names, opened as the party with `wallet`'s key.
pub async fn open_ledger(
    spec: &str,
    wallet: Arc<Wallet>,
    key_pkcs8: &[u8],
) -> anyhow::Result<Arc<dyn Ledger>> {
    LEDGERS
        .open(spec, wallet, key_pkcs8)
        .await
        .map_err(anyhow::Error::msg)
}
