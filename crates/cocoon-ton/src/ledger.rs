//! The TON [`Ledger`] backend: each operation becomes a message from the party's wallet to the
//! contract that owns the rule (root, proxy, client or worker contract), signed with wallet v5
//! by tonlib-core and sent through a toncenter-shaped API. `execute` returns once the target
//! contract's transaction caused by that very message (found by message hash) is seen: a refusal
//! comes back as the contract's exit code, mapped to the same [`LedgerError`] the embedded
//! ledger gives.

use std::collections::HashMap;
use std::time::Duration;

use cocoon_ledger::{
    Address, ClientContract, ContractState, ImageRole, Ledger, LedgerError, LedgerState, Network,
    NetworkParams, Op, ProxyContract, PublicKey, Receipt, Tx, WorkerContract,
};
use num_bigint::BigInt;
use tonlib_core::TonAddress;
use tonlib_core::cell::{ArcCell, CellBuilder};

use crate::code::Contract;
use crate::error::TonError;
use crate::layout::{self, coins, op};
use crate::toncenter::{Client, Compute, TxInfo};
use crate::wallet::{Outgoing, Wallet};

/// TON attached to every message beyond the amount it books: gas for the chain of messages it
/// sets off. The contracts refuse less (`MIN_VALUE`, 0.1 TON) before they change anything, and
/// send back what the chain did not spend.
pub const GAS_ATTACHED: u128 = 100_000_000;

/// How long a proxy contract's terms, once read, are taken as they were (see `TonLedger::terms`).
const TERMS_TTL: Duration = Duration::from_secs(60);

/// The [`Ledger`] on TON: one party's wallet sending operations to the contracts under one root,
/// through a toncenter-shaped API.
pub struct TonLedger {
    api: Client,
    wallet: Wallet,
    root: TonAddress,
    /// The root's network id (set at its deploy) on the root's workchain.
    network: Network,
    params: NetworkParams,
    confirm_timeout: Duration,
    /// How long a proxy contract's terms and address, once read, are taken as they were.
    terms_ttl: Duration,
    /// One request at a time from the wallet: each takes the next seqno.
    sending: tokio::sync::Mutex<()>,
    /// Contracts' account ids by (proxy, party): each is a few cells built and hashed, and
    /// the proxy names a client's and a worker's contract in every bill.
    /// Each name is kept with the terms and the proxy contract it was derived from, and derived
    /// again if either changes.
    names: parking_lot::Mutex<HashMap<NameKey, (NetworkParams, TonAddress, Address)>>,
    /// The parameters each open proxy contract holds, as read from it, and when: a proxy's
    /// client and worker contracts are bound to these, not to the root's current ones. They
    /// change only when the proxy closes and opens again (which takes its close delay), so they
    /// are read again after [`TERMS_TTL`].
    terms: parking_lot::Mutex<HashMap<PublicKey, (NetworkParams, tokio::time::Instant)>>,
    /// Each proxy's contract address as the root reports it (the contract it opened, which the
    /// root records because the proxy code may be upgraded while it runs), read again after
    /// [`TERMS_TTL`] and whenever this party's own proxy opens or closes.
    proxies: parking_lot::Mutex<HashMap<PublicKey, (TonAddress, tokio::time::Instant)>>,
}

/// Whose contract a name is for: (role, proxy, party).
type NameKey = (Role, PublicKey, PublicKey);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Client,
    Worker,
}

fn unreachable(e: TonError) -> LedgerError {
    LedgerError::Unreachable(e.to_string())
}

/// A code cell's hash as a get-method returns it.
fn code_hash(contract: Contract) -> BigInt {
    BigInt::from_bytes_be(
        num_bigint::Sign::Plus,
        contract.code().cell_hash().as_slice(),
    )
}

fn u128_of(v: &BigInt) -> u128 {
    u128::try_from(v).unwrap_or(0)
}

/// A contract's state and unlock time as its get-method returns them.
fn contract_state(state: &BigInt, unlock_at: &BigInt) -> ContractState {
    match u128_of(state) as u64 {
        layout::STATE_NORMAL => ContractState::Normal,
        layout::STATE_CLOSING => ContractState::Closing {
            unlock_at: u128_of(unlock_at) as u64,
        },
        _ => ContractState::Closed,
    }
}

/// A contract's refusal (its exit code) as the ledger's error.
pub fn refusal(code: i32, at: Address) -> LedgerError {
    match code {
        100 => LedgerError::NotOwner,
        101 => LedgerError::NotAllowed(at),
        102 => LedgerError::UnknownProxy,
        103 => LedgerError::AlreadyExists(at),
        104 => LedgerError::NotOpen(at),
        105 => LedgerError::AlreadyClosing(at),
        106 => LedgerError::NotClosing(at),
        107 => LedgerError::StillLocked {
            address: at,
            unlock_at: 0,
            now: 0,
        },
        108 => LedgerError::ZeroAmount,
        109 => LedgerError::InsufficientBalance {
            balance: 0,
            needed: 0,
        },
        110 => LedgerError::BelowStake {
            amount: 0,
            left: 0,
            stake: 0,
        },
        111 => LedgerError::StakeTooLow { stake: 0, min: 0 },
        112 => LedgerError::CounterNotIncreasing { stored: 0, got: 0 },
        113 => LedgerError::WrongContract {
            this: at,
            expected_in_message: at,
        },
        114 => LedgerError::BadMessage("signature does not verify under the proxy's key".into()),
        115 => LedgerError::BadMessage("a payment message of the wrong kind".into()),
        116 => LedgerError::BadParams("refused by the root".into()),
        117 => LedgerError::BadTransaction(
            "not enough TON attached: the amount plus at least 0.1 TON for gas".into(),
        ),
        121 => LedgerError::BadTransaction(
            "the worker contract's previous payout request has not come back yet; retry".into(),
        ),
        122 => LedgerError::BadMessage("signed for another network or workchain".into()),
        other => LedgerError::BadTransaction(format!("contract exited with code {other}")),
    }
}

