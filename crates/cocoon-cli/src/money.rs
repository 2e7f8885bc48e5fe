//! The money commands: `cocoon ledger` (run the embedded ledger as a service, read it, send it
//! any signed operation) and the client's and worker's account commands. Amounts are given and
//! shown in TON with up to nine decimals; the ledger counts nanoton.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cocoon_client::ClientConfig;
use cocoon_ledger::{
    Address, ClientContract, EmbeddedLedger, Ledger, Nanoton, Op, PublicKey, Tx, Wallet,
};
use serde_json::{Value, json};

const NANOTON_PER_TON: Nanoton = 1_000_000_000;

/// An amount of TON as typed: `12`, `0.5`, `1.000000001`.
pub fn parse_ton(text: &str) -> anyhow::Result<Nanoton> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    anyhow::ensure!(
        !whole.is_empty() || !frac.is_empty(),
        "'{text}' is not an amount of TON"
    );
    anyhow::ensure!(
        whole.bytes().all(|b| b.is_ascii_digit()) && frac.bytes().all(|b| b.is_ascii_digit()),
        "'{text}' is not an amount of TON"
    );
    anyhow::ensure!(frac.len() <= 9, "'{text}': TON has nine decimals at most");
    let whole: Nanoton = if whole.is_empty() { 0 } else { whole.parse()? };
    let frac: Nanoton = format!("{frac:0<9}").parse()?;
    whole
        .checked_mul(NANOTON_PER_TON)
        .and_then(|n| n.checked_add(frac))
        .ok_or_else(|| anyhow::anyhow!("'{text}' is too large"))
}

/// Nanoton as TON, every decimal kept.
pub fn format_ton(n: Nanoton) -> String {
    format!("{}.{:09}", n / NANOTON_PER_TON, n % NANOTON_PER_TON)
}

/// A party's wallet: the Ed25519 key in its key file (the same key its TLS identity uses).
/// The file must exist: a typo must not quietly sign with a fresh key.
pub fn wallet(key_file: &Path) -> anyhow::Result<Arc<Wallet>> {
    anyhow::ensure!(
        key_file.exists(),
        "key file {} does not exist",
        key_file.display()
    );
    key_wallet(key_file)
}

/// The existing key in `key_file`, as a wallet and as PKCS#8 (for a chain wallet).
fn party(key_file: &Path) -> anyhow::Result<(Arc<Wallet>, Vec<u8>)> {
    wallet(key_file)?;
    key_party(key_file)
}

// Key files become wallets, and ledger settings ledgers, the same way for the binary's roles
// and for the dev network: both take the embedded ledger's service and TON roots
// (`cocoon_ton::Opener`).
pub use cocoon_testkit::dev::keys::{LEDGERS, key_party, key_wallet, open_ledger};

fn decode_key(text: &str) -> anyhow::Result<PublicKey> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key)
        .map_err(|_| anyhow::anyhow!("'{text}' is not a 32-byte hex public key"))?;
    Ok(key)
}

