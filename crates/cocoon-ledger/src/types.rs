//! Identities, amounts and the three kinds of payment contract.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Amounts are in nanoton (10⁻⁹ TON), as on chain.
pub type Nanoton = u128;

/// An Ed25519 public key: how clients, proxies, workers and the owner are known.
pub type PublicKey = [u8; 32];

/// The network a signed payment message or ledger transaction is for: its id (on TON the
/// chain's global id, −239 on mainnet and −3 on testnet; an embedded ledger picks its own when
/// it is created) and the workchain its contracts live in. With the 32-byte account id it makes
/// a contract's full address, so a message signed for one network never applies on another,
/// even where the same keys made contracts at the same account ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Network {
    /// The network's id.
    pub id: i32,
    /// The workchain of its contracts (0, the basechain, for every cocoon network today).
    pub workchain: i8,
}

impl Network {
    /// TON mainnet's basechain.
    pub const TON_MAINNET: Self = Self::basechain(-239);
    /// TON testnet's basechain.
    pub const TON_TESTNET: Self = Self::basechain(-3);
    /// What an embedded ledger created before networks had ids is on: id 0.
    pub const UNNAMED: Self = Self::basechain(0);

    /// The basechain of the network with this id.
    pub const fn basechain(id: i32) -> Self {
        Self { id, workchain: 0 }
    }

    /// A fresh network id (for a new embedded ledger): random, so that two ledgers made with
    /// the same keys do not accept each other's messages.
    pub fn random() -> Self {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 4];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source works");
        Self::basechain(i32::from_be_bytes(bytes))
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "network {} (workchain {})", self.id, self.workchain)
    }
}

/// A contract's address: derived from what the contract is and whom it binds, so that a signed
/// message naming an address can only ever apply to that one contract (as TON derives an
/// address from code and initial data).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address(#[serde(with = "hex_32")] pub [u8; 32]);

impl Address {
    fn derive(kind: &str, parts: &[&[u8]]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"cocoon-contract/v1/");
        ctx.update(kind.as_bytes());
        for p in parts {
            ctx.update(&(p.len() as u32).to_be_bytes());
            ctx.update(p);
        }
        Self(
            ctx.finish()
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes"),
        )
    }

    /// The address of `proxy`'s own contract.
    pub fn proxy(proxy: &PublicKey) -> Self {
        Self::derive("proxy", &[proxy])
    }

    /// The address of `client`'s contract with `proxy`.
    pub fn client(proxy: &PublicKey, client: &PublicKey) -> Self {
        Self::derive("client", &[proxy, client])
    }

    /// The address of `worker`'s contract with `proxy`.
    pub fn worker(proxy: &PublicKey, worker: &PublicKey) -> Self {
        Self::derive("worker", &[proxy, worker])
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

/// Lifecycle of a contract that can be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ContractState {
    /// Open: accepts deposits, charges and payouts as usual.
    Normal,
    /// Closing was requested; what is left is released at `unlock_at` (seconds since epoch).
    Closing {
        /// When the close may be finished, in seconds since the Unix epoch.
        unlock_at: u64,
    },
    /// Closed and emptied; it accepts nothing more.
    Closed,
}

/// One per proxy instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyContract {
    /// The proxy's public key.
    #[serde(with = "hex_32")]
    pub key: PublicKey,
    /// The proxy's own share of what clients were charged, not yet withdrawn (or spent on
    /// payouts beyond `owed`), in nanoton: what it may withdraw.
    pub balance: Nanoton,
    /// Locked when the proxy opened, in nanoton; payouts draw on it once `owed` and `balance`
    /// run out.
    pub stake: Nanoton,
    /// The workers' share of what clients were charged (tokens × worker fee), held for their
    /// payouts and never withdrawable by the proxy; in nanoton. Its final close, after the
    /// delay, releases what workers left unclaimed.
    #[serde(default)]
    pub owed: Nanoton,
    /// Whether the contract is open, closing or closed.
    pub state: ContractState,
}

/// One per (client, proxy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientContract {
    /// The client's public key.
    #[serde(with = "hex_32")]
    pub client: PublicKey,
    /// The proxy that serves the client and signs its charge messages.
    #[serde(with = "hex_32")]
    pub proxy: PublicKey,
    /// Everything the client has in the contract, the stake included.
    pub balance: Nanoton,
    /// The part of `balance` the client cannot withdraw while the contract is open: it
    /// guarantees the proxy payment for work in flight.
    pub stake: Nanoton,
    /// Weighted tokens charged so far; the counter of the proxy's charge messages.
    pub tokens_used: u64,
    /// Whether the contract is open, closing or closed.
    pub state: ContractState,
}

/// One per (worker, proxy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerContract {
    /// The worker's public key.
    #[serde(with = "hex_32")]
    pub worker: PublicKey,
    /// The proxy whose payout messages this contract applies.
    #[serde(with = "hex_32")]
    pub proxy: PublicKey,
    /// Weighted tokens paid so far; the counter of the proxy's payout messages.
    pub tokens_paid: u64,
    /// Earned and not yet withdrawn to the worker's owner.
    pub balance: Nanoton,
}

pub(crate) mod hex_32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}