impl TonLedger {
    /// Connects to the root at `root` and reads the network and its parameters from it.
    /// `wallet` must be the party's wallet on that network (see [`TonLedger::network_of`]).
    pub async fn connect(
        api: Client,
        wallet: Wallet,
        root: TonAddress,
    ) -> Result<Self, LedgerError> {
        let network = Self::network_of(&api, &root).await?;
        if wallet.network() != network {
            return Err(LedgerError::BadTransaction(format!(
                "the wallet is for {}, the root {} is on {network}",
                wallet.network(),
                crate::toncenter::raw(&root)
            )));
        }
        let mut ledger = Self {
            api,
            wallet,
            root,
            network,
            params: NetworkParams::default(),
            confirm_timeout: Duration::from_secs(60),
            terms_ttl: TERMS_TTL,
            sending: tokio::sync::Mutex::new(()),
            names: parking_lot::Mutex::new(HashMap::new()),
            terms: parking_lot::Mutex::new(HashMap::new()),
            proxies: parking_lot::Mutex::new(HashMap::new()),
        };
        ledger.params = ledger.read_params().await?;
        Ok(ledger)
    }

    /// The network of the root at `root`: the id it was deployed with, on its workchain. Warns
    /// when the root hands new proxies code this build does not know (after an upgrade): their
    /// contracts are then refused here, with a clear error, until cocoon is upgraded too.
    pub async fn network_of(api: &Client, root: &TonAddress) -> Result<Network, LedgerError> {
        let v = api
            .run_get_method(root, "get_network", &[])
            .await
            .map_err(unreachable)?;
        let [id, proxy, client, worker] = v.as_slice() else {
            return Err(LedgerError::Unreachable(
                "root get_network returned an unexpected stack".into(),
            ));
        };
        let id = i32::try_from(id).map_err(|_| {
            LedgerError::Unreachable(format!("root get_network: network id {id} is not an int32"))
        })?;
        for (contract, held) in [
            (Contract::Proxy, proxy),
            (Contract::Client, client),
            (Contract::Worker, worker),
        ] {
            if *held != code_hash(contract) {
                tracing::warn!(
                    contract = contract.name(),
                    held = %format!("{held:x}"),
                    "the root deploys {} code this build does not know: contracts opened with it \
                     will be refused here until cocoon is upgraded",
                    contract.name()
                );
            }
        }
        // The root deploys every proxy contract, and clients and workers theirs, on the
        // basechain, wherever the root itself lives: that is the workchain messages name.
        Ok(Network::basechain(id))
    }

    /// The network this ledger's root is on.
    pub fn network(&self) -> Network {
        self.network
    }

    /// How long a proxy contract's terms and address, once read, are taken as they were before
    /// they are read again (a minute by default).
    pub fn with_terms_ttl(mut self, ttl: Duration) -> Self {
        self.terms_ttl = ttl;
        self
    }

    /// How long `execute` waits for the target contract's transaction before giving up (60 s by
    /// default).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Deploys a root owned by `owner`'s wallet (the network's first transaction) and returns
    /// its address.
    pub async fn deploy_root(
        api: &Client,
        owner: &Wallet,
        params: &NetworkParams,
        timeout: Duration,
    ) -> Result<TonAddress, LedgerError> {
        let root = layout::root(owner.address(), params, owner.network()).map_err(unreachable)?;
        let out = Outgoing {
            dest: root.address.clone(),
            value: 1_000_000_000,
            body: layout::empty_cell(),
            state_init: Some(root.state_init),
        };
        send_and_confirm(api, owner, out, timeout).await?;
        Ok(root.address)
    }

    async fn read_params(&self) -> Result<NetworkParams, LedgerError> {
        let v = self
            .api
            .run_get_method(&self.root, "get_params", &[])
            .await
            .map_err(unreachable)?;
        params_of(&v).ok_or_else(|| {
            LedgerError::Unreachable("root get_params returned an unexpected stack".into())
        })
    }

