//! The load tool against a scripted stand-in for rota: a websocket server that speaks
//! just enough of protocol v1 (docs/PROTOCOL.md) to answer a replay, and misbehaves on
//! cue (closes connections, refuses leads, answers `unavailable` for a lead it stored,
//! delivers a tenant's leads on another tenant's stream, sends frames that do not read,
//! stops reading a connection for a while), so the tool's own verdicts and figures can
//! be checked without the real daemon and without depending on timing (the pause is a
//! lower bound; only orderings are asserted on durations).

use futures_util::{SinkExt, StreamExt};
use rota_loadtest::replay::{self, ReplayConfig, Summary};
use rota_loadtest::schedule::Pacing;
use rota_loadtest::trace::{Record, TRACE_EPOCH_MS};
use rota_loadtest::wire::{self, Availability, Client, ContactPrefs, Encoding, Lead, Pro, Request};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as HttpRequest, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// What the stand-in does with the n-th publish (1-based, over the whole run).
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// `ok`, accepted and offered to `p1` at once; events `lead_accepted`, `offered`.
    Accept,
    /// Stored and delivered like `Accept`, but answered with an `ok` whose result is
    /// not a lead reply (no `status`).
    Unreadable,
    /// An `error` reply with this code. `stored`: the lead was stored all the same and
    /// its events follow (a request in doubt, such as one answered `unavailable`).
    Error { code: &'static str, stored: bool },
}

/// How the stand-in behaves over a run.
struct Script {
    fate: Box<dyn Fn(u64) -> Fate + Send>,
    /// After answering this many publishes, close every ingest connection (a daemon
    /// going away), keeping the stream subscriptions open.
    close_ingest_after: Option<u64>,
    /// After answering this many publishes, close every stream subscription with 4008.
    close_streams_after: Option<u64>,
    /// Answer the first this many connections with HTTP 503 (`Retry-After: 0`), as
    /// rota does while it replays its log.
    recovering_for: u64,
    /// `(from, to)` tokens: the events of a lead published with token `from` go on the
    /// stream of token `to` (numbered in that stream's seqs), none on `from`'s.
    misroute: Option<(&'static str, &'static str)>,
    /// After this many publishes, send every stream subscription a frame that is not a
    /// frame of the protocol.
    garbage_event_after: Option<u64>,
    /// `(token, pause)`: an ingest connection with this token, once it has answered its
    /// first publish, stops reading for `pause` (once): its socket buffers fill, and the
    /// tool's write on that connection blocks until the stand-in reads again.
    stall_ingest: Option<(&'static str, Duration)>,
    /// Answer the first `upsert_pro` `overloaded` (a tenant at its bound of changes in
    /// flight), changing nothing.
    refuse_first_upsert: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            fate: Box::new(|_| Fate::Accept),
            close_ingest_after: None,
            close_streams_after: None,
            recovering_for: 0,
            misroute: None,
            garbage_event_after: None,
            stall_ingest: None,
            refuse_first_upsert: false,
        }
    }
}

/// One subscriber: its encoding and where its frames go.
type Subscriber = (Encoding, UnboundedSender<Message>);

/// A daemon tenant (one per token): its stream.
#[derive(Default)]
struct Tenant {
    next_seq: u64,
    subscribers: Vec<Subscriber>,
}

struct Shared {
    script: Script,
    leads: u64,
    tenants: HashMap<String, Tenant>,
    /// `subscribe` requests answered.
    subscriptions: u64,
    close_ingest: watch::Sender<bool>,
    /// Requests other than publishes and subscriptions, in the order answered, as
    /// `type:answer` (`ok` or the error code).
    changes: Vec<String>,
    refused_an_upsert: bool,
}

struct Mock {
    addr: String,
    shared: Arc<Mutex<Shared>>,
}

