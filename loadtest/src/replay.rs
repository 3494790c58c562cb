//! Replays a trace against a running rota, open loop, and measures it.
//!
//! * Connections: `connections` ingest websockets per tenant plus one `subscribe`
//!   stream per distinct token (tenants sharing a token share a daemon tenant, and so
//!   its stream), all with `TCP_NODELAY` (tungstenite leaves Nagle on). With
//!   [`Resubscribe`] each stream leaves and resumes (`resume_from`) on a schedule.
//! * Setup: the records before the first lead (pros, credits) are sent pipelined and
//!   all answered before the clock starts; they are not measured.
//! * Timed phase: one sender task walks the schedule; each wake-up it encodes every
//!   record that is due, then writes each connection's share (`feed`s and one `flush`),
//!   the connections side by side. Everything about a lead goes on one connection,
//!   so a response is never overtaken by its lead's publish on another socket.
//! * Latency is receipt time minus *intended* send time: `ack` for publish replies
//!   (durable acknowledgement), `delivery` for the lead's first `offered` event on
//!   the stream. `send lag` runs from the intended time to the return of the flush
//!   of the request's own connection (or to its reply, if that came first), recorded
//!   as soon as that flush returns. `ack ok, service` is `ack ok` measured from there
//!   instead: the daemon's share, without the tool's own send lag (which, on a
//!   saturated host, is part of what clients would see). A reply that is read before
//!   its write was recorded keeps its latency until it is, so every `ack ok` has a
//!   service sample.
//! * Ids are rewritten per run (`<run_tag>-<lead ordinal>`, `<run_tag>-<lap>-<client>`,
//!   `<run_tag>-<lap>-<op>`) so one trace can be replayed many times against one
//!   daemon, and stream events map back to the schedule without a lookup table.
//!
//! Bounded: every loop ends with the schedule, the drain timeout or a closed socket.

use crate::checker::{Checker, Violations};
use crate::clock::{mono_ns, wall_ms, Sleeper};
use crate::schedule::{self, Pacing, Plan, TimedRecord};
use crate::trace::{Record, TRACE_EPOCH_MS};
use crate::wire::{self, Encoding, Envelope, Incoming, LeadReply, Request, SubscribedReply};
use anyhow::{bail, Context};
use futures_util::stream::SplitStream;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;
type Source = SplitStream<Ws>;
type Sink = futures_util::stream::SplitSink<Ws, Message>;

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub url: String,
    /// `(tenant, token)`; tenant `None` = the records without a tenant.
    pub tokens: Vec<(Option<String>, String)>,
    pub connections: usize,
    pub pacing: Pacing,
    pub duration: Option<Duration>,
    pub encoding: Encoding,
    /// How long to wait after the last send for replies and stream events.
    pub drain: Duration,
    /// Shortest gap between two sender wake-ups (batching).
    pub batch: Duration,
    pub run_tag: String,
    pub progress: bool,
    /// Length of one interval of the interval log and the chart.
    pub interval: Duration,
    /// Hosts besides loopback that may be targeted (must be given explicitly).
    pub allowed_hosts: Vec<String>,
    /// Runtime threads for the tool (1 = everything on one thread).
    pub threads: usize,
    /// Skip the trace's setup records (they were sent in an earlier run against the
    /// same data, e.g. before a restart).
    pub skip_setup: bool,
    /// Writes every request sent and every reply received as JSON lines (see
    /// [`RecordLog`]), so an auditor can compare the daemon with what it said.
    pub record: Option<std::path::PathBuf>,
    /// Subscriptions opened and never read (slow consumers), to see the daemon cut them
    /// off (4008) while the other streams keep their latency.
    pub stalled_subscribers: usize,
    /// Subscribe with `batch: true` (events in `events` frames) instead of one frame
    /// per event.
    pub stream_batch: bool,
    /// Each tenant's stream subscription leaves and resumes on this schedule (see
    /// [`Resubscribe`]); `None` = it stays connected for the whole run.
    pub resubscribe: Option<Resubscribe>,
    /// Sent and checked like the rest, but left out of the latency histograms and
    /// the throughput: the first this-long of the schedule, on top of `duration`
    /// (wrk2's calibration period). Connections, the daemon's and the tool's buffers
    /// and caches start cold; the intervals still show it.
    pub warmup: Duration,
}

impl ReplayConfig {
    /// One connection to `url` with `token` for the records without a tenant, JSON,
    /// a batched stream, one pass of the trace, a 5 s drain, no progress bar, nothing
    /// written: a base for callers that set only what they need (`..`).
    pub fn new(url: impl Into<String>, token: impl Into<String>, pacing: Pacing) -> Self {
        ReplayConfig {
            url: url.into(),
            tokens: vec![(None, token.into())],
            connections: 1,
            pacing,
            duration: None,
            encoding: Encoding::Json,
            drain: Duration::from_secs(5),
            batch: Duration::from_micros(200),
            run_tag: String::new(),
            progress: false,
            interval: Duration::from_secs(1),
            allowed_hosts: vec![],
            threads: 1,
            skip_setup: false,
            record: None,
            stalled_subscribers: 0,
            stream_batch: true,
            resubscribe: None,
            warmup: Duration::ZERO,
        }
    }
}

/// `--resubscribe-every` / `--away`: during the timed phase each tenant's stream
/// subscription closes its websocket cleanly every `every`, stays away for `away`,
/// reconnects (same token, encoding and `batch` setting) and sends `subscribe` with
/// `resume_from` = the last seq it received, then reads on. Stream `i` of `n` leaves at
/// `k * every + i * every / n` (k = 1, 2, ...) from the start of the timed phase, so the
/// tenants do not all leave at once; only departures before the end of the timed phase
/// happen, and a departure that falls while the subscription is still catching up is
/// skipped (the next one after the catch-up is taken).
///
/// The sequence check (`stream_seq_gaps`) and the exactly-once checks run across
/// resumes: a resume must go on at the last seq + 1. Delivery latency stays measured
/// from each lead's intended send time, so a lead published while its subscriber was
/// away is charged the time away too; `delivery_outside_catch_up` in the summary leaves
/// the catch-ups out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resubscribe {
    pub every: Duration,
    pub away: Duration,
}

impl Resubscribe {
    /// Refuses a schedule in which a subscriber would leave again before it is back.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.every.is_zero(), "--resubscribe-every must be longer than 0");
        anyhow::ensure!(
            self.away < self.every,
            "--away ({:?}) must be shorter than --resubscribe-every ({:?}): a subscriber must be back \
             before it is due to leave again",
            self.away,
            self.every
        );
        Ok(())
    }

    /// When stream `i` of `n` next leaves: its first departure strictly after `after`
    /// (both from the start of the timed phase), if that is before `span`, the end of
    /// the timed phase.
    pub fn next_departure(&self, i: usize, n: usize, after: Duration, span: Duration) -> Option<Duration> {
        let every = self.every.as_nanos().max(1);
        let offset = every * i as u128 / n.max(1) as u128;
        let after = after.as_nanos();
        let k = if after < offset + every { 1 } else { (after - offset) / every + 1 };
        let t = k * every + offset;
        (t < span.as_nanos()).then(|| Duration::from_nanos(u64::try_from(t).unwrap_or(u64::MAX)))
    }
}

