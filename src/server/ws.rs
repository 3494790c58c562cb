//! The websocket gateway: upgrade with authentication and subprotocol selection,
//! then requests, replies and streams on one connection.
//!
//! * Authentication happens at the upgrade (`Authorization: Bearer <token>`), before
//!   any frame is read; a bad token gets HTTP 401, no usable subprotocol HTTP 400, a
//!   tenant holding `max_connections_per_tenant` connections already HTTP 429.
//! * Requests on one connection are handled concurrently (pipelining); every request
//!   gets exactly one reply, matched by its `id`.
//! * Outgoing frames are batched: `feed` many, `flush` once. Refusals (`overloaded`,
//!   `rate_limited`) wait for the next reply or at most 1 ms, so a flood's refusals
//!   share writes.
//! * A subscriber's queue is bounded; one that falls behind is closed with code 4008
//!   and the sequence number to resume from.
//! * Admission control (`server::admission`): when the gateway falls behind a
//!   connection, its requests wait unread in the kernel's socket buffer, where no
//!   queue of rota's sees them. When more than `shed_backlog_bytes` stay unread for
//!   20 ms (a standing queue, not a hiccup being drained), the connection is overloaded
//!   and for a second new leads are answered `overloaded` beyond
//!   `shed_backlog_overloaded_bytes`; beyond four times `shed_backlog_bytes`, every
//!   request but `subscribe`, at once. A request to refuse is recognised from its `id` and `type` when the
//!   frame starts with them (`protocol::peek_head`), without decoding the rest, so
//!   refusing costs a peek and a short reply; the gateway catches up and the requests
//!   it accepts keep their latency instead of waiting behind the backlog. (A shed
//!   request is refused before its scope and rate limits are checked: it gets
//!   `overloaded` even if it would have been `forbidden` or `rate_limited`, and nothing
//!   is done either way.)
//!
//! Close codes: 1000 normal, 1001 shutting down (reason carries `resume_from=N`),
//! 1002 protocol error, 1007 invalid UTF-8, 1009 frame too big, 4000 heartbeat
//! timeout (nothing read from the peer, and no frame it made room for, within
//! `heartbeat_timeout_ms`), 4008 slow subscriber (reason carries `resume_from=N`). A
//! peer that reads nothing for `send_timeout_ms` is dropped without a close frame
//! (`server::deadline`).

use super::admission::Admission;
use super::deadline::SendDeadline;
use crate::engine::hub::{Outgoing, ResumeError, Subscription};
use crate::engine::spill::{Chunk, Lost, Spill, Unserved};
use crate::engine::Engine;
use crate::ids::TenantId;
use crate::protocol::{self, ApiError, Encoding, OkResult, Reply, Request, Scope};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HsRequest, Response as HsResponse,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Open connections per tenant, each held by a [`TenantSlot`] from the upgrade to the
/// connection's end: bounded by `max_connections_per_tenant`, so that one tenant's
/// clients (or one leaked token) cannot take every connection `max_connections` allows
/// and keep the other tenants out.
#[derive(Default)]
pub(crate) struct TenantConnections(parking_lot::Mutex<std::collections::HashMap<TenantId, usize>>);

impl TenantConnections {
    /// A slot for one more connection of `tenant`, unless it holds `max` already.
    fn take(self: &Arc<Self>, tenant: &TenantId, max: usize) -> Option<TenantSlot> {
        let mut open = self.0.lock();
        let n = open.entry(tenant.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(TenantSlot { all: self.clone(), tenant: tenant.clone() })
    }
}

/// One open connection of a tenant, given back when dropped.
pub(crate) struct TenantSlot {
    all: Arc<TenantConnections>,
    tenant: TenantId,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut open = self.all.0.lock();
        if let Some(n) = open.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

pub const CLOSE_HEARTBEAT: u16 = 4000;
pub const CLOSE_SLOW: u16 = 4008;

/// Accepts connections until `shutdown` turns true, then waits (at most `CLOSE_WAIT`,
/// and at most half of `shutdown_timeout_ms`, which leaves the rest to the final
/// sync and snapshot) for the open ones to answer what they have in flight and close.
pub async fn serve(listener: TcpListener, engine: Engine, mut shutdown: watch::Receiver<bool>) {
    // Fewer when the open-file limit would not leave the log its descriptors.
    let configured = engine.inner.cfg.raw.max_connections;
    let max =
        super::fdlimit::soft_limit().map_or(configured, |s| super::fdlimit::connection_cap(configured, s));
    let limit = Arc::new(Semaphore::new(max));
    let per_tenant = Arc::new(TenantConnections::default());
    let mut failures = super::fdlimit::AcceptFailures::default();
    // Connections refused at the limit are logged like failed accepts: a flood of
    // connections would otherwise write a line for each (every refusal is counted in
    // `rota_overload_refusals_total{reason="connections_full"}`).
    let mut refused = super::fdlimit::AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) if super::fdlimit::is_exhaustion(&e) => {
                // The connection waits in the backlog and the next accept would fail at
                // once: wait, instead of spinning (see `server::fdlimit`).
                engine.inner.metrics.m.overload_refusals.get("fd_limit").increment(1);
                if let Some(n) = failures.record(Instant::now()) {
                    tracing::warn!(error = %e, failures = n, open_connections = max - limit.available_permits(),
                        "accept failed for want of a resource; retrying every {} ms", super::fdlimit::ACCEPT_BACKOFF.as_millis());
                }
                tokio::select! {
                    _ = tokio::time::sleep(super::fdlimit::ACCEPT_BACKOFF) => continue,
                    _ = shutdown.changed() => break,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            engine.inner.metrics.m.overload_refusals.get("connections_full").increment(1);
            if let Some(n) = refused.record(Instant::now()) {
                tracing::warn!(%peer, refused = n, max_connections = max,
                    "connection limit reached; refusing connections (logged at most every {} s, with the number refused since the last line)",
                    super::fdlimit::LOG_EVERY.as_secs());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        let per_tenant = per_tenant.clone();
        // Each connection lives on one worker thread, round robin, and its requests
        // are decided there. The socket moves to that thread's own reactor, so its
        // readiness never wakes this one.
        let worker = engine.next_worker().clone();
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not hand a connection to its worker");
                continue;
            }
        };
        worker.spawn_fn(move || {
            let stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "could not register a connection with its worker");
                    return;
                }
            };
            actix_rt::spawn(async move {
                connection(stream, engine, shutdown, per_tenant).await;
                drop(permit);
            });
        });
    }
    drop(listener);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let wait = CLOSE_WAIT.min(Duration::from_millis(engine.inner.cfg.raw.shutdown_timeout_ms / 2));
    let _ = tokio::time::timeout(wait, limit.acquire_many(all)).await;
}

