//! The contracts' storage layouts and message bodies as cells, built with tonlib-core. Each
//! function mirrors a struct in `contracts/src/*.tolk` field for field (Tolk serializes structs
//! in declaration order); `contracts/test/cocoon.mjs` is the same for the sandbox.

use std::sync::Arc;

use cocoon_ledger::{Network, NetworkParams, PaymentMessage, PublicKey};
use num_bigint::BigUint;
use tonlib_core::TonAddress;
use tonlib_core::cell::{ArcCell, Cell, CellBuilder};
use tonlib_core::tlb_types::block::state_init::StateInit;
use tonlib_core::tlb_types::tlb::TLB;

use crate::code::Contract;
use crate::error::TonError;

/// Result of building the cells and addresses here (a [`TonError`] when tonlib-core fails).
pub type Result<T> = std::result::Result<T, TonError>;

/// Operation codes (the 32-bit prefixes of the Tolk message structs).
pub mod op {
    /// Root `SetParams`: the owner replaces the network parameters.
    pub const SET_PARAMS: u32 = 0x636f_0001;
    /// Root `AllowImage`: the owner allows a worker or proxy image hash.
    pub const ALLOW_IMAGE: u32 = 0x636f_0002;
    /// Root `RevokeImage`: the owner revokes a worker or proxy image hash.
    pub const REVOKE_IMAGE: u32 = 0x636f_0003;
    /// Root `AllowModel`: the owner allows a model hash.
    pub const ALLOW_MODEL: u32 = 0x636f_0004;
    /// Root `RegisterProxy`: the owner registers a proxy's key, wallet and endpoint.
    pub const REGISTER_PROXY: u32 = 0x636f_0005;
    /// Root `OpenProxy`: a registered proxy's wallet stakes and has the root deploy its proxy
    /// contract.
    pub const OPEN_PROXY: u32 = 0x636f_0006;
    /// Root `ProposeOwner`: the owner names a new owner's wallet (first of two steps).
    pub const PROPOSE_OWNER: u32 = 0x636f_0007;
    /// Root `AcceptOwner`: the proposed owner's wallet takes over (second step).
    pub const ACCEPT_OWNER: u32 = 0x636f_0008;
    /// Root `RevokeModel`: the owner removes a model hash.
    pub const REVOKE_MODEL: u32 = 0x636f_0009;
    /// Root `UnregisterProxy`: the owner removes a proxy from the registry.
    pub const UNREGISTER_PROXY: u32 = 0x636f_000a;
    /// Root `SetCodes`: the owner replaces the proxy, client and worker code that contracts
    /// opened from then on get.
    pub const SET_CODES: u32 = 0x636f_000b;
    /// Root `UpgradeRoot`: the owner replaces the root's own code (its storage stays).
    pub const UPGRADE_ROOT: u32 = 0x636f_000c;
    /// Proxy `ProxyAddStake`: the owner adds to the proxy contract's stake.
    pub const PROXY_ADD_STAKE: u32 = 0x636f_0014;
    /// Proxy `ProxyWithdraw`: the owner withdraws earnings from the proxy contract.
    pub const PROXY_WITHDRAW: u32 = 0x636f_0010;
    /// Proxy `ProxyClose`: the owner starts closing the proxy contract (its close delay starts).
    pub const PROXY_CLOSE: u32 = 0x636f_0011;
    /// Proxy `ProxyFinishClose`: after the close delay, the owner takes everything back.
    pub const PROXY_FINISH_CLOSE: u32 = 0x636f_0012;
    /// Proxy `ProxyRefundClient`: the owner has the proxy contract send a client contract `Refund`,
    /// closing it cooperatively.
    pub const PROXY_REFUND_CLIENT: u32 = 0x636f_0013;
    /// Client `ClientDeposit`: the owner adds to the contract's balance.
    pub const CLIENT_DEPOSIT: u32 = 0x636f_0020;
    /// Client `ClientStake`: the owner moves part of the balance into the stake.
    pub const CLIENT_STAKE: u32 = 0x636f_0021;
    /// Client `ClientWithdraw`: the owner withdraws balance above the stake.
    pub const CLIENT_WITHDRAW: u32 = 0x636f_0022;
    /// Client `ClientClose`: the owner starts closing without the proxy; all but the stake comes
    /// back now.
    pub const CLIENT_CLOSE: u32 = 0x636f_0023;
    /// Client `ClientFinishClose`: after the close delay, the owner takes the rest back.
    pub const CLIENT_FINISH_CLOSE: u32 = 0x636f_0024;
    /// Client `Charge`: delivers a proxy-signed charge message (anyone may send it).
    pub const CHARGE: u32 = 0x636f_0025;
    /// Worker `Payout`: delivers a proxy-signed payout message, which claims the worker's pay.
    pub const PAYOUT: u32 = 0x636f_0030;
    /// Worker `WorkerWithdraw`: the owner withdraws the worker contract's earnings.
    pub const WORKER_WITHDRAW: u32 = 0x636f_0031;
    /// `Charged`, client contract to proxy contract: carries a charge's cost; a bounce of it
    /// restores the client's balance.
    pub const CHARGED: u32 = 0x636f_0102;
}

