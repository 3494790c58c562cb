//! Shard execution: one `(tenant, zone, category)` shard's state behind a mutex, the
//! pure core run on it, and one actor per shard for its timers.
//!
//! For every command: decide -> execute money intents on the ledger -> apply -> append
//! the record to the WAL -> and, only in the WAL's durability callback, reply and
//! publish. Applying before the record is durable is safe because the WAL is one
//! ordered log: a later decision that saw this state is logged after it (the record is
//! appended before the shard's lock is released), so it can never survive a crash that
//! this one did not. Nothing outside learns about either before it is durable.
//!
//! Requests run [`execute`] inline on the gateway thread that decoded them (no
//! cross-thread hop before the decision; DESIGN.md section 6): the shard's mutex
//! serialises them, in the order they take it. The [`ShardActor`] lives on an arbiter
//! and owns the shard's timer: it runs `Tick` when the earliest deadline passes. An
//! inline command that brings the earliest deadline forward tells the actor
//! ([`Rearm`]); `armed_at` is read and written only under the shard's lock, so a
//! deadline is never missed between the two.
//!
//! The timer sleeps on the monotonic clock while deadlines are wall-clock times
//! (`clock` module docs): it is armed for when the wall clock reaches the deadline
//! ([`Clock::ms_until`](crate::clock::Clock::ms_until), which counts a hold of
//! rota's time behind a step back), and never for longer than [`MAX_TIMER_DELAY`],
//! so that a forward step of the wall clock, or a suspend of the machine, delays no
//! deadline by more than that.

use super::hub::Prepared;
use super::record::{self, WalRecord, RECORD_KIND};
use super::{Engine, ShardReply};
use crate::core::shard::{Command, Event, Shard};
use crate::core::Reject;
use crate::ids::{Millis, ShardKey};
use crate::protocol::{ApiError, StreamEvent};
use actix::prelude::*;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub type Responder = tokio::sync::oneshot::Sender<Result<ShardReply, ApiError>>;

/// `armed_at` when no timer is armed.
pub const NOT_ARMED: Millis = Millis::MAX;

/// Longest a shard's timer sleeps before it reads the clock again. The delay to a
/// deadline is measured on the wall clock but slept on the monotonic one, and nothing
/// else re-arms a quiet shard: without a bound, a forward step of the wall clock (NTP,
/// an operator's `date -s`) or a suspend of the machine (the monotonic clock stops)
/// would delay every armed deadline by the size of the step. With it, a deadline the
/// step made due runs within a minute, at the shard's next wake-up.
///
/// The cost: a shard whose next deadline is further away wakes once a minute, reads
/// its next deadline under its lock and arms again (no tick: no gate, no decision,
/// nothing logged). At `max_shards_per_tenant` (100,000 by default) shards with far
/// deadlines, about 1,700 wake-ups a second per tenant, each about 1.5 µs (measured
/// in a release build): about 0.25 % of one core per 100,000 such shards. A shard
/// with no deadline has no timer and never wakes.
/// (Detecting a step instead, in the server's periodic work, and re-arming every
/// shard would miss a suspend the detection does not see, and engines run without
/// the server.)
pub const MAX_TIMER_DELAY: Duration = Duration::from_secs(60);

/// Run one command on the shard's actor (shutdown's drain tick).
pub struct Exec {
    pub cmd: Command,
    pub reply: Option<Responder>,
    pub received: Instant,
}

impl Message for Exec {
    type Result = ();
}

/// The shard's earliest deadline may have moved forward: re-arm the timer.
pub struct Rearm;

impl Message for Rearm {
    type Result = ();
}

/// A shard's state: behind its lock, and shared copy-on-write with a snapshot being
/// written (the first change after a snapshot took it copies it, once).
pub type ShardState = Arc<Mutex<Arc<Shard>>>;