/// Connections answered at once while recovering; more are closed on accept.
const RECOVERING_ANSWERS_AT_ONCE: usize = 256;
/// How long a connection may take to send its request head while recovering, and
/// again to take the answer.
const RECOVERING_IO: Duration = Duration::from_secs(2);
/// The request head read while recovering, at most.
const RECOVERING_HEAD_BYTES: usize = 8192;

/// Answers every connection to the websocket port with `503 Service Unavailable`
/// (`Retry-After: 1`, a plain-text reason) until `recovered` resolves, then hands the
/// listener back for [`serve`]. A client connecting while the log is replayed learns
/// why at once, instead of waiting in the backlog for a handshake with no deadline.
/// Bounded like the admin port: each answer has a deadline, and at most
/// [`RECOVERING_ANSWERS_AT_ONCE`] are in progress.
pub async fn refuse_while_recovering(
    listener: TcpListener,
    mut recovered: oneshot::Receiver<()>,
) -> TcpListener {
    let answering = Arc::new(Semaphore::new(RECOVERING_ANSWERS_AT_ONCE));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut recovered => return listener,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                if let Ok(permit) = answering.clone().try_acquire_owned() {
                    actix_rt::spawn(async move {
                        answer_recovering(stream).await;
                        drop(permit);
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed while recovering");
                tokio::select! {
                    _ = &mut recovered => return listener,
                    _ = tokio::time::sleep(super::fdlimit::ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Reads the request head (so closing does not reset a connection whose request is
/// still unread, which could lose the answer), then answers 503.
async fn answer_recovering(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read_head = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while head.len() < RECOVERING_HEAD_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let from = head.len().saturating_sub(3);
                    head.extend_from_slice(&buf[..n]);
                    if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(RECOVERING_IO, read_head).await;
    let body = "rota is recovering its state from the log; retry shortly\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(RECOVERING_IO, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// How long a shutdown waits for connections to close before stopping the workers.
const CLOSE_WAIT: Duration = Duration::from_secs(6);

struct Session {
    tenant: TenantId,
    scopes: Vec<Scope>,
    encoding: Encoding,
    /// SHA-256 of the bearer token: checked again at every configuration reload.
    token: [u8; 32],
}

/// The token of an `Authorization: Bearer <token>` header value; the scheme's name is
/// case-insensitive (RFC 7235), as some HTTP clients send `BEARER`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn refuse(status: StatusCode, msg: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{msg}\n")));
    *r.status_mut() = status;
    r
}

#[allow(clippy::result_large_err)] // the handshake callback type is fixed by tungstenite
async fn connection(
    stream: TcpStream,
    engine: Engine,
    mut shutdown: watch::Receiver<bool>,
    per_tenant: Arc<TenantConnections>,
) {
    let cfg = &engine.inner.cfg.raw;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (stream, send_expired) = SendDeadline::new(stream, Duration::from_millis(cfg.send_timeout_ms));
    let taken = stream.taken();
    let ws_cfg = WebSocketConfig {
        max_message_size: Some(cfg.max_frame_bytes),
        max_frame_size: Some(cfg.max_frame_bytes),
        ..Default::default()
    };
    // Watched from before the token is checked: a reload that revokes it while the
    // handshake completes is seen by the loop below, which checks the token again.
    let mut reloads = engine.reloads();
    let mut session = None;
    // Held until the connection ends (this function returns).
    let mut tenant_slot: Option<TenantSlot> = None;
    let callback = |req: &HsRequest, mut resp: HsResponse| -> Result<HsResponse, ErrorResponse> {
        let token = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(bearer_token);
        let Some(token) = token else {
            engine.inner.metrics.m.auth_failures.get("missing_token").increment(1);
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer <token>)",
            ));
        };
        let Some((tenant, scopes)) = engine.authenticate(token) else {
            engine.inner.metrics.m.auth_failures.get("invalid_token").increment(1);
            return Err(refuse(StatusCode::UNAUTHORIZED, "invalid token"));
        };
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(Encoding::from_subprotocol);
        let Some(encoding) = offered else {
            engine.inner.metrics.m.auth_failures.get("bad_subprotocol").increment(1);
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "offer a subprotocol: Sec-WebSocket-Protocol: rota.v1.json or rota.v1.msgpack",
            ));
        };
        let max = cfg.max_connections_per_tenant;
        let Some(slot) = per_tenant.take(&tenant, max) else {
            engine.inner.metrics.m.overload_refusals.get("tenant_connections_full").increment(1);
            let mut r = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "tenant {tenant} has {max} connections open (max_connections_per_tenant): close one, or connect again later"
                ),
            );
            r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            return Err(r);
        };
        tenant_slot = Some(slot);
        resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(encoding.subprotocol()));
        session = Some(Session { tenant, scopes, encoding, token: crate::config::hash_token(token) });
        Ok(resp)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_cfg));
    let ws = match tokio::time::timeout(Duration::from_millis(cfg.handshake_timeout_ms), handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "websocket upgrade refused");
            return;
        }
        Err(_) => {
            tracing::debug!("websocket upgrade not completed in time; closed");
            return;
        }
    };
    let Some(session) = session else { return };
    let enc = session.encoding;
    let scope_label = if session.scopes.contains(&Scope::Admin) {
        "admin"
    } else if session.scopes.contains(&Scope::Ingest) {
        "ingest"
    } else {
        "stream"
    };
    let m = engine.inner.metrics.m.clone();
    m.connections.get(scope_label).increment(1.0);
    let (mut sink, mut source) = ws.split();
    let mut pending = FuturesUnordered::new();
    let mut sub: Option<Subscription> = None;
    // `subscribe` with `batch: true`: events go out in `events` frames.
    let mut batch_events = false;
    let mut last_seq_sent: u64 = 0;
    let hb_every = Duration::from_millis(cfg.heartbeat_interval_ms);
    let hb_timeout = Duration::from_millis(cfg.heartbeat_timeout_ms);
    let mut heartbeat = tokio::time::interval(hb_every);
    let mut last_seen = tokio::time::Instant::now();
    let hub = engine.hub(&session.tenant);
    let conn_limit = crate::ratelimit::per_second(cfg.rate_limit_connection_per_s);
    let mut admission = Admission::new(cfg.shed_backlog_bytes, cfg.shed_backlog_overloaded_bytes);
    let mut catch_up: Option<CatchUp> = None;
    let mut frames_this_turn: u32 = 0;
    // Refusals (`overloaded`, `rate_limited`) are fed unflushed and go out with the
    // next reply, the next turn's flush, or at this deadline, whichever comes first:
    // one write for many refusals instead of one each (see `REFUSALS_FLUSHED_WITHIN`).
    let refusals_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(refusals_due);
    let mut refusals_unflushed = false;
    // Stream batches sent in a row without the socket being read (see `STREAM_TURNS`).
    let mut stream_turns: u32 = 0;
    let close = loop {
        // Share the worker thread: after a few requests read in a row, let the other
        // connections (their replies, their streams) and the log's wake-ups run. A
        // socket with a backlog never returns `Pending`, and tokio's own budget lets a
        // task read a hundred 4 KiB chunks (over a thousand requests) in one turn.
        if frames_this_turn >= FRAMES_PER_TURN {
            frames_this_turn = 0;
            // Answers given at once (a shed lead's `overloaded`, a refusal) are fed
            // unflushed, to go out with the next reply; before the worker moves on
            // they go out now, so that under overload a refusal does not wait for the
            // next acknowledgement to be flushed.
            if sink.flush().await.is_err() {
                break None;
            }
            refusals_unflushed = false;
            tokio::task::yield_now().await;
        }
        if let Some(c) = catch_up.as_mut().filter(|c| c.reading.is_none()) {
            let (spill, after) = (c.spill.clone(), c.after);
            // Frames from disk go out as they are to a MessagePack subscriber of the
            // whole stream; the others need the events (decoded here, off the worker).
            let raw = enc == Encoding::Msgpack && c.pro.is_none();
            let pro = c.pro.clone();
            // At most as many chunks as cores are read and decoded at once, process
            // wide: a burst of resumes (or a client opening many, each cheap to ask
            // for) shares the cores with the traffic instead of taking them all.
            let reads = catch_up_reads();
            c.reading = Some(tokio::spawn(async move {
                let permit =
                    reads.acquire_owned().await.map_err(|_| Unserved::Unreadable("shutting down".into()))?;
                let read = tokio::task::spawn_blocking(move || {
                    // Held for the read itself, even if the connection ends meanwhile.
                    let _permit = permit;
                    match spill.read_frames_after(after, CATCH_UP_EVENTS, CATCH_UP_BYTES)? {
                        Chunk::Frames(frames) if !raw => {
                            let last = frames.last().map(|f| f.0);
                            frames
                                .into_iter()
                                // A per-pro feed decodes only the frames that hold its
                                // pro's id (the rest cannot be about it), and the chunk's
                                // last, which carries the cursor on.
                                .filter(|(seq, f)| {
                                    pro.as_ref().is_none_or(|p| {
                                        Some(*seq) == last
                                            || memchr::memmem::find(f, p.as_str().as_bytes()).is_some()
                                    })
                                })
                                .map(|(seq, f)| spill.decode(seq, f).map_err(Unserved::from))
                                .collect::<Result<Vec<_>, _>>()
                                .map(Chunk::Events)
                        }
                        chunk => Ok(chunk),
                    }
                });
                read.await.unwrap_or_else(|e| Err(Unserved::Unreadable(format!("the read failed: {e}"))))
            }));
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                break Some((CloseCode::Away, format!("shutting down; resume_from={last_seq_sent}")));
            }
            // Rarely ready, so first: a revoked token or a silent peer is acted on even
            // while the stream or the requests keep the branches below busy.
            Ok(()) = reloads.changed() => {
                // A reload that removed this connection's token, or changed what it
                // may do, ends the connection: a revoked token is revoked now.
                if engine.token_scopes(&session.tenant, &session.token).as_ref() != Some(&session.scopes) {
                    m.auth_failures.get("token_revoked").increment(1);
                    break Some((CloseCode::Policy, format!("token revoked; resume_from={last_seq_sent}")));
                }
            }
            _ = heartbeat.tick() => {
                // A peer that took frames we had to wait for is alive: its pongs may
                // wait unread behind a long send (a large resume backlog to a slow
                // reader), and timing it out for them would close a live subscriber
                // 4000 without a cursor. A peer that reads nothing is the send
                // deadline's (`send_timeout_ms`), not the heartbeat's.
                if let Some(t) = taken.last() {
                    last_seen = last_seen.max(t);
                }
                if last_seen.elapsed() > hb_timeout {
                    break Some((CloseCode::Library(CLOSE_HEARTBEAT), "heartbeat timeout".into()));
                }
                if sink.send(Message::Ping(Vec::new())).await.is_err() { break None; }
            }
            Some(reply) = pending.next(), if !pending.is_empty() => {
                let bytes = protocol::encode(enc, &reply);
                if send(&mut sink, enc, bytes, false).await.is_err() { break None; }
                // Flush replies that are ready right now in the same batch.
                while let Some(Some(r)) = futures_util::FutureExt::now_or_never(pending.next()) {
                    if send(&mut sink, enc, protocol::encode(enc, &r), false).await.is_err() { break; }
                }
                if sink.flush().await.is_err() { break None; }
                refusals_unflushed = false;
            }
            () = &mut refusals_due, if refusals_unflushed => {
                refusals_unflushed = false;
                if sink.flush().await.is_err() { break None; }
            }
            item = async { sub.as_mut().expect("guarded by the select condition").rx.recv().await }, if sub.is_some() && stream_turns < STREAM_TURNS => {
                stream_turns += 1;
                match item {
                    Some(out) => {
                        let rx = &mut sub.as_mut().expect("still subscribed").rx;
                        let frames = if batch_events {
                            // What is ready now, up to a bound, in one frame.
                            let mut frame = protocol::EventsFrame::new(enc);
                            frame.push(out.bytes(enc));
                            last_seq_sent = out.seq;
                            while frame.len() < EVENTS_PER_FRAME && frame.bytes_len() < EVENTS_FRAME_BYTES {
                                let Ok(more) = rx.try_recv() else { break };
                                frame.push(more.bytes(enc));
                                last_seq_sent = more.seq;
                            }
                            if send(&mut sink, enc, frame.finish(), false).await.is_err() { break None; }
                            1
                        } else {
                            last_seq_sent = out.seq;
                            if feed(&mut sink, enc, out.bytes(enc)).await.is_err() { break None; }
                            let mut n = 1;
                            while n < EVENTS_PER_FRAME {
                                let Ok(more) = rx.try_recv() else { break };
                                last_seq_sent = more.seq;
                                if feed(&mut sink, enc, more.bytes(enc)).await.is_err() { break; }
                                n += 1;
                            }
                            n as u64
                        };
                        m.frames_sent.get(enc.label()).increment(frames);
                        if sink.flush().await.is_err() { break None; }
                    }
                    None => {
                        let slow = sub.as_ref().is_some_and(|s| s.slow.load(Ordering::Acquire));
                        sub = None;
                        if slow {
                            m.slow_subscriber_disconnects.increment(1);
                            break Some((CloseCode::Library(CLOSE_SLOW), format!("slow subscriber; resume_from={last_seq_sent}")));
                        }
                        break Some((CloseCode::Away, format!("stream closed; resume_from={last_seq_sent}")));
                    }
                }
            }
            read = async { catch_up.as_mut().and_then(|c| c.reading.as_mut()).expect("guarded by the select condition").await }, if catch_up.as_ref().is_some_and(|c| c.reading.is_some()) => {
                let c = catch_up.as_mut().expect("guarded");
                c.reading = None;
                match read {
                    Ok(Ok(Chunk::Events(events))) if !events.is_empty() => {
                        let after = events.last().map_or(c.after, |o| o.seq);
                        let wanted: Vec<Arc<Outgoing>> = match &c.pro {
                            None => events,
                            Some(p) => events.into_iter().filter(|o| o.event.pro() == Some(p)).collect(),
                        };
                        if feed_events(&mut sink, enc, c.batch, &wanted, &mut last_seq_sent).await.is_err() { break None; }
                        if sink.flush().await.is_err() { break None; }
                        c.after = after;
                        last_seq_sent = after;
                    }
                    Ok(Ok(Chunk::Frames(frames))) if !frames.is_empty() => {
                        let after = frames.last().map_or(c.after, |f| f.0);
                        if feed_all(&mut sink, enc, c.batch, frames.iter().map(|f| f.1.as_slice())).await.is_err() { break None; }
                        if sink.flush().await.is_err() { break None; }
                        c.after = after;
                        last_seq_sent = after;
                    }
                    Ok(Ok(_)) => {
                        // Nothing more on disk or in transit: the buffer should hold
                        // the next event (else it was evicted meanwhile: read again).
                        let h = hub.as_ref().expect("a catch-up has a hub");
                        match h.subscribe(Some(c.after), c.pro.clone(), engine.inner.cfg.raw.subscriber_queue_frames, enc) {
                            Ok(mut s) => {
                                let backlog = std::mem::take(&mut s.backlog);
                                let batch = c.batch;
                                catch_up = None;
                                sub = Some(s);
                                if feed_events(&mut sink, enc, batch, &backlog, &mut last_seq_sent).await.is_err() { break None; }
                                if sink.flush().await.is_err() { break None; }
                            }
                            Err(ResumeError::TooOld { .. }) => {}
                            Err(ResumeError::Ahead { .. }) => {
                                break Some((CloseCode::Error, format!("stream history ahead of the stream; resume_from={}", c.after)));
                            }
                        }
                    }
                    Ok(Err(Unserved::Lost(Lost { .. }))) | Err(_) => {
                        // Overtaken by the history's own bound (or dropped, or cut at
                        // damage): the client resumes again and is told what is still
                        // kept.
                        m.slow_subscriber_disconnects.increment(1);
                        break Some((CloseCode::Library(CLOSE_SLOW), format!("stream history overtaken while catching up; resume_from={}", c.after)));
                    }
                    Ok(Err(Unserved::Unreadable(e))) => {
                        // The disk could not be read now (no file descriptor left,
                        // an I/O error): the history is kept, the same cursor may be
                        // served by a later resume.
                        break Some((CloseCode::Again, format!("stream history not readable now ({e}); resume_from={}", c.after)));
                    }
                }
            }
            msg = source.next() => {
                stream_turns = 0;
                last_seen = tokio::time::Instant::now();
                let msg = match msg {
                    None => break None,
                    Some(Ok(m)) => m,
                    Some(Err(WsError::Capacity(e))) => {
                        break Some((CloseCode::Size, format!("frame too big: {e}")));
                    }
                    Some(Err(WsError::Utf8)) => break Some((CloseCode::Invalid, "invalid UTF-8 in a text frame".into())),
                    Some(Err(WsError::Protocol(e))) => break Some((CloseCode::Protocol, e.to_string())),
                    Some(Err(_)) => break None,
                };
                // The frame's own buffer, moved (not copied) into the request.
                // A frame of the other kind counts like any (turns, rate limits) and is
                // answered `bad_frame` once those let it through.
                let (bytes, wrong_kind) = match (msg, enc) {
                    (Message::Text(t), Encoding::Json) => (t.into_bytes(), false),
                    (Message::Binary(b), Encoding::Msgpack) => (b, false),
                    (Message::Text(t), _) => (t.into_bytes(), true),
                    (Message::Binary(b), _) => (b, true),
                    (Message::Close(_), _) => break None,
                    _ => continue,
                };
                m.frames_received.get(enc.label()).increment(1);
                frames_this_turn += 1;
                // While shedding, a request that would be shed is refused from its `id`
                // and `type` alone, before the decode that refusing it would waste.
                admission.refresh(fd);
                if admission.shedding() {
                    if let Some((id, ty)) = protocol::peek_head(enc, &bytes) {
                        if admission.sheds(ty) {
                            m.overload_refusals.get("gateway_backlog").increment(1);
                            let r = Reply::Error { id: Some(id.to_string()), error: ApiError::overloaded(admission.retry_after_ms(Instant::now())) };
                            if feed_refusal(&mut sink, enc, protocol::encode(enc, &r), &mut refusals_unflushed, refusals_due.as_mut()).await.is_err() { break None; }
                            continue;
                        }
                    }
                }
                // Floods: per-connection, then per-tenant token buckets, for every frame,
                // before it is decoded: a refusal needs only the request's `id`, peeked
                // from the frame's head (one pass reading only the id for a frame that
                // does not start with it). A request over the rate gets `rate_limited` whatever
                // else is wrong with it.
                let limited = match conn_limit.as_ref().map(crate::ratelimit::check) {
                    Some(Err(retry)) => Some(retry),
                    _ => engine.tenant_rate_check(&session.tenant).err(),
                };
                if let Some(retry) = limited {
                    let id = match protocol::peek_head(enc, &bytes) {
                        Some((id, _)) => Some(id.to_string()),
                        None => protocol::peek_id(enc, &bytes),
                    };
                    let mut e = ApiError::new("rate_limited", "too many requests; retry later");
                    e.retry_after_ms = Some(retry);
                    m.overload_refusals.get("rate_limited").increment(1);
                    if feed_refusal(&mut sink, enc, protocol::encode(enc, &Reply::Error { id, error: e }), &mut refusals_unflushed, refusals_due.as_mut()).await.is_err() { break None; }
                    continue;
                }
                if wrong_kind {
                    let e = ApiError::new("bad_frame", format!("{} connections use {} frames", enc.subprotocol(), if enc == Encoding::Json { "text" } else { "binary" }));
                    let r = Reply::Error { id: None, error: e };
                    if send(&mut sink, enc, protocol::encode(enc, &r), true).await.is_err() { break None; }
                    continue;
                }
                let env = match protocol::decode(enc, &bytes) {
                    Ok(env) => env,
                    Err(e) => {
                        let r = Reply::Error { id: e.id, error: ApiError { field: e.field, ..ApiError::new(e.code, e.message) } };
                        if send(&mut sink, enc, protocol::encode(enc, &r), true).await.is_err() { break None; }
                        continue;
                    }
                };
                let id = env.id;
                let scope = env.request.scope();
                if !session.scopes.contains(&scope) {
                    m.auth_failures.get("forbidden_scope").increment(1);
                    let e = ApiError::new("forbidden", format!("{} needs the {} scope", env.request.name(), scope.as_str()));
                    if send(&mut sink, enc, protocol::encode(enc, &Reply::Error { id: Some(id), error: e }), true).await.is_err() { break None; }
                    continue;
                }
                if admission.sheds(env.request.name()) {
                    m.overload_refusals.get("gateway_backlog").increment(1);
                    let r = Reply::Error { id: Some(id), error: ApiError::overloaded(admission.retry_after_ms(Instant::now())) };
                    if feed_refusal(&mut sink, enc, protocol::encode(enc, &r), &mut refusals_unflushed, refusals_due.as_mut()).await.is_err() { break None; }
                    continue;
                }
                if let Request::Subscribe { resume_from, pro, batch } = env.request {
                    // A per-pro feed's pro is checked as every other request's: a bad id
                    // would subscribe to a feed no event ever reaches.
                    if let Some(e) = pro.as_ref().and_then(|p| p.validate("pro").err()) {
                        let error = crate::core::Reject::from(crate::core::FieldError::from(e)).into();
                        if send(&mut sink, enc, protocol::encode(enc, &Reply::Error { id: Some(id), error }), true).await.is_err() { break None; }
                        continue;
                    }
                    let reply = match (&hub, &sub) {
                        (_, Some(_)) => Reply::Error { id: Some(id), error: ApiError::new("already_subscribed", "one subscription per connection") },
                        _ if catch_up.is_some() => Reply::Error { id: Some(id), error: ApiError::new("already_subscribed", "one subscription per connection") },
                        (None, _) => Reply::Error { id: Some(id), error: ApiError::new("unknown_tenant", "tenant has no stream") },
                        (Some(h), None) => {
                            let resumed = h.subscribe(resume_from, pro.clone(), engine.inner.cfg.raw.subscriber_queue_frames, enc);
                            // Older than the replay buffer: the history on disk may hold it.
                            let from_disk = match (&resumed, resume_from, h.spill()) {
                                (Err(ResumeError::TooOld { oldest_available }), Some(after), Some(spill)) => {
                                    match spill.oldest_kept() {
                                        Some(o) if o <= after + 1 => Ok(spill.clone()),
                                        o => Err(o.unwrap_or(*oldest_available).min(*oldest_available)),
                                    }
                                }
                                (Err(ResumeError::TooOld { oldest_available }), _, _) => Err(*oldest_available),
                                _ => Err(0),
                            };
                            if resume_from.is_some() {
                                let outcome = match (&resumed, &from_disk) {
                                    (Err(ResumeError::TooOld { .. }), Ok(_)) => "from_disk",
                                    (Err(ResumeError::TooOld { .. }), Err(_)) => "too_old",
                                    // A cursor beyond the stream: refused, not replayed.
                                    (Err(ResumeError::Ahead { .. }), _) => "other",
                                    (Ok(_), _) => "replayed",
                                };
                                m.stream_resumes.get(outcome).increment(1);
                            }
                            match (resumed, from_disk) {
                                (Ok(s), _) => {
                                    let next = s.next_seq;
                                    let backlog = std::mem::take(&mut sub.insert(s).backlog);
                                    batch_events = batch;
                                    let ok = Reply::Ok { id, result: OkResult::Subscribed { subscribed: true, next_seq: next } };
                                    if send(&mut sink, enc, protocol::encode(enc, &ok), false).await.is_err() { break None; }
                                    if feed_events(&mut sink, enc, batch, &backlog, &mut last_seq_sent).await.is_err() { break None; }
                                    // Everything before `next` is covered now (sent, or not
                                    // this subscription's): the cursor a close reports.
                                    last_seq_sent = last_seq_sent.max(next.saturating_sub(1));
                                    if sink.flush().await.is_err() { break None; }
                                    continue;
                                }
                                (Err(ResumeError::TooOld { .. }), Ok(spill)) => {
                                    let after = resume_from.expect("a resume");
                                    batch_events = batch;
                                    last_seq_sent = after;
                                    catch_up = Some(CatchUp { after, pro, batch, spill, reading: None });
                                    let ok = Reply::Ok { id, result: OkResult::Subscribed { subscribed: true, next_seq: h.next_seq() } };
                                    if send(&mut sink, enc, protocol::encode(enc, &ok), true).await.is_err() { break None; }
                                    continue;
                                }
                                (Err(ResumeError::TooOld { .. }), Err(oldest_available)) => Reply::Error { id: Some(id), error: ApiError::new("resume_too_old", format!("events before {oldest_available} are no longer kept; resume from {} or later", oldest_available - 1)) },
                                (Err(ResumeError::Ahead { next_seq }), _) => Reply::Error { id: Some(id), error: ApiError::new("resume_ahead", format!("the next event will be {next_seq}")) },
                            }
                        }
                    };
                    if send(&mut sink, enc, protocol::encode(enc, &reply), true).await.is_err() { break None; }
                    continue;
                }
                // What one connection may have in flight is bounded too: requests that
                // queue inside rota (changes of one pro run one at a time) would
                // otherwise keep the socket drained, out of admission control's sight.
                if pending.len() >= MAX_IN_FLIGHT_PER_CONNECTION {
                    m.overload_refusals.get("connection_in_flight").increment(1);
                    let r = Reply::Error { id: Some(id), error: ApiError::overloaded(Admission::RETRY_MIN.as_millis() as u64) };
                    if feed_refusal(&mut sink, enc, protocol::encode(enc, &r), &mut refusals_unflushed, refusals_due.as_mut()).await.is_err() { break None; }
                    continue;
                }
                let engine = engine.clone();
                let tenant = session.tenant.clone();
                pending.push(async move {
                    match engine.request(&tenant, env.request).await {
                        Ok(result) => Reply::Ok { id, result },
                        Err(error) => Reply::Error { id: Some(id), error },
                    }
                });
            }
            // The stream had its turns and nothing else was ready: it goes on.
            () = std::future::ready(()), if stream_turns >= STREAM_TURNS => {
                stream_turns = 0;
            }
        }
    };
    if let (Some(s), Some(h)) = (&sub, &hub) {
        h.cancel(s);
    }
    if send_expired.load(Ordering::Relaxed) {
        m.slow_subscriber_disconnects.increment(1);
        tracing::warn!(
            tenant = %session.tenant,
            last_seq_sent,
            "connection dropped: the peer read nothing for send_timeout_ms"
        );
    }
    // Answer what is still in flight before closing, so no request goes unanswered.
    while let Some(r) = pending.next().await {
        if send(&mut sink, enc, protocol::encode(enc, &r), false).await.is_err() {
            break;
        }
    }
    if let Some((code, reason)) = close {
        let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
        // Close handshake: read until the peer's Close (bounded in time). Dropping the
        // socket with its frames unread would reset the connection, and a reset makes
        // the peer's kernel discard our close frame (and its resume cursor).
        let peer_closed = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(m)) = source.next().await {
                if m.is_close() {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !peer_closed {
            // The frame reader failed (e.g. the rest of an oversized frame is still
            // unread, 1009), so drain the raw socket after a half-close: unread bytes
            // at drop would reset the connection and lose our close frame.
            if let Ok(mut ws) = sink.reunite(source) {
                drain_raw(ws.get_mut().get_mut()).await;
            }
            m.connections.get(scope_label).decrement(1.0);
            return;
        }
    }
    let _ = sink.flush().await;
    m.connections.get(scope_label).decrement(1.0);
}

