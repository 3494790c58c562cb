//! Per-tenant stream hub: sequence numbers, a bounded replay buffer, subscribers.
//!
//! [`StreamHub::publish`] is called only from the WAL's durability callbacks, which
//! run on the single WAL writer thread in log order; so stream sequence numbers
//! follow the log, and replaying the log after a restart gives every event the same
//! number again. Subscribers get bounded queues; one that falls behind is cut off
//! (never buffered without bound) and can resume from its last sequence number.

use crate::ids::ProId;
use crate::protocol::{Encoding, StreamEvent, StreamFrame, StreamTag};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

/// One event of a replay buffer, serialised as `(seq, event)`.
pub struct Buffered(Arc<Outgoing>);

impl serde::Serialize for Buffered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.0.seq, &self.0.event).serialize(s)
    }
}

/// One stream event, encoded at most once per encoding and shared by every
/// subscriber.
#[derive(Debug)]
pub struct Outgoing {
    pub seq: u64,
    pub event: StreamEvent,
    json: OnceLock<Framed>,
    msgpack: OnceLock<Framed>,
}

/// An encoded frame: `buf[start..]`. A body prepared before its sequence number was
/// known leaves room in front for the frame's header, written in place at publish, so
/// the frame is allocated and copied once.
#[derive(Debug)]
struct Framed {
    buf: Vec<u8>,
    start: usize,
}

impl Outgoing {
    pub fn new(seq: u64, event: impl Into<Prepared>) -> Self {
        let p = event.into();
        let out = Self { seq, event: p.event, json: OnceLock::new(), msgpack: OnceLock::new() };
        if let Some(body) = p.json {
            let _ = out.json.set(frame_around(Encoding::Json, seq, body));
        }
        if let Some(body) = p.msgpack {
            let _ = out.msgpack.set(frame_around(Encoding::Msgpack, seq, body));
        }
        out
    }

    pub fn bytes(&self, enc: Encoding) -> &[u8] {
        let cell = match enc {
            Encoding::Json => &self.json,
            Encoding::Msgpack => &self.msgpack,
        };
        let f = cell.get_or_init(|| {
            // Encode a borrowed frame: no clone of the event.
            #[derive(serde::Serialize)]
            struct Frame<'a> {
                #[serde(rename = "type")]
                kind: StreamTag,
                seq: u64,
                event: &'a StreamEvent,
            }
            let frame = Frame { kind: StreamTag::Event, seq: self.seq, event: &self.event };
            crate::protocol::with_scratch(|buf| {
                crate::protocol::encode_into(enc, &frame, buf);
                Framed { buf: buf.as_slice().to_vec(), start: 0 }
            })
        });
        &f.buf[f.start..]
    }

    /// An event read back from the stream history on disk, with its MessagePack
    /// frame as written (so it is not encoded again).
    pub(crate) fn spilled(seq: u64, event: StreamEvent, msgpack_frame: Vec<u8>) -> Self {
        let out = Self { seq, event, json: OnceLock::new(), msgpack: OnceLock::new() };
        let _ = out.msgpack.set(Framed { buf: msgpack_frame, start: 0 });
        out
    }

    pub fn frame(&self) -> StreamFrame {
        StreamFrame { kind: StreamTag::Event, seq: self.seq, event: self.event.clone() }
    }
}

/// A stream event, with its body already encoded in the encodings subscribers use
/// (done by the shard's thread, so the gateway only copies bytes; see
/// [`StreamHub::wants`]). A body that is missing is encoded on first use.
pub struct Prepared {
    pub event: StreamEvent,
    json: Option<Body>,
    msgpack: Option<Body>,
}

/// An encoded body after [`header_room`] bytes of room for its frame's header (and,
/// in JSON, with capacity for the frame's closing brace).
struct Body(Vec<u8>);

/// Room for the longest frame header: `{"type":"event","seq":<20 digits>,"event":` in
/// JSON (51 bytes), `\x83\xa4type\xa5event\xa3seq<uint64>\xa5event` in MessagePack
/// (31 bytes).
const fn header_room(enc: Encoding) -> usize {
    match enc {
        Encoding::Json => 51,
        Encoding::Msgpack => 31,
    }
}

impl Body {
    fn of(enc: Encoding, encoded: &[u8]) -> Self {
        let room = header_room(enc);
        let mut v = Vec::with_capacity(room + encoded.len() + usize::from(enc == Encoding::Json));
        v.resize(room, 0);
        v.extend_from_slice(encoded);
        Body(v)
    }

    #[cfg(test)]
    fn encoded(&self, enc: Encoding) -> &[u8] {
        &self.0[header_room(enc)..]
    }
}

impl Prepared {
    /// Encodes `event`'s body for each encoding `hub` has subscribers in.
    pub fn for_hub(event: StreamEvent, hub: &StreamHub) -> Self {
        Self::batch(vec![event], hub).pop().expect("one event in, one out")
    }
}