impl Mock {
    /// Listens on a loopback port, on a thread of its own, for the rest of the test.
    fn start(script: Script) -> Mock {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let addr = std_listener.local_addr().expect("an address").to_string();
        let shared = Arc::new(Mutex::new(Shared {
            script,
            leads: 0,
            tenants: HashMap::new(),
            subscriptions: 0,
            close_ingest: watch::channel(false).0,
            changes: Vec::new(),
            refused_an_upsert: false,
        }));
        let s = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("a tokio listener");
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(serve(tcp, s.clone()));
                }
            });
        });
        Mock { addr, shared }
    }

    fn subscriptions(&self) -> u64 {
        self.shared.lock().unwrap().subscriptions
    }
}

fn frame(enc: Encoding, v: &Value) -> Message {
    let mut buf = Vec::new();
    wire::encode_into(enc, v, &mut buf);
    match enc {
        Encoding::Json => Message::Text(String::from_utf8(buf).expect("JSON is UTF-8")),
        Encoding::Msgpack => Message::Binary(buf),
    }
}

// The handshake callback's signature is tungstenite's (its error is an HTTP response).
#[allow(clippy::result_large_err)]
async fn serve(tcp: TcpStream, shared: Arc<Mutex<Shared>>) {
    let (mut token, mut proto) = (String::new(), String::new());
    let recovering = {
        let mut sh = shared.lock().unwrap();
        let left = sh.script.recovering_for;
        sh.script.recovering_for = left.saturating_sub(1);
        left > 0
    };
    let accepted = tokio_tungstenite::accept_hdr_async(tcp, |req: &HttpRequest, mut resp: Response| {
        if recovering {
            let mut refusal = ErrorResponse::new(Some("recovering".into()));
            *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            refusal.headers_mut().insert("retry-after", "0".parse().expect("a header value"));
            return Err(refusal);
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        token = header("authorization").trim_start_matches("Bearer ").to_string();
        proto = header("sec-websocket-protocol").split(',').next().unwrap_or("").trim().to_string();
        resp.headers_mut().insert("sec-websocket-protocol", proto.parse().expect("a header value"));
        Ok(resp)
    })
    .await;
    let Ok(ws) = accepted else { return };
    let enc = if proto == wire::SUBPROTOCOL_JSON { Encoding::Json } else { Encoding::Msgpack };
    let (mut tx, mut rx) = ws.split();
    let mut closing = shared.lock().unwrap().close_ingest.subscribe();
    let mut stall = shared.lock().unwrap().script.stall_ingest.filter(|(t, _)| *t == token).map(|(_, d)| d);
    loop {
        if *closing.borrow_and_update() {
            let _ = tx.send(Message::Close(None)).await;
            return;
        }
        let m = tokio::select! {
            _ = closing.changed() => continue,
            m = rx.next() => m,
        };
        let bytes = match &m {
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
            Some(Ok(Message::Binary(b))) => b.clone(),
            Some(Ok(_)) => continue,
            _ => return,
        };
        let req: Value = wire::decode(enc, &bytes).expect("a request the stand-in can read");
        let id = req["id"].clone();
        match req["type"].as_str() {
            Some("subscribe") => {
                let (etx, mut erx) = unbounded_channel();
                let next_seq = {
                    let mut sh = shared.lock().unwrap();
                    sh.subscriptions += 1;
                    let t = sh.tenants.entry(token.clone()).or_default();
                    t.subscribers.push((enc, etx));
                    t.next_seq + 1
                };
                let ok =
                    json!({"type": "ok", "id": id, "result": {"subscribed": true, "next_seq": next_seq}});
                let _ = tx.send(frame(enc, &ok)).await;
                // From here on a stream: events out until the stand-in or the client
                // closes it.
                loop {
                    tokio::select! {
                        e = erx.recv() => {
                            let Some(e) = e else { return };
                            let close = e.is_close();
                            let _ = tx.send(e).await;
                            if close {
                                return;
                            }
                        }
                        m = rx.next() => match m {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                            Some(Ok(_)) => {}
                        },
                    }
                }
            }
            Some("publish_lead") => {
                let lead = req["lead"]["id"].as_str().expect("a lead id").to_string();
                let (reply, close_ingest) = {
                    let mut sh = shared.lock().unwrap();
                    sh.leads += 1;
                    let n = sh.leads;
                    let fate = (sh.script.fate)(n);
                    let (reply, stored) = match fate {
                        Fate::Accept => (
                            json!({"type": "ok", "id": id, "result": {"lead": lead, "status": "accepted",
                            "offers": [["p1", "direct"]]}}),
                            true,
                        ),
                        Fate::Unreadable => (json!({"type": "ok", "id": id, "result": {"lead": lead}}), true),
                        Fate::Error { code, stored } => {
                            (json!({"type": "error", "id": id, "code": code, "message": "scripted"}), stored)
                        }
                    };
                    if stored {
                        let stream = match sh.script.misroute {
                            Some((from, to)) if from == token => to.to_string(),
                            _ => token.clone(),
                        };
                        let t = sh.tenants.entry(stream).or_default();
                        for ev in [
                            json!({"event": "lead_accepted", "lead": lead}),
                            json!({"event": "offered", "lead": lead, "pro": "p1"}),
                        ] {
                            t.next_seq += 1;
                            let e = json!({"type": "event", "seq": t.next_seq, "event": ev});
                            for (enc, s) in &t.subscribers {
                                let _ = s.send(frame(*enc, &e));
                            }
                        }
                    }
                    if sh.script.garbage_event_after == Some(n) {
                        for t in sh.tenants.values() {
                            for (enc, s) in &t.subscribers {
                                let _ = s.send(match enc {
                                    Encoding::Json => Message::Text("{\"type\": \"event\", \"seq\": ".into()),
                                    // 0xc1 is never used in MessagePack.
                                    Encoding::Msgpack => Message::Binary(vec![0xc1]),
                                });
                            }
                        }
                    }
                    let close_ingest = sh.script.close_ingest_after == Some(n);
                    if sh.script.close_streams_after == Some(n) {
                        let close =
                            CloseFrame { code: CloseCode::from(4008), reason: "slow subscriber".into() };
                        for t in sh.tenants.values() {
                            for (_, s) in &t.subscribers {
                                let _ = s.send(Message::Close(Some(close.clone())));
                            }
                        }
                    }
                    (reply, close_ingest)
                };
                let _ = tx.send(frame(enc, &reply)).await;
                if close_ingest {
                    let _ = shared.lock().unwrap().close_ingest.send(true);
                }
                if let Some(pause) = stall.take() {
                    // Nothing is read meanwhile: what the tool writes piles up in the
                    // socket buffers until they are full.
                    tokio::time::sleep(pause).await;
                }
            }
            Some(kind) => {
                let refuse = {
                    let mut sh = shared.lock().unwrap();
                    let refuse =
                        kind == "upsert_pro" && sh.script.refuse_first_upsert && !sh.refused_an_upsert;
                    sh.refused_an_upsert |= refuse;
                    sh.changes.push(format!("{kind}:{}", if refuse { "overloaded" } else { "ok" }));
                    refuse
                };
                let reply = if refuse {
                    json!({"type": "error", "id": id, "code": "overloaded", "message": "scripted"})
                } else {
                    json!({"type": "ok", "id": id, "result": {"done": true}})
                };
                let _ = tx.send(frame(enc, &reply)).await;
            }
            None => {
                let _ = tx.send(frame(enc, &json!({"type": "ok", "id": id, "result": {"done": true}}))).await;
            }
        }
    }
}

fn lead(n: usize) -> Lead {
    Lead {
        id: format!("L{n}"),
        category: "painting".into(),
        zone: "bologna".into(),
        location: None,
        description: "Repaint a two-room flat".into(),
        details: Default::default(),
        attributes: vec![],
        client: Client {
            id: format!("c{n}"),
            name: "Anna Rossi".into(),
            phone: "+39 333 1234567".into(),
            phone_verified: true,
            contact: ContactPrefs { call: true, whatsapp: false, chat: true },
            address: None,
            pro_id: None,
        },
        direct: vec![],
        kind: "match".into(),
        created_at: TRACE_EPOCH_MS,
    }
}

/// One pro upserted at setup, then `leads` publishes 10 ms apart (on the trace clock),
/// each followed by `others` requests that are not about the lead; every record for
/// `tenant`.
fn trace(leads: usize, others: usize, tenant: Option<&str>) -> Vec<Record> {
    let rec = |at_ms: u64, request: Request| Record { at_ms, tenant: tenant.map(str::to_string), request };
    let pro = Pro {
        id: "p1".into(),
        categories: vec!["painting".into()],
        zones: vec!["bologna".into()],
        base: None,
        radius_km: None,
        quality: Default::default(),
        refuses: vec![],
        availability: Default::default(),
        autobuy: vec![],
    };
    let mut out = vec![rec(0, Request::UpsertPro { pro })];
    for n in 0..leads {
        let at = 10 * n as u64;
        out.push(rec(at, Request::PublishLead { lead: lead(n) }));
        for _ in 0..others {
            out.push(rec(
                at,
                Request::SetAvailability { pro: "p1".into(), availability: Availability::default() },
            ));
        }
    }
    out
}

fn config(m: &Mock, pacing: Pacing, tag: &str) -> ReplayConfig {
    ReplayConfig { run_tag: tag.into(), ..ReplayConfig::new(format!("ws://{}", m.addr), "tok", pacing) }
}

fn run(cfg: &ReplayConfig, records: &[Record]) -> Summary {
    replay::run(cfg, records).expect("the replay runs").summary
}

#[test]
fn a_well_behaved_stand_in_passes() {
    let m = Mock::start(Script::default());
    let s = run(&config(&m, Pacing::Rate(1_000.0), "ok"), &trace(50, 1, None));
    assert_eq!((s.sent, s.sent_leads, s.not_sent), (100, 50, 0), "{s:#?}");
    assert_eq!(s.delivery.count, 50);
    assert!(s.failures().is_empty(), "{:?}", s.failures());
}

/// A setup record refused `overloaded` (a tenant at its bound of pro changes in
/// flight) is sent again, and so is every later setup record of the same pro that was
/// sent meanwhile: the pro's vacation, answered while the pro did not exist yet (or
/// before its profile), must not end up overwritten or lost.
#[test]
fn a_setup_record_refused_overloaded_is_sent_again_with_the_pros_later_records() {
    let m = Mock::start(Script { refuse_first_upsert: true, ..Script::default() });
    let mut records = trace(5, 0, None);
    let vacation = Availability { vacation: Some((1, i64::from(i32::MAX))), ..Availability::default() };
    records.insert(
        1,
        Record {
            at_ms: 0,
            tenant: None,
            request: Request::SetAvailability { pro: "p1".into(), availability: vacation },
        },
    );
    let s = run(&config(&m, Pacing::Rate(1_000.0), "resend"), &records);
    assert_eq!((s.sent_leads, s.not_sent), (5, 0), "{s:#?}");
    let changes = m.shared.lock().unwrap().changes.clone();
    assert_eq!(
        changes,
        ["upsert_pro:overloaded", "set_availability:ok", "upsert_pro:ok", "set_availability:ok"],
        "the vacation is sent again after the profile"
    );
}

/// A daemon replaying its log answers connections with HTTP 503 and `Retry-After`:
/// the tool waits for it (the first connections of the run are refused here) instead
/// of failing the run.
#[test]
fn a_daemon_still_recovering_is_waited_for() {
    let m = Mock::start(Script { recovering_for: 3, ..Script::default() });
    let s = run(&config(&m, Pacing::Rate(1_000.0), "recovering"), &trace(20, 1, None));
    assert_eq!((s.sent_leads, s.not_sent), (20, 0), "{s:#?}");
    assert!(s.failures().is_empty(), "{:?}", s.failures());
}

/// The daemon closes every ingest connection after the fifth lead: the sender stops,
/// and what it never sent is counted and fails the run, instead of a run that looks
/// complete (every request it did send answered, every answered lead delivered).
#[test]
fn a_run_the_daemon_cut_short_fails_and_counts_what_was_never_sent() {
    let m = Mock::start(Script { close_ingest_after: Some(5), ..Script::default() });
    // 40 leads 50 ms apart: the close reaches the tool long before the next lead is due.
    let s = run(&config(&m, Pacing::Rate(20.0), "cut"), &trace(40, 0, None));
    assert!(s.sent_leads < 40, "leads actually sent, not the plan: {s:#?}");
    assert!(s.not_sent > 0 && s.not_sent_leads > 0, "{s:#?}");
    assert_eq!(s.sent + s.not_sent + s.followups_skipped, 40);
    assert_eq!(s.sent_leads + s.not_sent_leads, 40);
    let f = s.failures();
    assert!(f.iter().any(|f| f.contains("never sent")), "{f:?}");
    let table = rota_loadtest::report::table(&s);
    assert!(table.contains(&format!("not sent {}", s.not_sent)), "{table}");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["not_sent"], s.not_sent);
}