/// One shard: its state and what its timer and its inline callers share.
pub struct ShardCell {
    pub key: ShardKey,
    pub state: ShardState,
    /// The deadline the actor's timer is armed for ([`NOT_ARMED`] if none). Only
    /// touched while `state` is locked.
    pub armed_at: AtomicI64,
    /// Commands taken and not answered yet (deciding, or waiting for durability):
    /// bounded by `mailbox_capacity`, beyond which requests are `overloaded`.
    pub depth: AtomicUsize,
    /// The shard's timer actor (set once it is started).
    pub timer: OnceLock<Addr<ShardActor>>,
    /// How many times the timer has fired: a tick when a deadline was due, otherwise
    /// only a re-arm ([`MAX_TIMER_DELAY`]).
    pub wakes: AtomicU64,
}

impl ShardCell {
    pub fn new(key: ShardKey, shard: Shard) -> Self {
        Self {
            key,
            state: Arc::new(Mutex::new(Arc::new(shard))),
            armed_at: AtomicI64::new(NOT_ARMED),
            depth: AtomicUsize::new(0),
            timer: OnceLock::new(),
            wakes: AtomicU64::new(0),
        }
    }
}

pub struct ShardActor {
    cell: Arc<ShardCell>,
    engine: Engine,
    /// The deadline the armed timer fires for, if any.
    armed: Option<(Millis, SpawnHandle)>,
}

impl ShardActor {
    pub fn new(cell: Arc<ShardCell>, engine: Engine) -> Self {
        Self { cell, engine, armed: None }
    }

    /// Arms one timer for the shard's next deadline, or for [`MAX_TIMER_DELAY`] if
    /// that is sooner (only on the wall clock; a manual clock ticks shards when it is
    /// advanced).
    fn arm(&mut self, ctx: &mut Context<Self>) {
        if self.engine.inner.clock.is_manual() {
            return;
        }
        let next = {
            let shard = self.cell.state.lock();
            let next = shard.next_deadline();
            self.cell.armed_at.store(next.unwrap_or(NOT_ARMED), Ordering::Release);
            next
        };
        let Some(next) = next else {
            if let Some((_, h)) = self.armed.take() {
                ctx.cancel_future(h);
            }
            return;
        };
        if let Some((at, h)) = self.armed {
            if at == next {
                return;
            }
            ctx.cancel_future(h);
        }
        // Until the wall clock reaches `next`: while it is behind the clock's floor,
        // rota's time holds and `next - now` would not shrink (a deadline a few ms past
        // the floor would wake the shard every few ms, finding nothing due, for the
        // whole hold).
        let wait = self.engine.inner.clock.ms_until(next);
        let delay = Duration::from_millis(wait as u64).min(MAX_TIMER_DELAY);
        let h = ctx.run_later(delay, move |act, ctx| {
            act.armed = None;
            act.cell.wakes.fetch_add(1, Ordering::Relaxed);
            // Not due yet (woken by the bound, or early because the wall clock runs
            // slower than the monotonic one): only arm again, for what is left.
            if act.engine.inner.clock.ms_until(next) == 0 {
                execute(&act.engine, &act.cell, &Command::Tick, None, Instant::now(), false);
            }
            act.arm(ctx);
        });
        self.armed = Some((next, h));
    }
}

impl Actor for ShardActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.engine.inner.cfg.raw.mailbox_capacity);
        self.arm(ctx);
    }
}

impl Handler<Exec> for ShardActor {
    type Result = ();

    fn handle(&mut self, msg: Exec, ctx: &mut Self::Context) {
        execute(&self.engine, &self.cell, &msg.cmd, msg.reply, msg.received, false);
        self.arm(ctx);
    }
}

impl Handler<Rearm> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Rearm, ctx: &mut Self::Context) {
        self.arm(ctx);
    }
}