/// The oldest cursor a `resume_too_old` error names: rota says `events before N are no
/// longer kept; resume from N-1 or later` (docs/PROTOCOL.md, Resume).
pub fn oldest_cursor(message: &str) -> Option<u64> {
    let rest = message.split("resume from ").nth(1)?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// `--record`: what the tool sent and what it was told, one JSON object per line:
/// `{"sent": <request frame>}` before a request goes out (setup and timed) and
/// `{"reply": <reply frame>}` for every reply (`ok` or `error`), in either encoding,
/// written as JSON. Requests and replies pair up by the frame's `id`. A request
/// without a reply was in flight when the run ended (e.g. the daemon was killed): its
/// outcome is unknown. Stream events are not recorded.
pub struct RecordLog {
    out: std::io::BufWriter<std::fs::File>,
}

impl RecordLog {
    pub fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RecordLog { out: std::io::BufWriter::new(f) })
    }

    fn sent(&mut self, id: &str, req: &Request) {
        self.line("sent", &serde_json::to_value(Envelope { id, request: req }));
    }

    fn reply(&mut self, enc: Encoding, bytes: &[u8]) {
        self.line("reply", &wire::decode::<serde_json::Value>(enc, bytes));
    }

    fn line<E>(&mut self, key: &str, v: &Result<serde_json::Value, E>) {
        use std::io::Write;
        let v = match v {
            Ok(v) => v,
            Err(_) => &serde_json::Value::Null,
        };
        // A failed write shows up as a missing line; `finish` reports the error.
        let _ = writeln!(self.out, "{}", serde_json::json!({ key: v }));
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        self.out.flush().context("writing the --record file")
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            p9999: ms(h.value_at_quantile(0.9999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One interval of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IntervalStat {
    /// Seconds from the start of the timed phase to the end of this interval.
    pub t_s: f64,
    pub sent_per_s: f64,
    /// Replies to leads per second, errors included (the `ack` histograms' samples).
    pub acks_per_s: f64,
    /// Replies to leads per second that were errors (under overload: `overloaded`).
    #[serde(default)]
    pub lead_errors_per_s: f64,
    pub deliveries_per_s: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    pub errors: u64,
}

/// `errors_by_code`: an `ok` reply to a publish that does not read as a lead reply. Its
/// acknowledgement is unknown, so the lead's delivery goes unchecked.
pub const UNREADABLE_REPLY: &str = "unreadable_reply";
/// `errors_by_code`: a stream frame that does not read as events. What it carried (a
/// delivery, or a duplicate) goes unchecked.
pub const UNREADABLE_EVENT: &str = "unreadable_event";
/// `errors_by_code`: a frame on an ingest connection that does not read as a reply.
pub const UNREADABLE_FRAME: &str = "unreadable_frame";
/// The codes of frames the tool could not read: any fails the run
/// ([`Summary::failures`]), since what they said was not checked and a run that cannot
/// see a broken promise must not pass.
pub const UNREADABLE: [&str; 3] = [UNREADABLE_REPLY, UNREADABLE_EVENT, UNREADABLE_FRAME];

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub run_tag: String,
    pub encoding: Encoding,
    pub connections: usize,
    /// Leads per second the schedule asked for.
    pub target_leads_per_s: f64,
    /// Measured leads (intended after the warm-up) answered `ok`, per second of
    /// `measured_s`.
    pub achieved_leads_per_s: f64,
    /// The seconds `achieved_leads_per_s` is over: from the end of the warm-up to the
    /// end of the leads' span (the last lead's intended time plus one gap), or to the
    /// last acknowledgement if that came later. Warm-up not included.
    pub measured_s: f64,
    /// Seconds from the start of the timed phase to the last send, **warm-up
    /// included** (not the span of `achieved_leads_per_s`: that is `measured_s`).
    pub duration_s: f64,
    /// [`ReplayConfig::warmup`]: the first this-many seconds of the timed phase are
    /// not in the histograms nor in `achieved_leads_per_s` (0 = none).
    #[serde(default)]
    pub warmup_s: f64,
    pub setup_records: u64,
    pub setup_s: f64,
    /// Requests written to a connection (followups skipped and requests never sent are
    /// not in it).
    pub sent: u64,
    /// Publishes written to a connection.
    pub sent_leads: u64,
    /// Planned requests never written: the daemon closed every ingest connection (or
    /// the one they were routed to) before their turn came. A run cut short is not a
    /// measurement of the planned load: any fails the run ([`Summary::failures`]).
    pub not_sent: u64,
    /// Of `not_sent`, publishes.
    pub not_sent_leads: u64,
    /// Requests about a lead (responses, declines, replies) not sent because that
    /// lead's publish had been answered with an error (e.g. shed as `overloaded`): a
    /// platform does not act on a lead rota refused. Those whose lead's answer had not
    /// arrived yet are sent (and answered `unknown_lead`).
    pub followups_skipped: u64,
    pub replies: u64,
    pub missing_replies: u64,
    /// Replies to a request that had already been answered (every request gets exactly
    /// one reply): a protocol violation, also in `errors_by_code` as `duplicate_reply`.
    pub duplicate_replies: u64,
    pub acks_accepted: u64,
    pub acks_rejected: u64,
    /// Error replies by code, and frames the tool could not read ([`UNREADABLE`]).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Every publish reply, `ok` or error.
    pub ack: Percentiles,
    /// Publishes answered `ok` (accepted or rejected by the quality gate).
    pub ack_ok: Percentiles,
    /// Publishes answered with an error (e.g. `overloaded` when the daemon sheds).
    pub ack_error: Percentiles,
    pub delivery: Percentiles,
    /// `delivery` with every measured lead refused with an error (e.g. shed as
    /// `overloaded`) added at [`REFUSED_US`], above any bound: a refused lead is never
    /// delivered, so it is not left out of the tail. What the `--max-rate` verdict
    /// bounds: refusals and slow deliveries share the 1% above p99.
    pub delivery_counting_refused: Percentiles,
    /// Measured leads (after the warm-up) answered with an error.
    pub leads_refused: u64,
    /// Replies to everything but publishes.
    pub other_replies: Percentiles,
    /// How late the tool itself sent: from a request's intended time to the return of
    /// the flush that wrote it on its connection (or to its reply, if that came first:
    /// it was on the wire by then). Each connection's requests are timed by their own
    /// connection's flush. The tool's share of latency, and the daemon's pushing back
    /// on a connection it does not read fast enough.
    pub send_lag: Percentiles,
    /// Publishes answered `ok`, from the moment `send_lag` ends (not the intended
    /// time): the daemon's share of `ack_ok`. One sample per `ack_ok` sample, 0 for a
    /// publish answered before its connection's flush returned.
    pub ack_ok_service: Percentiles,
    /// Of `ack_ok`, publishes without an `ack_ok_service` sample: answered, but their
    /// write was never recorded (0 unless the run ended in the middle of a write).
    pub ack_ok_service_missing: u64,
    pub stream_events: u64,
    pub stream_seq_gaps: u64,
    pub stream_closed_early: bool,
    /// How each stalled subscription ended: `4008 slow subscriber; resume_from=N`, or
    /// `open` if the daemon never closed it.
    pub stalled_subscribers: Vec<String>,
    pub violations: Violations,
    pub intervals: Vec<IntervalStat>,
    /// How busy the machine was during the timed phase (absent where `/proc` is not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<crate::hostcpu::HostCpu>,
    /// Tool threads (`--threads`), for reading `host`.
    pub tool_threads: usize,
    /// What the stream subscriptions' departures and resumes did (`--resubscribe-every`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resubscribe: Option<ResubscribeSummary>,
}

impl Summary {
    /// The promises the run saw broken, one line each; empty = the run passed. The one
    /// failure predicate: the exit code of a replay is 1 when this is not empty (a run
    /// cut short included: what it measured is not the planned load), and a
    /// `--max-rate` step fails on it before its own bounds ([`crate::search::verdict`]).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.not_sent > 0 {
            f.push(format!(
                "{} planned requests ({} leads) never sent: the daemon closed the ingest connections",
                self.not_sent, self.not_sent_leads
            ));
        }
        if self.missing_replies > 0 {
            f.push(format!("{} requests unanswered", self.missing_replies));
        }
        if self.duplicate_replies > 0 {
            f.push(format!("{} requests answered twice", self.duplicate_replies));
        }
        if self.violations.total() > 0 {
            f.push(format!("{} exactly-once violations", self.violations.total()));
        }
        let unreadable: Vec<String> = UNREADABLE
            .iter()
            .filter_map(|&code| {
                self.errors_by_code.get(code).filter(|&&n| n > 0).map(|n| format!("{code}={n}"))
            })
            .collect();
        if !unreadable.is_empty() {
            f.push(format!("frames the tool could not read, so not checked: {}", unreadable.join(", ")));
        }
        if self.stream_seq_gaps > 0 {
            f.push(format!("{} stream sequence gaps", self.stream_seq_gaps));
        }
        if self.stream_closed_early {
            f.push("a stream subscription was closed by the server (or could not resume)".into());
        }
        if self.resubscribe.as_ref().is_some_and(|r| r.failed()) {
            f.push("a resume lost events or could not reconnect".into());
        }
        f
    }
}

/// `--resubscribe-every`: the resumes of the run.
///
/// A resume's *catch-up* is what the daemon had published when it answered the resume:
/// the events from `resume_from + 1` up to `next_seq - 1` (`next_seq` from the `ok`).
/// `catch_up_events` counts them; `catch_up_ms` runs from sending the `subscribe` to
/// receiving event `next_seq - 1` (to the `ok` when there was nothing to catch up), so
/// it includes the reconnect's round trip but not the time away. Events after that
/// were published during the catch-up and count as live.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResubscribeSummary {
    pub every_s: f64,
    pub away_s: f64,
    /// Times a subscription closed its websocket to come back later.
    pub departures: u64,
    /// Resumes answered `ok`.
    pub resumes: u64,
    /// Resumes answered `resume_too_old`: the daemon no longer kept the events after the
    /// cursor, so the stream lost them (a continuity failure; the run fails).
    pub resumes_too_old: u64,
    /// Seqs lost to `resume_too_old` (from the cursor to the oldest cursor named); each
    /// such resume also counts as one seq gap.
    pub resume_too_old_lost_seqs: u64,
    /// `stream N: resume_from=A, oldest cursor B (C seqs lost)` per `resume_too_old`.
    pub resume_too_old_details: Vec<String>,
    /// Reconnects or resumes that failed otherwise (connection refused, another error
    /// code, no reply): that stream stopped there.
    pub resume_failures: u64,
    /// Times the server closed a subscription (e.g. `4008`: too slow, or its catch-up
    /// from the history on disk was overtaken); the stream resumed at once, like a
    /// client would, and is checked the same way.
    pub server_closes: u64,
    pub catch_up_events_sum: u64,
    pub catch_up_events_max: u64,
    /// Over the catch-ups that finished.
    pub catch_up_ms_mean: f64,
    pub catch_up_ms_max: f64,
    /// Catch-ups that did not reach `next_seq - 1`: the run ended or the server closed
    /// the stream during them.
    pub catch_ups_unfinished: u64,
    /// From sending the `subscribe` to the first lead delivered within [`LIVE_MS`] of its
    /// intended send time (the subscriber is at the head of the stream again: events
    /// published during the catch-up are read too), over the resumes that got there.
    pub back_to_live_ms_mean: f64,
    pub back_to_live_ms_max: f64,
    /// Resumes that were not back to live before the subscription left again or the
    /// run ended (reading the backlog was not fast enough to overtake the stream).
    pub back_to_live_never: u64,
    /// `delivery` without the leads whose first offer came in a catch-up (and so carries
    /// the time away).
    pub delivery_outside_catch_up: Percentiles,
    /// Every resume, in order of departure per stream.
    pub log: Vec<ResumeRecord>,
}

impl ResubscribeSummary {
    /// A resume lost events or a stream could not come back.
    pub fn failed(&self) -> bool {
        self.resumes_too_old > 0 || self.resume_failures > 0
    }
}

/// One departure and its resume.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResumeRecord {
    /// Stream (tenant) index.
    pub stream: usize,
    /// `scheduled`, or `server close: <code> <reason>`.
    pub cause: String,
    /// Seconds from the start of the timed phase to the departure.
    pub left_at_s: f64,
    /// The cursor sent (after any `resume_too_old`, the oldest cursor named).
    pub resume_from: u64,
    /// `next_seq` of the `ok`.
    pub next_seq: u64,
    pub catch_up_events: u64,
    /// `None`: the catch-up did not finish (see `catch_ups_unfinished`).
    pub catch_up_ms: Option<f64>,
    /// `None`: not back to live (see `back_to_live_never`).
    pub back_to_live_ms: Option<f64>,
}

/// A run's summary and its full histograms (for `.hgrm` files and the interval log).
pub struct Outcome {
    pub summary: Summary,
    pub ack: Histogram<u64>,
    pub delivery: Histogram<u64>,
    /// `(start, ack, delivery)` per interval.
    pub interval_hists: Vec<(Duration, Histogram<u64>, Histogram<u64>)>,
    pub interval: Duration,
}

/// The histograms' highest value: 10 min, in us.
const HIST_MAX_US: u64 = 600_000_000;

/// The delivery latency a lead refused with an error counts as in
/// [`Summary::delivery_counting_refused`]: the histograms' top, above any bound.
pub const REFUSED_US: u64 = HIST_MAX_US;

fn hist(sigfig: u8) -> Histogram<u64> {
    // Microseconds, 1 us to 10 min.
    Histogram::new_with_bounds(1, HIST_MAX_US, sigfig).expect("constant bounds are valid")
}

/// Checks that the URL points at loopback or at a host given explicitly.
pub fn check_target(url: &str, allowed: &[String]) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: only ws:// URLs are supported (plain websockets)"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
    };
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback || allowed.iter().any(|a| a == host) {
        return Ok(());
    }
    bail!("{host} is not a loopback address; pass --allow-host {host} to load-test it on purpose")
}

/// How long [`connect`] keeps trying a daemon that answers HTTP 503 (it is replaying
/// its log after a start, docs/OPERATIONS.md "Start").
const RECOVERING_PATIENCE: Duration = Duration::from_secs(300);

