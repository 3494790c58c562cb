//! rota: a lead dispatch daemon for service marketplaces.
//!
//! # Layout
//!
//! ```text
//! platform --ws--> server::ws --> engine (router) --(tenant,zone,category)--> engine::actor
//!                                                                   | core::shard (pure)
//!                                                  ledger <---------+ (credits, budgets;
//!                                                                   |  shared by all shards)
//!                                                                   v
//!                                                        wal (group commit)
//!                                                                   |
//!                                   subscribers <--ws-- engine::hub (only after durable)
//! ```
//!
//! | module | what it owns | what it may not touch |
//! |---|---|---|
//! | [`ids`] | string ids, [`ids::Millis`] time, [`ids::ShardKey`] | anything else |
//! | [`core`] | the pure rules engine: policy, pros, leads, offers, rotation, explain, order requests | I/O, clocks, threads, async, metrics |
//! | [`pricing`] | R11 lead price from category statistics, integer math | I/O, clocks |
//! | [`ledger`] | credits and auto-buy budgets, concurrent and idempotent | I/O, clocks |
//! | [`wal`] | record framing, segments, group-commit writer, snapshots, recovery | what records mean |
//! | [`engine`] | shard actors, money execution, recovery, snapshots, stream hubs | sockets |
//! | [`protocol`] | protocol v1 messages and their JSON / MessagePack codecs | I/O |
//! | [`ratelimit`] | token buckets against request floods, on one shared clock | rules, I/O |
//! | [`server`] | websocket gateway, admin HTTP, signals | rules |
//! | [`config`] | daemon config: defaults < file < env < flags | |
//! | [`clock`] | the only wall-clock reader; the manual test clock | |
//! | [`telemetry`] | metric names, units, buckets and handles; Prometheus recorder; log setup | rules, state, I/O beyond `/proc/self` |
//!
//! Every state change is decided by the core (`decide`), written to the WAL as an
//! event, applied (`apply`, also used by replay) and only then published.

pub mod clock;
pub mod config;
pub mod core;
pub mod engine;
pub mod ids;
pub mod ledger;
pub mod pricing;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod telemetry;
pub mod wal;