/// Runs one command on a shard, on the calling thread: decide, money, apply, append.
/// `reply` hears back once the record is durable (or at once if refused). With
/// `inline` (not on the shard's actor), the actor is told when the shard's earliest
/// deadline moved before the one its timer is armed for.
pub fn execute(
    engine: &Engine,
    cell: &ShardCell,
    cmd: &Command,
    reply: Option<Responder>,
    received: Instant,
    inline: bool,
) {
    let inner = &engine.inner;
    let key = &cell.key;
    // Held for the whole decide -> log -> apply step, so a snapshot never sees a
    // half-applied decision.
    let _gate = inner.gate.read();
    let now = inner.clock.now();
    let mut shard = cell.state.lock();
    let funds = super::money::LedgerFunds {
        ledger: &inner.ledger,
        tenant: &key.tenant,
        directory: Some(&inner.pros),
        now,
    };
    let started = Instant::now();
    let decided = shard.decide(now, cmd, &funds);
    inner.metrics.decide_seconds(started.elapsed());
    // Refused by the core or by the ledger: nothing changed. Answered once what the
    // refusal was decided on is durable (as a repeat's answer is): a response refused
    // `lead_full` because of another's response still on its way to the disk must not
    // be final if a power cut takes that one away; then it is `unavailable` (in doubt,
    // sent again after the restart it is decided on what survived).
    let refuse = |r: Reject, reply: Option<Responder>| {
        inner.metrics.refused(&key.tenant, r.code());
        if let Some(tx) = reply {
            let refusal: ApiError = r.into();
            // Through the barrier (not only the log's queue): the refusal may rest on a
            // change another shard made in memory whose record is not queued yet (credits
            // another shard's charge took: `insufficient_credits`).
            engine.after_barrier(Box::new(move |durable| {
                let _ = tx.send(Err(durable.err().unwrap_or(refusal)));
            }));
        }
    };
    let decision = match decided {
        Ok(d) => d,
        Err(r) => return refuse(r, reply),
    };
    let mut events = decision.events;
    let mut answer = decision.reply;
    // Offers the ledger refused to pay for, taken out of the events: out of the
    // reply too, before it is sent with the last record (R1).
    let mut dropped = Vec::new();
    // Ledger facts giving credits or budget back: applied once the records holding
    // them are queued (`money::execute_noting_drops`), and then the op ids of the
    // leads the decision forgets, in replay's order (a record's facts, then its
    // events).
    let mut deferred = Vec::new();
    // R5/R6 under auto-buy: a publish's direct targets buy the lead first, and if the
    // ledger refuses some of them (another shard spent the budget since the decision
    // read it), the release is planned again without them (`Shard::replan_release`)
    // before any buyer of it pays. Their facts go with the first record.
    let mut paid = Vec::new();
    let mut paid_events = 0;
    if super::money::buys_at_publish(&events) {
        let rest = events.split_off(2);
        match super::money::execute_noting_drops(
            &shard,
            &inner.ledger,
            &key.tenant,
            now,
            &mut events,
            &mut dropped,
            &mut deferred,
        ) {
            Ok(facts) => paid = facts,
            Err(r) => return refuse(r, reply),
        }
        if dropped.is_empty() {
            events.extend(rest);
        } else {
            let lost: Vec<_> = dropped.iter().map(|(_, pro)| pro.clone()).collect();
            shard.replan_release(now, &mut events, &lost, &mut answer, &funds);
        }
        paid_events = 2;
    }
    // A decision of many events (a tick after a long pause, a recharge that retries
    // thousands of leads) is logged as several records of at most `RECORD_WEIGHT` (see
    // `weight`), so no record comes near the log's `MAX_RECORD_BYTES` (one that did
    // would be refused after the shard and the ledger had changed). They share a group
    // id (`record::Part`) and replay applies them in the same order, only once the last
    // is there: a crash between two leaves none applied, as if the decision had not
    // been made (a tick's first record sweeps its due deadlines; the events handling
    // them may be in the later ones). All of them go to the log in one append, so they
    // are contiguous there (no other shard's record between them, which might rely on
    // what an earlier part did in memory, such as credits a release gave back) and
    // durable together; their stream events are published together once the last is
    // durable, where replay puts them too, and the reply is sent then.
    let mut rest = split_record(&mut events);
    let group = (!rest.is_empty()).then(record::Part::next_group);
    let mut logged: Vec<Logged> = Vec::new();
    // `LeadForgotten` events logged so far, unindexed after the last record.
    let mut forgotten = Vec::new();
    let mut reply = Some((reply, answer));
    let mut first = true;
    let mut forget_ops = Vec::new();
    loop {
        // The events whose money was executed above lead the first records.
        let done = paid_events.min(events.len());
        paid_events -= done;
        let executed = super::money::execute_noting_drops(
            &shard,
            &inner.ledger,
            &key.tenant,
            now,
            &mut events[done..],
            &mut dropped,
            &mut deferred,
        );
        let money = match executed {
            Ok(m) if paid.is_empty() => m,
            Ok(m) => {
                let mut all = std::mem::take(&mut paid);
                all.extend(m);
                all
            }
            Err(r) => {
                // Only a response's charge is refused, and a response is one event: this
                // is the first record of its decision and nothing has changed.
                debug_assert!(first, "only single-event decisions are refused by the ledger");
                if let Some((tx, _)) = reply.take() {
                    return refuse(r, tx);
                }
                return;
            }
        };
        first = false;
        let last = rest.is_empty();
        if let (true, false, Some((_, answer))) = (last, dropped.is_empty(), reply.as_mut()) {
            super::money::without_dropped(answer, &dropped);
        }
        let part = group.map(|group| record::Part { group, last });
        // A part with nothing in it is not logged, except a last one after others: it
        // completes the group.
        let completes_group = last && !logged.is_empty();
        if completes_group || !events.is_empty() || !money.is_empty() {
            let to_log = ToLog { events, money, part };
            logged.push(apply_record(engine, &mut shard, key, to_log, &mut forgotten, &mut forget_ops));
        }
        if last {
            break;
        }
        events = rest;
        rest = split_record(&mut events);
    }
    let reply = reply.take();
    if logged.is_empty() {
        debug_assert!(deferred.is_empty(), "facts given back are always logged");
        drop(shard);
        // Nothing new (an idempotent repeat): answer once everything logged before is
        // durable, so a repeat never overtakes the original's ack.
        if let Some((tx, answer)) = reply {
            engine.after_durable(Box::new(move |res| {
                if let Some(tx) = tx {
                    let _ = tx.send(res.map(|_| ShardReply { reply: answer }));
                }
            }));
        }
        return;
    }
    // Appended under the shard's lock: the WAL holds this shard's records in the
    // order they were decided.
    let give_backs: Option<GiveBacks> =
        (!deferred.is_empty()).then(|| Arc::new(parking_lot::Mutex::new(Some(deferred))));
    append_logged(engine, key, logged, give_backs.clone(), received, reply);
    // Queued: a spend decided from here on is queued after these records, and the log
    // is durable in order, so no power cut keeps it and loses what it relied on.
    if let Some(g) = &give_backs {
        apply_give_backs(&inner.ledger, g);
    }
    super::money::forget_ops(&inner.ledger, &forget_ops);
    // Unindexed once appended (still under the shard's lock): a forgotten lead id is
    // free for a new lead, possibly in another shard, only once its `LeadForgotten`
    // (and the ledger ops forgotten with it) is in the log, so the new lead's
    // records, and its ops under the same ids, come after it in the log as they came
    // after it live. Meanwhile requests about the id still reach this shard, which
    // no longer knows it.
    for ev in &forgotten {
        engine.index_event(key, ev);
    }
    if let (true, Some(addr), Some(next)) = (inline, cell.timer.get(), shard.next_deadline()) {
        if !inner.clock.is_manual() && next < cell.armed_at.load(Ordering::Acquire) {
            cell.armed_at.store(next, Ordering::Release);
            // Queued even past the mailbox capacity; sent only when this lowers
            // `armed_at`, so at most one per new earliest deadline.
            addr.do_send(Rearm);
        }
    }
}