/// Opens a websocket to the daemon. A daemon still recovering answers HTTP 503 with
/// `Retry-After`: waited for (as it asks, between 50 ms and 5 s a time), for at most
/// [`RECOVERING_PATIENCE`], so a run started right after the daemon, or a stream
/// resuming across a restart, waits for it instead of failing.
async fn connect(url: &str, token: &str, enc: Encoding) -> anyhow::Result<Ws> {
    static SAID: AtomicBool = AtomicBool::new(false);
    let started = std::time::Instant::now();
    loop {
        match connect_once(url, token, enc).await {
            Ok(ws) => return Ok(ws),
            Err(e) => {
                let Some(wait) = recovering(&e) else { return Err(e) };
                if started.elapsed() >= RECOVERING_PATIENCE {
                    return Err(e.context(format!(
                        "the daemon still answers 503 (recovering) after {} s",
                        RECOVERING_PATIENCE.as_secs()
                    )));
                }
                if !SAID.swap(true, Ordering::Relaxed) {
                    eprintln!("the daemon at {url} is recovering its state (HTTP 503); waiting for it");
                }
                tokio::time::sleep(wait.clamp(Duration::from_millis(50), Duration::from_secs(5))).await;
            }
        }
    }
}

/// `Some(Retry-After)` when `e` is the daemon's answer while recovering (HTTP 503).
fn recovering(e: &anyhow::Error) -> Option<Duration> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    e.chain().find_map(|cause| match cause.downcast_ref::<WsError>() {
        Some(WsError::Http(resp)) if resp.status() == 503 => {
            let secs = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
            Some(Duration::from_secs(secs))
        }
        _ => None,
    })
}

async fn connect_once(url: &str, token: &str, enc: Encoding) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    req.headers_mut().insert("sec-websocket-protocol", enc.subprotocol().parse()?);
    let uri = req.uri().clone();
    let host = uri.host().context("URL without a host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let tcp =
        TcpStream::connect((host, port)).await.with_context(|| format!("connecting to {host}:{port}"))?;
    // Nagle would hold small frames back for tens of ms.
    tcp.set_nodelay(true)?;
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .with_context(|| format!("websocket upgrade at {url}"))?;
    let chosen = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
    anyhow::ensure!(chosen == Some(enc.subprotocol()), "the server chose subprotocol {chosen:?}");
    Ok(ws)
}

fn message(enc: Encoding, bytes: &[u8]) -> Message {
    match enc {
        // Our JSON encoder only produces UTF-8.
        Encoding::Json => Message::Text(String::from_utf8_lossy(bytes).into_owned()),
        Encoding::Msgpack => Message::Binary(bytes.to_vec()),
    }
}

fn payload(m: &Message) -> Option<&[u8]> {
    match m {
        Message::Text(t) => Some(t.as_bytes()),
        Message::Binary(b) => Some(b),
        _ => None,
    }
}

/// How to rewrite one record for this run.
struct Localizer {
    tag: String,
    /// Trace lead id -> position among the timed leads.
    lead_pos: HashMap<String, u32>,
    leads_per_lap: u32,
    speedup: f64,
}

impl Localizer {
    fn lead_ord(&self, lap: u32, trace_id: &str) -> Option<u32> {
        let pos = *self.lead_pos.get(trace_id)?;
        Some(lap * self.leads_per_lap + pos)
    }

    fn lead_id(&self, ord: u32) -> String {
        format!("{}-{ord}", self.tag)
    }

    fn parse_lead(&self, id: &str) -> Option<u32> {
        id.strip_prefix(self.tag.as_str())?.strip_prefix('-')?.parse().ok()
    }

    /// A trace time `t` of a record at `at_ms`, moved to the wall clock of its
    /// intended send time (relative durations scale with the replay speed).
    fn rebase(&self, t: i64, at_ms: u64, intended_wall_ms: i64) -> i64 {
        let offset = t - (TRACE_EPOCH_MS + at_ms as i64);
        intended_wall_ms + (offset as f64 / self.speedup) as i64
    }