/// Requests a connection reads before it lets the worker's other tasks run.
const FRAMES_PER_TURN: u32 = 16;

/// Stream batches a connection sends in a row before its socket is read again: a
/// stream always ready would otherwise keep the requests (and the peer's pongs, which
/// the heartbeat waits for) unread behind it.
const STREAM_TURNS: u32 = 32;

/// Requests one connection may have in flight (read, not answered yet); beyond it a
/// request is refused `overloaded` (reason `connection_in_flight`).
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 4096;

/// A refusal (`overloaded`, `rate_limited`) waits at most this long to be written, with
/// the refusals and replies after it. Under a flood or overload the client sends a new
/// request every few tens of microseconds and the gateway used to write each refusal
/// alone (a `sendto` and, over loopback, the peer's receive work: most of the cost of
/// refusing); a refused request is not urgent: its client must wait `retry_after_ms`
/// before sending it again.
const REFUSALS_FLUSHED_WITHIN: Duration = Duration::from_millis(1);

/// Most events sent per wake-up of a subscriber (and per `events` frame).
const EVENTS_PER_FRAME: usize = 1024;
/// An `events` frame is closed once it holds this many bytes (a client's frame limit
/// is usually far above; one event is about 0.5 KiB).
const EVENTS_FRAME_BYTES: usize = 256 << 10;