/// Most weight (see [`weight`]) in one WAL record of a decision: with a few hundred
/// bytes per unit, records of at most about 2 MB, far below `MAX_RECORD_BYTES`.
pub const RECORD_WEIGHT: usize = 4096;

/// What an event adds to its record, in units of one small event: an offer of a lead
/// to `n` pros (each with its charge, and the ledger fact it brings) or a close
/// releasing `n` holds weighs `1 + n`.
pub fn weight(ev: &Event) -> usize {
    match ev {
        Event::Offered { grants, skipped, budget_short, .. } => {
            1 + grants.len() + skipped.len() / 4 + budget_short.len() / 4
        }
        Event::LeadClosed { releases, .. } => 1 + releases.len(),
        _ => 1,
    }
}

/// Keeps in `events` the longest prefix within [`RECORD_WEIGHT`] (at least one event)
/// and returns the rest.
pub fn split_record(events: &mut Vec<Event>) -> Vec<Event> {
    let mut total = 0;
    let cut = events
        .iter()
        .position(|ev| {
            total += weight(ev);
            total > RECORD_WEIGHT
        })
        .map_or(events.len(), |i| i.max(1));
    events.split_off(cut)
}

/// One record of a decision: its events, the ledger facts executed for them, and its
/// place in the decision when it is logged as several.
struct ToLog {
    events: Vec<Event>,
    money: Vec<crate::ledger::LedgerEvent>,
    part: Option<record::Part>,
}

