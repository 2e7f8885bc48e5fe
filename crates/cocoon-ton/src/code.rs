//! The compiled contracts, exactly as committed under `contracts/build/` (CI recompiles them
//! with the pinned Tolk and fails on any difference).

use std::sync::{Arc, OnceLock};

use tonlib_core::cell::{ArcCell, BagOfCells};

use crate::error::TonError;

/// One contract's code cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contract {
    Wallet,
    Root,
    Proxy,
    Client,
    Worker,
}

impl Contract {
    pub const ALL: [Contract; 5] = [
        Self::Wallet,
        Self::Root,
        Self::Proxy,
        Self::Client,
        Self::Worker,
    ];

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

pub fn parse_boc(bytes: &[u8]) -> Result<ArcCell, TonError> {
    Ok(BagOfCells::parse(bytes)?.single_root()?)
}

pub fn to_boc(cell: &ArcCell) -> Result<Vec<u8>, TonError> {
    Ok(BagOfCells::new(&[Arc::clone(cell)]).serialize(false)?)
}