    /// The parameters `proxy`'s contract was opened with, which its client and worker contracts
    /// are bound to (a later `SetParams` at the root applies only to proxies opened after it).
    async fn terms(&self, proxy: &PublicKey) -> Result<NetworkParams, LedgerError> {
        if let Some((terms, read)) = self.terms.lock().get(proxy)
            && read.elapsed() < self.terms_ttl
        {
            return Ok(terms.clone());
        }
        let at = self.proxy_contract(proxy).await?;
        // A contract that is not open has no parameters: its get-method fails.
        let v = self
            .api
            .run_get_method(&at, "get_params", &[])
            .await
            .map_err(|e| {
                LedgerError::Unreachable(format!(
                    "reading the terms of proxy contract {} (is it open?): {e}",
                    crate::toncenter::raw(&at)
                ))
            })?;
        let terms = params_of(&v).ok_or_else(|| {
            LedgerError::Unreachable("proxy get_params returned an unexpected stack".into())
        })?;
        self.check_codes(&at).await?;
        self.terms
            .lock()
            .insert(*proxy, (terms.clone(), tokio::time::Instant::now()));
        Ok(terms)
    }
}

impl TonLedger {
    /// Refuses a proxy contract whose client or worker code is not this build's (it opened
    /// after the root's code was upgraded) or that signs for another network: addresses
    /// derived here would name no contract of it.
    async fn check_codes(&self, at: &TonAddress) -> Result<(), LedgerError> {
        let v = self
            .api
            .run_get_method(at, "get_terms", &[])
            .await
            .map_err(unreachable)?;
        let [client, worker, network] = v.as_slice() else {
            return Err(LedgerError::Unreachable(
                "proxy get_terms returned an unexpected stack".into(),
            ));
        };
        for (contract, held) in [(Contract::Client, client), (Contract::Worker, worker)] {
            if *held != code_hash(contract) {
                return Err(LedgerError::Unreachable(format!(
                    "proxy contract {} holds {} code {held:x}, which this build does not know \
                     (the root's code was upgraded): upgrade cocoon to use it",
                    crate::toncenter::raw(at),
                    contract.name()
                )));
            }
        }
        if *network != BigInt::from(self.network.id) {
            return Err(LedgerError::Unreachable(format!(
                "proxy contract {} signs for network {network}, this ledger is {}",
                crate::toncenter::raw(at),
                self.network
            )));
        }
        Ok(())
    }
}

/// Network parameters as `get_params` returns them (the root's and each proxy contract's).
fn params_of(v: &[BigInt]) -> Option<NetworkParams> {
    if v.len() != 10 {
        return None;
    }
    let n = |i: usize| u128_of(&v[i]);
    Some(NetworkParams {
        price_per_token: n(0),
        worker_fee_per_token: n(1),
        prompt_multiplier: n(2) as u64,
        cached_multiplier: n(3) as u64,
        completion_multiplier: n(4) as u64,
        reasoning_multiplier: n(5) as u64,
        min_client_stake: n(6),
        min_proxy_stake: n(7),
        client_close_delay: n(8) as u64,
        proxy_close_delay: n(9) as u64,
    })
}

impl TonLedger {
    /// The address of the proxy contract of the key `proxy`, as the root reports it: the
    /// contract that key opened, or where opening it would deploy one now. A key the root does
    /// not know is [`LedgerError::UnknownProxy`].
    pub async fn proxy_contract(&self, proxy: &PublicKey) -> Result<TonAddress, LedgerError> {
        if let Some((at, read)) = self.proxies.lock().get(proxy)
            && read.elapsed() < self.terms_ttl
        {
            return Ok(at.clone());
        }
        let key = BigInt::from_bytes_be(num_bigint::Sign::Plus, proxy);
        let v = match self
            .api
            .run_get_method(&self.root, "proxy_account", &[key])
            .await
        {
            Ok(v) => v,
            Err(TonError::GetMethod { exit_code, .. }) => {
                return Err(refusal(exit_code, layout::account_id(&self.root)));
            }
            Err(e) => return Err(unreachable(e)),
        };
        let [account] = v.as_slice() else {
            return Err(LedgerError::Unreachable(
                "root proxy_account returned an unexpected stack".into(),
            ));
        };
        let (_, bytes) = account.to_bytes_be();
        let mut id = [0u8; 32];
        if bytes.len() > 32 {
            return Err(LedgerError::Unreachable(
                "root proxy_account is not an account id".into(),
            ));
        }
        id[32 - bytes.len()..].copy_from_slice(&bytes);
        let at = TonAddress::new(i32::from(self.network.workchain), id.into());
        self.proxies
            .lock()
            .insert(*proxy, (at.clone(), tokio::time::Instant::now()));
        Ok(at)
    }

    /// `party`'s wallet on this ledger's network.
    fn wallet_of(&self, party: &PublicKey) -> Result<TonAddress, LedgerError> {
        Ok(layout::wallet(party, self.network)
            .map_err(unreachable)?
            .address)
    }

    /// `party`'s contract with `proxy`, whose contract holds `terms`: its address and state
    /// init.
    async fn deployable(
        &self,
        role: Role,
        proxy: &PublicKey,
        party: &PublicKey,
        terms: &NetworkParams,
    ) -> Result<layout::Deployable, LedgerError> {
        let wallet = self.wallet_of(party)?;
        let at = self.proxy_contract(proxy).await?;
        match role {
            Role::Client => layout::client(&at, &wallet, proxy, self.network, terms),
            Role::Worker => layout::worker(&at, &wallet, proxy, self.network, terms),
        }
        .map_err(unreachable)
    }