/// The ledger facts a decision gives back (releases, refunds), applied exactly once:
/// by the deciding thread as soon as its records are queued, or by their durability
/// callback if that runs first (before it answers anyone).
type GiveBacks = Arc<parking_lot::Mutex<Option<Vec<crate::ledger::LedgerEvent>>>>;

fn apply_give_backs(ledger: &crate::ledger::Ledger, slot: &GiveBacks) {
    let mut pending = slot.lock();
    if let Some(facts) = pending.take() {
        for fact in &facts {
            ledger.apply(fact);
        }
    }
}

/// One record of a decision, applied to the shard and encoded, not yet appended.
struct Logged {
    bytes: Vec<u8>,
    /// Its stream events, published once it is durable.
    stream: Vec<StreamEvent>,
    /// Pros whose auto-buy spend it refunds (R22).
    returned: Vec<(crate::ids::TenantId, crate::ids::ProId)>,
}

/// Applies `events` to the shard and encodes them, with the ledger facts `money`, as
/// one record, for [`append_logged`]. `LeadForgotten` events are added to `forgotten`
/// for the caller to unindex once the record is appended.
fn apply_record(
    engine: &Engine,
    shard: &mut Arc<Shard>,
    key: &ShardKey,
    ToLog { events, money, part }: ToLog,
    forgotten: &mut Vec<Event>,
    forget_ops: &mut Vec<super::money::LeadOps>,
) -> Logged {
    let inner = &engine.inner;
    let mut stream: Vec<StreamEvent> = Vec::new();
    let state = Arc::make_mut(shard);
    // Leads offered to anyone for the first time (`rota_leads_dispatched_total`), told
    // from the state before each event: exact after a restart too, no state of its own.
    let mut first_offers = 0u64;
    for ev in &events {
        if let Event::Offered { lead, grants, .. } = ev {
            if !grants.is_empty() && state.lead(lead).is_some_and(|st| st.offers.is_empty()) {
                first_offers += 1;
            }
        }
        record::shard_stream_events(state, ev, &mut stream);
        if let Event::LeadForgotten { lead } = ev {
            // Forgotten in the ledger once the records are queued, after the facts
            // they give back (`execute`).
            super::money::lead_ops(state, &key.tenant, lead, forget_ops);
        } else {
            // Before the append, so an answer (sent once durable) never overtakes it.
            engine.index_event(key, ev);
        }
        state.apply(ev);
    }
    // R6/R7: no core event lists the offers it makes inactive; the stream does.
    let inactive = stream
        .iter()
        .filter(|e| matches!(e, StreamEvent::OfferStatus { status, .. } if status == "inactive"))
        .count();
    record::money_stream_events(&money, &mut stream);
    inner.metrics.events(&key.tenant, &events, &money, first_offers);
    inner.metrics.offers_inactive(&key.tenant, inactive as u64);
    // Auto-buy spends refunded: the pros' missed leads are retried (R22) once the
    // refund is durable (`Engine::retry_refunded`).
    let returned = budget_refunds(&key.tenant, &events);
    // The caller unindexes them once the decision's last record is appended: a lead
    // id forgotten in one record of a split decision is free only once replay would
    // apply that record (with the decision's last, `record::Part`).
    forgotten.extend(events.iter().filter(|ev| matches!(ev, Event::LeadForgotten { .. })).cloned());
    let rec = WalRecord::Shard { key: key.clone(), events, money, part };
    Logged { bytes: record::encode(&rec), stream, returned }
}

