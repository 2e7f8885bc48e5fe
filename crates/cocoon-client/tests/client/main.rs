//! The gateway's own end-to-end tests, on the testkit's in-process network with scripted
//! workers: no model, no llama.cpp.

mod access;
mod api;
mod failover;
mod review_access;
mod review_choices;
mod scripted;