/// The daemon closes the stream subscription (4008) while the ingest connections go on:
/// the deliveries after it cannot be checked, and the run fails.
#[test]
fn a_stream_closed_by_the_daemon_fails_the_run() {
    let m = Mock::start(Script { close_streams_after: Some(3), ..Script::default() });
    let s = run(&config(&m, Pacing::Rate(1_000.0), "closed"), &trace(20, 0, None));
    assert!(s.stream_closed_early, "{s:#?}");
    let f = s.failures();
    assert!(f.iter().any(|f| f.contains("closed by the server")), "{f:?}");
    assert!(rota_loadtest::report::table(&s).contains("checks: FAILED"));
}

/// Without a duration the trace is replayed once; a warm-up would be carved out of that
/// one pass (fewer leads measured the higher the rate), so it is refused.
#[test]
fn a_warm_up_without_a_duration_is_refused() {
    let m = Mock::start(Script::default());
    let cfg = ReplayConfig { warmup: Duration::from_millis(100), ..config(&m, Pacing::Rate(1_000.0), "w") };
    let e = replay::run(&cfg, &trace(10, 0, None)).err().expect("refused");
    assert!(e.to_string().contains("--warmup needs --duration"), "{e}");
    let cfg = ReplayConfig { duration: Some(Duration::from_millis(50)), ..cfg };
    let s = run(&cfg, &trace(10, 0, None));
    // 150 ms of leads at 1,000/s, the first 100 ms of them warm-up.
    assert_eq!((s.sent_leads, s.ack.count), (150, 50), "{s:#?}");
    assert!(s.failures().is_empty(), "{:?}", s.failures());
    // The achieved rate is over `measured_s`, which leaves the warm-up out: the 50
    // measured leads' slots at least, never the warm-up's.
    let over = s.achieved_leads_per_s * s.measured_s;
    assert!((over - 50.0).abs() < 1e-6, "{} leads/s over {} s", s.achieved_leads_per_s, s.measured_s);
    assert!(s.measured_s >= 0.05 - 1e-9, "{s:#?}");
    let table = rota_loadtest::report::table(&s);
    let measured =
        format!("over {:.1} s measured (sending took {:.1} s, warm-up included)", s.measured_s, s.duration_s);
    assert!(table.contains(&measured), "{table}");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["measured_s"], s.measured_s);
}