impl Prepared {
    /// [`Prepared::for_hub`] for the stream events of one record, in order. The offers
    /// of one release share their lead summary (and price components): the summary is
    /// encoded once per encoding and spliced into every offer's body, which is byte for
    /// byte what encoding each offer whole gives (the summary was most of the bytes and
    /// of the encoding time of a release's 4-5 offers).
    pub fn batch(events: Vec<StreamEvent>, hub: &StreamHub) -> Vec<Prepared> {
        let wants = [Encoding::Json, Encoding::Msgpack].map(|e| hub.wants(e));
        let mut tails = OfferTails::default();
        events
            .into_iter()
            .map(|event| {
                let mut body =
                    |enc: Encoding| wants[enc_index(enc)].then(|| encode_body(enc, &event, &mut tails));
                let (json, msgpack) = (body(Encoding::Json), body(Encoding::Msgpack));
                Prepared { event, json, msgpack }
            })
            .collect()
    }
}

/// The encoded summary part of the offers of one release (see [`Prepared::batch`]).
#[derive(Default)]
struct OfferTails {
    of: Option<(Arc<crate::protocol::LeadSummary>, Option<Arc<crate::pricing::PriceComponents>>)>,
    bytes: [Option<Box<[u8]>>; 2],
}

/// An offer's fields before its summary, in declaration order (the tag first, as
/// serde writes an internally tagged variant).
#[derive(serde::Serialize)]
struct OfferedHead<'a> {
    event: &'static str,
    lead: &'a crate::ids::LeadId,
    pro: &'a crate::ids::ProId,
    kind: crate::core::OfferKind,
    price: u64,
    respond_by: Option<crate::ids::Millis>,
    at: crate::ids::Millis,
}

/// An offer's fields from its summary on.
#[derive(serde::Serialize)]
struct OfferedTail<'a> {
    summary: &'a crate::protocol::LeadSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_components: Option<&'a crate::pricing::PriceComponents>,
}

fn encode_body(enc: Encoding, event: &StreamEvent, tails: &mut OfferTails) -> Body {
    if let StreamEvent::Offered { lead, pro, kind, price, respond_by, at, summary, price_components } = event
    {
        let same = tails.of.as_ref().is_some_and(|(s, c)| {
            Arc::ptr_eq(s, summary)
                && match (c, price_components) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
        });
        if !same {
            *tails =
                OfferTails { of: Some((summary.clone(), price_components.clone())), bytes: [None, None] };
        }
        let tail = tails.bytes[enc_index(enc)].get_or_insert_with(|| {
            let t = OfferedTail { summary, price_components: price_components.as_deref() };
            crate::protocol::with_scratch(|buf| {
                crate::protocol::encode_into(enc, &t, buf);
                Box::from(buf.as_slice())
            })
        });
        let head = OfferedHead {
            event: "offered",
            lead,
            pro,
            kind: *kind,
            price: *price,
            respond_by: *respond_by,
            at: *at,
        };
        let spliced = crate::protocol::with_scratch(|buf| {
            crate::protocol::encode_into(enc, &head, buf);
            splice(enc, buf, tail).then(|| Body::of(enc, buf))
        });
        if let Some(body) = spliced {
            return body;
        }
    }
    crate::protocol::with_scratch(|buf| {
        crate::protocol::encode_into(enc, event, buf);
        Body::of(enc, buf)
    })
}

/// Joins two encoded maps (`head`, then `tail`'s entries) into one map in `head`, or
/// returns false if either is not in the shape expected (then the caller encodes the
/// event whole).
fn splice(enc: Encoding, head: &mut Vec<u8>, tail: &[u8]) -> bool {
    match enc {
        Encoding::Json => {
            if head.last() != Some(&b'}') || tail.len() < 3 || tail[0] != b'{' {
                return false;
            }
            head.pop();
            head.push(b',');
            head.extend_from_slice(&tail[1..]);
        }
        Encoding::Msgpack => {
            // Both fixmaps (at most 15 entries, one header byte).
            let (Some(&h), Some(&t)) = (head.first(), tail.first()) else { return false };
            if h & 0xf0 != 0x80 || t & 0xf0 != 0x80 || t == 0x80 {
                return false;
            }
            let n = (h & 0x0f) + (t & 0x0f);
            if n > 15 {
                return false;
            }
            head[0] = 0x80 | n;
            head.extend_from_slice(&tail[1..]);
        }
    }
    true
}

impl From<StreamEvent> for Prepared {
    fn from(event: StreamEvent) -> Self {
        Self { event, json: None, msgpack: None }
    }
}