/// `cocoon ledger serve`: the embedded ledger at `db`, owned by the key in `owner_key_file`
/// (created if missing), served until `shutdown`.
pub async fn serve_ledger(
    db: &Path,
    owner_key_file: &Path,
    listen: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let owner = key_wallet(owner_key_file)?.public_key();
    let ledger = Arc::new(EmbeddedLedger::open(db, owner)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!(
        "ledger {} on http://{} (registry owner {})",
        db.display(),
        listener.local_addr()?,
        hex::encode(owner)
    );
    cocoon_ledger::service::serve(ledger, listener, shutdown).await?;
    Ok(())
}

/// `cocoon ledger exec`: sends one operation (JSON, as in `docs/ledger.md`) signed with the
/// key in `key_file`.
pub async fn exec(url: &str, key_file: &Path, op: &str) -> anyhow::Result<Value> {
    let op: Op = serde_json::from_str(op).map_err(|e| anyhow::anyhow!("bad operation: {e}"))?;
    let (wallet, key) = party(key_file)?;
    let ledger = open_ledger(url, wallet.clone(), &key).await?;
    let receipt = ledger
        .execute(Tx {
            sender: wallet.public_key(),
            op,
            now: 0,
        })
        .await?;
    Ok(serde_json::to_value(receipt)?)
}

/// The code files of `cocoon ledger upgrade`; `None`: this build's committed code.
#[derive(Debug, Default)]
pub struct Codes {
    /// New proxy contracts' code.
    pub proxy: Option<PathBuf>,
    /// New client contracts' code.
    pub client: Option<PathBuf>,
    /// New worker contracts' code.
    pub worker: Option<PathBuf>,
    /// The root's own code.
    pub root: Option<PathBuf>,
}

/// The root owner's code upgrades on the TON root `spec` names: `SetCodes` when any contract
/// code is given, then `UpgradeRoot` when the root's is. What was done, with each code's hash.
pub async fn upgrade(spec: &str, key_file: &Path, codes: Codes) -> anyhow::Result<Value> {
    use cocoon_ton::code::{Contract, parse_boc};
    let read = |file: &Path| -> anyhow::Result<tonlib_core::cell::ArcCell> {
        let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        parse_boc(&bytes).map_err(|e| anyhow::anyhow!("{}: not a code BOC: {e}", file.display()))
    };
    let code_or = |file: &Option<PathBuf>, committed: Contract| match file {
        Some(f) => read(f),
        None => Ok(committed.code()),
    };
    anyhow::ensure!(
        codes.proxy.is_some()
            || codes.client.is_some()
            || codes.worker.is_some()
            || codes.root.is_some(),
        "nothing to upgrade: give --proxy-code, --client-code, --worker-code or --root-code"
    );
    let parsed: cocoon_ton::LedgerSpec = spec.parse().map_err(anyhow::Error::msg)?;
    let (_, key) = party(key_file)?;
    let ledger = parsed.open_ton(&key).await?;
    let hash = |c: &tonlib_core::cell::ArcCell| c.cell_hash().to_hex();
    let mut done = serde_json::Map::new();
    if codes.proxy.is_some() || codes.client.is_some() || codes.worker.is_some() {
        let proxy = code_or(&codes.proxy, Contract::Proxy)?;
        let client = code_or(&codes.client, Contract::Client)?;
        let worker = code_or(&codes.worker, Contract::Worker)?;
        ledger.set_codes(&proxy, &client, &worker).await?;
        done.insert(
            "set_codes".into(),
            serde_json::json!({"proxy": hash(&proxy), "client": hash(&client), "worker": hash(&worker)}),
        );
    }
    if let Some(file) = &codes.root {
        let root = read(file)?;
        ledger.upgrade_root(&root).await?;
        done.insert(
            "upgrade_root".into(),
            serde_json::json!({"root": hash(&root)}),
        );
    }
    Ok(Value::Object(done))
}

/// What the client commands act on.
pub struct ClientAccount {
    ledger: Arc<dyn Ledger>,
    wallet: Arc<Wallet>,
    proxy: PublicKey,
    config: ClientConfig,
    key_file: PathBuf,
}

/// The client's side of its contract: flags override `client.toml`.
#[derive(Debug, Clone, clap::Args)]
pub struct AccountOptions {
    /// The client's configuration (key file, proxy, `[payments]`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The ledger (its service URL, or `ton:<root>@<API URL>`), instead of `[payments] ledger`.
    #[arg(long)]
    pub ledger: Option<String>,
    /// The client's key file, instead of `key_file`.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The proxy's public key (hex), instead of `[payments] proxy_key` or the registry's
    /// proxy at `proxy_addr`.
    #[arg(long)]
    pub proxy_key: Option<String>,
}

/// What the client can do with its contract.
#[derive(Debug, Clone, Copy)]
pub enum ClientAction {
    /// Brings this many nanotons into the contract, opening it if new.
    Deposit(Nanoton),
    /// Locks this many more nanotons of the balance as stake.
    Stake(Nanoton),
    /// Takes this many nanotons out of the balance, down to no less than the stake.
    Withdraw(Nanoton),
    /// Through the proxy: everything back at once.
    Close,
    /// Without the proxy: above the stake now, the stake after the delay.
    CloseUnilateral,
    /// After the close delay, pays out what is left and closes the contract.
    FinishClose,
    /// Changes nothing: only reports the contract.
    Balance,
}

impl ClientAccount {
    /// This client's contract with `proxy`, as the ledger names it.
    async fn address(&self, proxy: &PublicKey) -> anyhow::Result<Address> {
        Ok(self
            .ledger
            .client_address(proxy, &self.wallet.public_key())
            .await?)
    }

    /// Opens the ledger with the client's key and finds the proxy: from the options, the
    /// config, or the registry entry at `proxy_addr`.
    pub async fn open(options: &AccountOptions) -> anyhow::Result<Self> {
        let config: ClientConfig = crate::config::load(options.config.as_deref())?;
        let url = options
            .ledger
            .clone()
            .or(config.payments.ledger.clone())
            .ok_or_else(|| anyhow::anyhow!("no ledger: set [payments] ledger or --ledger"))?;
        let key_file = options.key_file.clone().or(config.key_file.clone()).ok_or_else(|| {
            anyhow::anyhow!(
                "no key file: the contract is bound to the gateway's key, set key_file or --key-file"
            )
        })?;
        let (wallet, key) = party(&key_file)?;
        let ledger = open_ledger(&url, wallet.clone(), &key).await?;
        let proxy = match options
            .proxy_key
            .as_ref()
            .or(config.payments.proxy_key.as_ref())
        {
            Some(k) => decode_key(k)?,
            None => {
                let state = ledger.snapshot().await?;
                let found = state
                    .registry
                    .proxies
                    .iter()
                    .find(|(_, addr)| **addr == config.proxy_addr)
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "no registered proxy at {}: give --proxy-key",
                            config.proxy_addr
                        )
                    })?;
                decode_key(&found)?
            }
        };
        Ok(Self {
            ledger,
            wallet,
            proxy,
            config,
            key_file,
        })
    }

    /// Asks the proxy, over RA-TLS as the gateway would connect, to close and refund.
    async fn close_through_proxy(&self) -> anyhow::Result<cocoon_protocol::Refund> {
        let identity = Arc::new(self.config.attester.identity(
            Some(&self.key_file),
            "cocoon-client",
            "client",
            None,
        )?);
        let collateral = cocoon_collateral::NodeCollateral::prepare(&self.config.collateral)?;
        // As the gateway: with the registry's proxy images, the registry is asked too.
        let from_registry = self.config.payments.proxy_images_from_registry;
        let policy = self
            .config
            .proxy_policy
            .registry_images(from_registry)
            .build_with("proxy_policy", "proxy", &collateral.store)?;
        let _collateral = collateral.start().await;
        let mut link =
            cocoon_client::ProxyLink::new(self.config.proxy_addr.clone(), identity, policy);
        if from_registry {
            link = link.with_registry(self.ledger.clone());
        }
        link.close_contract().await.map_err(|e| {
            anyhow::anyhow!(
                "{}; if the proxy is down, `cocoon client close --unilateral` gets back what \
                 is above the stake now and the stake after the close delay",
                e.message
            )
        })
    }

    /// Runs `action` and reports the contract afterwards.
    pub async fn run(&self, action: ClientAction) -> anyhow::Result<Value> {
        let proxy = self.proxy;
        if let ClientAction::Close = action {
            let refund = self.close_through_proxy().await?;
            let contract = self.ledger.client(proxy, self.wallet.public_key()).await?;
            let mut report = contract_report(self.address(&proxy).await?, contract.as_ref());
            report["refunded_ton"] = json!(format_ton(Nanoton::from(refund.refunded)));
            return Ok(report);
        }
        let op = match action {
            ClientAction::Deposit(amount) => Some(Op::ClientDeposit { proxy, amount }),
            ClientAction::Stake(amount) => Some(Op::ClientStake { proxy, amount }),
            ClientAction::Withdraw(amount) => Some(Op::ClientWithdraw { proxy, amount }),
            ClientAction::Close | ClientAction::CloseUnilateral => Some(Op::ClientClose { proxy }),
            ClientAction::FinishClose => Some(Op::ClientFinishClose { proxy }),
            ClientAction::Balance => None,
        };
        let receipt = match op {
            Some(op) => Some(
                self.ledger
                    .execute(Tx {
                        sender: self.wallet.public_key(),
                        op,
                        now: 0,
                    })
                    .await?,
            ),
            None => None,
        };
        let contract = self.ledger.client(proxy, self.wallet.public_key()).await?;
        let mut report = contract_report(self.address(&proxy).await?, contract.as_ref());
        if let Some(r) = receipt {
            report["paid_out_ton"] = json!(format_ton(r.paid_out));
            report["deposited_ton"] = json!(format_ton(r.deposited));
        }
        Ok(report)
    }
}

