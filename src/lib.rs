//! rota: a lead dispatch daemon for service marketplaces.
//!
//! # Layout
//!
//! ```text
//! platform --ws--> gateway --> router --(tenant,zone,category)--> shard actor
//!                                                                   | core::Shard (pure)
//!                                                  ledger <---------+ (credits, budgets;
//!                                                                   |  shared by all shards)
//!                                                                   v
//!                                                        wal (group commit)
//!                                                                   |
//!                                   subscribers <--ws-- stream (only after durable)
//! ```
//!
//! | module | what it owns | what it may not touch |
//! |---|---|---|
//! | [`ids`] | string ids, [`ids::Millis`] time, [`ids::ShardKey`] | anything else |
//! | [`core`] | the pure rules engine: policy, pros, leads, offers, rotation, explain | I/O, clocks, threads, async, metrics |
//! | [`ledger`] | credits and auto-buy budgets, concurrent and idempotent | I/O, clocks |
//! | [`pricing`] | R11 lead prices in credits, with their components; category stats learning | state, I/O, floats |
//! | [`wal`] | record framing, segments, group-commit writer, snapshots, recovery | what records mean |
//! | [`telemetry`] | metric names, units, buckets and handles; Prometheus recorder; log setup | rules, state, I/O beyond `/proc/self` |
//!
//! Every state change is decided by the core (`decide`), written to the WAL as an
//! event, applied (`apply`, also used by replay) and only then published.

pub mod core;
pub mod ids;
pub mod ledger;
pub mod pricing;
pub mod telemetry;
pub mod wal;
