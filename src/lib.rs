//! preauth-sidecar: a pingora reverse proxy that sits beside an LLM gateway and decides, inline,
//! whether each LLM call may go out and what it may cost.
//!
//! Layout (dependency rule: `A ← B` means B may import A):
//! - [`decide`] — pure policy, no I/O. ← everything.
//! - [`config`] — environment and files → typed `Config`, every error collected.
//! - [`store`] — counters, leases and runtime policy behind object-safe traits.
//! - [`telemetry`] — every metric and the audit log in one place.
//! - [`proxy`] — the only code touching pingora's `Session`.
//! - [`admin`] — the admin listener.
//! - [`worker`] — background services (sweep).
//! - [`server`] — composition: builds the pingora `Server` from a `Config`.
//! - [`demo`] — the built-in fake upstream and the `demo` command.
#![forbid(unsafe_code)]

pub mod admin;
pub mod clock;
pub mod commit;
pub mod config;
pub mod decide;
pub mod demo;
pub mod drain;
pub mod ids;
pub mod intern;
pub mod jsonw;
pub mod ledger;
pub mod proxy;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod worker;
