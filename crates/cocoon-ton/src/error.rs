use thiserror::Error;

/// What can go wrong on the TON side before a ledger rule is involved.
#[derive(Debug, Error)]
pub enum TonError {
    #[error("cell: {0}")]
    Cell(String),
    #[error("TON API: {0}")]
    Api(String),
    #[error("not confirmed: {0}")]
    NotConfirmed(String),
}

impl From<tonlib_core::cell::TonCellError> for TonError {
    fn from(e: tonlib_core::cell::TonCellError) -> Self {
        Self::Cell(e.to_string())
    }
}

impl From<tonlib_core::message::TonMessageError> for TonError {
    fn from(e: tonlib_core::message::TonMessageError) -> Self {
        Self::Cell(e.to_string())
    }
}

impl From<tycho_types::error::Error> for TonError {
    fn from(e: tycho_types::error::Error) -> Self {
        Self::Cell(e.to_string())
    }
}