/// A step that sheds 2% of its leads (`overloaded`, under 1% of all requests: each
/// lead brings two other requests) while delivering the rest at once: the shed leads
/// count as delivered above the bound, so the step fails whatever the bound.
#[test]
fn shed_leads_count_above_the_bound_in_the_search() {
    let fate = |n: u64| {
        if n.is_multiple_of(50) {
            Fate::Error { code: "overloaded", stored: false }
        } else {
            Fate::Accept
        }
    };
    let m = Mock::start(Script { fate: Box::new(fate), ..Script::default() });
    let s = run(&config(&m, Pacing::Rate(1_000.0), "shed"), &trace(200, 2, None));
    assert_eq!((s.sent, s.leads_refused), (600, 4), "{s:#?}");
    assert_eq!(s.errors_by_code.get("overloaded"), Some(&4));
    assert!(s.failures().is_empty(), "a plain replay does not fail on refusals: {:?}", s.failures());
    assert_eq!(s.delivery.count, 196);
    assert_eq!(s.delivery_counting_refused.count, 200);
    let (pass, why) = rota_loadtest::search::verdict(&s, 10_000.0);
    assert!(!pass, "passed on the p99 of the leads it did not shed: {why}");
    assert!(why.contains("refused"), "{why}");

    // One lead in 200 refused stays within the 1% above p99.
    let fate =
        |n: u64| if n == 100 { Fate::Error { code: "overloaded", stored: false } } else { Fate::Accept };
    let m = Mock::start(Script { fate: Box::new(fate), ..Script::default() });
    let s = run(&config(&m, Pacing::Rate(1_000.0), "shed1"), &trace(200, 2, None));
    assert_eq!(s.leads_refused, 1);
    assert!(s.delivery_counting_refused.p99 < 10_000.0, "{s:#?}");
    // (Whether the step passes also depends on the rate achieved over its 0.2 s.)
    let (_, why) = rota_loadtest::search::verdict(&s, 10_000.0);
    assert!(!why.contains("p99 delivery"), "{why}");
}

