//! Transport for every cocoon hop: mutual TLS 1.3 (configs from `cocoon-tls`) carrying HTTP/2,
//! so many requests share one connection and cancelling one stream (`RST_STREAM`) cancels the
//! work behind it.
//!
//! Workers dial out to their proxy (they may sit behind NAT) but *serve* HTTP/2 on that
//! connection: the TLS client is the HTTP/2 server. [`serve_h2`] and [`Channel::handshake`] work
//! on any TLS stream, whichever side opened it.

mod body;
mod channel;
mod conn;
mod tap;

pub use body::{
    Body, BoxError, EventReader, Unseal, empty, error_response, event_stream_response, frames_body,
    full, json, no_route, read_json, response, status_of,
};
pub use channel::Channel;
pub use conn::{
    ClientTls, HANDSHAKE_TIMEOUT, ServerTls, accept_tls, connect_tls, serve_h2, serve_h2_counting,
};
pub use tap::{Direction, Tapped, WireTap};