    fn localize(&self, rec: &Record, lap: &str, lap_n: u32, lead_ord: u32, wall: i64) -> Request {
        let mut r = rec.request.clone();
        let at = rec.at_ms;
        match &mut r {
            Request::PublishLead { lead } => {
                lead.id = self.lead_id(lead_ord);
                lead.client.id = format!("{}-{lap}-{}", self.tag, lead.client.id);
                lead.created_at = self.rebase(lead.created_at, at, wall);
            }
            Request::Offer { lead, .. } => {
                *lead = match self.lead_ord(lap_n, lead) {
                    Some(ord) => self.lead_id(ord),
                    None => format!("{}-{lap}-{lead}", self.tag),
                };
            }
            Request::GrantCredits { op, .. } => *op = format!("{}-{lap}-{op}", self.tag),
            Request::SetAvailability { availability, .. } => {
                availability.paused_until = availability.paused_until.map(|t| self.rebase(t, at, wall));
                availability.vacation =
                    availability.vacation.map(|(a, b)| (self.rebase(a, at, wall), self.rebase(b, at, wall)));
            }
            Request::UpsertPro { pro } => {
                let a = &mut pro.availability;
                a.paused_until = a.paused_until.map(|t| self.rebase(t, at, wall));
                a.vacation = a.vacation.map(|(x, y)| (self.rebase(x, at, wall), self.rebase(y, at, wall)));
                for c in &mut pro.autobuy {
                    c.paused_until = c.paused_until.map(|t| self.rebase(t, at, wall));
                }
            }
            Request::RemovePro { .. } | Request::SetTopupRule { .. } => {}
        }
        r
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Which of a tenant's connections carries a record: by lead for lead traffic, by
/// pro otherwise, so each lead's and each pro's requests stay in order. (The timed
/// phase sends a publish by its client instead, and the lead's later requests after
/// it: see the sender.)
fn route(r: &Request, lead_ord: Option<u32>, n: usize) -> usize {
    let key = match (r, lead_ord) {
        (_, Some(ord)) => u64::from(ord),
        (Request::UpsertPro { pro }, _) => fnv(&pro.id),
        (
            Request::RemovePro { pro }
            | Request::SetAvailability { pro, .. }
            | Request::GrantCredits { pro, .. }
            | Request::SetTopupRule { pro, .. }
            | Request::Offer { pro, .. },
            _,
        ) => fnv(pro),
        (Request::PublishLead { lead }, None) => fnv(&lead.id),
    };
    (key % n as u64) as usize
}

/// The pro a request changes, if it changes one (what must stay in order for it).
fn pro_key(r: &Request) -> Option<&str> {
    match r {
        Request::UpsertPro { pro } => Some(&pro.id),
        Request::RemovePro { pro }
        | Request::SetAvailability { pro, .. }
        | Request::GrantCredits { pro, .. }
        | Request::SetTopupRule { pro, .. }
        | Request::Offer { pro, .. } => Some(pro),
        Request::PublishLead { .. } => None,
    }
}

/// [`route`] for the timed phase: a client's leads go on one connection (by client
/// id), so a duplicate (R2) never overtakes the lead it repeats (over two connections
/// the daemon would now and then take the repeat first, accept it and refuse the
/// original, against the trace's expectations); a lead's later requests go where its
/// publish went (`lead_conn`, by lead ordinal).
fn route_timed(r: &Request, lead_ord: Option<u32>, n: usize, lead_conn: &mut [u32]) -> usize {
    match (r, lead_ord) {
        (Request::PublishLead { lead }, Some(o)) => {
            let k = (fnv(&lead.client.id) % n as u64) as usize;
            if let Some(slot) = lead_conn.get_mut(o as usize) {
                *slot = k as u32;
            }
            k
        }
        (_, Some(o)) => match lead_conn.get(o as usize) {
            Some(&k) if k != u32::MAX => k as usize,
            _ => route(r, lead_ord, n),
        },
        _ => route(r, lead_ord, n),
    }
}

/// Shared state of a run, updated by the readers and the sender.
/// `Recorder::lag_us` of an item whose write time is not recorded yet.
const LAG_UNKNOWN: u32 = u32::MAX;

struct Recorder {
    start_ns: u64,
    plan: Arc<Plan>,
    timed_is_lead: Arc<Vec<bool>>,
    loc: Arc<Localizer>,
    ack: Histogram<u64>,
    ack_ok: Histogram<u64>,
    ack_error: Histogram<u64>,
    delivery: Histogram<u64>,
    other: Histogram<u64>,
    lag: Histogram<u64>,
    ack_ok_service: Histogram<u64>,
    /// Per plan item, how late it was written, in us (`LAG_UNKNOWN` until recorded).
    lag_us: Vec<u32>,
    /// Measured publishes answered `ok` before their write was recorded ([`Recorder::written`]):
    /// plan item -> ack latency (us). Their `ack_ok_service` sample is taken when the
    /// write is recorded; what is left at the end has none (`ack_ok_service_missing`).
    service_waiting: HashMap<usize, u64>,
    iv_ack: Histogram<u64>,
    iv_delivery: Histogram<u64>,
    iv_errors: u64,
    iv_lead_errors: u64,
    iv_deliveries: u64,
    interval_hists: Vec<(Duration, Histogram<u64>, Histogram<u64>)>,
    intervals: Vec<IntervalStat>,
    replies: u64,
    acks_accepted: u64,
    acks_rejected: u64,
    errors: BTreeMap<String, u64>,
    checker: Checker,
    stream_events: u64,
    seq_gaps: u64,
    last_seq: HashMap<usize, u64>,
    /// `delivery` for the leads whose first offer did not come in a resume's catch-up.
    delivery_live: Histogram<u64>,
    /// `delivery` plus [`REFUSED_US`] per measured lead refused with an error.
    delivery_refused: Histogram<u64>,
    leads_refused: u64,
    /// Departures and resumes (`--resubscribe-every`); the aggregates are filled in at
    /// the end of the run.
    resub: ResubscribeSummary,
    /// Reply received per plan item (a second reply to one id is a protocol error).
    answered: Vec<bool>,
    duplicate_replies: u64,
    /// Receipt time of the last publish reply.
    last_ack_ns: u64,
    /// Requests intended before this (from the start of the timed phase) are warm-up:
    /// not in the summary's histograms ([`ReplayConfig::warmup`]).
    warmup_ns: u64,
    /// Per lead (by ordinal), whether its publish was answered with an error; the
    /// sender skips that lead's later requests.
    refused: Arc<Vec<AtomicBool>>,
    log: Option<RecordLog>,
}

impl Recorder {
    fn latency_us(&self, t_ns: u64, recv_ns: u64) -> u64 {
        recv_ns.saturating_sub(self.start_ns + t_ns) / 1000
    }

    fn on_reply(&mut self, bytes: &[u8], enc: Encoding, f: &Incoming<'_>, recv_ns: u64) {
        if let Some(log) = self.log.as_mut() {
            log.reply(enc, bytes);
        }
        let Some(idx) =
            f.id.as_deref().and_then(|id| id.strip_prefix('i')).and_then(|n| n.parse::<usize>().ok())
        else {
            // Replies without our id (bad_frame) count as errors.
            if f.kind == "error" {
                *self.errors.entry(f.code.as_deref().unwrap_or("unknown").to_string()).or_default() += 1;
                self.iv_errors += 1;
            }
            return;
        };
        let Some(item) = self.plan.items.get(idx).copied() else { return };
        if std::mem::replace(&mut self.answered[idx], true) {
            self.duplicate_replies += 1;
            return;
        }
        self.replies += 1;
        let lat = self.latency_us(item.t_ns, recv_ns);
        let is_lead = self.timed_is_lead[item.rec as usize];
        if f.kind == "error" {
            *self.errors.entry(f.code.as_deref().unwrap_or("unknown").to_string()).or_default() += 1;
            self.iv_errors += 1;
            if is_lead {
                self.iv_lead_errors += 1;
                if item.t_ns >= self.warmup_ns {
                    self.leads_refused += 1;
                    // Not delivered, as far as a client knows: above any bound. (A lead
                    // in doubt that was delivered before its error came is already in.)
                    if !self.checker.offered(item.lead_ord) {
                        self.delivery_refused.saturating_record(REFUSED_US);
                    }
                }
                self.checker.on_ack_error(item.lead_ord, f.code.as_deref().unwrap_or("unknown"));
                if let Some(r) = self.refused.get(item.lead_ord as usize) {
                    r.store(true, Ordering::Relaxed);
                }
            }
        }
        let measured = item.t_ns >= self.warmup_ns;
        if is_lead {
            self.last_ack_ns = self.last_ack_ns.max(recv_ns);
            self.iv_ack.saturating_record(lat);
            if measured {
                self.ack.saturating_record(lat);
                if f.kind == "ok" {
                    self.ack_ok.saturating_record(lat);
                    let lag = self.lag_us[idx];
                    if lag == LAG_UNKNOWN {
                        // Answered before its connection's write returned (or before the
                        // writer took the lock, on another thread): sampled in `written`.
                        self.service_waiting.insert(idx, lat);
                    } else {
                        self.ack_ok_service.saturating_record(lat.saturating_sub(u64::from(lag)));
                    }
                } else {
                    self.ack_error.saturating_record(lat);
                }
            }
            if f.kind == "ok" {
                match wire::decode::<LeadReply>(enc, bytes) {
                    Ok(r) if r.result.status == "accepted" => {
                        self.acks_accepted += 1;
                        self.checker
                            .on_ack_accepted(item.lead_ord, r.result.offers.iter().map(|(p, _)| p.as_ref()));
                    }
                    Ok(_) => {
                        self.acks_rejected += 1;
                        self.checker.on_ack_rejected(item.lead_ord);
                    }
                    Err(_) => *self.errors.entry(UNREADABLE_REPLY.into()).or_default() += 1,
                }
            }
        } else if measured {
            self.other.saturating_record(lat);
        }
    }

    /// Plan item `idx` was written: the flush of its connection returned `done_ns` after
    /// the start of the timed phase. Its send lag runs from its intended time to then, or
    /// to its reply if that came first (a write the daemon held back by not reading:
    /// the item was on the wire by the time it was answered).
    fn written(&mut self, idx: usize, done_ns: u64) {
        let t_ns = self.plan.items[idx].t_ns;
        let mut us = done_ns.saturating_sub(t_ns) / 1000;
        if let Some(lat) = self.service_waiting.remove(&idx) {
            us = us.min(lat);
            self.ack_ok_service.saturating_record(lat - us);
        }
        if t_ns >= self.warmup_ns {
            self.lag.saturating_record(us);
        }
        self.lag_us[idx] = u32::try_from(us).unwrap_or(LAG_UNKNOWN - 1);
    }

    /// Returns the delivery latency (us) when the event is a lead's first offer.
    fn on_event(&mut self, stream: usize, f: &Incoming<'_>, recv_ns: u64, catching_up: bool) -> Option<u64> {
        self.stream_events += 1;
        if let Some(seq) = f.seq {
            if let Some(last) = self.last_seq.insert(stream, seq) {
                if seq != last + 1 {
                    self.seq_gaps += 1;
                }
            }
        }
        let ev = f.event.as_ref()?;
        let ord = ev.lead.as_deref().and_then(|l| self.loc.parse_lead(l))?;
        // Streams are indexed like the checker's (`stream_of_tenant` in `run_async`).
        let on = stream as u32;
        match ev.event.as_ref() {
            "lead_accepted" => {
                self.checker.on_lead_accepted(ord, on);
            }
            "lead_rejected" => self.checker.on_lead_rejected(ord, on),
            "offered" => {
                let pro = ev.pro.as_deref()?;
                if self.checker.on_offered(ord, on, pro) {
                    let &item = self.plan.lead_item.get(ord as usize)?;
                    let t = self.plan.items[item as usize].t_ns;
                    let lat = self.latency_us(t, recv_ns);
                    if t >= self.warmup_ns {
                        self.delivery.saturating_record(lat);
                        if !catching_up {
                            self.delivery_live.saturating_record(lat);
                        }
                        // A refused lead is already in at REFUSED_US.
                        if !self.refused.get(ord as usize).is_some_and(|r| r.load(Ordering::Relaxed)) {
                            self.delivery_refused.saturating_record(lat);
                        }
                    }
                    self.iv_delivery.saturating_record(lat);
                    self.iv_deliveries += 1;
                    return Some(lat);
                }
            }
            _ => {}
        }
        None
    }

    fn rotate(&mut self, start: Duration, len: Duration, sent: u64) {
        let secs = len.as_secs_f64().max(1e-9);
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |h: &Histogram<u64>, p: f64| if h.is_empty() { 0.0 } else { ms(h.value_at_quantile(p)) };
        self.intervals.push(IntervalStat {
            t_s: (start + len).as_secs_f64(),
            sent_per_s: sent as f64 / secs,
            acks_per_s: self.iv_ack.len() as f64 / secs,
            lead_errors_per_s: self.iv_lead_errors as f64 / secs,
            deliveries_per_s: self.iv_deliveries as f64 / secs,
            ack_p50_ms: q(&self.iv_ack, 0.5),
            ack_p99_ms: q(&self.iv_ack, 0.99),
            delivery_p50_ms: q(&self.iv_delivery, 0.5),
            delivery_p99_ms: q(&self.iv_delivery, 0.99),
            errors: self.iv_errors,
        });
        let a = std::mem::replace(&mut self.iv_ack, hist(2));
        let d = std::mem::replace(&mut self.iv_delivery, hist(2));
        self.interval_hists.push((start, a, d));
        self.iv_errors = 0;
        self.iv_lead_errors = 0;
        self.iv_deliveries = 0;
    }
}

/// Bounds on one run, whatever the flags say (a longer drain is refused).
pub const MAX_DRAIN: Duration = Duration::from_secs(120);
const SETUP_WINDOW: usize = 256;
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Setup records refused `overloaded` are sent again after this pause (at least the
/// daemon's `retry_after_ms` for them), at most `SETUP_RESENDS` times.
const SETUP_RESEND_PAUSE: Duration = Duration::from_millis(100);
const SETUP_RESENDS: usize = 600;
/// Most records sent in one wake-up before readers get a turn.
const MAX_BATCH: usize = 2048;

pub fn run(cfg: &ReplayConfig, records: &[Record]) -> anyhow::Result<Outcome> {
    check_target(&cfg.url, &cfg.allowed_hosts)?;
    anyhow::ensure!((1..=1024).contains(&cfg.connections), "connections must be in 1..=1024");
    anyhow::ensure!(cfg.duration != Some(Duration::ZERO), "--duration must be longer than 0");
    anyhow::ensure!(
        cfg.drain <= MAX_DRAIN,
        "--drain {:?} is above the longest drain, {MAX_DRAIN:?}",
        cfg.drain
    );
    // The warm-up comes on top of the duration; without one it would be carved out of
    // the trace's single pass.
    anyhow::ensure!(
        cfg.warmup.is_zero() || cfg.duration.is_some(),
        "--warmup needs --duration: without it the trace is replayed once and the warm-up would be \
         taken out of that one pass"
    );
    if let Some(r) = &cfg.resubscribe {
        r.validate()?;
    }
    let rt = if cfg.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.threads).enable_all().build()?
    };
    rt.block_on(run_async(cfg, records))
}

async fn run_async(cfg: &ReplayConfig, records: &[Record]) -> anyhow::Result<Outcome> {
    let enc = cfg.encoding;
    let first_lead = records
        .iter()
        .position(|r| matches!(r.request, Request::PublishLead { .. }))
        .context("the trace has no publish_lead record")?;
    let (setup, timed) = records.split_at(first_lead);
    let setup = if cfg.skip_setup { &setup[..0] } else { setup };
    let mut log = cfg.record.as_deref().map(RecordLog::create).transpose()?;

    // Tenants and their tokens.
    let mut tenants: Vec<Option<String>> = Vec::new();
    for r in records {
        if !tenants.contains(&r.tenant) {
            tenants.push(r.tenant.clone());
        }
    }
    let token_of = |t: &Option<String>| -> anyhow::Result<String> {
        cfg.tokens
            .iter()
            .find(|(tt, _)| tt == t)
            .or_else(|| cfg.tokens.iter().find(|(tt, _)| tt.is_none()))
            .map(|(_, tok)| tok.clone())
            .with_context(|| format!("no --token for tenant {}", t.as_deref().unwrap_or("(default)")))
    };
    let tenant_idx: HashMap<Option<String>, usize> =
        tenants.iter().cloned().enumerate().map(|(i, t)| (t, i)).collect();

    // The schedule.
    let timed_recs: Vec<TimedRecord> = timed
        .iter()
        .map(|r| TimedRecord { at_ms: r.at_ms, is_lead: matches!(r.request, Request::PublishLead { .. }) })
        .collect();
    let plan = Arc::new(schedule::plan(
        &timed_recs,
        cfg.pacing,
        cfg.duration.map(|d| (d + cfg.warmup).as_nanos() as u64),
    )?);
    let warmup_ns = cfg.warmup.as_nanos() as u64;
    let mut lead_pos = HashMap::new();
    for r in timed {
        if let Request::PublishLead { lead } = &r.request {
            let n = lead_pos.len() as u32;
            lead_pos.entry(lead.id.clone()).or_insert(n);
        }
    }
    let loc = Arc::new(Localizer {
        tag: cfg.run_tag.clone(),
        lead_pos,
        leads_per_lap: plan.leads_per_lap,
        speedup: plan.speedup,
    });
    let timed_is_lead = Arc::new(timed_recs.iter().map(|r| r.is_lead).collect::<Vec<_>>());
    let n = cfg.connections;

    // Connect.
    let mut conns = Vec::with_capacity(tenants.len() * n);
    for t in &tenants {
        let token = token_of(t)?;
        for _ in 0..n {
            conns.push(connect(&cfg.url, &token, enc).await?);
        }
    }

    // Setup: pipelined, every reply awaited, not measured. A record refused
    // `overloaded` (e.g. past the daemon's bound on a tenant's changes of pros in
    // flight) changed nothing and is sent again, under a new id, after a pause.
    let setup_started = std::time::Instant::now();
    let mut setup_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut setup_resent = 0u64;
    let mut buf = Vec::new();
    let wall = wall_ms();
    for (chunk_no, chunk) in setup.chunks(SETUP_WINDOW * conns.len()).enumerate() {
        let mut to_send: Vec<usize> = (0..chunk.len()).collect();
        for attempt in 0usize.. {
            if to_send.is_empty() {
                break;
            }
            if attempt > 0 {
                if attempt > SETUP_RESENDS {
                    bail!(
                        "setup: {} records still refused `overloaded` after {SETUP_RESENDS} resends",
                        to_send.len()
                    );
                }
                setup_resent += to_send.len() as u64;
                tokio::time::sleep(SETUP_RESEND_PAUSE).await;
            }
            let mut expected = vec![0usize; conns.len()];
            let mut ids: HashMap<String, usize> = HashMap::with_capacity(to_send.len());
            for &i in &to_send {
                let r = &chunk[i];
                let c = tenant_idx[&r.tenant] * n + route(&r.request, None, n);
                let req = loc.localize(r, "setup", 0, u32::MAX, wall);
                let id = match attempt {
                    0 => format!("s{chunk_no}-{i}"),
                    a => format!("s{chunk_no}-{i}-r{a}"),
                };
                if let Some(log) = log.as_mut() {
                    log.sent(&id, &req);
                }
                wire::encode_into(enc, &Envelope { id: &id, request: &req }, &mut buf);
                conns[c].feed(message(enc, &buf)).await?;
                expected[c] += 1;
                ids.insert(id, i);
            }
            let attempted = std::mem::take(&mut to_send);
            // Each record's answer this attempt: `None` for `ok`, else the error code.
            let mut answers: HashMap<usize, Option<String>> = HashMap::with_capacity(attempted.len());
            for (c, ws) in conns.iter_mut().enumerate() {
                ws.flush().await?;
                let mut got = 0;
                while got < expected[c] {
                    let m = tokio::time::timeout(SETUP_TIMEOUT, ws.next())
                        .await
                        .context("setup: no reply within the timeout")?
                        .context("setup: connection closed")??;
                    let Some(bytes) = payload(&m) else { continue };
                    let f = Incoming::read(enc, bytes)?;
                    if f.kind != "ok" && f.kind != "error" {
                        continue;
                    }
                    if let Some(log) = log.as_mut() {
                        log.reply(enc, bytes);
                    }
                    let code =
                        (f.kind == "error").then(|| f.code.as_deref().unwrap_or("unknown").to_string());
                    match f.id.as_deref().and_then(|id| ids.get(id)) {
                        Some(&i) => {
                            answers.insert(i, code);
                        }
                        None => {
                            if let Some(code) = code {
                                *setup_errors.entry(code).or_default() += 1;
                            }
                        }
                    }
                    got += 1;
                }
            }
            // A record refused `overloaded` is sent again, and with it every later
            // record of the same pro sent in this attempt, whatever it was answered:
            // they were decided without it (a `set_availability` answered
            // `unknown_pro`, or an older profile that would now overwrite a newer
            // one), and setup records set state, so sending one twice is harmless.
            let pro_of = |i: usize| pro_key(&chunk[i].request).map(|p| (chunk[i].tenant.as_deref(), p));
            let mut first_refused: HashMap<(Option<&str>, &str), usize> = HashMap::new();
            for &i in &attempted {
                if answers.get(&i).is_some_and(|a| a.as_deref() == Some("overloaded")) {
                    if let Some(k) = pro_of(i) {
                        first_refused.entry(k).or_insert(i);
                    }
                }
            }
            for &i in &attempted {
                let answer = answers.get(&i).cloned().flatten();
                let after_refusal = pro_of(i).and_then(|k| first_refused.get(&k)).is_some_and(|&m| m <= i);
                if answer.as_deref() == Some("overloaded") || after_refusal {
                    to_send.push(i);
                } else if let Some(code) = answer {
                    *setup_errors.entry(code).or_default() += 1;
                }
            }
            // In the trace's order (`attempted` is).
        }
    }
    if setup_resent > 0 {
        eprintln!("setup: {setup_resent} records refused `overloaded` sent again");
    }
    if !setup_errors.is_empty() {
        eprintln!("setup errors by code: {setup_errors:?}");
    }
    let setup_s = setup_started.elapsed().as_secs_f64();

    // Streams: subscribe after the setup, so setup events do not fill the queue.
    // `(socket, token, next_seq)` per distinct token: a token belongs to one daemon
    // tenant, whose stream carries every event of it. Trace tenants that share a token
    // (a single fallback `--token`) share that stream; one subscription each would
    // receive every event once per trace tenant, each a duplicate delivery.
    let mut stream_tokens: Vec<String> = Vec::new();
    // Per trace tenant (`tenant_idx`), the stream its leads must arrive on.
    let mut stream_of_tenant: Vec<u32> = Vec::with_capacity(tenants.len());
    for t in &tenants {
        let token = token_of(t)?;
        let s = match stream_tokens.iter().position(|s| *s == token) {
            Some(s) => s,
            None => {
                stream_tokens.push(token);
                stream_tokens.len() - 1
            }
        };
        stream_of_tenant.push(s as u32);
    }
    // Per lead ordinal, from the tenant of its publish record.
    let lead_streams: Vec<u32> = plan
        .lead_item
        .iter()
        .map(|&item| stream_of_tenant[tenant_idx[&timed[plan.items[item as usize].rec as usize].tenant]])
        .collect();
    let mut streams = Vec::new();
    for token in stream_tokens {
        let mut ws = connect(&cfg.url, &token, enc).await?;
        let sub = serde_json::json!({"id": "sub", "type": "subscribe", "batch": cfg.stream_batch});
        wire::encode_into(enc, &sub, &mut buf);
        ws.send(message(enc, &buf)).await?;
        let next_seq = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("subscribe: no reply")?
                .context("subscribe: connection closed")??;
            let Some(bytes) = payload(&m) else { continue };
            let f = Incoming::read(enc, bytes)?;
            if f.id.as_deref() == Some("sub") {
                anyhow::ensure!(f.kind == "ok", "subscribe refused: {:?}", f.code);
                let s: SubscribedReply = wire::decode(enc, bytes)?;
                anyhow::ensure!(s.result.subscribed, "subscribe answered subscribed=false");
                break s.result.next_seq;
            }
        };
        streams.push((ws, token, next_seq));
    }