/// `unavailable` leaves a publish in doubt (docs/PROTOCOL.md: it may have been stored):
/// a lead answered so and delivered is not a lead delivered after an error.
#[test]
fn a_lead_answered_unavailable_and_stored_is_not_a_violation() {
    let fate = |n: u64| match n {
        5 => Fate::Error { code: "unavailable", stored: true },
        6 => Fate::Error { code: "unavailable", stored: false },
        _ => Fate::Accept,
    };
    let m = Mock::start(Script { fate: Box::new(fate), ..Script::default() });
    let s = run(&config(&m, Pacing::Rate(1_000.0), "doubt"), &trace(20, 0, None));
    assert_eq!(s.errors_by_code.get("unavailable"), Some(&2));
    assert_eq!(s.violations.total(), 0, "{:#?}", s.violations);

    // A definite refusal that is delivered all the same still is one.
    let fate = |n: u64| match n {
        5 => Fate::Error { code: "overloaded", stored: true },
        _ => Fate::Accept,
    };
    let m = Mock::start(Script { fate: Box::new(fate), ..Script::default() });
    let s = run(&config(&m, Pacing::Rate(1_000.0), "refused"), &trace(20, 0, None));
    assert_eq!(s.violations.delivered_after_error, 1, "{:#?}", s.violations);
    assert_eq!(s.violations.total(), 1, "{:#?}", s.violations);
}