/// Appends the records of one decision in one go (consecutive seqs, durable
/// together); once they are durable, applies the ledger facts they give back if the
/// deciding thread has not yet (`give_backs`: releases and refunds, see
/// `money::execute_noting_drops`; applied exactly once, before anyone is answered),
/// publishes their stream events, queues the R22 retries of refunded budgets, and
/// sends `reply` (the requester and its answer).
fn append_logged(
    engine: &Engine,
    key: &ShardKey,
    logged: Vec<Logged>,
    give_backs: Option<GiveBacks>,
    received: Instant,
    reply: Option<(Option<Responder>, crate::core::Reply)>,
) {
    let inner = &engine.inner;
    let mut records = Vec::with_capacity(logged.len());
    let mut stream = Vec::new();
    let mut returned = Vec::new();
    for l in logged {
        records.push((RECORD_KIND, l.bytes));
        if stream.is_empty() {
            stream = l.stream;
        } else {
            stream.extend(l.stream);
        }
        returned.extend(l.returned);
    }
    let hub = engine.hub(&key.tenant);
    let offers = stream.iter().any(|e| matches!(e, StreamEvent::Offered { .. }));
    // Encoded here, on the deciding thread, rather than per subscriber.
    let stream: Vec<Prepared> = match &hub {
        Some(h) => Prepared::batch(stream, h),
        None => Vec::new(),
    };
    let metrics = inner.metrics.clone();
    let tenant = key.tenant.clone();
    let budget_returned =
        (!returned.is_empty()).then(|| (inner.budget_returned.clone(), inner.budget_notify.clone()));
    let give_backs = give_backs.map(|g| (engine.clone(), g));
    engine.append(
        records,
        Box::new(move |res| match res {
            Ok(_) => {
                // Usually done already by the deciding thread; never twice.
                if let Some((owner, g)) = &give_backs {
                    apply_give_backs(&owner.inner.ledger, g);
                }
                metrics.durable_seconds(received.elapsed());
                if let Some(h) = &hub {
                    h.publish(stream);
                }
                if offers {
                    // Handed to every subscriber's queue.
                    metrics.delivered_seconds(received.elapsed());
                }
                if let Some((q, notify)) = budget_returned {
                    q.lock().extend(returned);
                    notify.notify_one();
                }
                if let Some((Some(tx), answer)) = reply {
                    let _ = tx.send(Ok(ShardReply { reply: answer }));
                }
            }
            Err(e) => {
                tracing::error!(tenant = %tenant, error = %e, "WAL append failed; decision not acknowledged");
                if let Some((Some(tx), _)) = reply {
                    let _ = tx.send(Err(super::wal_api_error(e)));
                }
            }
        }),
    );
}