    // Stalled subscribers: subscribe, then never read until the end of the run.
    let mut stalled = Vec::new();
    for _ in 0..cfg.stalled_subscribers {
        let mut ws = connect(&cfg.url, &token_of(&tenants[0])?, enc).await?;
        wire::encode_into(enc, &serde_json::json!({"id": "stalled", "type": "subscribe"}), &mut buf);
        ws.send(message(enc, &buf)).await?;
        stalled.push(ws);
    }

    let total_leads = plan.lead_item.len();
    let start_ns = mono_ns() + 20_000_000; // 20 ms to get the readers going
    let wall_start = wall_ms() + 20;
    let refused: Arc<Vec<AtomicBool>> = Arc::new((0..total_leads).map(|_| AtomicBool::new(false)).collect());
    let rec = Arc::new(Mutex::new(Recorder {
        start_ns,
        plan: plan.clone(),
        timed_is_lead: timed_is_lead.clone(),
        loc: loc.clone(),
        ack: hist(3),
        ack_ok: hist(3),
        ack_error: hist(3),
        delivery: hist(3),
        other: hist(3),
        lag: hist(3),
        ack_ok_service: hist(3),
        lag_us: vec![LAG_UNKNOWN; plan.items.len()],
        service_waiting: HashMap::new(),
        iv_ack: hist(2),
        iv_delivery: hist(2),
        iv_errors: 0,
        iv_lead_errors: 0,
        iv_deliveries: 0,
        interval_hists: Vec::new(),
        intervals: Vec::new(),
        replies: 0,
        acks_accepted: 0,
        acks_rejected: 0,
        errors: BTreeMap::new(),
        checker: Checker::with_streams(lead_streams),
        stream_events: 0,
        seq_gaps: 0,
        // A new subscription's first event is `next_seq`: the stream's cursor starts
        // just before it (and is where a resume before any event goes on from).
        last_seq: streams.iter().enumerate().map(|(i, s)| (i, s.2.saturating_sub(1))).collect(),
        delivery_live: hist(3),
        delivery_refused: hist(3),
        leads_refused: 0,
        resub: ResubscribeSummary {
            every_s: cfg.resubscribe.map_or(0.0, |r| r.every.as_secs_f64()),
            away_s: cfg.resubscribe.map_or(0.0, |r| r.away.as_secs_f64()),
            ..Default::default()
        },
        answered: vec![false; plan.items.len()],
        duplicate_replies: 0,
        last_ack_ns: 0,
        warmup_ns,
        refused: refused.clone(),
        log,
    }));
    let stream_closed = Arc::new(AtomicBool::new(false));
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    // Ingest connections still open: when none is left (the daemon went away),
    // nothing more can be sent or answered, so the run ends early.
    let live = Arc::new(AtomicU64::new(conns.len() as u64));
    for ws in conns {
        let (sink, source) = ws.split();
        sinks.push(sink);
        readers.push(tokio::spawn(read_replies(source, enc, rec.clone(), live.clone())));
    }
    let (stop_streams, stop_rx) = tokio::sync::watch::channel(false);
    let n_streams = streams.len();
    let mut stream_tasks = Vec::new();
    for (i, (ws, token, _)) in streams.into_iter().enumerate() {
        let s = StreamSub {
            i,
            n: n_streams,
            url: cfg.url.clone(),
            token,
            enc,
            batch: cfg.stream_batch,
            resub: cfg.resubscribe,
            start_ns,
            span: Duration::from_nanos(plan.span_ns),
            rec: rec.clone(),
            closed: stream_closed.clone(),
            stop: stop_rx.clone(),
        };
        stream_tasks.push(tokio::spawn(s.run(ws)));
    }
    drop(stop_rx);

    // Progress and intervals.
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn(progress(
        rec.clone(),
        sent.clone(),
        done.clone(),
        cfg.interval,
        start_ns,
        plan.span_ns,
        cfg.progress,
        target_leads_per_s(&plan, cfg.pacing),
    ));

