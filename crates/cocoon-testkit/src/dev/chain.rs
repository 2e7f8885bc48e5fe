//! The dev network's money on TON: a local emulated chain (in memory, gone with the network)
//! running the committed contracts, with the root deployed, the proxy registered and staked
//! and the gateway's contract funded, every step sent as a wallet v5 request through the
//! toncenter-shaped API exactly as the nodes send theirs. The faucet gives each party's wallet
//! its TON. For trying the TON backend end to end; the embedded ledger stays the default.

use std::path::Path;

use cocoon_ledger::{Op, PublicKey, Tx};
use cocoon_ton::local::LocalChain;

use super::keys::{key_party, open_ledger};

use super::ledger::{CLIENT_DEPOSIT, CLIENT_STAKE, PROXY_STAKE, TON, dev_params};

/// What the faucet gives each party: its deposits and stakes, and the gas on top.
const WALLET_FUNDS: u128 = 1_000 * TON;

/// The dev network's TON chain: an in-memory emulated chain with the root deployed by the dev owner
/// key.
pub struct DevChain {
    /// How configs name the root (`ton:<root>@<API>`).
    pub spec: String,
    /// The emulated chain itself, with its toncenter-shaped API on loopback.
    pub local: LocalChain,
    owner_key_file: std::path::PathBuf,
}

impl DevChain {
    /// Starts the chain with a root owned by `dir/owner.key`, at the dev network's prices.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let owner_key_file = dir.join("owner.key");
        let (_, owner) = key_party(&owner_key_file)?;
        let local = LocalChain::start(&owner, &dev_params()).await?;
        Ok(Self {
            spec: local.spec().to_string(),
            local,
            owner_key_file,
        })
    }

    /// Gives the wallet of the key in `key_file` its TON; returns the key.
    pub fn enrol(&self, key_file: &Path) -> anyhow::Result<PublicKey> {
        let (wallet, _) = key_party(key_file)?;
        self.local.fund(&wallet.public_key(), WALLET_FUNDS)?;
        Ok(wallet.public_key())
    }

    /// Sends `op` from the wallet of the key in `key_file`, and waits for it to be confirmed.
    pub async fn exec(&self, key_file: &Path, op: Op) -> anyhow::Result<()> {
        let (wallet, key) = key_party(key_file)?;
        let ledger = open_ledger(&self.spec, wallet.clone(), &key).await?;
        ledger
            .execute(Tx {
                sender: wallet.public_key(),
                op,
                now: 0,
            })
            .await?;
        Ok(())
    }

    /// The owner allows workers to serve the model whose weights hash to `hash`.
    pub async fn allow_model(&self, hash: &str) -> anyhow::Result<()> {
        self.enrol(&self.owner_key_file)?;
        self.exec(&self.owner_key_file, Op::AllowModel { hash: hash.into() })
            .await
    }

    /// Registers the proxy of `proxy_key_file` at `address` and opens its contract.
    pub async fn open_proxy(&self, proxy_key_file: &Path, address: &str) -> anyhow::Result<()> {
        self.enrol(&self.owner_key_file)?;
        let key = self.enrol(proxy_key_file)?;
        self.exec(
            &self.owner_key_file,
            Op::RegisterProxy {
                key,
                address: address.to_owned(),
            },
        )
        .await?;
        self.exec(proxy_key_file, Op::ProxyOpen { stake: PROXY_STAKE })
            .await
    }

    /// Funds and stakes the contract of `client_key_file`'s key with `proxy`.
    pub async fn fund_client(
        &self,
        client_key_file: &Path,
        proxy: PublicKey,
    ) -> anyhow::Result<()> {
        self.enrol(client_key_file)?;
        self.exec(
            client_key_file,
            Op::ClientDeposit {
                proxy,
                amount: CLIENT_DEPOSIT,
            },
        )
        .await?;
        self.exec(
            client_key_file,
            Op::ClientStake {
                proxy,
                amount: CLIENT_STAKE,
            },
        )
        .await
    }
}