fn contract_report(address: Address, contract: Option<&ClientContract>) -> Value {
    let address = address.to_string();
    match contract {
        None => json!({"contract": address, "exists": false}),
        Some(c) => json!({
            "contract": address,
            "exists": true,
            "proxy": hex::encode(c.proxy),
            "client": hex::encode(c.client),
            "balance_ton": format_ton(c.balance),
            "stake_ton": format_ton(c.stake),
            "balance": c.balance.to_string(),
            "stake": c.stake.to_string(),
            "tokens_used": c.tokens_used,
            "state": c.state,
        }),
    }
}

/// The worker's payout store, and a task claiming its payouts when a ledger is configured.
/// Payouts are bound to the worker's key, so they are kept only with a `key_file`.
pub async fn worker_payouts(
    config: &cocoon_worker::WorkerConfig,
    identity: &cocoon_tls::Identity,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<Arc<cocoon_worker::PayoutStore>>> {
    let payments = &config.payments;
    if config.key_file.is_none() {
        anyhow::ensure!(
            payments.ledger.is_none(),
            "[payments] needs a key_file: payouts are bound to the worker's key"
        );
        tracing::warn!("no key_file: this worker's key lives one run, so it keeps no payouts");
        return Ok(None);
    }
    let wallet = Arc::new(Wallet::new(identity.signing_key()));
    let store = cocoon_worker::PayoutStore::open(&payments.payout_file, wallet.public_key())?;
    let Some(url) = &payments.ledger else {
        return Ok(Some(Arc::new(store)));
    };
    let ledger = open_ledger(url, wallet, &identity.key_pkcs8()).await?;
    let store = Arc::new(store.with_ledger(ledger.clone()));
    tokio::spawn(cocoon_worker::claim_loop(
        store.clone(),
        ledger,
        std::time::Duration::from_secs(payments.claim_interval_secs.max(1)),
        shutdown,
    ));
    Ok(Some(store))
}

/// The ledger a worker reads the registry's proxy images from, with `[payments]
/// proxy_images_from_registry`; `None` without it.
pub async fn worker_registry(
    config: &cocoon_worker::WorkerConfig,
    identity: &cocoon_tls::Identity,
) -> anyhow::Result<Option<Arc<dyn cocoon_ledger::Ledger>>> {
    if !config.payments.proxy_images_from_registry {
        return Ok(None);
    }
    let secs = config.payments.registry_refresh_secs;
    anyhow::ensure!(
        (1..=3600).contains(&secs),
        "[payments] registry_refresh_secs is 1 to 3600: how long the worker may keep serving a \
         revoked proxy"
    );
    let url = config.payments.ledger.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "[payments] proxy_images_from_registry needs a ledger: it reads the registry"
        )
    })?;
    let wallet = Arc::new(Wallet::new(identity.signing_key()));
    Ok(Some(open_ledger(url, wallet, &identity.key_pkcs8()).await?))
}