    /// The account id of `party`'s contract with `proxy`, derived once.
    async fn name(
        &self,
        role: Role,
        proxy: &PublicKey,
        party: &PublicKey,
    ) -> Result<Address, LedgerError> {
        let key = (role, *proxy, *party);
        let terms = self.terms(proxy).await?;
        // A name holds for the terms and the proxy contract it was derived from: after a code
        // upgrade a proxy re-opens at another address with the same terms.
        let at = self.proxy_contract(proxy).await?;
        if let Some((of, from, name)) = self.names.lock().get(&key)
            && *of == terms
            && *from == at
        {
            return Ok(*name);
        }
        let name = layout::account_id(&self.deployable(role, proxy, party, &terms).await?.address);
        self.names.lock().insert(key, (terms, at, name));
        Ok(name)
    }

    /// Where `party`'s contract with `proxy` lives.
    async fn at(
        &self,
        role: Role,
        proxy: &PublicKey,
        party: &PublicKey,
    ) -> Result<TonAddress, LedgerError> {
        Ok(TonAddress::new(
            i32::from(self.network.workchain),
            self.name(role, proxy, party).await?.0.into(),
        ))
    }

    /// A worker's contract: (tokens paid, balance), if deployed.
    pub async fn worker(
        &self,
        proxy: &PublicKey,
        worker: &PublicKey,
    ) -> Result<Option<(u64, u128)>, LedgerError> {
        let at = self.at(Role::Worker, proxy, worker).await?;
        match self.api.run_get_method(&at, "get_worker", &[]).await {
            // (tokens paid, balance, claim in flight)
            Ok(v) if v.len() == 3 => Ok(Some((u128_of(&v[0]) as u64, u128_of(&v[1])))),
            _ => Ok(None),
        }
    }

