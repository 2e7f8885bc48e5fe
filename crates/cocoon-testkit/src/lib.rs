//! What it takes to run a cocoon network without a model or a cluster.
//!
//! - [`dev`]: a proxy, its workers, a gateway and a ledger (embedded, or the TON contracts on a
//!   local emulated chain) in one process, every hop mutual RA-TLS with development
//!   attestation. `cocoon dev` runs it with the embedded llama.cpp engine; tests run it with
//!   the doubles below, so the proxy, worker and client crates test themselves end to end
//!   without linking llama.cpp.
//! - [`backends`]: [`Backend`](cocoon_engine::Backend)s whose behaviour a test scripts
//!   (serve, refuse, stall, break off mid-stream), with exact token counts.
//! - [`http`]: the few HTTP and polling helpers every end-to-end test needs.
//! - [`pccs`]: a server shaped like a PCCS (Intel's v4 API) that serves recorded collateral,
//!   goes down and comes back, for tests of collateral fetching.

pub mod backends;
pub mod dev;
pub mod http;
pub mod pccs;

/// The engine crate, for tests that script a [`Backend`](cocoon_engine::Backend) of their own
/// (its trait, event stream and stats types) without depending on it themselves.
pub use cocoon_engine;