/// Half-closes `tcp` and reads until the peer closes, bounded in time and bytes.
async fn drain_raw(tcp: &mut TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.flush().await;
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 16 * 1024];
    let mut left: usize = 64 * 1024 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

type Sink =
    futures_util::stream::SplitSink<tokio_tungstenite::WebSocketStream<SendDeadline<TcpStream>>, Message>;

/// The buffer becomes the message without a copy.
fn message(enc: Encoding, bytes: Vec<u8>) -> Message {
    match enc {
        // JSON encoding of our own types is always UTF-8; checked, not trusted.
        Encoding::Json => match String::from_utf8(bytes) {
            Ok(text) => Message::Text(text),
            Err(e) => Message::Text(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        },
        Encoding::Msgpack => Message::Binary(bytes),
    }
}

/// Queues `events` (a resume's backlog), in `events` frames bounded as the live
/// ones are when `batch`, else one frame each; `last` is set to the last one's seq.
async fn feed_events(
    sink: &mut Sink,
    enc: Encoding,
    batch: bool,
    events: &[Arc<Outgoing>],
    last: &mut u64,
) -> Result<(), WsError> {
    feed_all(sink, enc, batch, events.iter().map(|o| o.bytes(enc))).await?;
    if let Some(o) = events.last() {
        *last = o.seq;
    }
    Ok(())
}

/// Queues encoded event frames: in `events` frames bounded as the live ones are when
/// `batch`, else one frame each.
async fn feed_all<'a>(
    sink: &mut Sink,
    enc: Encoding,
    batch: bool,
    frames: impl Iterator<Item = &'a [u8]>,
) -> Result<(), WsError> {
    if !batch {
        for bytes in frames {
            feed(sink, enc, bytes).await?;
        }
        return Ok(());
    }
    let mut frame = protocol::EventsFrame::new(enc);
    for bytes in frames {
        frame.push(bytes);
        if frame.len() >= EVENTS_PER_FRAME || frame.bytes_len() >= EVENTS_FRAME_BYTES {
            let full = std::mem::replace(&mut frame, protocol::EventsFrame::new(enc));
            send(sink, enc, full.finish(), false).await?;
        }
    }
    if !frame.is_empty() {
        send(sink, enc, frame.finish(), false).await?;
    }
    Ok(())
}

