//! Black-box integration tests: the real pingora proxy on ephemeral loopback ports in front of
//! the built-in fake upstream. One test binary (link once), one module per area.

mod support;

mod admin;
mod approvals;
mod cli;
mod drills;
mod fleet;
mod gate;
mod guards;
mod h1;
mod ledger;
mod proxy;
mod spend;
