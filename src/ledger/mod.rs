//! Ledger: every decision, settlement, release, approval step and runtime change as an
//! [`event::Event`], on its way to the central ledger.
//!
//! Owns: the event model. Imports: decide types, serde.

pub mod event;
