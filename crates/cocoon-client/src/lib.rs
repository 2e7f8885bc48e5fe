//! The client role: a local HTTP gateway that speaks the OpenAI API to apps and the cocoon
//! protocol to a proxy.
//!
//! Any OpenAI SDK pointed at the gateway works unchanged: `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions`, streaming or not. This crate owns
//! the translation between the two (requests, answers, errors), the connections to its
//! proxies (with failover between them), `GET /v1/network` (what the network offers), and
//! the check of the bill the proxy hands over with each answer.

mod api;
mod bill;
pub mod chunks;
mod config;
mod guard;
mod key_usage;
mod link;
mod logprobs;
mod metrics;
pub mod openai;
mod pool;
mod sealing;

pub use api::Gateway;
pub use config::{ClientConfig, ClientPayments, SealingConfig};
pub use guard::{AccessConfig, ApiKey};
pub use link::ProxyLink;
pub use pool::{ProxyPool, ProxyState};