    // The sender.
    let mut sleeper = Sleeper::new()?;
    let batch_ns = cfg.batch.as_nanos() as u64;
    // Per connection, what this wake-up writes on it.
    let mut queues: Vec<Vec<Outgoing>> = (0..sinks.len()).map(|_| Vec::new()).collect();
    let mut dead = vec![false; sinks.len()];
    let mut i = 0;
    let mut skipped: u64 = 0;
    // Written to a connection; routed to a connection already closed (never sent).
    let (mut sent_total, mut sent_leads, mut lost) = (0u64, 0u64, 0u64);
    // Per lead (by ordinal), the connection its publish went on.
    let mut lead_conn: Vec<u32> = vec![u32::MAX; total_leads];
    let items = &plan.items;
    let recording = cfg.record.is_some();
    eprintln!("replay: timed phase started ({} sends planned)", items.len());
    let cpu_start = crate::hostcpu::sample();
    while i < items.len() {
        if live.load(Ordering::Relaxed) == 0 {
            eprintln!(
                "replay: every ingest connection closed; stopping with {} of {} planned requests not sent",
                items.len() - i,
                items.len()
            );
            break;
        }
        let now = mono_ns().saturating_sub(start_ns);
        if items[i].t_ns > now {
            sleeper.until(start_ns + items[i].t_ns.max(now + batch_ns)).await?;
            continue;
        }
        let now = mono_ns().saturating_sub(start_ns);
        let mut k = 0;
        while i < items.len() && items[i].t_ns <= now && k < MAX_BATCH {
            let item = items[i];
            let r = &timed[item.rec as usize];
            let lead_ord = match &r.request {
                Request::PublishLead { .. } => Some(item.lead_ord),
                Request::Offer { lead, .. } => loc.lead_ord(item.lap, lead),
                _ => None,
            };
            if matches!(r.request, Request::Offer { .. })
                && lead_ord.and_then(|o| refused.get(o as usize)).is_some_and(|f| f.load(Ordering::Relaxed))
            {
                skipped += 1;
                i += 1;
                continue;
            }
            let c = tenant_idx[&r.tenant] * n + route_timed(&r.request, lead_ord, n, &mut lead_conn);
            let wall = wall_start + (item.t_ns / 1_000_000) as i64;
            let lap = item.lap.to_string();
            let req = loc.localize(r, &lap, item.lap, item.lead_ord, wall);
            let id = format!("i{i}");
            wire::encode_into(enc, &Envelope { id: &id, request: &req }, &mut buf);
            let is_lead = matches!(r.request, Request::PublishLead { .. });
            i += 1;
            k += 1;
            if dead[c] {
                // Never written: counted as not sent, not as a request left unanswered.
                lost += 1;
                continue;
            }
            let log = recording.then_some((id, req));
            queues[c].push(Outgoing { idx: i - 1, is_lead, msg: message(enc, &buf), log });
        }
        // Every connection's share at once, each recording its own items' lag when its
        // own flush returns: a connection the daemon stops reading holds back only what
        // goes on it (until the next wake-up, which waits for every write of this one).
        let writes = sinks
            .iter_mut()
            .zip(queues.iter_mut())
            .enumerate()
            .filter(|(_, (_, q))| !q.is_empty())
            .map(|(c, (sink, q))| write_conn(sink, q, &rec, start_ns).map(move |w| (c, w)));
        let mut fed = 0u64;
        for (c, w) in futures_util::future::join_all(writes).await {
            fed += w.fed;
            sent_leads += w.leads;
            lost += w.lost;
            dead[c] |= w.dead;
        }
        sent_total += fed;
        sent.fetch_add(fed, Ordering::Relaxed);
        if k == MAX_BATCH {
            tokio::task::yield_now().await;
        }
    }
    // Planned but never written: the sender stopped early (every ingest connection
    // closed), or the request's connection was already closed.
    let planned_leads = plan.lead_item.len() as u64;
    let not_sent = (items.len() - i) as u64 + lost;
    // Publishes are never skipped: every planned one is sent or not sent.
    let not_sent_leads = planned_leads - sent_leads;
    debug_assert_eq!(sent_total + skipped + not_sent, items.len() as u64);
    let send_end = mono_ns();
    let host = cpu_start.zip(crate::hostcpu::sample()).and_then(|(a, b)| crate::hostcpu::between(&a, &b));

    // Drain: every reply and every acknowledged lead's event, or the timeout (longer by
    // the time away: a subscriber may have left just before the last send).
    let away = cfg.resubscribe.map_or(Duration::ZERO, |r| r.away);
    let drain_until = send_end + (cfg.drain + away).as_nanos() as u64;
    loop {
        let settled = {
            let r = rec.lock().expect("no thread panics holding the recorder");
            r.replies >= sent_total && r.checker.pending() == 0
        };
        let gone = live.load(Ordering::Relaxed) == 0;
        if settled || gone || mono_ns() >= drain_until || stream_closed.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the last stream frames of this batch in, then stop.
    tokio::time::sleep(Duration::from_millis(20)).await;
    done.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    let _ = stop_streams.send(true);
    for mut s in sinks {
        let _ = s.send(Message::Close(None)).await;
    }
    for r in &readers {
        r.abort();
    }
    // Each stream sends its close frame and records an unfinished catch-up, if any.
    let _ =
        tokio::time::timeout(Duration::from_secs(2), futures_util::future::join_all(&mut stream_tasks)).await;
    for t in &stream_tasks {
        t.abort();
    }

    let mut stalled_ends = Vec::new();
    for ws in &mut stalled {
        stalled_ends.push(stalled_end(ws).await);
    }
    let end_ns = mono_ns();
    let mut r = rec.lock().expect("no thread panics holding the recorder");
    let timed_s = (send_end.max(start_ns) - start_ns) as f64 / 1e9;
    let _ = end_ns;
    if let Some(log) = r.log.as_mut() {
        log.finish()?;
    }
    let violations = r.checker.finish();
    let mut errors = r.errors.clone();
    if r.duplicate_replies > 0 {
        errors.insert("duplicate_reply".into(), r.duplicate_replies);
    }
    let measured_ns =
        lead_span_ns(&plan).max(r.last_ack_ns.saturating_sub(start_ns)).saturating_sub(warmup_ns);
    let summary = Summary {
        run_tag: cfg.run_tag.clone(),
        encoding: enc,
        connections: n,
        target_leads_per_s: target_leads_per_s(&plan, cfg.pacing),
        // Over the leads' own span, or until the last acknowledgement if later.
        // Warm-up leads are not in `ack_ok`, nor is their time.
        achieved_leads_per_s: r.ack_ok.len() as f64 / (measured_ns as f64 / 1e9).max(1e-9),
        measured_s: measured_ns as f64 / 1e9,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: timed_s,
        setup_records: setup.len() as u64,
        setup_s,
        sent: sent_total,
        sent_leads,
        not_sent,
        not_sent_leads,
        followups_skipped: skipped,
        replies: r.replies,
        missing_replies: sent_total.saturating_sub(r.replies),
        duplicate_replies: r.duplicate_replies,
        acks_accepted: r.acks_accepted,
        acks_rejected: r.acks_rejected,
        errors_by_code: errors,
        ack: Percentiles::of(&r.ack),
        ack_ok: Percentiles::of(&r.ack_ok),
        ack_error: Percentiles::of(&r.ack_error),
        delivery: Percentiles::of(&r.delivery),
        delivery_counting_refused: Percentiles::of(&r.delivery_refused),
        leads_refused: r.leads_refused,
        other_replies: Percentiles::of(&r.other),
        send_lag: Percentiles::of(&r.lag),
        ack_ok_service: Percentiles::of(&r.ack_ok_service),
        ack_ok_service_missing: r.service_waiting.len() as u64,
        stream_events: r.stream_events,
        stream_seq_gaps: r.seq_gaps,
        stream_closed_early: stream_closed.load(Ordering::Relaxed),
        stalled_subscribers: stalled_ends,
        violations,
        intervals: std::mem::take(&mut r.intervals),
        host,
        tool_threads: cfg.threads.max(1),
        resubscribe: cfg.resubscribe.map(|_| {
            let mut x = std::mem::take(&mut r.resub);
            let done: Vec<f64> = x.log.iter().filter_map(|l| l.catch_up_ms).collect();
            x.catch_up_events_sum = x.log.iter().map(|l| l.catch_up_events).sum();
            x.catch_up_events_max = x.log.iter().map(|l| l.catch_up_events).max().unwrap_or(0);
            x.catch_up_ms_mean = done.iter().fold(0.0, |a, b| a + b) / done.len().max(1) as f64;
            x.catch_up_ms_max = done.iter().copied().fold(0.0, f64::max);
            x.catch_ups_unfinished = x.log.iter().filter(|l| l.catch_up_ms.is_none()).count() as u64;
            let live: Vec<f64> = x.log.iter().filter_map(|l| l.back_to_live_ms).collect();
            x.back_to_live_ms_mean = live.iter().fold(0.0, |a, b| a + b) / live.len().max(1) as f64;
            x.back_to_live_ms_max = live.iter().copied().fold(0.0, f64::max);
            x.back_to_live_never = (x.log.len() - live.len()) as u64;
            x.delivery_outside_catch_up = Percentiles::of(&r.delivery_live);
            x
        }),
    };
    Ok(Outcome {
        summary,
        ack: r.ack.clone(),
        delivery: r.delivery.clone(),
        interval_hists: std::mem::take(&mut r.interval_hists),
        interval: cfg.interval,
    })
}

/// From the start to the intended time of the last publish (or the whole span with
/// a fixed duration).
fn lead_span_ns(plan: &Plan) -> u64 {
    let last = plan.lead_item.last().map(|&i| plan.items[i as usize].t_ns).unwrap_or(0);
    let per_lead = last / (plan.lead_item.len().max(2) as u64 - 1);
    (last + per_lead).max(1)
}

fn target_leads_per_s(plan: &Plan, pacing: Pacing) -> f64 {
    match pacing {
        Pacing::Rate(r) => r,
        Pacing::Speed(_) => plan.lead_item.len() as f64 / (lead_span_ns(plan) as f64 / 1e9),
    }
}

/// Reads a stalled subscription to its end: the close frame's code and reason, or
/// `open` if nothing closes it within a few seconds of reading.
async fn stalled_end(ws: &mut Ws) -> String {
    let read = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(Some(f))) => return format!("{} {}", u16::from(f.code), f.reason),
                Ok(Message::Close(None)) => return "closed without a code".to_string(),
                Ok(_) => {}
                Err(e) => return format!("error: {e}"),
            }
        }
        "closed without a close frame".to_string()
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.unwrap_or_else(|_| "open".to_string())
}

/// One request of a wake-up, encoded, waiting for its connection's write.
struct Outgoing {
    /// Plan item.
    idx: usize,
    is_lead: bool,
    msg: Message,
    /// `--record`: its id and request, logged once written.
    log: Option<(String, Request)>,
}

/// What writing one connection's share of a wake-up did.
#[derive(Default)]
struct Written {
    /// Requests handed to the connection.
    fed: u64,
    /// Of `fed`, publishes.
    leads: u64,
    /// Requests not written: the connection failed before their turn.
    lost: u64,
    /// The connection failed: nothing more is written on it.
    dead: bool,
}

/// Writes `queue` on one connection (`feed` each, one `flush`) and, as soon as the
/// flush returns and before anything else runs on this task, records every request
/// written there as written then ([`Recorder::written`]).
async fn write_conn(
    sink: &mut Sink,
    queue: &mut Vec<Outgoing>,
    rec: &Mutex<Recorder>,
    start_ns: u64,
) -> Written {
    let mut w = Written::default();
    let mut done: Vec<(usize, Option<(String, Request)>)> = Vec::with_capacity(queue.len());
    for o in queue.drain(..) {
        if w.dead || sink.feed(o.msg).await.is_err() {
            w.dead = true;
            w.lost += 1;
            continue;
        }
        w.fed += 1;
        w.leads += u64::from(o.is_lead);
        done.push((o.idx, o.log));
    }
    if !done.is_empty() && sink.flush().await.is_err() {
        w.dead = true;
    }
    // Encoding and the wait for the wake-up are the tool's too: lag runs from the
    // intended time.
    let done_ns = mono_ns().saturating_sub(start_ns);
    let mut r = rec.lock().expect("no thread panics holding the recorder");
    for (idx, log) in done {
        r.written(idx, done_ns);
        if let (Some(l), Some((id, req))) = (r.log.as_mut(), log) {
            l.sent(&id, &req);
        }
    }
    w
}

