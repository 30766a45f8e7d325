//! Integration tests: the real server, real HTTP.

mod helpers;

mod hardening;

mod admin;
mod architecture;
mod auth;
mod catalog;
mod channels;
mod cli;
#[cfg(feature = "ballista")]
mod cluster;
mod console;
mod flight;
mod fuzz_replay;
mod gate;
mod leaks;
mod ledger;
mod ledger_scale;
mod limits;
mod market;
mod metering;
mod owners;
mod policy;
mod privacy;
mod queries;
mod random_sql;
mod restart;
mod utility;
