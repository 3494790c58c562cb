//! rota-loadtest: generates marketplace traces and replays them against a running
//! rota over websockets, open loop, measuring acknowledgement and delivery latency
//! and checking exactly-once delivery.
//!
//! # Layout
//! * [`wire`]: protocol v1 as documented in `docs/PROTOCOL.md` (own types, on purpose).
//! * [`mpscan`]: the fast MessagePack reader of replies and stream events.
//! * [`trace`]: the trace file format (`.jsonl`, `.msgpack`).
//! * [`gen`]: the synthetic marketplace (`gen`).
//! * [`schedule`]: intended send times (open loop).
//! * [`checker`]: exactly-once checks.
//! * [`replay`]: connections, sending, receiving, measuring (`replay`).
//! * [`hostcpu`]: how busy the machine was while sending (the tool shares it).
//! * [`report`]: the percentile table, JSON summary, `.hgrm`, interval log, chart.
//! * [`search`]: `--max-rate`, the highest rate within a p99 bound.
//!
//! Data flow: trace -> schedule (intended times) -> sender (one task, feed + flush per
//! tick per connection) -> rota -> readers (replies, stream) -> recorder (histograms,
//! checker) -> report.

pub mod checker;
pub mod clock;
pub mod gen;
pub mod hostcpu;
pub mod mpscan;
pub mod replay;
pub mod report;
pub mod schedule;
pub mod search;
pub mod trace;
pub mod wire;