/// The frame `{"type": "event", "seq": seq, "event": body}` around an encoded body,
/// written into the room in front of it: byte for byte what serialising
/// [`StreamFrame`] gives.
fn frame_around(enc: Encoding, seq: u64, body: Body) -> Framed {
    let mut head = [0u8; 64];
    let mut w = &mut head[..];
    match enc {
        Encoding::Json => {
            std::io::Write::write_fmt(&mut w, format_args!("{{\"type\":\"event\",\"seq\":{seq},\"event\":"))
                .expect("the header fits its room");
        }
        Encoding::Msgpack => {
            // fixmap(3), "type": "event", "seq": <uint>, "event": <body>
            std::io::Write::write_all(&mut w, b"\x83\xa4type\xa5event\xa3seq").expect("fits");
            rmp_serde::encode::write(&mut w, &seq).expect("fits");
            std::io::Write::write_all(&mut w, b"\xa5event").expect("fits");
        }
    }
    let len = 64 - w.len();
    let room = header_room(enc);
    debug_assert!(len <= room);
    let mut buf = body.0;
    let start = room - len;
    buf[start..room].copy_from_slice(&head[..len]);
    if enc == Encoding::Json {
        buf.push(b'}');
    }
    Framed { buf, start }
}

struct Subscriber {
    enc: Encoding,
    id: u64,
    tx: mpsc::Sender<Arc<Outgoing>>,
    /// Set when the hub dropped this subscriber for being too slow.
    slow: Arc<AtomicBool>,
}

struct Inner {
    next_seq: u64,
    buffer: VecDeque<Arc<Outgoing>>,
    /// Subscribers to the whole stream.
    subscribers: Vec<Subscriber>,
    /// Per-pro feeds, by pro: an event is offered only to its own pro's feeds. A
    /// tenant may keep a feed open for each of thousands of pros, and `publish` runs
    /// on the log's one thread for every tenant: its cost must not grow with them.
    by_pro: FxHashMap<ProId, Vec<Subscriber>>,
    /// How many subscribers `by_pro` holds.
    per_pro: usize,
    /// Events published since `by_pro` was last swept for feeds whose receiver is
    /// gone (a connection that ended without unsubscribing).
    since_sweep: usize,
}

/// Events of a resume's backlog copied per hold of the hub's lock (see
/// [`StreamHub::subscribe`]): about 20 us of Arc clones.
pub const BACKLOG_CHUNK: usize = 4096;

/// Per-pro feeds are swept for ended receivers once at least this many events (and at
/// least as many as there are feeds) went by: an amortised constant per event.
const SWEEP_EVERY_EVENTS: usize = 1024;

pub struct StreamHub {
    inner: Mutex<Inner>,
    /// Subscribers per encoding (JSON, MessagePack).
    wanted: [AtomicUsize; 2],
    retention: usize,
    /// Where evicted events go: the history on disk (`stream_spill_bytes`), if on.
    spill: Option<Arc<super::spill::Spill>>,
    next_sub: AtomicU64,
    pub slow_disconnects: AtomicU64,
}

/// A live subscription: the backlog to send first, then the receiver.
pub struct Subscription {
    pub backlog: Vec<Arc<Outgoing>>,
    pub rx: mpsc::Receiver<Arc<Outgoing>>,
    pub slow: Arc<AtomicBool>,
    pub next_seq: u64,
    pub id: u64,
    /// The pro of a per-pro feed (`None`: the whole stream): where
    /// [`StreamHub::cancel`] finds it.
    pub pro: Option<ProId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeError {
    /// The requested position is older than what the hub still holds.
    TooOld { oldest_available: u64 },
    /// The requested position is in the future.
    Ahead { next_seq: u64 },
}

impl StreamHub {
    pub fn new(retention: usize) -> Self {
        Self::with_spill(retention, None)
    }

