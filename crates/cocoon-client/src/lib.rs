//! The client role: a local HTTP gateway that speaks the OpenAI API to apps and the cocoon
//! protocol to a proxy.
//!
//! Any OpenAI SDK pointed at the gateway works unchanged: `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions`, streaming or not. This crate owns
//! the translation between the two (requests, answers, errors) and the connection to the proxy.

mod api;
mod config;
mod link;
mod openai;

pub use api::Gateway;
pub use config::{ClientConfig, ClientPayments};
pub use link::ProxyLink;
