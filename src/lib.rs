//! Frostglass: a privacy-preserving data trading sandbox.
//!
//! Buyers send SQL; the query runs in-domain under the policies of
//! `policies/`; only aggregates that pass the release rules come back, each
//! recorded in a durable usage log before it is answered. Start at
//! [`pipeline`], which reads top to bottom.
//!
//! Dependencies point one way (a test in `tests/api/architecture.rs` keeps
//! them so): front doors ([`api`], the CLI binary in `src/cli/`,
//! [`fuzzing`]) → [`pipeline`] → [`app`] (the shared services and admin
//! changes) → {[`release`] → [`policy`], [`ledger`], [`accounting`]} →
//! {[`catalog`], [`engine`], [`store`]} → {[`config`], [`validate`],
//! [`error`], [`auth`]} → [`util`]. Only [`api`] knows HTTP.

pub mod accounting;
pub mod api;
pub mod app;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod flight;
pub mod fuzzing;
pub mod ledger;
pub mod pipeline;
pub mod policy;
pub mod release;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod util;
pub mod validate;
