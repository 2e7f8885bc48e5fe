//! A party's TON wallet: external requests in wallet v5r1's format, built and signed by
//! tonlib-core, addressed to the cocoon wallet contract (same data layout as v5r1, our code).

use std::sync::Arc;

use cocoon_ledger::{Network, PublicKey};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use tonlib_core::TonAddress;
use tonlib_core::cell::{ArcCell, CellBuilder};
use tonlib_core::wallet::mnemonic::KeyPair;
use tonlib_core::wallet::ton_wallet::TonWallet;
use tonlib_core::wallet::wallet_version::WalletVersion;

use crate::code::to_boc;
use crate::error::TonError;
use crate::layout::{self, Deployable, internal_message};

/// One message for the wallet to send.
pub struct Outgoing {
    /// Where the message goes.
    pub dest: TonAddress,
    /// TON attached, in nanotons.
    pub value: u128,
    /// The message body cell.
    pub body: ArcCell,
    /// The destination's `StateInit`, to deploy it with this message.
    pub state_init: Option<ArcCell>,
}

/// A party's cocoon wallet on one network: its Ed25519 key, which signs the wallet's external
/// requests, and its address (which the network's wallet id is part of).
pub struct Wallet {
    signer: TonWallet,
    public: PublicKey,
    network: Network,
    deployable: Deployable,
}

impl Wallet {
    /// The wallet on `network` of the Ed25519 key with this 32-byte seed.
    pub fn from_seed(seed: [u8; 32], network: Network) -> Result<Self, TonError> {
        let ring = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| TonError::Cell(format!("bad Ed25519 seed: {e}")))?;
        let public: PublicKey = ring.public_key().as_ref().try_into().expect("32 bytes");
        let mut secret = seed.to_vec();
        secret.extend_from_slice(&public);
        let key_pair = KeyPair {
            public_key: public.to_vec(),
            secret_key: secret,
        };
        let signer = TonWallet::new_with_params(
            WalletVersion::V5R1,
            key_pair,
            i32::from(network.workchain),
            layout::wallet_id(network),
        )?;
        Ok(Self {
            signer,
            public,
            network,
            deployable: layout::wallet(&public, network)?,
        })
    }

    /// Reads a ring PKCS#8 v2 Ed25519 key file (what every cocoon role already has) for a
    /// wallet on `network`; its seed is the 32 bytes after the 16-byte header.
    pub fn from_pkcs8(der: &[u8], network: Network) -> Result<Self, TonError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| TonError::Cell(format!("not an Ed25519 key: {e}")))?;
        let seed: [u8; 32] = der
            .get(16..48)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| TonError::Cell("PKCS#8 key too short".into()))?;
        let wallet = Self::from_seed(seed, network)?;
        let parsed = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).expect("checked above");
        if parsed.public_key().as_ref() != wallet.public {
            return Err(TonError::Cell("unexpected PKCS#8 layout".into()));
        }
        Ok(wallet)
    }

    /// The wallet's Ed25519 public key (the party's identity key).
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The network the wallet is on.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The wallet contract's address (not the standard v5r1's: the code is cocoon's).
    pub fn address(&self) -> &TonAddress {
        &self.deployable.address
    }

    /// A signed external message carrying `messages`, valid until `valid_until` (unix time),
    /// with the wallet's state init when `deploy` (its first request).
    pub fn request(
        &self,
        seqno: u32,
        valid_until: u32,
        messages: &[Outgoing],
        deploy: bool,
    ) -> Result<Vec<u8>, TonError> {
        // tonlib-core (0.26) puts the first message at the head of the out-action list, and TVM
        // runs that list from its tail: given as is, a request of several messages would go out
        // last first. Reversed here, they go out in the order given (the scenarios' batches
        // check it against @ton/core's wallet in the reference emulator).
        let relaxed = messages
            .iter()
            .rev()
            .map(|m| internal_message(&m.dest, m.value, true, &m.body, m.state_init.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let unsigned = self
            .signer
            .create_external_body(valid_until, seqno, relaxed)?;
        let signed = Arc::new(self.signer.sign_external_body(&unsigned)?);
        let mut b = CellBuilder::new();
        b.store_u8(2, 0b10)? // ext_in_msg_info$10
            .store_u8(2, 0)? // src: addr_none
            .store_address(self.address())?
            .store_coins(&layout::coins(0))?;
        if deploy {
            b.store_bit(true)?
                .store_bit(true)?
                .store_reference(&self.deployable.state_init)?;
        } else {
            b.store_bit(false)?;
        }
        b.store_bit(true)?.store_reference(&signed)?;
        to_boc(&Arc::new(b.build()?))
    }
}