    /// A hub whose evicted events go to `spill` (see [`super::spill`]).
    pub fn with_spill(retention: usize, spill: Option<Arc<super::spill::Spill>>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_seq: 1,
                buffer: VecDeque::new(),
                subscribers: Vec::new(),
                by_pro: FxHashMap::default(),
                per_pro: 0,
                since_sweep: 0,
            }),
            wanted: [AtomicUsize::new(0), AtomicUsize::new(0)],
            retention,
            spill,
            next_sub: AtomicU64::new(1),
            slow_disconnects: AtomicU64::new(0),
        }
    }

    /// The history on disk behind the replay buffer, if any.
    pub fn spill(&self) -> Option<&Arc<super::spill::Spill>> {
        self.spill.as_ref()
    }

    /// Recovery: publishes the events of the log replayed after the snapshot. The
    /// history on disk is aligned first (kept only if it joins what the snapshot's
    /// replay buffer holds, and holds nothing the log no longer has), then what the
    /// buffer evicts is written out every [`super::spill::RECOVERY_CHUNK`] events:
    /// published at once, the events of minutes of traffic would overflow transit,
    /// which drops the oldest, and the history would restart after them.
    pub fn publish_recovered(&self, events: Vec<StreamEvent>) {
        if let Some(sp) = &self.spill {
            let next = self.next_seq() + events.len() as u64;
            sp.align(sp.transit_front().unwrap_or_else(|| self.oldest_buffered()), next);
        }
        let mut events = events.into_iter();
        loop {
            let chunk: Vec<StreamEvent> = events.by_ref().take(super::spill::RECOVERY_CHUNK).collect();
            if chunk.is_empty() {
                return;
            }
            self.publish(chunk);
            if let Some(sp) = &self.spill {
                sp.drain();
            }
        }
    }

    /// The oldest event in the replay buffer (`next_seq` when it is empty).
    pub fn oldest_buffered(&self) -> u64 {
        let g = self.inner.lock();
        g.buffer.front().map_or(g.next_seq, |o| o.seq)
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.lock().next_seq
    }

    /// After restoring a snapshot: continue numbering from `next_seq`.
    pub fn set_next_seq(&self, next_seq: u64) {
        let mut g = self.inner.lock();
        g.next_seq = next_seq;
        g.buffer.clear();
    }

    /// The replay buffer (for snapshots): consecutive sequence numbers, oldest first,
    /// shared (no event copied), each entry serialised as `(seq, event)`. With a
    /// stream history, the evicted events still in transit (not on disk yet) come
    /// first: a crash right after the snapshot would otherwise lose them (they precede
    /// the snapshot's cut, so replaying the log does not bring them back) and leave the
    /// history a gap short of the restored buffer. Restoring publishes them again and
    /// the buffer evicts them to the history as before.
    pub fn buffered_shared(&self) -> Vec<Buffered> {
        let g = self.inner.lock();
        let mut out = Vec::new();
        if let Some(sp) = &self.spill {
            let pending = sp.transit_events();
            // The newest evicted event is the buffer's first minus one; anything else
            // (nothing evicted yet) is left out rather than make a gap.
            if pending.last().map(|o| o.seq + 1) == g.buffer.front().map(|o| o.seq) {
                out.extend(pending.into_iter().map(Buffered));
            }
        }
        out.extend(g.buffer.iter().map(|o| Buffered(o.clone())));
        out
    }

    /// Whether any subscriber reads `enc` (worth encoding events for it up front).
    pub fn wants(&self, enc: Encoding) -> bool {
        self.wanted[enc_index(enc)].load(Ordering::Relaxed) > 0
    }

    fn gone(&self, s: &Subscriber) {
        self.wanted[enc_index(s.enc)].fetch_sub(1, Ordering::Relaxed);
    }

    /// Offers `out` to each of `subs`: one that is full (too slow) or whose receiver is
    /// gone is dropped (dropping its sender ends its stream). Returns how many were.
    fn fan_out(&self, subs: &mut Vec<Subscriber>, out: &Arc<Outgoing>) -> usize {
        let (mut i, mut dropped) = (0, 0);
        while i < subs.len() {
            let keep = match subs[i].tx.try_send(out.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subs[i].slow.store(true, Ordering::Release);
                    self.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            if keep {
                i += 1;
            } else {
                self.gone(&subs.swap_remove(i));
                dropped += 1;
            }
        }
        dropped
    }

    /// Numbers, buffers and fans out events, in order.
    pub fn publish<E: Into<Prepared>>(&self, events: impl IntoIterator<Item = E>) {
        // Events pushed out of the replay buffer are freed after the lock is released:
        // they are old, cold in the cache, and half the time under the lock otherwise
        // (every thread publishing to this tenant waits for it).
        let mut evicted: smallvec::SmallVec<[Arc<Outgoing>; 8]> = smallvec::SmallVec::new();
        // Evicted events for the history on disk: handed to it in one go, under this
        // lock (an event is always in the buffer, in transit or on disk: see `spill`).
        let mut to_spill: smallvec::SmallVec<[Arc<Outgoing>; 8]> = smallvec::SmallVec::new();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        for event in events {
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let out = Arc::new(Outgoing::new(seq, event));
            if inner.buffer.len() == self.retention {
                if let Some(old) = inner.buffer.pop_front() {
                    match &self.spill {
                        Some(_) => to_spill.push(old),
                        None => evicted.push(old),
                    }
                }
            }
            inner.buffer.push_back(out.clone());
            self.fan_out(&mut inner.subscribers, &out);
            if let Some(p) = out.event.pro() {
                if let Some(feeds) = inner.by_pro.get_mut(p) {
                    inner.per_pro -= self.fan_out(feeds, &out);
                    if feeds.is_empty() {
                        inner.by_pro.remove(p);
                    }
                }
            }
            inner.since_sweep += 1;
        }
        if inner.per_pro > 0 && inner.since_sweep >= SWEEP_EVERY_EVENTS.max(inner.per_pro) {
            inner.since_sweep = 0;
            let mut ended = 0;
            inner.by_pro.retain(|_, feeds| {
                feeds.retain(|s| {
                    let open = !s.tx.is_closed();
                    if !open {
                        self.gone(s);
                        ended += 1;
                    }
                    open
                });
                !feeds.is_empty()
            });
            inner.per_pro -= ended;
        }
        if let (Some(sp), false) = (&self.spill, to_spill.is_empty()) {
            sp.push_evicted(to_spill, &mut evicted);
        }
        drop(g);
        drop(evicted);
    }

    /// Subscribes from `resume_from` (exclusive; `None` = live only). The backlog's
    /// last part and the registration happen under one lock: no gap, no duplicate.
    /// A backlog of more than [`BACKLOG_CHUNK`] events is copied a chunk per lock
    /// first: the log's thread takes this lock to publish (for every tenant, in log
    /// order), and a resume from far back must not hold it for the whole buffer.
    pub fn subscribe(
        &self,
        resume_from: Option<u64>,
        pro: Option<crate::ids::ProId>,
        capacity: usize,
        enc: Encoding,
    ) -> Result<Subscription, ResumeError> {
        let mut backlog = Vec::new();
        let mut after = resume_from;
        let wanted = |o: &&Arc<Outgoing>| pro.as_ref().is_none_or(|p| o.event.pro() == Some(p));
        loop {
            let mut g = self.inner.lock();
            if let Some(after) = after.as_mut() {
                if *after >= g.next_seq {
                    return Err(ResumeError::Ahead { next_seq: g.next_seq });
                }
                // Evicted meanwhile (between two chunks, only if the buffer turned over
                // faster than chunks are copied): too old, as for any resume.
                let oldest = g.buffer.front().map_or(g.next_seq, |o| o.seq);
                if *after + 1 < oldest {
                    return Err(ResumeError::TooOld { oldest_available: oldest });
                }
                // The buffer holds consecutive numbers from `oldest`: the backlog
                // starts at a known place, not after a scan of everything before it.
                let from = (*after + 1 - oldest) as usize;
                if g.buffer.len() - from > BACKLOG_CHUNK {
                    backlog.extend(g.buffer.range(from..from + BACKLOG_CHUNK).filter(wanted).cloned());
                    *after = g.buffer[from + BACKLOG_CHUNK - 1].seq;
                    continue;
                }
                backlog.extend(g.buffer.range(from..).filter(wanted).cloned());
            }
            let (tx, rx) = mpsc::channel(capacity);
            let slow = Arc::new(AtomicBool::new(false));
            let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
            let sub = Subscriber { enc, id, tx, slow: slow.clone() };
            match &pro {
                Some(p) => {
                    g.by_pro.entry(p.clone()).or_default().push(sub);
                    g.per_pro += 1;
                }
                None => g.subscribers.push(sub),
            }
            self.wanted[enc_index(enc)].fetch_add(1, Ordering::Relaxed);
            return Ok(Subscription { backlog, rx, slow, next_seq: g.next_seq, id, pro });
        }
    }

    /// Ends `sub` (a connection that goes away). A per-pro feed is looked up under its
    /// own pro: the hub's lock is the one the log's thread takes to publish, for every
    /// tenant, and a tenant may keep feeds open for thousands of pros, so it is not held
    /// for a scan of them all. Nothing happens if the hub already dropped it (too slow,
    /// or its receiver gone).
    pub fn cancel(&self, sub: &Subscription) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        match &sub.pro {
            None => {
                if let Some(i) = inner.subscribers.iter().position(|s| s.id == sub.id) {
                    self.gone(&inner.subscribers.swap_remove(i));
                }
            }
            Some(p) => {
                let Some(feeds) = inner.by_pro.get_mut(p) else { return };
                let Some(i) = feeds.iter().position(|s| s.id == sub.id) else { return };
                self.gone(&feeds.swap_remove(i));
                inner.per_pro -= 1;
                if feeds.is_empty() {
                    inner.by_pro.remove(p);
                }
            }
        }
    }

    pub fn subscriber_count(&self) -> usize {
        let g = self.inner.lock();
        g.subscribers.len() + g.per_pro
    }

    /// Closes every subscription (shutdown): their receivers end.
    pub fn close_all(&self) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        for s in inner.subscribers.drain(..).chain(inner.by_pro.drain().flat_map(|(_, feeds)| feeds)) {
            self.gone(&s);
        }
        inner.per_pro = 0;
    }
}