/// A resume served from the stream history on disk: events after `after` are read
/// in chunks (off the worker thread) and sent, until the replay buffer holds the
/// next one; then the subscription goes live as any resume does.
struct CatchUp {
    after: u64,
    pro: Option<crate::ids::ProId>,
    batch: bool,
    spill: Arc<Spill>,
    reading: Option<tokio::task::JoinHandle<Result<Chunk, Unserved>>>,
}

impl Drop for CatchUp {
    /// A catch-up whose connection ended stops waiting for a read slot: reads for
    /// nobody must not hold up the live catch-ups behind them.
    fn drop(&mut self) {
        if let Some(r) = &self.reading {
            r.abort();
        }
    }
}

/// Chunks of catch-ups read from disk at once, process wide: the machine's cores (a
/// chunk's read and decode is CPU work, done off the worker threads).
fn catch_up_reads() -> Arc<tokio::sync::Semaphore> {
    static READS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    READS
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Arc::new(tokio::sync::Semaphore::new(cores))
        })
        .clone()
}

/// Events read from disk per chunk of a catch-up.
const CATCH_UP_EVENTS: usize = 4096;
const CATCH_UP_BYTES: usize = 1 << 20;

/// Queues a frame shared with other subscribers (copied into the message).
async fn feed(sink: &mut Sink, enc: Encoding, bytes: &[u8]) -> Result<(), WsError> {
    sink.feed(message(enc, bytes.to_vec())).await
}

