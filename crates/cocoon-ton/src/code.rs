//! The compiled contracts, exactly as committed under `contracts/build/` (CI recompiles them
//! with the pinned Tolk and fails on any difference).

use std::sync::{Arc, OnceLock};

use tonlib_core::cell::{ArcCell, BagOfCells};

use crate::error::TonError;

/// One contract's code cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contract {
    /// The parties' wallet (wallet-v5r1 layout, cocoon wallet id).
    Wallet,
    /// The root registry: owner, network parameters, allowlists, registered proxies.
    Root,
    /// A proxy's contract: its stake and its earnings from clients.
    Proxy,
    /// A client's contract with one proxy: prepaid balance, stake and charged-token counter.
    Client,
    /// A worker's contract with one proxy: paid-token counter and unwithdrawn earnings.
    Worker,
}

impl Contract {
    /// Every contract, in declaration order (the order [`Contract::code`] indexes by).
    pub const ALL: [Contract; 5] = [
        Self::Wallet,
        Self::Root,
        Self::Proxy,
        Self::Client,
        Self::Worker,
    ];

    /// The contract's name: its file stem in `contracts/` (`root.tolk`, `root.boc`) and its key
    /// in `hashes.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wallet => "wallet",
            Self::Root => "root",
            Self::Proxy => "proxy",
            Self::Client => "client",
            Self::Worker => "worker",
        }
    }

    /// The code BOC as committed.
    pub fn boc(self) -> &'static [u8] {
        match self {
            Self::Wallet => include_bytes!("../../../contracts/build/wallet.boc"),
            Self::Root => include_bytes!("../../../contracts/build/root.boc"),
            Self::Proxy => include_bytes!("../../../contracts/build/proxy.boc"),
            Self::Client => include_bytes!("../../../contracts/build/client.boc"),
            Self::Worker => include_bytes!("../../../contracts/build/worker.boc"),
        }
    }

    /// The code cell.
    pub fn code(self) -> ArcCell {
        static CODES: OnceLock<Vec<ArcCell>> = OnceLock::new();
        let codes = CODES.get_or_init(|| {
            Self::ALL
                .iter()
                .map(|c| parse_boc(c.boc()).expect("committed contract code is a valid BOC"))
                .collect()
        });
        codes[self as usize].clone()
    }

    /// The code hash the build recorded in `contracts/build/hashes.json`.
    pub fn recorded_hash(self) -> String {
        let hashes: serde_json::Value =
            serde_json::from_str(include_str!("../../../contracts/build/hashes.json"))
                .expect("hashes.json is JSON");
        hashes["code"][self.name()]
            .as_str()
            .expect("every contract has a recorded hash")
            .to_owned()
    }
}

/// Parses a bag of cells that must have exactly one root, and returns that root.
pub fn parse_boc(bytes: &[u8]) -> Result<ArcCell, TonError> {
    Ok(BagOfCells::parse(bytes)?.single_root()?)
}

/// Serializes `cell` as a single-root bag of cells, without a CRC.
pub fn to_boc(cell: &ArcCell) -> Result<Vec<u8>, TonError> {
    Ok(BagOfCells::new(&[Arc::clone(cell)]).serialize(false)?)
}
