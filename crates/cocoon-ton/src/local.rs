//! A local TON chain for development and tests: the emulated chain ([`Chain`]) served on
//! loopback in the toncenter shape, its clock following the wall clock (close delays run in
//! real time), with a faucet and a root already deployed. It lives in memory and is gone when
//! dropped: it stands in for a chain, it is not a durable ledger.

use std::sync::Arc;
use std::time::Duration;

use cocoon_ledger::{LedgerError, Network, NetworkParams, PublicKey, unix_now};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonlib_core::TonAddress;
use tycho_types::cell::HashBytes;

use crate::emulator::Chain;
use crate::ledger::TonLedger;
use crate::select::LedgerSpec;
use crate::toncenter::{self, Client};
use crate::wallet::Wallet;
use crate::{TonError, layout};

/// What the root's owner is given to deploy it with.
const OWNER_FUNDS: u128 = 1_000_000_000_000;

/// The network a local chain's root is deployed for: neither mainnet's nor testnet's id, so
/// nothing signed for a local chain applies on a public one.
pub const LOCAL_NETWORK: Network = Network::basechain(0x636f_6c63); // "colc"

/// A running local chain: the emulated chain, its toncenter-shaped API on loopback, the clock task,
/// and the root deployed on it.
pub struct LocalChain {
    chain: Arc<Mutex<Chain>>,
    api: String,
    root: TonAddress,
    tasks: Vec<JoinHandle<()>>,
}

impl LocalChain {
    /// Starts the chain and deploys a root with `params`, owned by the key in `owner_pkcs8`.
    pub async fn start(owner_pkcs8: &[u8], params: &NetworkParams) -> Result<Self, LedgerError> {
        let unreachable = |e: std::io::Error| LedgerError::Unreachable(e.to_string());
        let chain = Arc::new(Mutex::new(Chain::new(unix_now() as u32)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(unreachable)?;
        let api = format!("http://{}", listener.local_addr().map_err(unreachable)?);
        let router = toncenter::router(chain.clone());
        let serve = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "the local TON chain's API stopped");
            }
        });
        let clock = {
            let chain = chain.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    chain.lock().set_now(unix_now() as u32);
                }
            })
        };
        let owner = Wallet::from_pkcs8(owner_pkcs8, LOCAL_NETWORK)
            .map_err(|e| LedgerError::BadTransaction(e.to_string()))?;
        let mut local = Self {
            chain,
            api,
            root: owner.address().clone(),
            tasks: vec![serve, clock],
        };
        local
            .fund(&owner.public_key(), OWNER_FUNDS)
            .map_err(|e| LedgerError::Unreachable(e.to_string()))?;
        local.root = TonLedger::deploy_root(
            &Client::new(&local.api),
            &owner,
            params,
            Duration::from_secs(10),
        )
        .await?;
        tracing::warn!(api = %local.api, "LOCAL TON CHAIN: emulated in memory, not a real chain");
        Ok(local)
    }

    /// How configs name this chain's root.
    pub fn spec(&self) -> LedgerSpec {
        LedgerSpec::Ton {
            root: self.root.clone(),
            api: self.api.clone(),
        }
    }

    /// The faucet: gives the wallet bound to `key` `amount` nanoton (its gas money).
    pub fn fund(&self, key: &PublicKey, amount: u128) -> Result<(), TonError> {
        let address = layout::wallet(key, LOCAL_NETWORK)?.address;
        let hash = HashBytes(
            address
                .hash_part
                .as_slice()
                .try_into()
                .expect("account ids are 32 bytes"),
        );
        self.chain.lock().fund(hash, amount);
        Ok(())
    }

    /// The chain itself, to inspect accounts and transactions.
    pub fn chain(&self) -> &Arc<Mutex<Chain>> {
        &self.chain
    }
}

impl Drop for LocalChain {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