/// Values the flags refuse are refused by the library too, not cut or run as nothing.
#[test]
fn a_zero_duration_and_an_overlong_drain_are_refused() {
    let m = Mock::start(Script::default());
    let cfg = ReplayConfig { duration: Some(Duration::ZERO), ..config(&m, Pacing::Rate(1_000.0), "z") };
    let e = replay::run(&cfg, &trace(10, 0, None)).err().expect("refused");
    assert!(e.to_string().contains("--duration"), "{e}");
    let cfg = ReplayConfig { drain: replay::MAX_DRAIN * 2, ..config(&m, Pacing::Rate(1_000.0), "d") };
    let e = replay::run(&cfg, &trace(10, 0, None)).err().expect("refused");
    assert!(e.to_string().contains("--drain"), "{e}");
    assert_eq!(m.subscriptions(), 0, "refused before connecting");
}

/// A trace with two tenants replayed with one token (the fallback for both): the
/// daemon sees one tenant, so one subscription carries every event. One subscription
/// per trace tenant would receive each event twice, every lead a duplicate delivery.
#[test]
fn trace_tenants_sharing_a_token_share_one_subscription() {
    let m = Mock::start(Script::default());
    let mut records = trace(20, 0, Some("tenant-0"));
    for (n, r) in records.iter_mut().enumerate() {
        if n % 2 == 0 {
            r.tenant = Some("tenant-1".into());
        }
    }
    let s = run(&config(&m, Pacing::Rate(1_000.0), "shared"), &records);
    assert_eq!(m.subscriptions(), 1);
    assert_eq!(s.stream_events, 40, "lead_accepted and offered once per lead: {s:#?}");
    assert_eq!(s.violations.total(), 0, "{:#?}", s.violations);
    assert!(s.failures().is_empty(), "{:?}", s.failures());
}