/// The pros whose auto-buy spend `events` refund (their budget came back: R22).
pub fn budget_refunds(
    tenant: &crate::ids::TenantId,
    events: &[Event],
) -> Vec<(crate::ids::TenantId, crate::ids::ProId)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Refunded { pro, charge, .. }
                if matches!(charge.mode, crate::core::shard::ChargeMode::Budget { .. }) =>
            {
                Some((tenant.clone(), pro.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Apply a replayed record's events to a shard (recovery), collecting its stream
/// events, after the ledger facts of the record were applied (as live: the money of a
/// record is executed before its events are applied). Forgets a forgotten lead's op
/// ids in the ledger as `execute` does live (after the facts, see `money::forget_lead`).
pub fn replay_into(
    shard: &mut Shard,
    ledger: &crate::ledger::Ledger,
    tenant: &crate::ids::TenantId,
    events: &[Event],
    stream: &mut Vec<StreamEvent>,
) {
    for ev in events {
        record::shard_stream_events(shard, ev, stream);
        if let Event::LeadForgotten { lead } = ev {
            super::money::forget_lead(shard, ledger, tenant, lead);
        }
        shard.apply(ev);
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;
    use crate::core::shard::Grant;
    use crate::core::OfferKind;
    use crate::ids::{LeadId, ProId};

    fn forgotten(n: usize) -> Vec<Event> {
        (0..n).map(|i| Event::LeadForgotten { lead: LeadId::new(format!("L{i}")) }).collect()
    }

    fn offered(pros: usize) -> Event {
        Event::Offered {
            lead: LeadId::new("big"),
            at: 0,
            release: true,
            grants: (0..pros)
                .map(|i| Grant { pro: ProId::new(format!("p{i}")), kind: OfferKind::Generic, charge: None })
                .collect(),
            rotation: Default::default(),
            skipped: vec![],
            skipped_more: 0,
            budget_short: Vec::new(),
        }
    }

    /// Splits `events` as `execute` does: the records, in order.
    fn records(mut events: Vec<Event>) -> Vec<Vec<Event>> {
        let mut out = Vec::new();
        loop {
            let rest = split_record(&mut events);
            out.push(events);
            if rest.is_empty() {
                return out;
            }
            events = rest;
        }
    }

    #[test]
    fn a_large_decision_is_logged_in_records_of_bounded_weight_in_order() {
        let all = forgotten(10_000);
        let recs = records(all.clone());
        assert_eq!(recs.iter().map(Vec::len).collect::<Vec<_>>(), vec![4096, 4096, 1808]);
        assert_eq!(recs.concat(), all, "every event, in order");
        assert_eq!(records(forgotten(3)), vec![forgotten(3)], "a small decision is one record");
    }

    #[test]
    fn offers_weigh_by_their_grants_and_a_heavy_event_goes_alone() {
        // 1,000 leads offered to 4 pros each: weight 5 each, 819 per record.
        let recs = records((0..1000).map(|_| offered(4)).collect());
        assert_eq!(recs.iter().map(Vec::len).collect::<Vec<_>>(), vec![819, 181]);
        // One release to 10,000 pros is heavier than a record's weight: alone, whole.
        let recs = records(vec![offered(2), offered(10_000), offered(2)]);
        assert_eq!(recs.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}

/// The shard timers on the wall clock. The wall time is a stand-in the tests move
/// ([`Clock::wall_reading`](crate::clock::Clock::wall_reading)), and the timers
/// sleep on tokio's paused clock: the actors run on the test's own thread
/// (`arbiters = 0`), whose runtime advances straight to each timer in turn, so
/// wake-ups are counted over hours of sleep without waiting for them.
#[cfg(test)]
mod timer_tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::{Config, Sources};
    use crate::ids::TenantId;
    use crate::protocol::OkResult;
    use crate::wal::MemFs;
    use serde_json::{json, Value};
    use std::future::Future;

    /// Monday 2025-11-24 16:00 UTC: the wall time the tests start at.
    const W0: Millis = 1_764_000_000_000;
    const HOUR: Millis = 3_600_000;

    /// Runs `fut` in a fresh actix system, then stops it.
    fn in_system<F: Future>(fut: F) -> F::Output {
        let sys = actix_rt::System::new();
        let out = sys.block_on(fut);
        sys.block_on(async { actix_rt::System::current().stop() });
        sys.run().expect("the actor system stops cleanly");
        out
    }

    /// An engine on a wall clock reading `wall`, its actors on this thread.
    fn engine(wall: &Arc<AtomicI64>) -> Engine {
        let flags = vec!["data_dir=\"/mem\"".to_string(), "arbiters=0".into(), "wal.fsync=\"always\"".into()];
        let cfg =
            Config::load(&Sources { flags, ..Default::default() }).expect("the test configuration is valid");
        let read = wall.clone();
        let clock = Clock::wall_reading(move || read.load(Ordering::Acquire));
        let fs: Arc<dyn crate::wal::Fs> = Arc::new(MemFs::new().process_handle());
        Engine::recover_with_clock(cfg, fs, clock).expect("recovers").start().expect("starts").0
    }

    async fn ok(e: &Engine, mut v: Value) -> OkResult {
        v["id"] = json!("t");
        let frame = serde_json::to_vec(&v).unwrap();
        let req = crate::protocol::decode(crate::protocol::Encoding::Json, &frame).expect("decodes").request;
        e.request(&TenantId::new("demo"), req).await.unwrap_or_else(|err| panic!("{v} answered {err}"))
    }

    /// A pro and a lead offered to it, published at `W0`: the shard and its next
    /// deadline (the end of the lead's lifetime, 48 hours later).
    async fn shard_with_a_lead(e: &Engine) -> (Arc<ShardCell>, Millis) {
        ok(
            e,
            json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"],
                   "zones": ["bologna"], "quality": {"reviews": 3}}}),
        )
        .await;
        ok(e, json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 200})).await;
        ok(
            e,
            json!({"type": "publish_lead", "lead": {
                "id": "L1", "category": "painting", "zone": "bologna",
                "description": "Repaint a two-room flat in Bologna, walls and ceilings",
                "client": {"id": "client-1", "name": "Anna Rossi", "phone": "+39 333 1234567",
                           "phone_verified": true, "contact": {"call": true, "chat": true}},
                "created_at": W0
            }}),
        )
        .await;
        let cells: Vec<Arc<ShardCell>> = e.inner.shards.iter().map(|c| c.value().clone()).collect();
        assert_eq!(cells.len(), 1, "one shard");
        let next = cells[0].state.lock().next_deadline().expect("the lead has deadlines");
        // Further than the bound on a timer's sleep, so that the tests below tell
        // waking at the bound from waking at the deadline.
        assert!(next - W0 > 2 * 60_000, "the next deadline is {} ms away", next - W0);
        (cells[0].clone(), next)
    }

    /// A step back of the wall clock holds rota's time at the latest it handed out
    /// (here a second before the shard's deadline) until the wall clock catches up, an
    /// hour later. The deadline is an hour and a second away, not a second: armed for
    /// a second, the timer found nothing due at every wake-up and armed a second
    /// again, for the whole hour, each time taking the gate and the shard's lock (with
    /// deadlines a few ms apart, hundreds of times a second per shard).
    #[test]
    fn a_shard_sleeps_through_a_hold_of_the_clock_instead_of_waking_at_the_held_deadline() {
        let wall = Arc::new(AtomicI64::new(W0));
        in_system(async {
            let e = engine(&wall);
            let (cell, next) = shard_with_a_lead(&e).await;
            tokio::time::pause();
            wall.store(next - 1_000, Ordering::Release);
            assert_eq!(e.inner.clock.now(), next - 1_000);
            wall.store(next - 1_000 - HOUR, Ordering::Release);
            assert_eq!(e.inner.clock.behind_ms(), HOUR);
            // Past the timer armed at the publish (for the deadline, or for the bound
            // on a timer's sleep), which then arms again during the hold.
            tokio::time::sleep(Duration::from_millis((next - W0) as u64) + Duration::from_secs(60)).await;
            // Ten minutes of the hold: a wake-up a minute (`MAX_TIMER_DELAY`), at most.
            let before = cell.wakes.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(600)).await;
            let wakes = cell.wakes.load(Ordering::Relaxed) - before;
            assert!(
                wakes <= 11,
                "the shard's timer woke {wakes} times in ten minutes of a hold of the clock"
            );
            assert_eq!(cell.state.lock().next_deadline(), Some(next), "not due: rota's time holds");
            assert_eq!(e.inner.clock.now(), next - 1_000);
        });
    }

    /// A forward step of the wall clock moves no timer already armed: they sleep on
    /// the monotonic clock, and the shard's was armed for its deadline two days away.
    /// The deadline the step made due runs within a minute of the step (the bound on a
    /// timer's sleep), not two days later; a suspend of the machine (the monotonic
    /// clock stops, the wall clock does not) is the same.
    #[test]
    fn a_deadline_a_forward_step_of_the_wall_clock_made_due_runs_within_a_minute() {
        let wall = Arc::new(AtomicI64::new(W0));
        in_system(async {
            let e = engine(&wall);
            let (cell, next) = shard_with_a_lead(&e).await;
            tokio::time::pause();
            wall.store(next + HOUR, Ordering::Release);
            tokio::time::sleep(Duration::from_secs(61)).await;
            let pending = cell.state.lock().next_deadline();
            assert!(
                pending.is_none_or(|at| at > next),
                "61 s after a step of the wall clock an hour past it, the deadline at {next} has not run \
                 (the shard's next deadline is {pending:?})"
            );
        });
    }
}