/// What every cocoon wallet's id derives from ("coco"): the id is this XOR the network's id,
/// so the same key has a different wallet (and address) on each network, and a request signed
/// for a wallet on one network is refused by the same key's wallet on any other.
pub const WALLET_ID: i32 = 0x636f_636f;

/// The wallet id of cocoon wallets on `network`.
pub fn wallet_id(network: Network) -> i32 {
    WALLET_ID ^ network.id
}

/// The contract states the getters report (`STATE_*` in common.tolk).
pub const STATE_NORMAL: u64 = 0;
/// Closing: the close delay is running (`unlock_at` in the getters).
pub const STATE_CLOSING: u64 = 1;
/// Closed: the balance and stake have been paid out.
pub const STATE_CLOSED: u64 = 2;

/// `n` nanotons as the `BigUint` tonlib-core stores as `Coins`.
pub fn coins(n: u128) -> BigUint {
    BigUint::from(n)
}

fn build(b: &mut CellBuilder) -> Result<ArcCell> {
    Ok(Arc::new(b.build()?))
}

/// The basechain (workchain 0) address of a contract with this code and initial data.
pub fn address_of(code: ArcCell, data: ArcCell) -> Result<TonAddress> {
    Ok(TonAddress::derive(0, code, data)?)
}

/// The `StateInit` cell (code and data) that deploys a contract.
pub fn state_init(code: ArcCell, data: ArcCell) -> Result<ArcCell> {
    Ok(Arc::new(StateInit::new(code, data).to_cell()?))
}

/// A contract as deployed: its initial state and the address derived from it.
#[derive(Clone, Debug)]
pub struct Deployable {
    /// Where the contract lives (workchain 0), derived from `state_init`.
    pub address: TonAddress,
    /// The `StateInit` cell to attach to the first message, which deploys the contract.
    pub state_init: ArcCell,
}

impl Deployable {
    fn new(contract: Contract, data: ArcCell) -> Result<Self> {
        Self::with_code(contract.code(), data)
    }

    fn with_code(code: ArcCell, data: ArcCell) -> Result<Self> {
        Ok(Self {
            address: address_of(code.clone(), data.clone())?,
            state_init: state_init(code, data)?,
        })
    }
}

/// A party's wallet on `network`: the cocoon wallet with v5r1's data layout, for one Ed25519
/// key.
pub fn wallet(key: &PublicKey, network: Network) -> Result<Deployable> {
    let data = build(
        CellBuilder::new()
            .store_bit(true)?
            .store_u32(32, 0)?
            .store_i32(32, wallet_id(network))?
            .store_slice(key)?
            .store_bit(false)?,
    )?;
    Deployable::new(Contract::Wallet, data)
}