/// Two tenants with a token each. Well behaved, each lead arrives on its tenant's
/// stream. Then the stand-in delivers tenant A's leads on tenant B's subscription (in
/// B's seqs, so B's stream stays continuous) and none on A's: every lead is still seen
/// exactly once, but A's subscriber never got its leads, and the run fails.
#[test]
fn a_lead_delivered_on_another_tenants_stream_fails_the_run() {
    let mut records = trace(20, 0, Some("tenant-b"));
    for (n, r) in records.iter_mut().enumerate() {
        if n % 2 == 1 {
            r.tenant = Some("tenant-a".into());
        }
    }
    let two_tokens = |m: &Mock, tag: &str| ReplayConfig {
        tokens: vec![(Some("tenant-a".into()), "tok-a".into()), (Some("tenant-b".into()), "tok-b".into())],
        ..config(m, Pacing::Rate(1_000.0), tag)
    };

    let m = Mock::start(Script::default());
    let s = run(&two_tokens(&m, "own"), &records);
    assert_eq!(m.subscriptions(), 2);
    assert_eq!(s.violations.total(), 0, "{:#?}", s.violations);
    assert!(s.failures().is_empty(), "{:?}", s.failures());

    let m = Mock::start(Script { misroute: Some(("tok-a", "tok-b")), ..Script::default() });
    let s = run(&two_tokens(&m, "misrouted"), &records);
    assert_eq!(m.subscriptions(), 2);
    assert_eq!((s.stream_events, s.stream_seq_gaps), (40, 0), "{s:#?}");
    let v = &s.violations;
    assert_eq!((v.missing_deliveries, v.duplicate_deliveries), (0, 0), "{v:#?}");
    assert_eq!(v.wrong_stream, 10, "tenant A's ten leads: {v:#?}");
    assert_eq!(v.total(), 10, "{v:#?}");
    assert!(v.examples.iter().any(|e| e.contains("on stream 0 instead of its tenant's stream 1")), "{v:#?}");
    let f = s.failures();
    assert!(f.iter().any(|f| f.contains("10 exactly-once violations")), "{f:?}");
    let table = rota_loadtest::report::table(&s);
    assert!(table.contains("wrong stream 10") && table.contains("checks: FAILED"), "{table}");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["violations"]["wrong_stream"], 10);
}

/// A frame the tool cannot read is something it did not check: an `ok` to a publish
/// that is not a lead reply leaves the lead's acknowledgement unknown (its delivery
/// goes unchecked), a stream frame that does not read may have carried a duplicate.
/// Either fails the run, saying why, in both encodings.
#[test]
fn an_unreadable_reply_or_stream_frame_fails_the_run() {
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let fate = |n: u64| if n == 5 { Fate::Unreadable } else { Fate::Accept };
        let m = Mock::start(Script { fate: Box::new(fate), ..Script::default() });
        let cfg = ReplayConfig { encoding: enc, ..config(&m, Pacing::Rate(1_000.0), "reply") };
        let s = run(&cfg, &trace(20, 0, None));
        assert_eq!(s.errors_by_code.get(replay::UNREADABLE_REPLY), Some(&1), "{enc:?}: {s:#?}");
        assert_eq!((s.replies, s.missing_replies), (20, 0), "{enc:?}");
        assert_eq!(s.violations.total(), 0, "{enc:?}: nothing else is wrong: {:#?}", s.violations);
        let f = s.failures();
        assert!(f.iter().any(|f| f.contains("could not read") && f.contains("unreadable_reply=1")), "{f:?}");
        assert!(rota_loadtest::report::table(&s).contains("checks: FAILED"), "{enc:?}");

        let m = Mock::start(Script { garbage_event_after: Some(10), ..Script::default() });
        let cfg = ReplayConfig { encoding: enc, ..config(&m, Pacing::Rate(1_000.0), "event") };
        let s = run(&cfg, &trace(20, 0, None));
        assert_eq!(s.errors_by_code.get(replay::UNREADABLE_EVENT), Some(&1), "{enc:?}: {s:#?}");
        assert_eq!(s.violations.total(), 0, "{enc:?}: nothing else is wrong: {:#?}", s.violations);
        let f = s.failures();
        assert!(f.iter().any(|f| f.contains("unreadable_event=1")), "{enc:?}: {f:?}");
    }
}