/// Feeds a refusal (`overloaded`, `rate_limited`) unflushed and, unless one is armed
/// already, arms `due` to flush it within [`REFUSALS_FLUSHED_WITHIN`].
async fn feed_refusal(
    sink: &mut Sink,
    enc: Encoding,
    bytes: Vec<u8>,
    armed: &mut bool,
    due: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Result<(), WsError> {
    send(sink, enc, bytes, false).await?;
    if !*armed {
        *armed = true;
        due.reset(tokio::time::Instant::now() + REFUSALS_FLUSHED_WITHIN);
    }
    Ok(())
}

/// Sends a frame encoded for this connection alone (a reply).
async fn send(sink: &mut Sink, enc: Encoding, bytes: Vec<u8>, flush: bool) -> Result<(), WsError> {
    let msg = message(enc, bytes);
    if flush {
        sink.send(msg).await
    } else {
        sink.feed(msg).await
    }
}

#[cfg(test)]
mod bearer_tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_read_whatever_its_case_and_other_schemes_are_not() {
        for v in ["Bearer t0k", "bearer t0k", "BEARER t0k", "Bearer  t0k "] {
            assert_eq!(bearer_token(v), Some("t0k"), "{v:?}");
        }
        for v in ["Basic dTpw", "Bearert0k", "t0k", ""] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }
}