    /// The message that carries `op`; `terms` are the parameters of the proxy contract the
    /// operation concerns (which name its client and worker contracts).
    async fn message(&self, op: &Op, terms: &NetworkParams) -> Result<Outgoing, LedgerError> {
        let e = unreachable;
        let to = |dest: TonAddress, value: u128, body| Outgoing {
            dest,
            value,
            body,
            state_init: None,
        };
        let role = |r: &ImageRole| match r {
            ImageRole::Worker => 0u8,
            ImageRole::Proxy => 1u8,
        };
        let hash = |h: &str| {
            num_bigint::BigUint::parse_bytes(h.as_bytes(), 16)
                .ok_or_else(|| LedgerError::BadTransaction(format!("{h} is not a hex hash")))
        };
        let me = self.wallet.public_key();
        let root = self.root.clone();
        Ok(match op {
            Op::SetParams { params } => {
                let cell = layout::params(params).map_err(e)?;
                to(
                    root,
                    GAS_ATTACHED,
                    layout::body(op::SET_PARAMS, 0, |b| b.store_reference(&cell).map(|_| ()))
                        .map_err(e)?,
                )
            }
            Op::AllowImage { role: r, hash: h } | Op::RevokeImage { role: r, hash: h } => {
                let code = if matches!(op, Op::AllowImage { .. }) {
                    op::ALLOW_IMAGE
                } else {
                    op::REVOKE_IMAGE
                };
                let h = hash(h)?;
                to(
                    root,
                    GAS_ATTACHED,
                    layout::body(code, 0, |b| {
                        b.store_u8(8, role(r))?.store_uint(256, &h).map(|_| ())
                    })
                    .map_err(e)?,
                )
            }
            Op::AllowModel { hash: h } => {
                let h = hash(h)?;
                to(
                    root,
                    GAS_ATTACHED,
                    layout::body(op::ALLOW_MODEL, 0, |b| b.store_uint(256, &h).map(|_| ()))
                        .map_err(e)?,
                )
            }
            Op::RevokeModel { hash: h } => {
                let h = hash(h)?;
                to(
                    root,
                    GAS_ATTACHED,
                    layout::body(op::REVOKE_MODEL, 0, |b| b.store_uint(256, &h).map(|_| ()))
                        .map_err(e)?,
                )
            }
            Op::UnregisterProxy { key } => to(
                root,
                GAS_ATTACHED,
                layout::body(op::UNREGISTER_PROXY, 0, |b| b.store_slice(key).map(|_| ()))
                    .map_err(e)?,
            ),
            Op::ProposeOwner { owner } => {
                // The root names its owner by wallet: the cocoon wallet of that key.
                let wallet = self.wallet_of(owner)?;
                to(
                    root,
                    GAS_ATTACHED,
                    layout::body(op::PROPOSE_OWNER, 0, |b| {
                        b.store_address(&wallet).map(|_| ())
                    })
                    .map_err(e)?,
                )
            }
            Op::AcceptOwner => to(
                root,
                GAS_ATTACHED,
                layout::body(op::ACCEPT_OWNER, 0, |_| Ok(())).map_err(e)?,
            ),
            Op::RegisterProxy { key, address } => {
                let wallet = self.wallet_of(key)?;
                let endpoint = std::sync::Arc::new(
                    CellBuilder::new()
                        .store_string(address)
                        .and_then(|b| b.build())
                        .map_err(TonError::from)
                        .map_err(e)?,
                );
                let body = layout::body(op::REGISTER_PROXY, 0, |b| {
                    b.store_slice(key)?
                        .store_address(&wallet)?
                        .store_reference(&endpoint)
                        .map(|_| ())
                })
                .map_err(e)?;
                to(root, GAS_ATTACHED, body)
            }
            Op::ProxyOpen { stake } => {
                let body = layout::body(op::OPEN_PROXY, 0, |b| {
                    b.store_slice(&me)?.store_coins(&coins(*stake)).map(|_| ())
                })
                .map_err(e)?;
                to(root, stake + GAS_ATTACHED, body)
            }
            Op::ProxyWithdraw { amount } => {
                let body = layout::body(op::PROXY_WITHDRAW, 0, |b| {
                    b.store_coins(&coins(*amount)).map(|_| ())
                })
                .map_err(e)?;
                to(self.proxy_contract(&me).await?, GAS_ATTACHED, body)
            }
            Op::ProxyAddStake { amount } => {
                let body = layout::body(op::PROXY_ADD_STAKE, 0, |b| {
                    b.store_coins(&coins(*amount)).map(|_| ())
                })
                .map_err(e)?;
                to(self.proxy_contract(&me).await?, amount + GAS_ATTACHED, body)
            }
            Op::ProxyClose | Op::ProxyFinishClose => {
                let code = if matches!(op, Op::ProxyClose) {
                    op::PROXY_CLOSE
                } else {
                    op::PROXY_FINISH_CLOSE
                };
                to(
                    self.proxy_contract(&me).await?,
                    GAS_ATTACHED,
                    layout::body(code, 0, |_| Ok(())).map_err(e)?,
                )
            }
            Op::ProxyRefundClient { client } => {
                let wallet = self.wallet_of(client)?;
                let body = layout::body(op::PROXY_REFUND_CLIENT, 0, |b| {
                    b.store_address(&wallet).map(|_| ())
                })
                .map_err(e)?;
                to(self.proxy_contract(&me).await?, GAS_ATTACHED, body)
            }
            Op::ClientDeposit { proxy, amount } => {
                let k = self.deployable(Role::Client, proxy, &me, terms).await?;
                let body = layout::body(op::CLIENT_DEPOSIT, 0, |b| {
                    b.store_coins(&coins(*amount)).map(|_| ())
                })
                .map_err(e)?;
                Outgoing {
                    dest: k.address,
                    value: amount + GAS_ATTACHED,
                    body,
                    state_init: Some(k.state_init),
                }
            }
            Op::ClientStake { proxy, amount } | Op::ClientWithdraw { proxy, amount } => {
                let code = if matches!(op, Op::ClientStake { .. }) {
                    op::CLIENT_STAKE
                } else {
                    op::CLIENT_WITHDRAW
                };
                let body = layout::body(code, 0, |b| b.store_coins(&coins(*amount)).map(|_| ()))
                    .map_err(e)?;
                to(
                    self.deployable(Role::Client, proxy, &me, terms)
                        .await?
                        .address,
                    GAS_ATTACHED,
                    body,
                )
            }
            Op::ClientClose { proxy } | Op::ClientFinishClose { proxy } => {
                let code = if matches!(op, Op::ClientClose { .. }) {
                    op::CLIENT_CLOSE
                } else {
                    op::CLIENT_FINISH_CLOSE
                };
                to(
                    self.deployable(Role::Client, proxy, &me, terms)
                        .await?
                        .address,
                    GAS_ATTACHED,
                    layout::body(code, 0, |_| Ok(())).map_err(e)?,
                )
            }
            Op::Charge { proxy, message } => {
                let parsed = message.verify(proxy, self.network)?;
                // Charges name the client contract by account id; anyone may deliver them.
                let at = TonAddress::new(
                    i32::from(self.network.workchain),
                    parsed.contract().0.into(),
                );
                to(
                    at,
                    GAS_ATTACHED,
                    layout::signed_payment(op::CHARGE, &message.0).map_err(e)?,
                )
            }
            Op::Payout { proxy, message } => {
                message.verify(proxy, self.network)?;
                let k = self.deployable(Role::Worker, proxy, &me, terms).await?;
                Outgoing {
                    dest: k.address,
                    value: GAS_ATTACHED,
                    body: layout::signed_payment(op::PAYOUT, &message.0).map_err(e)?,
                    state_init: Some(k.state_init),
                }
            }
            Op::WorkerWithdraw { proxy } => to(
                self.deployable(Role::Worker, proxy, &me, terms)
                    .await?
                    .address,
                GAS_ATTACHED,
                layout::body(op::WORKER_WITHDRAW, 0, |_| Ok(())).map_err(e)?,
            ),
        })
    }

    async fn client_state(&self, at: &TonAddress) -> Option<Vec<BigInt>> {
        self.api.run_get_method(at, "get_client", &[]).await.ok()
    }
}