fn enc_index(enc: Encoding) -> usize {
    match enc {
        Encoding::Json => 0,
        Encoding::Msgpack => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::LeadId;

    fn ev(i: u64) -> StreamEvent {
        StreamEvent::LeadClosed { lead: LeadId::new(format!("L{i}")), at: i as i64 }
    }

    #[test]
    fn resume_delivers_the_gap_then_live_without_duplicates() {
        let hub = StreamHub::new(100);
        hub.publish((1..=5).map(ev));
        let mut sub = hub.subscribe(Some(3), None, 16, Encoding::Json).unwrap();
        assert_eq!(sub.backlog.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![4, 5]);
        hub.publish([ev(6)]);
        assert_eq!(sub.rx.try_recv().unwrap().seq, 6);
        assert!(sub.rx.try_recv().is_err());
    }

    /// A backlog longer than a chunk (copied a chunk per hold of the lock) is whole
    /// and in order, then live events follow without a gap or a duplicate; also for
    /// a per-pro feed.
    #[test]
    fn a_resume_of_several_chunks_gets_every_event_once_in_order() {
        let n = 3 * BACKLOG_CHUNK as u64 + 5;
        let credit = |i: u64| StreamEvent::TopupRequested {
            pro: crate::ids::ProId::new(if i % 2 == 0 { "a" } else { "b" }),
            credits: i,
        };
        let hub = StreamHub::new(n as usize + 10);
        hub.publish((1..=n).map(credit));
        let mut all = hub.subscribe(Some(2), None, 16, Encoding::Json).unwrap();
        assert_eq!(all.backlog.iter().map(|o| o.seq).collect::<Vec<_>>(), (3..=n).collect::<Vec<_>>());
        let mut b = hub.subscribe(Some(0), Some(crate::ids::ProId::new("b")), 16, Encoding::Json).unwrap();
        let odd: Vec<u64> = (1..=n).filter(|i| i % 2 == 1).collect();
        assert_eq!(b.backlog.iter().map(|o| o.seq).collect::<Vec<_>>(), odd);
        hub.publish([credit(n + 1), credit(n + 2)]);
        assert_eq!(all.rx.try_recv().unwrap().seq, n + 1);
        assert_eq!(all.rx.try_recv().unwrap().seq, n + 2);
        assert_eq!(b.rx.try_recv().unwrap().seq, n + 2);
        assert!(b.rx.try_recv().is_err());
    }

    #[test]
    fn resume_older_than_retention_is_refused_with_the_oldest_cursor() {
        let hub = StreamHub::new(3);
        hub.publish((1..=10).map(ev));
        assert_eq!(
            hub.subscribe(Some(2), None, 16, Encoding::Json).err(),
            Some(ResumeError::TooOld { oldest_available: 8 })
        );
        assert!(hub.subscribe(Some(7), None, 16, Encoding::Json).is_ok());
        assert_eq!(
            hub.subscribe(Some(11), None, 16, Encoding::Json).err(),
            Some(ResumeError::Ahead { next_seq: 11 })
        );
    }

    #[test]
    fn a_per_pro_subscriber_whose_receiver_is_gone_is_dropped_by_a_later_sweep() {
        let hub = StreamHub::new(100);
        let sub = hub.subscribe(None, Some(crate::ids::ProId::new("x")), 16, Encoding::Json).unwrap();
        assert_eq!(hub.subscriber_count(), 1);
        // The connection ended without `unsubscribe`; events of other leads follow
        // (`LeadClosed` names no pro): swept once enough went by.
        drop(sub);
        hub.publish((1..SWEEP_EVERY_EVENTS as u64).map(ev));
        assert_eq!(hub.subscriber_count(), 1, "not swept at every event");
        hub.publish([ev(SWEEP_EVERY_EVENTS as u64)]);
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[test]
    fn slow_subscriber_is_cut_off_and_others_keep_receiving() {
        let hub = StreamHub::new(100);
        let slow = hub.subscribe(None, None, 2, Encoding::Json).unwrap();
        let mut fast = hub.subscribe(None, None, 100, Encoding::Json).unwrap();
        hub.publish((1..=5).map(ev));
        assert!(slow.slow.load(Ordering::Acquire));
        assert_eq!(hub.subscriber_count(), 1);
        for i in 1..=5 {
            assert_eq!(fast.rx.try_recv().unwrap().seq, i);
        }
    }

    #[test]
    fn a_per_pro_feed_sees_only_that_pros_events_live_and_on_resume() {
        let credit =
            |pro: &str, n: u64| StreamEvent::TopupRequested { pro: crate::ids::ProId::new(pro), credits: n };
        let hub = StreamHub::new(100);
        hub.publish([credit("a", 1), credit("b", 2), ev(3)]);
        let mut feed = hub.subscribe(Some(0), Some(crate::ids::ProId::new("a")), 16, Encoding::Json).unwrap();
        assert_eq!(feed.backlog.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1]);
        hub.publish([credit("b", 4), credit("a", 5)]);
        assert_eq!(feed.rx.try_recv().unwrap().seq, 5);
        assert!(feed.rx.try_recv().is_err());
    }

    /// Feeds of many pros, several per pro, ended one by one through their own pro:
    /// the others keep getting their pro's events, a pro whose feeds all ended has no
    /// entry left, the counts (subscribers, encodings wanted) follow, and ending a feed
    /// the hub already dropped (too slow) changes nothing.
    #[test]
    fn cancelling_many_per_pro_feeds_leaves_exactly_the_others() {
        let pro = |i: usize| crate::ids::ProId::new(format!("p{i}"));
        let credit = |i: usize, n: u64| StreamEvent::TopupRequested { pro: pro(i), credits: n };
        let hub = StreamHub::new(10_000);
        let mut feeds: Vec<(usize, Subscription)> = Vec::new();
        for i in 0..300 {
            for _ in 0..2 {
                feeds.push((i, hub.subscribe(None, Some(pro(i)), 16, Encoding::Json).unwrap()));
            }
        }
        let mut whole = hub.subscribe(None, None, 1024, Encoding::Msgpack).unwrap();
        let whole_gone = hub.subscribe(None, None, 1024, Encoding::Msgpack).unwrap();
        // Both feeds of every third pro end, and the first feed of every other even one.
        let (mut ended, mut kept) = (Vec::new(), Vec::new());
        for (n, (i, s)) in feeds.into_iter().enumerate() {
            if i % 3 == 0 || (i % 2 == 0 && n % 2 == 0) {
                hub.cancel(&s);
                ended.push((i, s));
            } else {
                kept.push((i, s));
            }
        }
        hub.cancel(&whole_gone);
        assert_eq!(hub.subscriber_count(), kept.len() + 1);
        {
            let g = hub.inner.lock();
            assert_eq!(g.per_pro, kept.len());
            assert_eq!(g.by_pro.len(), (0..300).filter(|i| i % 3 != 0).count(), "no empty entry left");
            assert!(g.by_pro.values().flatten().all(|s| kept.iter().any(|(_, k)| k.id == s.id)));
        }
        assert!(hub.wants(Encoding::Json) && hub.wants(Encoding::Msgpack));
        hub.publish((0..300).map(|i| credit(i, i as u64)));
        for (i, s) in &mut kept {
            let got = s.rx.try_recv().expect("its pro's event");
            assert_eq!(got.event, credit(*i, *i as u64));
            assert!(s.rx.try_recv().is_err(), "only its own pro's");
        }
        for (_, s) in &mut ended {
            assert!(matches!(s.rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
        }
        assert_eq!(whole.backlog.len() + (0..300).filter(|_| whole.rx.try_recv().is_ok()).count(), 300);

        // A feed the hub dropped for being slow, ended again by its connection.
        let slow = hub.subscribe(None, Some(pro(1)), 1, Encoding::Json).unwrap();
        hub.publish([credit(1, 1), credit(1, 2)]);
        assert!(slow.slow.load(Ordering::Acquire));
        let before = hub.subscriber_count();
        hub.cancel(&slow);
        assert_eq!(hub.subscriber_count(), before, "dropped already: nothing more to end");
        for (_, s) in &kept {
            hub.cancel(s);
        }
        hub.cancel(&whole);
        assert_eq!(hub.subscriber_count(), 0);
        assert!(hub.inner.lock().by_pro.is_empty());
        assert!(!hub.wants(Encoding::Json) && !hub.wants(Encoding::Msgpack));
    }

    #[test]
    fn frames_are_encoded_once_and_shared() {
        let o = Outgoing::new(7, ev(7));
        let a = o.bytes(Encoding::Json);
        let b = o.bytes(Encoding::Json);
        assert!(std::ptr::eq(a, b));
        let v: serde_json::Value = serde_json::from_slice(a).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["event"]["event"], "lead_closed");
    }
}

#[cfg(test)]
mod prepared_tests {
    use super::*;
    use crate::ids::{LeadId, ProId};
    use crate::protocol::StreamFrame;

    fn events() -> Vec<StreamEvent> {
        vec![
            StreamEvent::LeadClosed { lead: LeadId::new("L1"), at: 1_795_424_400_000 },
            StreamEvent::Credits {
                pro: ProId::new("p\"1"),
                op: "op-\u{e8}".into(),
                movement: "charged".into(),
                credits: 12,
                reason: Some("lead L1".into()),
            },
            StreamEvent::OfferStatus {
                lead: LeadId::new("L2"),
                pro: ProId::new("p2"),
                status: "declined".into(),
                at: -5,
            },
        ]
    }

    #[test]
    fn a_frame_built_around_a_prepared_body_is_byte_for_byte_the_serialised_frame() {
        let hub = StreamHub::new(16);
        let _json = hub.subscribe(None, None, 16, Encoding::Json).unwrap();
        let _msgpack = hub.subscribe(None, None, 16, Encoding::Msgpack).unwrap();
        for seq in [0u64, 1, 127, 128, 255, 256, 65_535, 65_536, u32::MAX as u64 + 1, u64::MAX] {
            for ev in events() {
                let prepared = Outgoing::new(seq, Prepared::for_hub(ev.clone(), &hub));
                let plain = Outgoing::new(seq, ev.clone());
                for enc in [Encoding::Json, Encoding::Msgpack] {
                    let want = crate::protocol::encode(
                        enc,
                        &StreamFrame { kind: StreamTag::Event, seq, event: ev.clone() },
                    );
                    assert_eq!(prepared.bytes(enc), &want[..], "seq {seq} {enc:?} {ev:?}");
                    assert_eq!(plain.bytes(enc), &want[..], "seq {seq} {enc:?} {ev:?}");
                }
            }
        }
    }

    fn offers(components: bool) -> Vec<StreamEvent> {
        let summary = Arc::new(crate::protocol::LeadSummary {
            zone: crate::ids::ZoneId::new("bologna"),
            category: crate::ids::CategoryId::new("painting"),
            description: "Repaint \"two\" rooms, \u{e8} ok".into(),
            details: [("rooms".to_string(), "2".to_string())].into_iter().collect(),
            attributes: vec!["ceilings".into()],
            approx_location: Some(crate::core::GeoPoint { lat: 44.49, lon: 11.34 }),
            contact: Default::default(),
            created_at: 1_795_424_400_000,
        });
        let pc = components.then(|| {
            Arc::new(crate::pricing::PriceComponents {
                avg_job_value_cents: 150_000,
                conversion_permille: 120,
                avg_proposals_milli: 3_500,
                expected_value_cents: 5_143,
                credit_value_cents: 150,
                tenant_factor_permille: 1_000,
                chat_only_discount_permille: 0,
                thin_details_discount_permille: 200,
                far_away_discount_permille: 0,
                distance_m: Some(4_200),
                far_away_km: 30,
                risk_factor_permille: 800,
                unclamped_credits: 27,
                min_price_credits: 1,
                max_price_credits: 20,
                clamped: crate::pricing::Clamp::Max,
                far_away_pro_discount_permille: 200,
            })
        });
        let offer = |pro: &str, kind, respond_by| StreamEvent::Offered {
            lead: LeadId::new("L1"),
            pro: ProId::new(pro),
            kind,
            price: 12,
            respond_by,
            at: 1_795_424_400_000,
            summary: summary.clone(),
            price_components: pc.clone(),
        };
        vec![
            offer("p1", crate::core::OfferKind::Direct, Some(1_795_424_500_000)),
            offer("p2", crate::core::OfferKind::Generic, None),
            events()[0].clone(),
            offer("p3", crate::core::OfferKind::AutoBuy, None),
        ]
    }

    #[test]
    fn offers_sharing_a_summary_encode_byte_for_byte_like_whole_offers() {
        let hub = StreamHub::new(16);
        let _json = hub.subscribe(None, None, 16, Encoding::Json).unwrap();
        let _msgpack = hub.subscribe(None, None, 16, Encoding::Msgpack).unwrap();
        let mut all = offers(false);
        all.extend(offers(true));
        all.extend(events());
        let prepared = Prepared::batch(all.clone(), &hub);
        assert_eq!(prepared.len(), all.len());
        for (p, ev) in prepared.iter().zip(&all) {
            assert_eq!(&p.event, ev);
            for (enc, body) in [(Encoding::Json, &p.json), (Encoding::Msgpack, &p.msgpack)] {
                let want = crate::protocol::encode(enc, ev);
                assert_eq!(body.as_ref().map(|b| b.encoded(enc)), Some(&want[..]), "{enc:?} {ev:?}");
            }
        }
        // And the frames around them are the serialised frames.
        for (seq, p) in prepared.into_iter().enumerate() {
            let ev = p.event.clone();
            let o = Outgoing::new(seq as u64, p);
            for enc in [Encoding::Json, Encoding::Msgpack] {
                let want = crate::protocol::encode(
                    enc,
                    &StreamFrame { kind: StreamTag::Event, seq: seq as u64, event: ev.clone() },
                );
                assert_eq!(o.bytes(enc), &want[..]);
            }
        }
    }

    #[test]
    fn a_splice_of_unexpected_shapes_falls_back_to_whole_encoding() {
        let mut head = vec![0x87, 0xc0];
        assert!(!splice(Encoding::Msgpack, &mut head, &[0x90]), "tail not a map");
        let mut head = vec![0x8f, 0xc0];
        assert!(!splice(Encoding::Msgpack, &mut head, &[0x81, 0xa1, b'a', 0xc0]), "16 entries");
        let mut head = b"[1]".to_vec();
        assert!(!splice(Encoding::Json, &mut head, b"{\"a\":1}"));
        let mut head = b"{\"x\":1}".to_vec();
        assert!(splice(Encoding::Json, &mut head, b"{\"a\":1}"));
        assert_eq!(head, b"{\"x\":1,\"a\":1}");
    }

    #[test]
    fn bodies_are_prepared_only_for_encodings_someone_reads() {
        let hub = StreamHub::new(16);
        assert!(!hub.wants(Encoding::Json) && !hub.wants(Encoding::Msgpack));
        let p = Prepared::for_hub(events()[0].clone(), &hub);
        assert!(p.json.is_none() && p.msgpack.is_none());
        let s = hub.subscribe(None, None, 16, Encoding::Msgpack).unwrap();
        assert!(hub.wants(Encoding::Msgpack) && !hub.wants(Encoding::Json));
        let p = Prepared::for_hub(events()[0].clone(), &hub);
        assert!(p.json.is_none() && p.msgpack.is_some());
        hub.cancel(&s);
        assert!(!hub.wants(Encoding::Msgpack));
        // A subscriber dropped for being slow is counted out too.
        let slow = hub.subscribe(None, None, 1, Encoding::Json).unwrap();
        hub.publish(events());
        assert!(slow.slow.load(Ordering::Acquire));
        assert!(!hub.wants(Encoding::Json));
        let _a = hub.subscribe(None, None, 16, Encoding::Json).unwrap();
        hub.close_all();
        assert!(!hub.wants(Encoding::Json));
    }
}
