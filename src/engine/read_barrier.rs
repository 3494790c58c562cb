//! Answers that must wait until everything they may have seen is durable, through one
//! barrier at a time (see [`super::Engine::durable_read`]).
//!
//! A read (`balance`, `explain`, ...) or a refusal is made from memory, which can hold
//! a change whose record is not yet in the log's queue: every change holds the gate's
//! read side from its first step in memory to its record's place in the queue, so once
//! the gate's write side has been had, every change such an answer saw is queued, and
//! the log makes the queue durable in order. Taking the write side makes every decision
//! wait for it, and a worker thread that took it would block on it (behind decisions
//! that may themselves wait for room in a full log queue).
//!
//! So the barrier is taken here, on a thread of its own, once for every answer waiting
//! when it starts: a client sending a flood of reads (or of offers on unknown leads)
//! costs the decisions one closing of the gate per barrier, not one per request, and
//! the worker threads never block on it. One barrier's sync is awaited before the next
//! one starts (answers registered meanwhile wait for at most two syncs), which bounds
//! the closings of the gate to about one per sync of the log.

use super::{wal_api_error, Inner};
use crate::protocol::ApiError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Told the outcome once everything before the barrier is durable (`unavailable` if
/// the log failed or closed).
pub(crate) type Waiter = Box<dyn FnOnce(Result<(), ApiError>) + Send>;

pub(crate) struct ReadBarrier {
    tx: crossbeam_channel::Sender<Waiter>,
    /// Barriers taken so far.
    taken: Arc<AtomicU64>,
}

impl ReadBarrier {
    /// Starts the barrier's thread for the engine `inner` (held weakly: the thread ends
    /// when the engine is gone and its last waiter is answered).
    pub(crate) fn start(inner: Weak<Inner>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Waiter>();
        let taken = Arc::new(AtomicU64::new(0));
        let count = taken.clone();
        std::thread::Builder::new()
            .name("rota-read-barrier".into())
            .spawn(move || run(&inner, &rx, &count))
            .expect("spawn the read barrier's thread");
        Self { tx, taken }
    }

    /// Barriers taken so far (each closed the gate once).
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Runs `done` once everything in memory now is durable.
    pub(crate) fn wait(&self, done: Waiter) {
        if let Err(e) = self.tx.send(done) {
            (e.into_inner())(Err(ApiError::unavailable("rota is shutting down")));
        }
    }
}

fn run(inner: &Weak<Inner>, rx: &crossbeam_channel::Receiver<Waiter>, taken: &AtomicU64) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let Some(engine) = inner.upgrade() else {
            for w in waiting {
                w(Err(ApiError::unavailable("rota is shutting down")));
            }
            continue;
        };
        drop(engine.gate.write());
        taken.fetch_add(1, Ordering::Relaxed);
        let (synced_tx, synced) = crossbeam_channel::bounded::<()>(1);
        engine.wal.append(
            vec![],
            Box::new(move |r| {
                let r = r.map(|_| ()).map_err(wal_api_error);
                for w in waiting {
                    w(r.clone());
                }
                let _ = synced_tx.send(());
            }),
        );
        drop(engine);
        // Every append is answered (a closed log answers with an error).
        let _ = synced.recv();
    }
}