/// `cocoon worker withdraw`: claims the kept payouts, then withdraws the earnings held by each
/// proxy's worker contract.
pub async fn worker_withdraw(config: &cocoon_worker::WorkerConfig) -> anyhow::Result<Value> {
    let url = config
        .payments
        .ledger
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no ledger: set [payments] ledger"))?;
    let key_file = config
        .key_file
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no key_file: payouts are bound to the worker's key"))?;
    let (wallet, key) = party(key_file)?;
    let ledger = open_ledger(url, wallet.clone(), &key).await?;
    let store =
        cocoon_worker::PayoutStore::open(&config.payments.payout_file, wallet.public_key())?
            .with_ledger(ledger.clone());
    let claimed = store.claim(ledger.as_ref()).await?;
    let mut withdrawn = serde_json::Map::new();
    for proxy in store.owed().keys() {
        let proxy_key = decode_key(proxy)?;
        let result = ledger
            .execute(Tx {
                sender: wallet.public_key(),
                op: Op::WorkerWithdraw { proxy: proxy_key },
                now: 0,
            })
            .await;
        let value = match result {
            Ok(r) => json!(format_ton(r.paid_out)),
            Err(cocoon_ledger::LedgerError::ZeroAmount) => json!(format_ton(0)),
            Err(e) => return Err(e.into()),
        };
        withdrawn.insert(proxy.clone(), value);
    }
    Ok(json!({"claimed": claimed, "withdrawn_ton": withdrawn}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ton_amounts_parse_exactly() {
        assert_eq!(parse_ton("1").unwrap(), 1_000_000_000);
        assert_eq!(parse_ton("0.5").unwrap(), 500_000_000);
        assert_eq!(parse_ton(".000000001").unwrap(), 1);
        assert_eq!(parse_ton("12.25").unwrap(), 12_250_000_000);
        for bad in ["", ".", "1.0000000001", "-1", "1e9", "1,5", "x"] {
            assert!(parse_ton(bad).is_err(), "{bad}");
        }
        assert_eq!(format_ton(12_250_000_000), "12.250000000");
        assert_eq!(format_ton(1), "0.000000001");
    }
}
