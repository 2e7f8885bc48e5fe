//! The proxy's own end-to-end tests, on the testkit's in-process network with scripted
//! workers (no model, no llama.cpp): the market (prices, failover, mid-stream deaths) and the
//! abuse limits, and the operator's listener and dashboard.

mod admin;
mod dashboard;
mod limits;
mod market;
mod reload;
mod sealed;