async fn read_replies(mut source: Source, enc: Encoding, rec: Arc<Mutex<Recorder>>, live: Arc<AtomicU64>) {
    read_replies_until_closed(&mut source, enc, &rec).await;
    live.fetch_sub(1, Ordering::Relaxed);
}

async fn read_replies_until_closed(source: &mut Source, enc: Encoding, rec: &Mutex<Recorder>) {
    while let Some(Ok(m)) = source.next().await {
        let recv = mono_ns();
        let mut batch = vec![m];
        // Take what is already here too, and record it under one lock.
        while batch.len() < 1024 {
            match source.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let mut r = rec.lock().expect("no thread panics holding the recorder");
        for m in &batch {
            let Some(bytes) = payload(m) else { continue };
            match Incoming::read(enc, bytes) {
                Ok(f) if f.kind == "ok" || f.kind == "error" => r.on_reply(bytes, enc, &f, recv),
                Ok(_) => {}
                Err(_) => *r.errors.entry(UNREADABLE_FRAME.into()).or_default() += 1,
            }
        }
    }
}

/// One tenant's stream subscription for the whole run: reads events into the
/// recorder and, with `--resubscribe-every`, leaves and resumes on schedule.
struct StreamSub {
    i: usize,
    n: usize,
    url: String,
    token: String,
    enc: Encoding,
    batch: bool,
    resub: Option<Resubscribe>,
    start_ns: u64,
    /// Intended length of the timed phase: no departure at or after it.
    span: Duration,
    rec: Arc<Mutex<Recorder>>,
    /// Set when the server closed the stream (or it could not come back): the drain
    /// stops waiting for events.
    closed: Arc<AtomicBool>,
    /// The end of the run: send a close frame and stop.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A resume whose catch-up has not reached `next_seq - 1` yet.
struct CatchUp {
    /// Index in the recorder's resume log.
    log: usize,
    next_seq: u64,
    sent_ns: u64,
    events: u64,
}

/// How a resume attempt ended.
enum Resumed {
    /// Answered `ok`: the new socket, the resume's entry in the log, when the
    /// `subscribe` went out and when the `ok` came in.
    Ok { ws: Box<Ws>, log: usize, sent_ns: u64, ok_ns: u64 },
    /// The stream cannot go on (already reported); the task ends.
    Gone,
}

/// Most `resume_too_old` answers taken in a row before a stream gives up (each one
/// moves the cursor to the oldest one kept, so a second is already unusual).
const MAX_TOO_OLD: u32 = 5;
/// A resumed subscription is back to live at its first lead delivered within this
/// many ms of the lead's intended send time.
pub const LIVE_MS: u64 = 50;
/// Most times one stream resumes after the server closed it before it stops.
const MAX_SERVER_CLOSES: u32 = 20;
/// Bound on a reconnect's `subscribe` reply and on a clean close's handshake.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one batch of stream frames did.
#[derive(Default)]
struct Taken {
    /// The server closed the stream: its close frame, as text.
    closed: Option<String>,
    /// A catch-up finished in this batch.
    caught_up: bool,
}

impl StreamSub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.rec.lock().expect("no thread panics holding the recorder")
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn departure_after(&self, after_ns: u64) -> Option<u64> {
        let r = self.resub?;
        let after = Duration::from_nanos(after_ns.saturating_sub(self.start_ns));
        let d = r.next_departure(self.i, self.n, after, self.span)?;
        Some(self.start_ns + d.as_nanos() as u64)
    }

    async fn run(mut self, mut ws: Ws) {
        let mut catch_up: Option<CatchUp> = None;
        let mut live: Option<(usize, u64)> = None;
        let mut departure = self.departure_after(mono_ns());
        let mut server_closes = 0;
        loop {
            let wait = departure.map(|t| Duration::from_nanos(t.saturating_sub(mono_ns())));
            let m = tokio::select! {
                biased;
                _ = self.stop.changed() => {
                    let _ = ws.send(Message::Close(None)).await;
                    self.unfinished(catch_up);
                    return;
                }
                _ = sleep_or_never(wait) => None,
                m = ws.next() => Some(m),
            };
            // Leaving on schedule, or the server closed the stream.
            let (left_ns, cause) = match m {
                None => {
                    let left_ns = mono_ns();
                    self.leave(&mut ws).await;
                    let away = self.resub.map_or(Duration::ZERO, |r| r.away);
                    tokio::select! {
                        biased;
                        _ = self.stop.changed() => return,
                        _ = tokio::time::sleep(away) => {}
                    }
                    (left_ns, "scheduled".to_string())
                }
                Some(Some(Ok(m))) => {
                    let mut batch = vec![m];
                    while batch.len() < 4096 {
                        match ws.next().now_or_never() {
                            Some(Some(Ok(m))) => batch.push(m),
                            _ => break,
                        }
                    }
                    let recv = mono_ns();
                    let t = self.take(&batch, recv, &mut catch_up, &mut live);
                    if t.caught_up {
                        departure = self.departure_after(recv);
                    }
                    let Some(frame) = t.closed else { continue };
                    eprintln!("stream {} closed by the server: {frame}", self.i);
                    self.unfinished(catch_up.take());
                    server_closes += 1;
                    // A resubscribing stream comes back, as a client would; the resume
                    // must go on without a gap like any other.
                    if self.resub.is_none() || server_closes > MAX_SERVER_CLOSES {
                        self.closed.store(true, Ordering::Relaxed);
                        return;
                    }
                    // Answer the close handshake before going.
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    self.lock().resub.server_closes += 1;
                    (recv, format!("server close: {frame}"))
                }
                Some(_) => {
                    eprintln!("stream {}: the connection ended without a close frame", self.i);
                    self.closed.store(true, Ordering::Relaxed);
                    self.unfinished(catch_up);
                    return;
                }
            };
            if self.stopping() {
                return;
            }
            match self.resume(left_ns, cause).await {
                Resumed::Ok { ws: new, log, sent_ns, ok_ns } => {
                    ws = *new;
                    catch_up = self.catch_up(log, sent_ns, ok_ns);
                    live = Some((log, sent_ns));
                    // No departure during a catch-up: the next one is armed when it ends.
                    departure = match catch_up {
                        None => self.departure_after(ok_ns),
                        Some(_) => None,
                    };
                }
                Resumed::Gone => return,
            }
        }
    }

    /// Records a batch of frames.
    /// `live`: a resume (log entry, when its `subscribe` went out) waiting for its first
    /// delivery within [`LIVE_MS`].
    fn take(
        &self,
        batch: &[Message],
        recv: u64,
        catch_up: &mut Option<CatchUp>,
        live: &mut Option<(usize, u64)>,
    ) -> Taken {
        let mut r = self.lock();
        let mut t = Taken::default();
        for m in batch {
            if let Message::Close(frame) = m {
                t.closed = Some(match frame {
                    Some(f) => format!("{} {}", u16::from(f.code), f.reason),
                    None => "closed without a code".to_string(),
                });
                return t;
            }
            let Some(bytes) = payload(m) else { continue };
            let read = Incoming::read_each(self.enc, bytes, |f| {
                if f.kind != "event" {
                    return;
                }
                let lat = r.on_event(self.i, &f, recv, catch_up.is_some());
                if let (Some((log, sent_ns)), Some(lat)) = (*live, lat) {
                    if lat <= LIVE_MS * 1000 {
                        r.resub.log[log].back_to_live_ms = Some(recv.saturating_sub(sent_ns) as f64 / 1e6);
                        *live = None;
                    }
                }
                let (Some(c), Some(seq)) = (catch_up.as_mut(), f.seq) else { return };
                if seq < c.next_seq {
                    c.events += 1;
                }
                if seq + 1 >= c.next_seq {
                    let l = &mut r.resub.log[c.log];
                    l.catch_up_events = c.events;
                    l.catch_up_ms = Some(recv.saturating_sub(c.sent_ns) as f64 / 1e6);
                    *catch_up = None;
                    t.caught_up = true;
                }
            });
            if read.is_err() {
                *r.errors.entry(UNREADABLE_EVENT.into()).or_default() += 1;
            }
        }
        t
    }

    /// A catch-up that will not finish (the run ended, the server closed the stream):
    /// what it got so far.
    fn unfinished(&self, catch_up: Option<CatchUp>) {
        if let Some(c) = catch_up {
            self.lock().resub.log[c.log].catch_up_events = c.events;
        }
    }

    /// After a resume's `ok`: the catch-up in progress, or `None` when the `ok` already
    /// said there was nothing to catch up on (the log entry is then complete).
    fn catch_up(&self, log: usize, sent_ns: u64, ok_ns: u64) -> Option<CatchUp> {
        let mut r = self.lock();
        let l = &mut r.resub.log[log];
        if l.next_seq <= l.resume_from + 1 {
            l.catch_up_ms = Some(ok_ns.saturating_sub(sent_ns) as f64 / 1e6);
            return None;
        }
        Some(CatchUp { log, next_seq: l.next_seq, sent_ns, events: 0 })
    }

    /// Closes the websocket cleanly: a close frame, then the events already on their
    /// way are still read up to the server's close frame (bounded).
    async fn leave(&self, ws: &mut Ws) {
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        let close = CloseFrame { code: CloseCode::Normal, reason: "resubscribing".into() };
        let _ = ws.send(Message::Close(Some(close))).await;
        let _ = tokio::time::timeout(RESUBSCRIBE_TIMEOUT, async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
                self.take(std::slice::from_ref(&m), mono_ns(), &mut None, &mut None);
            }
        })
        .await;
        self.lock().resub.departures += 1;
    }

    /// Reconnects and resumes from the last seq received.
    async fn resume(&self, left_ns: u64, cause: String) -> Resumed {
        let mut cursor = self.lock().last_seq.get(&self.i).copied().unwrap_or(0);
        let mut ws = match connect(&self.url, &self.token, self.enc).await {
            Ok(ws) => ws,
            Err(e) => return self.give_up(&format!("reconnecting: {e:#}")),
        };
        let mut buf = Vec::new();
        let mut too_old = 0;
        let id = format!("resub-{}", self.i);
        loop {
            let sub = serde_json::json!({"id": id, "type": "subscribe", "resume_from": cursor, "batch": self.batch});
            wire::encode_into(self.enc, &sub, &mut buf);
            let sent_ns = mono_ns();
            if let Err(e) = ws.send(message(self.enc, &buf)).await {
                return self.give_up(&format!("sending subscribe: {e}"));
            }
            let reply = tokio::time::timeout(RESUBSCRIBE_TIMEOUT, async {
                while let Some(Ok(m)) = ws.next().await {
                    let Some(bytes) = payload(&m) else { continue };
                    if let Ok(f) = Incoming::read(self.enc, bytes) {
                        if f.id.as_deref() == Some(id.as_str()) {
                            return Some((f.kind == "ok", bytes.to_vec()));
                        }
                    }
                }
                None
            })
            .await;
            let recv = mono_ns();
            let (ok, bytes) = match reply {
                Ok(Some(r)) => r,
                Ok(None) => return self.give_up("the connection closed before the subscribe reply"),
                Err(_) => return self.give_up("no subscribe reply within 10 s"),
            };
            if ok {
                let next_seq = match wire::decode::<SubscribedReply>(self.enc, &bytes) {
                    Ok(s) if s.result.subscribed => s.result.next_seq,
                    _ => return self.give_up("unreadable subscribe reply"),
                };
                let mut r = self.lock();
                r.resub.resumes += 1;
                r.resub.log.push(ResumeRecord {
                    stream: self.i,
                    cause,
                    left_at_s: left_ns.saturating_sub(self.start_ns) as f64 / 1e9,
                    resume_from: cursor,
                    next_seq,
                    catch_up_events: 0,
                    catch_up_ms: None,
                    back_to_live_ms: None,
                });
                let log = r.resub.log.len() - 1;
                return Resumed::Ok { ws: Box::new(ws), log, sent_ns, ok_ns: recv };
            }
            let err = wire::decode::<wire::ErrorReply>(self.enc, &bytes).ok();
            let code = err.as_ref().map_or("unreadable", |e| e.code.as_str());
            let msg = err.as_ref().map_or("", |e| e.message.as_str());
            if code != "resume_too_old" {
                return self.give_up(&format!("resume from {cursor} answered {code}: {msg}"));
            }
            let Some(oldest) = oldest_cursor(msg).filter(|&o| o > cursor) else {
                return self.give_up(&format!("resume from {cursor} answered resume_too_old: {msg:?}"));
            };
            too_old += 1;
            {
                let mut r = self.lock();
                let lost = oldest - cursor;
                r.resub.resumes_too_old += 1;
                r.resub.resume_too_old_lost_seqs += lost;
                r.resub.resume_too_old_details.push(format!(
                    "stream {}: resume_from={cursor}, oldest cursor {oldest} ({lost} seqs lost)",
                    self.i
                ));
                r.seq_gaps += 1;
                r.last_seq.insert(self.i, oldest);
            }
            eprintln!(
                "stream {}: resume from {cursor} answered resume_too_old; going on from the oldest cursor {oldest}",
                self.i
            );
            if too_old >= MAX_TOO_OLD {
                return self.give_up(&format!("resume_too_old {too_old} times in a row"));
            }
            cursor = oldest;
        }
    }

    fn give_up(&self, why: &str) -> Resumed {
        eprintln!("stream {}: cannot resume ({why}); this stream stops here", self.i);
        self.lock().resub.resume_failures += 1;
        self.closed.store(true, Ordering::Relaxed);
        Resumed::Gone
    }
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn progress(
    rec: Arc<Mutex<Recorder>>,
    sent: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    interval: Duration,
    start_ns: u64,
    span_ns: u64,
    show: bool,
    target: f64,
) {
    let bar = if show {
        let b = indicatif::ProgressBar::new((span_ns / 1_000_000).max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {percent:>3}% {msg}")
                .expect("constant template is valid")
                .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let interval = interval.max(Duration::from_millis(100));
    let mut iv_start = Duration::ZERO;
    let mut last_sent = 0;
    // Wait for the start of the timed phase.
    let now = mono_ns();
    if start_ns > now {
        tokio::time::sleep(Duration::from_nanos(start_ns - now)).await;
    }
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let elapsed = Duration::from_nanos(mono_ns().saturating_sub(start_ns));
        bar.set_position((elapsed.as_millis() as u64).min(span_ns / 1_000_000));
        if elapsed >= iv_start + interval {
            let s = sent.load(Ordering::Relaxed);
            let mut r = rec.lock().expect("no thread panics holding the recorder");
            r.rotate(iv_start, elapsed - iv_start, s - last_sent);
            last_sent = s;
            iv_start = elapsed;
            let l = r.intervals.last().expect("just pushed");
            let errors: u64 = r.errors.values().sum();
            bar.set_message(format!(
                "target {target:.0}/s  sent {:.0}/s  leads ok {:.0}/s  refused {:.0}/s  ack p99 {:.2} ms  delivery p99 {:.2} ms  errors {errors}",
                l.sent_per_s,
                l.acks_per_s - l.lead_errors_per_s,
                l.lead_errors_per_s,
                l.ack_p99_ms,
                l.delivery_p99_ms
            ));
        }
    }
    let elapsed = Duration::from_nanos(mono_ns().saturating_sub(start_ns));
    if elapsed > iv_start {
        let s = sent.load(Ordering::Relaxed);
        rec.lock().expect("no thread panics holding the recorder").rotate(
            iv_start,
            elapsed - iv_start,
            s - last_sent,
        );
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r2_a_clients_leads_share_a_connection_and_a_leads_requests_follow_it() {
        // Every repeatable lead repeats its shard's last client: many leads per client.
        let gen = crate::gen::GenConfig { seed: 3, leads: 400, duplicate_share: 0.5, ..Default::default() };
        let (records, _) = crate::gen::generate(&gen);
        let n = 4;
        let mut ords: HashMap<String, u32> = HashMap::new();
        let mut lead_conn = vec![u32::MAX; 400];
        let mut by_client: HashMap<String, usize> = HashMap::new();
        let mut by_lead: HashMap<String, usize> = HashMap::new();
        let (mut repeats, mut follow_ups) = (0, 0);
        for r in &records {
            match &r.request {
                Request::PublishLead { lead } => {
                    let o = ords.len() as u32;
                    ords.insert(lead.id.clone(), o);
                    let c = route_timed(&r.request, Some(o), n, &mut lead_conn);
                    if let Some(&prev) = by_client.get(&lead.client.id) {
                        assert_eq!(c, prev, "client {}'s leads on two connections", lead.client.id);
                        repeats += 1;
                    }
                    by_client.insert(lead.client.id.clone(), c);
                    by_lead.insert(lead.id.clone(), c);
                }
                Request::Offer { lead, .. } => {
                    let o = ords[lead];
                    assert_eq!(route_timed(&r.request, Some(o), n, &mut lead_conn), by_lead[lead]);
                    follow_ups += 1;
                }
                _ => {}
            }
        }
        assert!(repeats > 50 && follow_ups > 100, "{repeats} repeated clients, {follow_ups} follow-ups");
        // Clients spread over the connections.
        let used: std::collections::HashSet<usize> = by_client.values().copied().collect();
        assert_eq!(used.len(), n);
    }

    /// Each code of a frame the tool could not read fails a run (what it said went
    /// unchecked); an error the daemon answered (here `overloaded`) does not by itself.
    #[test]
    fn frames_the_tool_could_not_read_fail_the_run() {
        assert!(Summary::default().failures().is_empty());
        let with = |code: &str| Summary {
            errors_by_code: BTreeMap::from([(code.to_string(), 2)]),
            ..Default::default()
        };
        assert!(with("overloaded").failures().is_empty());
        for code in UNREADABLE {
            let f = with(code).failures();
            assert_eq!(f.len(), 1, "{code}: {f:?}");
            assert!(f[0].contains(&format!("{code}=2")), "{f:?}");
        }
    }

    #[test]
    fn only_loopback_or_named_hosts() {
        assert!(check_target("ws://127.0.0.1:7700", &[]).is_ok());
        assert!(check_target("ws://localhost:7700/x", &[]).is_ok());
        assert!(check_target("ws://[::1]:7700", &[]).is_ok());
        assert!(check_target("ws://10.0.0.5:7700", &[]).is_err());
        assert!(check_target("ws://10.0.0.5:7700", &["10.0.0.5".into()]).is_ok());
        assert!(check_target("wss://127.0.0.1:7700", &[]).is_err());
    }

    #[test]
    fn resubscribe_schedule_is_staggered_and_ends_with_the_timed_phase() {
        let r = Resubscribe { every: Duration::from_secs(5), away: Duration::from_secs(2) };
        let s = |x: f64| Duration::from_secs_f64(x);
        let all = |i: usize, n: usize| {
            let mut out = Vec::new();
            let mut t = Duration::ZERO;
            while let Some(d) = r.next_departure(i, n, t, s(20.0)) {
                out.push(d.as_secs_f64());
                t = d;
            }
            out
        };
        // One tenant: every 5 s, the first after 5 s, none at or after the end.
        assert_eq!(all(0, 1), vec![5.0, 10.0, 15.0]);
        // Four tenants leave 1.25 s apart.
        assert_eq!(all(1, 4), vec![6.25, 11.25, 16.25]);
        assert_eq!(all(3, 4), vec![8.75, 13.75, 18.75]);
        // Strictly after: a slot that passed (during a catch-up) is skipped.
        assert_eq!(r.next_departure(0, 1, s(5.0), s(20.0)), Some(s(10.0)));
        assert_eq!(r.next_departure(0, 1, s(11.5), s(20.0)), Some(s(15.0)));
        assert_eq!(r.next_departure(0, 1, s(1.0), s(4.0)), None, "shorter than one period");
    }

    #[test]
    fn away_must_be_shorter_than_the_period() {
        let ok = Resubscribe { every: Duration::from_secs(5), away: Duration::from_secs(2) };
        assert!(ok.validate().is_ok());
        let long = Resubscribe { away: Duration::from_secs(5), ..ok };
        let e = long.validate().unwrap_err().to_string();
        assert!(e.contains("--away") && e.contains("--resubscribe-every"), "{e}");
        assert!(Resubscribe { every: Duration::ZERO, away: Duration::ZERO }.validate().is_err());
    }

    #[test]
    fn oldest_cursor_is_read_from_resume_too_old() {
        // The daemon's wording (src/server/ws.rs).
        let msg = "events before 1201 are no longer kept; resume from 1200 or later";
        assert_eq!(oldest_cursor(msg), Some(1200));
        assert_eq!(oldest_cursor("events are gone"), None);
        let frame = br#"{"type":"error","id":"resub-0","code":"resume_too_old","message":"events before 8 are no longer kept; resume from 7 or later"}"#;
        let e: wire::ErrorReply = wire::decode(Encoding::Json, frame).unwrap();
        assert_eq!((e.code.as_str(), oldest_cursor(&e.message)), ("resume_too_old", Some(7)));
    }

    #[test]
    fn lead_ids_round_trip_through_the_run_tag() {
        let loc =
            Localizer { tag: "run-7".into(), lead_pos: HashMap::new(), leads_per_lap: 10, speedup: 2.0 };
        assert_eq!(loc.parse_lead(&loc.lead_id(42)), Some(42));
        assert_eq!(loc.parse_lead("run-8-42"), None, "other runs' leads are ignored");
        // 10 s after the record's own time on the trace clock is 5 s at 2x.
        assert_eq!(loc.rebase(TRACE_EPOCH_MS + 1_000 + 10_000, 1_000, 50_000), 55_000);
    }
}
