//! The proxy role: the meeting point of clients and workers.
//!
//! One TLS port serves both; the ALPN name a peer offers says which it is. Workers connect
//! out to the proxy and stay connected; the proxy keeps them in a [`WorkerSet`] and opens
//! HTTP/2 streams to them. Clients send generation requests, which the proxy routes to the
//! worker the [`market`] picks (by price, load, measured performance and cache affinity),
//! fails over to another before the first token, and relays back event by event. This crate
//! owns that routing, the worker registry and its health checks, who is admitted (attestation policies per role), what
//! each request costs (reservation, settlement, the proxy's durable record, batched commits to
//! the ledger), the abuse limits per client and address, the operator's `[admin]` listener (the whole status;
//! clients see only aggregates) and controls, and the proxy's configuration and its reloads.

mod admin;
mod admission;
mod billing;
mod config;
mod handshakes;
mod limits;
pub mod market;
mod metrics;
mod relay;
mod reload;
mod server;
mod workers;

pub use admin::AdminConfig;
pub use admission::Refusal;
pub use billing::{Book, BookError, ClientRecord, PaymentsConfig, PaymentsStatus, WorkerRecord};
pub use config::{LimitsConfig, ProxyConfig, RoutingConfig};
pub use reload::Controls;
pub use server::{LoadStatus, Proxy, ProxyStatus, PublicStatus, StatusSource, WorkerStatus};
pub use workers::{WorkerEntry, WorkerSet};
