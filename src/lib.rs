//! Frostglass: a privacy-preserving data trading sandbox.
//!
//! Buyers send SQL; the query runs in-domain under the policies of
//! `policies/`; only aggregates that pass the release rules come back, each
//! recorded in a durable usage log before it is answered. Start at
//! [`query`], which reads top to bottom as the pipeline.

pub mod api;
pub mod auth;
pub mod bench;
pub mod catalog;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod fuzzing;
pub mod ledger;
pub mod merkle;
pub mod metering;
pub mod policy;
pub mod query;
pub mod release;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod validate;
pub mod verify;