/// Sends one message from `wallet` and waits for the transaction it causes at the destination;
/// returns that transaction's exit code (a refusal when not 0 or 1).
///
/// The transaction is found by message hash, never by position: the wallet's transaction is the
/// one whose inbound message is the external message sent, and the destination's the one whose
/// inbound message is what that transaction sent there. Anything else landing on either account
/// meanwhile (a top-up, another party's message) is passed over. The wallet's transaction must
/// have sent the message (its action phase succeeded; with send mode 3 a wallet short of TON
/// sends nothing), and the destination's must have run its code and had its action phase
/// succeed: a skipped compute phase (no contract there) or a failed action phase (nothing the
/// contract did stands) is an error, not a success.
async fn send_and_confirm(
    api: &Client,
    wallet: &Wallet,
    out: Outgoing,
    timeout: Duration,
) -> Result<i32, LedgerError> {
    let seqno = api.seqno(wallet.address()).await.map_err(unreachable)?;
    let dest = out.dest.clone();
    let from = api
        .last_lt(wallet.address())
        .await
        .map_err(unreachable)?
        .unwrap_or(0);
    let valid_until = (cocoon_ledger::unix_now() + timeout.as_secs().max(60)) as u32;
    let boc = wallet
        .request(seqno.unwrap_or(0), valid_until, &[out], seqno.is_none())
        .map_err(unreachable)?;
    let external = message_hash(&boc)?;
    let deadline = tokio::time::Instant::now() + timeout;
    // A send whose reply was lost may still have landed: look for it before reporting the
    // failure, or a caller's retry (with the next seqno) would do the operation twice.
    let send_error = api.send_boc(&boc).await.err();
    let sent = match find(
        api,
        wallet.address(),
        from,
        external,
        deadline,
        "the wallet's request",
    )
    .await
    {
        Ok(sent) => sent,
        Err(not_found) => return Err(send_error.map_or(not_found, unreachable)),
    };
    let wallet_at = crate::toncenter::raw(wallet.address());
    match (sent.compute, sent.action_result) {
        (Compute::Ran(0 | 1), Some(0)) => {}
        (Compute::Ran(0 | 1), code) => {
            return Err(LedgerError::BadTransaction(format!(
                "the wallet {wallet_at}'s action phase failed (result code {}): nothing was sent",
                code.unwrap_or(-1)
            )));
        }
        (compute, _) => {
            return Err(LedgerError::BadTransaction(format!(
                "the wallet {wallet_at}'s compute phase did not succeed ({compute:?})"
            )));
        }
    }
    let dest_at = crate::toncenter::raw(&dest);
    let Some(message) = sent
        .out_msgs
        .iter()
        .find(|m| m.destination.as_ref() == Some(&dest))
    else {
        return Err(LedgerError::BadTransaction(format!(
            "the wallet {wallet_at} sent nothing to {dest_at} (too little TON in the wallet?)"
        )));
    };
    let landed = find(api, &dest, sent.lt, message.hash, deadline, "the message").await?;
    let code = match (landed.compute, landed.action_result) {
        (Compute::Skipped, _) => return Err(LedgerError::NoContract(layout::account_id(&dest))),
        (Compute::Ran(code @ (0 | 1)), Some(0)) => code,
        (Compute::Ran(0 | 1), code) => {
            return Err(LedgerError::BadTransaction(format!(
                "the action phase on {dest_at} failed (result code {}): nothing the contract did stands",
                code.unwrap_or(-1)
            )));
        }
        (Compute::Ran(code), _) => return Ok(code),
    };
    follow(api, &landed, deadline).await?;
    Ok(code)
}

/// How many messages deep an operation's chain is followed: a payout, the longest, is worker,
/// proxy, worker, wallet.
const TRACE_DEPTH: usize = 6;

/// Follows the messages `first` sent, and theirs, to the transactions they caused: the first
/// contract accepting is not the operation landing (a payout the proxy contract refuses, or a
/// charge it does not take, bounces back after the first contract said yes). The first
/// refusal anywhere in the chain is the operation's.
async fn follow(
    api: &Client,
    first: &TxInfo,
    deadline: tokio::time::Instant,
) -> Result<(), LedgerError> {
    let mut hop: Vec<TxInfo> = vec![first.clone()];
    for _ in 0..TRACE_DEPTH {
        let mut next = Vec::new();
        for tx in &hop {
            for m in &tx.out_msgs {
                let Some(dest) = &m.destination else { continue };
                let caused = find(api, dest, tx.lt, m.hash, deadline, "a message it sent").await?;
                let at = layout::account_id(dest);
                match (caused.compute, caused.action_result) {
                    // A plain transfer to an account without code (a wallet not yet deployed).
                    (Compute::Skipped, _) if caused.out_msgs.is_empty() => {}
                    (Compute::Skipped, _) => return Err(LedgerError::NotOpen(at)),
                    (Compute::Ran(0 | 1), Some(0) | None) => next.push(caused),
                    (Compute::Ran(0 | 1), Some(code)) => {
                        return Err(LedgerError::BadTransaction(format!(
                            "the action phase on {} failed (result code {code})",
                            crate::toncenter::raw(dest)
                        )));
                    }
                    (Compute::Ran(code), _) => return Err(refusal(code, at)),
                }
            }
        }
        if next.is_empty() {
            return Ok(());
        }
        hop = next;
    }
    Ok(())
}