/// The stand-in stops reading one tenant's ingest connection for a second after its
/// first publish, with 6.4 MiB of leads still to come on it (more than the socket
/// buffers hold): the tool's write on that connection blocks until it reads again.
/// Everything is due at once, so one wake-up writes both tenants' leads (the stalled
/// tenant's first, then last).
///
/// The other connection's leads were written at once: the stall is not their send lag.
/// They are three in four, so the lag's p50 is theirs, far below the stalled
/// connection's (its last leads went out after the 1 s pause); a lag that ran until the
/// stalled write returned puts them all at the same figure. No lead was sent after its
/// reply came, so the lag stays at or below the ack. And every lead answered `ok` has
/// an `ok service` sample, those answered while the stalled write was still pending
/// included (with one tool thread, and with two).
#[test]
fn a_connection_the_daemon_stops_reading_is_not_the_others_send_lag() {
    let at0 = |tenant: &str, request: Request| Record { at_ms: 0, tenant: Some(tenant.into()), request };
    let Request::UpsertPro { pro } = trace(1, 0, None).remove(0).request else { unreachable!() };
    let slow: Vec<Record> = (0..100)
        .map(|n| {
            let mut lead = lead(n);
            lead.description = "x".repeat(64 * 1024);
            at0("slow", Request::PublishLead { lead })
        })
        .collect();
    let fast: Vec<Record> = (100..400).map(|n| at0("fast", Request::PublishLead { lead: lead(n) })).collect();
    for (threads, slow_first) in [(1, true), (2, false)] {
        let mut records = vec![
            at0("slow", Request::UpsertPro { pro: pro.clone() }),
            at0("fast", Request::UpsertPro { pro: pro.clone() }),
        ];
        let (a, b) = if slow_first { (&slow, &fast) } else { (&fast, &slow) };
        records.extend(a.iter().chain(b).cloned());
        let m = Mock::start(Script {
            stall_ingest: Some(("tok-slow", Duration::from_secs(1))),
            ..Script::default()
        });
        let cfg = ReplayConfig {
            tokens: vec![(Some("slow".into()), "tok-slow".into()), (Some("fast".into()), "tok-fast".into())],
            // The big leads cost little to encode and decode.
            encoding: Encoding::Msgpack,
            threads,
            ..config(&m, Pacing::Speed(1.0), &format!("stall{threads}"))
        };
        let s = run(&cfg, &records);
        let case = format!("threads {threads}, stalled tenant first: {slow_first}");
        assert_eq!((s.sent_leads, s.missing_replies, s.ack_ok.count), (400, 0, 400), "{case}: {s:#?}");
        assert!(s.failures().is_empty(), "{case}: {:?}", s.failures());
        assert_eq!(s.send_lag.count, 400, "{case}");
        // Else the write never blocked, and this test shows nothing.
        assert!(s.send_lag.max >= 500.0, "{case}: {:?}", s.send_lag);
        assert!(
            s.send_lag.p50 * 4.0 < s.send_lag.max,
            "{case}: the stalled connection's lag charged to the other's leads: {:?}",
            s.send_lag
        );
        assert!(
            s.send_lag.p50 <= s.ack_ok.p50
                && s.send_lag.p90 <= s.ack_ok.p90
                && s.send_lag.max <= s.ack_ok.max,
            "{case}: leads sent after their reply came: lag {:?}, ack ok {:?}",
            s.send_lag,
            s.ack_ok
        );
        assert_eq!(s.ack_ok_service.count, s.ack_ok.count, "{case}: {:?}", s.ack_ok_service);
        assert_eq!(s.ack_ok_service_missing, 0, "{case}");
    }
}
