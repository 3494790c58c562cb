//! The shard actor: one per `(tenant, zone, category)`, wrapping the pure core.
//!
//! For every command: decide -> execute money intents on the ledger -> append the
//! record to the WAL -> apply -> and, only in the WAL's durability callback, reply
//! and publish. Applying before the record is durable is safe because the WAL is one
//! ordered log: a later decision that saw this state is logged after it, so it can
//! never survive a crash that this one did not. Nothing outside learns about either
//! before it is durable.

use super::hub::Prepared;
use super::record::{self, WalRecord, RECORD_KIND};
use super::{Engine, ShardReply};
use crate::core::shard::{Command, Event, Shard};
use crate::ids::{Millis, ShardKey};
use crate::protocol::{ApiError, StreamEvent};
use actix::prelude::*;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type Responder = tokio::sync::oneshot::Sender<Result<ShardReply, ApiError>>;

/// Run one command on the shard.
pub struct Exec {
    pub cmd: Command,
    pub reply: Option<Responder>,
    pub received: Instant,
}

impl Message for Exec {
    type Result = ();
}

pub struct ShardActor {
    pub key: ShardKey,
    pub state: Arc<Mutex<Shard>>,
    pub engine: Engine,
    /// Commands queued for this actor (see `ShardHandle::depth`).
    depth: Arc<std::sync::atomic::AtomicUsize>,
    /// The deadline the armed timer fires for, if any.
    armed: Option<(Millis, SpawnHandle)>,
}

impl ShardActor {
    pub fn new(
        key: ShardKey,
        state: Arc<Mutex<Shard>>,
        depth: Arc<std::sync::atomic::AtomicUsize>,
        engine: Engine,
    ) -> Self {
        Self { key, state, engine, depth, armed: None }
    }

    fn run(&mut self, cmd: &Command, reply: Option<Responder>, received: Instant) {
        let engine = self.engine.clone();
        let inner = &engine.inner;
        // Held for the whole decide -> log -> apply step, so a snapshot never sees a
        // half-applied decision.
        let _gate = inner.gate.read();
        let now = inner.clock.now();
        let mut shard = self.state.lock();
        let funds = super::money::LedgerFunds { ledger: &inner.ledger, tenant: &self.key.tenant };
        let started = Instant::now();
        let decided = shard.decide(now, cmd, &funds);
        inner.metrics.decide_seconds(started.elapsed());
        let decision = match decided {
            Ok(d) => d,
            Err(r) => {
                inner.metrics.refused(&self.key.tenant, r.code());
                if let Some(tx) = reply {
                    let _ = tx.send(Err(r.into()));
                }
                return;
            }
        };
        let mut events = decision.events;
        let money = match super::money::execute(&shard, &inner.ledger, &self.key.tenant, &mut events) {
            Ok(m) => m,
            Err(r) => {
                inner.metrics.refused(&self.key.tenant, r.code());
                if let Some(tx) = reply {
                    let _ = tx.send(Err(r.into()));
                }
                return;
            }
        };
        if events.is_empty() && money.is_empty() {
            // Nothing new (an idempotent repeat): answer once everything logged
            // before is durable, so a repeat never overtakes the original's ack.
            engine.after_durable(Box::new(move |res| {
                if let Some(tx) = reply {
                    let _ = tx.send(res.map(|_| ShardReply { reply: decision.reply }));
                }
            }));
            return;
        }
        let mut stream: Vec<StreamEvent> = Vec::new();
        for ev in &events {
            record::shard_stream_events(&shard, ev, &mut stream);
            shard.apply(ev);
            engine.index_event(&self.key, ev);
        }
        record::money_stream_events(&money, &mut stream);
        inner.metrics.events(&self.key.tenant, &events, &money);
        let rec = WalRecord::Shard { key: self.key.clone(), events, money };
        let bytes = record::encode(&rec);
        drop(shard);
        let hub = engine.hub(&self.key.tenant);
        let offers = stream.iter().any(|e| matches!(e, StreamEvent::Offered { .. }));
        // Encoded here, on the shard's thread, rather than by the gateway.
        let stream: Vec<Prepared> = match &hub {
            Some(h) => stream.into_iter().map(|e| Prepared::for_hub(e, h)).collect(),
            None => Vec::new(),
        };
        let metrics = inner.metrics.clone();
        let tenant = self.key.tenant.clone();
        engine.append(
            vec![(RECORD_KIND, bytes)],
            Box::new(move |res| {
                match res {
                    Ok(_) => {
                        metrics.durable_seconds(received.elapsed());
                        if let Some(h) = &hub {
                            h.publish(stream);
                        }
                        if offers {
                            // Handed to every subscriber's queue.
                            metrics.delivered_seconds(received.elapsed());
                        }
                        if let Some(tx) = reply {
                            let _ = tx.send(Ok(ShardReply { reply: decision.reply }));
                        }
                    }
                    Err(e) => {
                        tracing::error!(tenant = %tenant, error = %e, "WAL append failed; decision not acknowledged");
                        if let Some(tx) = reply {
                            let _ = tx.send(Err(super::wal_api_error(e)));
                        }
                    }
                }
            }),
        );
    }

    /// Arms one timer for the shard's next deadline (only on the wall clock; a
    /// manual clock ticks shards when it is advanced).
    fn arm(&mut self, ctx: &mut Context<Self>) {
        if self.engine.inner.clock.is_manual() {
            return;
        }
        let Some(next) = self.state.lock().next_deadline() else {
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
        let now = self.engine.inner.clock.now();
        let delay = Duration::from_millis(next.saturating_sub(now).max(0) as u64);
        let h = ctx.run_later(delay, |act, ctx| {
            act.armed = None;
            act.run(&Command::Tick, None, Instant::now());
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
        self.depth.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.run(&msg.cmd, msg.reply, msg.received);
        self.arm(ctx);
    }
}

/// Apply a replayed event to a shard (recovery), collecting its stream events.
pub fn replay_into(shard: &mut Shard, events: &[Event], stream: &mut Vec<StreamEvent>) {
    for ev in events {
        record::shard_stream_events(shard, ev, stream);
        shard.apply(ev);
    }
}