/// The root's `Params` cell (common.tolk): prices and worker fee in nanotons, the token
/// multipliers, minimum stakes in nanotons and close delays in seconds.
pub fn params(p: &NetworkParams) -> Result<ArcCell> {
    build(
        CellBuilder::new()
            .store_coins(&coins(p.price_per_token))?
            .store_coins(&coins(p.worker_fee_per_token))?
            .store_u64(32, p.prompt_multiplier)?
            .store_u64(32, p.cached_multiplier)?
            .store_u64(32, p.completion_multiplier)?
            .store_u64(32, p.reasoning_multiplier)?
            .store_coins(&coins(p.min_client_stake))?
            .store_coins(&coins(p.min_proxy_stake))?
            .store_u64(32, p.client_close_delay)?
            .store_u64(32, p.proxy_close_delay)?,
    )
}

/// The root's `Codes` cell: the code it deploys proxy contracts with and hands them for client
/// and worker contracts.
pub fn codes(proxy: &ArcCell, client: &ArcCell, worker: &ArcCell) -> Result<ArcCell> {
    build(
        CellBuilder::new()
            .store_reference(proxy)?
            .store_reference(client)?
            .store_reference(worker)?,
    )
}

/// The root registry of `network` with no proxies, images or models yet.
pub fn root(owner_wallet: &TonAddress, p: &NetworkParams, network: Network) -> Result<Deployable> {
    let codes = codes(
        &Contract::Proxy.code(),
        &Contract::Client.code(),
        &Contract::Worker.code(),
    )?;
    let lists = build(
        CellBuilder::new()
            .store_bit(false)?
            .store_bit(false)?
            .store_bit(false)?,
    )?;
    let data = build(
        CellBuilder::new()
            .store_address(owner_wallet)?
            .store_reference(&params(p)?)?
            .store_reference(&lists)?
            .store_bit(false)?
            .store_reference(&codes)?
            .store_u64(64, 0)? // no owner proposed: 256 zero bits
            .store_u64(64, 0)?
            .store_u64(64, 0)?
            .store_u64(64, 0)?
            .store_i32(32, network.id)?,
    )?;
    Deployable::new(Contract::Root, data)
}

/// Where the root deploys a proxy's contract.
pub fn proxy_address(
    root: &TonAddress,
    proxy_wallet: &TonAddress,
    key: &PublicKey,
) -> Result<TonAddress> {
    let identity = build(
        CellBuilder::new()
            .store_address(root)?
            .store_address(proxy_wallet)?
            .store_slice(key)?,
    )?;
    let data = build(
        CellBuilder::new()
            .store_reference(&identity)?
            .store_u8(2, 3)?
            .store_u32(32, 0)?
            .store_coins(&coins(0))? // balance
            .store_coins(&coins(0))? // stake
            .store_coins(&coins(0))? // owed to workers
            .store_bit(false)?, // no config until it opens
    )?;
    address_of(Contract::Proxy.code(), data)
}

fn binding(
    proxy: &TonAddress,
    owner: &TonAddress,
    proxy_key: &PublicKey,
    network: Network,
) -> Result<ArcCell> {
    build(
        CellBuilder::new()
            .store_address(proxy)?
            .store_address(owner)?
            .store_slice(proxy_key)?
            .store_i32(32, network.id)?,
    )
}

/// A client's contract with a proxy (bound to the proxy's prices and network).
pub fn client(
    proxy: &TonAddress,
    client_wallet: &TonAddress,
    proxy_key: &PublicKey,
    network: Network,
    p: &NetworkParams,
) -> Result<Deployable> {
    client_of(
        Contract::Client.code(),
        proxy,
        client_wallet,
        proxy_key,
        network,
        p,
    )
}

/// [`client`] under `code`: the client code the proxy contract was opened with, which an
/// upgrade of the root may have made another than this build's.
pub fn client_of(
    code: ArcCell,
    proxy: &TonAddress,
    client_wallet: &TonAddress,
    proxy_key: &PublicKey,
    network: Network,
    p: &NetworkParams,
) -> Result<Deployable> {
    let terms = build(
        CellBuilder::new()
            .store_coins(&coins(p.price_per_token))?
            .store_coins(&coins(p.min_client_stake))?
            .store_u64(32, p.client_close_delay)?,
    )?;
    let data = build(
        CellBuilder::new()
            .store_reference(&binding(proxy, client_wallet, proxy_key, network)?)?
            .store_reference(&terms)?
            .store_u8(2, 0)?
            .store_u32(32, 0)?
            .store_coins(&coins(0))?
            .store_coins(&coins(0))?
            .store_u64(64, 0)?,
    )?;
    Deployable::with_code(code, data)
}