/// The hash of the message at the root of `boc`: what v3 reports as the inbound message's hash
/// of the transaction it causes.
fn message_hash(boc: &[u8]) -> Result<[u8; 32], LedgerError> {
    let root = tycho_types::boc::Boc::decode(boc)
        .map_err(|e| LedgerError::BadTransaction(format!("the wallet's request: {e}")))?;
    Ok(root.repr_hash().0)
}

/// Polls `account`'s transactions after logical time `after` for the one whose inbound message
/// has hash `hash`, until `deadline`.
async fn find(
    api: &Client,
    account: &TonAddress,
    after: u64,
    hash: [u8; 32],
    deadline: tokio::time::Instant,
    what: &str,
) -> Result<TxInfo, LedgerError> {
    let mut cursor = after;
    loop {
        let page = api
            .transactions(account, cursor)
            .await
            .map_err(unreachable)?;
        if let Some(tx) = page.iter().find(|t| t.in_msg_hash == Some(hash)) {
            return Ok(tx.clone());
        }
        let full = page.len() >= crate::toncenter::PAGE;
        if let Some(last) = page.last() {
            cursor = cursor.max(last.lt);
        }
        if full {
            continue;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(unreachable(TonError::NotConfirmed(format!(
                "{what} ({}) did not land on {} in time",
                hex::encode(hash),
                crate::toncenter::raw(account)
            ))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The root owner's code upgrades: operations of the chain alone (the embedded ledger has no
/// code), so not [`Op`]s. Each goes out from this ledger's wallet, which must be the root's
/// owner's (the root refuses anyone else, `100`), and is confirmed down its whole chain.
impl TonLedger {
    /// Sends `out` from this ledger's wallet, one request at a time, and confirms it down its
    /// whole chain; a refusal anywhere in it is the error.
    async fn send(&self, out: Outgoing) -> Result<(), LedgerError> {
        let at = layout::account_id(&out.dest);
        let code = {
            let _one = self.sending.lock().await;
            send_and_confirm(&self.api, &self.wallet, out, self.confirm_timeout).await?
        };
        if code != 0 && code != 1 {
            return Err(refusal(code, at));
        }
        Ok(())
    }

    /// The key of the wallet this ledger sends from.
    pub fn wallet_key(&self) -> PublicKey {
        self.wallet.public_key()
    }

    /// `SetCodes`: proxy contracts opened from now on get `proxy`'s code, and their clients' and
    /// workers' contracts `client`'s and `worker`'s. Contracts already open keep the code they
    /// opened with, so nobody's terms change under them.
    pub async fn set_codes(
        &self,
        proxy: &ArcCell,
        client: &ArcCell,
        worker: &ArcCell,
    ) -> Result<(), LedgerError> {
        let codes = layout::codes(proxy, client, worker).map_err(unreachable)?;
        let body = layout::body(op::SET_CODES, 0, |b| b.store_reference(&codes).map(|_| ()))
            .map_err(unreachable)?;
        self.send_to_root(body).await
    }

    /// `UpgradeRoot`: the root runs `code` from its next message on, over the same storage
    /// (the new code must read it, or migrate it).
    pub async fn upgrade_root(&self, code: &ArcCell) -> Result<(), LedgerError> {
        let body = layout::body(op::UPGRADE_ROOT, 0, |b| b.store_reference(code).map(|_| ()))
            .map_err(unreachable)?;
        self.send_to_root(body).await
    }

    async fn send_to_root(&self, body: ArcCell) -> Result<(), LedgerError> {
        self.send(Outgoing {
            dest: self.root.clone(),
            value: GAS_ATTACHED,
            body,
            state_init: None,
        })
        .await?;
        // New proxies are named from the new code: forget the names derived before.
        self.proxies.lock().clear();
        self.terms.lock().clear();
        Ok(())
    }
}

#[async_trait::async_trait]
impl Ledger for TonLedger {
    async fn execute(&self, tx: Tx) -> Result<Receipt, LedgerError> {
        if tx.sender != self.wallet.public_key() {
            return Err(LedgerError::BadTransaction(
                "the TON ledger signs only for its own wallet's key".into(),
            ));
        }
        let terms = match tx.op.proxy() {
            Some(proxy) => self.terms(proxy).await?,
            None => self.params.clone(),
        };
        let out = self.message(&tx.op, &terms).await?;
        let at = layout::account_id(&out.dest);
        let client_before = match &tx.op {
            Op::Charge { .. } => self.client_state(&out.dest).await,
            _ => None,
        };
        let me = self.wallet.public_key();
        let worker_before = match &tx.op {
            Op::WorkerWithdraw { proxy } => self.worker(proxy, &me).await?,
            _ => None,
        };
        self.send(out).await?;
        if matches!(tx.op, Op::ProxyOpen { .. } | Op::ProxyFinishClose) {
            // This proxy's own terms may have just changed: name its contracts afresh.
            self.terms.lock().remove(&me);
            self.proxies.lock().remove(&me);
            self.names.lock().retain(|(_, proxy, _), _| *proxy != me);
        }
        let mut receipt = Receipt::default();
        match &tx.op {
            Op::ClientDeposit { amount, .. } => receipt.deposited = *amount,
            Op::ProxyOpen { stake } | Op::ProxyAddStake { amount: stake } => {
                receipt.deposited = *stake
            }
            Op::ClientWithdraw { amount, .. } | Op::ProxyWithdraw { amount } => {
                receipt.paid_out = *amount
            }
            Op::Charge { .. } => {
                let after = self
                    .client_state(&TonAddress::new(
                        i32::from(self.network.workchain),
                        at.0.into(),
                    ))
                    .await;
                if let (Some(b), Some(a)) = (client_before, after) {
                    receipt.charged = u128_of(&b[2]).saturating_sub(u128_of(&a[2]));
                }
            }
            Op::WorkerWithdraw { proxy } => {
                let after = self.worker(proxy, &me).await?;
                if let (Some((_, b)), Some((_, a))) = (worker_before, after) {
                    receipt.paid_out = b.saturating_sub(a);
                }
            }
            _ => {}
        }
        Ok(receipt)
    }

    async fn snapshot(&self) -> Result<LedgerState, LedgerError> {
        Err(LedgerError::Unreachable(
            "a chain has no whole-state snapshot: query contracts one by one (params, client)"
                .into(),
        ))
    }

    async fn params(&self) -> Result<NetworkParams, LedgerError> {
        self.read_params().await
    }

    async fn image_allowed(&self, role: ImageRole, hash: &str) -> Result<bool, LedgerError> {
        let bytes = hex::decode(hash)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| LedgerError::BadTransaction(format!("bad image hash {hash:?}")))?;
        let role = BigInt::from(match role {
            ImageRole::Worker => 0u8,
            ImageRole::Proxy => 1u8,
        });
        let key = BigInt::from_bytes_be(num_bigint::Sign::Plus, &bytes);
        let v = self
            .api
            .run_get_method(&self.root, "image_allowed", &[role, key])
            .await
            .map_err(unreachable)?;
        match v.as_slice() {
            [allowed] => Ok(*allowed != BigInt::from(0)),
            _ => Err(LedgerError::Unreachable(
                "root image_allowed returned an unexpected stack".into(),
            )),
        }
    }

    async fn model_allowed(&self, hash: &str) -> Result<bool, LedgerError> {
        let bytes = hex::decode(hash)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| LedgerError::BadTransaction(format!("bad model hash {hash:?}")))?;
        let key = BigInt::from_bytes_be(num_bigint::Sign::Plus, &bytes);
        let v = self
            .api
            .run_get_method(&self.root, "model_allowed", &[key])
            .await
            .map_err(unreachable)?;
        match v.as_slice() {
            [allowed] => Ok(*allowed != BigInt::from(0)),
            _ => Err(LedgerError::Unreachable(
                "root model_allowed returned an unexpected stack".into(),
            )),
        }
    }

    async fn network(&self) -> Result<Network, LedgerError> {
        Ok(self.network)
    }

    async fn client_address(
        &self,
        proxy: &PublicKey,
        client: &PublicKey,
    ) -> Result<Address, LedgerError> {
        self.name(Role::Client, proxy, client).await
    }

    async fn worker_address(
        &self,
        proxy: &PublicKey,
        worker: &PublicKey,
    ) -> Result<Address, LedgerError> {
        self.name(Role::Worker, proxy, worker).await
    }

    async fn proxy_view(
        &self,
        proxy: PublicKey,
        clients: &[PublicKey],
        workers: &[PublicKey],
    ) -> Result<LedgerState, LedgerError> {
        // Only the parameters of the registry are read: the view is about this proxy.
        let mut view = LedgerState::new([0; 32], self.network);
        view.registry.params = self.params.clone();
        let at = self.proxy_contract(&proxy).await?;
        let got = self.api.run_get_method(&at, "get_proxy", &[]).await;
        if let Ok(v) = got
            && v.len() == 5
        {
            view.proxies.insert(
                layout::account_id(&at),
                ProxyContract {
                    key: proxy,
                    balance: u128_of(&v[2]),
                    stake: u128_of(&v[3]),
                    owed: u128_of(&v[4]),
                    state: contract_state(&v[0], &v[1]),
                },
            );
        }
        for client in clients {
            if let Some(contract) = self.client(proxy, *client).await? {
                view.clients
                    .insert(self.client_address(&proxy, client).await?, contract);
            }
        }
        for worker in workers {
            if let Some((tokens_paid, balance)) = self.worker(&proxy, worker).await? {
                view.workers.insert(
                    self.worker_address(&proxy, worker).await?,
                    WorkerContract {
                        worker: *worker,
                        proxy,
                        tokens_paid,
                        balance,
                    },
                );
            }
        }
        Ok(view)
    }

    async fn client(
        &self,
        proxy: PublicKey,
        client: PublicKey,
    ) -> Result<Option<ClientContract>, LedgerError> {
        let at = self.at(Role::Client, &proxy, &client).await?;
        let Some(v) = self.client_state(&at).await else {
            return Ok(None);
        };
        if v.len() != 5 {
            return Ok(None);
        }
        let state = contract_state(&v[0], &v[1]);
        Ok(Some(ClientContract {
            client,
            proxy,
            balance: u128_of(&v[2]),
            stake: u128_of(&v[3]),
            tokens_used: u128_of(&v[4]) as u64,
            state,
        }))
    }
}
