use thiserror::Error;

/// What can go wrong on the TON side before a ledger rule is involved.
#[derive(Debug, Error)]
pub enum TonError {
    /// Building, parsing or serializing a cell or BOC failed.
    #[error("cell: {0}")]
    Cell(String),
    /// The TON API (toncenter, or the emulator in its place) refused a request, failed, or answered
    /// something unexpected.
    #[error("TON API: {0}")]
    Api(String),
    /// A get-method ran and exited with an error code (it refused: no such proxy, not open).
    #[error("get-method {method} exited with {exit_code}")]
    GetMethod {
        /// The get-method's name.
        method: String,
        /// Its exit code.
        exit_code: i32,
    },
    /// A sent message produced no transaction on its destination within the confirmation
    /// timeout.
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