/// A worker's contract with a proxy.
pub fn worker(
    proxy: &TonAddress,
    worker_wallet: &TonAddress,
    proxy_key: &PublicKey,
    network: Network,
    p: &NetworkParams,
) -> Result<Deployable> {
    worker_of(
        Contract::Worker.code(),
        proxy,
        worker_wallet,
        proxy_key,
        network,
        p,
    )
}

/// [`worker`] under `code`, as [`client_of`].
pub fn worker_of(
    code: ArcCell,
    proxy: &TonAddress,
    worker_wallet: &TonAddress,
    proxy_key: &PublicKey,
    network: Network,
    p: &NetworkParams,
) -> Result<Deployable> {
    let data = build(
        CellBuilder::new()
            .store_reference(&binding(proxy, worker_wallet, proxy_key, network)?)?
            .store_coins(&coins(p.worker_fee_per_token))?
            .store_u64(64, 0)?
            .store_coins(&coins(0))?
            .store_bit(false)?, // no claim in flight
    )?;
    Deployable::with_code(code, data)
}

/// A message body: the op and query id, then what `fill` stores.
pub fn body(
    op: u32,
    query_id: u64,
    fill: impl FnOnce(&mut CellBuilder) -> std::result::Result<(), tonlib_core::cell::TonCellError>,
) -> Result<ArcCell> {
    let mut b = CellBuilder::new();
    b.store_u32(32, op)?.store_u64(64, query_id)?;
    fill(&mut b)?;
    build(&mut b)
}

/// A proxy-signed payment message wrapped for delivery (`Charge` or `Payout`): the op, then
/// the message's 121 bytes.
pub fn signed_payment(op: u32, signed: &[u8]) -> Result<ArcCell> {
    build(CellBuilder::new().store_u32(32, op)?.store_slice(signed)?)
}

/// The 32-byte account id a payment message names for a contract at `address`.
pub fn account_id(address: &TonAddress) -> cocoon_ledger::Address {
    let mut id = [0u8; 32];
    id.copy_from_slice(address.hash_part.as_slice());
    cocoon_ledger::Address(id)
}

/// A charge the proxy signs for the client contract at `contract`.
pub fn charge_message(query_id: u64, tokens_used: u64, contract: &TonAddress) -> PaymentMessage {
    PaymentMessage::ChargeClient {
        query_id,
        tokens_used,
        contract: account_id(contract),
    }
}

/// An internal message as a wallet sends it (MessageRelaxed: no source, no fees, no times).
pub fn internal_message(
    dest: &TonAddress,
    value: u128,
    bounce: bool,
    body: &ArcCell,
    init: Option<&ArcCell>,
) -> Result<ArcCell> {
    let mut b = CellBuilder::new();
    b.store_bit(false)? // int_msg_info$0
        .store_bit(true)? // ihr_disabled
        .store_bit(bounce)?
        .store_bit(false)? // bounced
        .store_u8(2, 0)? // src: addr_none
        .store_address(dest)?
        .store_coins(&coins(value))?
        .store_bit(false)? // no extra currencies
        .store_coins(&coins(0))? // ihr_fee
        .store_coins(&coins(0))? // fwd_fee
        .store_u64(64, 0)?
        .store_u32(32, 0)?;
    match init {
        Some(init) => b.store_bit(true)?.store_bit(true)?.store_reference(init)?,
        None => b.store_bit(false)?,
    };
    b.store_bit(true)?.store_reference(body)?;
    build(&mut b)
}

/// A cell with no bits and no references (an empty message body).
pub fn empty_cell() -> ArcCell {
    Arc::new(Cell::default())
}
