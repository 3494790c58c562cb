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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// Told the outcome once everything before the barrier is durable (`unavailable` if
/// the log failed or closed).
pub(crate) type Waiter = Box<dyn FnOnce(Result<(), ApiError>) + Send>;

/// Work that needs the gate closed (no decision in flight, none starting): ledger
/// operations outside any shard (a grant, a top-up rule, a budget's setting or
/// recharge), which must be queued in the log before any decision can spend what they
/// give. Run here, under one closing of the gate for every job waiting, so that a
/// flood of them from one client costs every tenant's decisions one closing per batch
/// and never blocks a worker thread on the gate. A job answers its caller itself
/// (from the log's callback); one that panics is dropped, and its caller sees the
/// answer channel closed.
pub(crate) type Exclusive = Box<dyn FnOnce() + Send>;

enum Job {
    Wait(Waiter),
    Exclusive(Exclusive),
}

pub(crate) struct ReadBarrier {
    tx: crossbeam_channel::Sender<Job>,
    /// [`Exclusive`] jobs sent and not yet run: while any is, a later one must queue
    /// behind it (see [`ReadBarrier::idle_for_exclusive`]).
    exclusive_pending: Arc<AtomicUsize>,
    /// Barriers taken so far.
    taken: Arc<AtomicU64>,
}

impl ReadBarrier {
    /// Starts the barrier's thread for the engine `inner` (held weakly: the thread ends
    /// when the engine is gone and its last waiter is answered).
    pub(crate) fn start(inner: Weak<Inner>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let taken = Arc::new(AtomicU64::new(0));
        let count = taken.clone();
        let exclusive_pending = Arc::new(AtomicUsize::new(0));
        let pending = exclusive_pending.clone();
        std::thread::Builder::new()
            .name("rota-read-barrier".into())
            .spawn(move || run(&inner, &rx, &count, &pending))
            .expect("spawn the read barrier's thread");
        Self { tx, exclusive_pending, taken }
    }

    /// Barriers taken so far (each closed the gate once).
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Runs `done` once everything in memory now is durable.
    pub(crate) fn wait(&self, done: Waiter) {
        if let Err(e) = self.tx.send(Job::Wait(done)) {
            if let Job::Wait(done) = e.into_inner() {
                done(Err(ApiError::unavailable("rota is shutting down")));
            }
        }
    }

    /// Runs `job` with the gate closed, on this thread (see [`Exclusive`]). If the
    /// thread is gone, `job` is dropped unrun.
    pub(crate) fn exclusive(&self, job: Exclusive) {
        self.exclusive_pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(Job::Exclusive(job)).is_err() {
            self.exclusive_pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether no [`Exclusive`] job waits here: only then may a caller that got the
    /// gate at once run such work itself, without overtaking one sent before it (two
    /// top-up rules of one pro must end with the later).
    pub(crate) fn idle_for_exclusive(&self) -> bool {
        self.exclusive_pending.load(Ordering::Acquire) == 0
    }
}

fn run(
    inner: &Weak<Inner>,
    rx: &crossbeam_channel::Receiver<Job>,
    taken: &AtomicU64,
    exclusive_pending: &AtomicUsize,
) {
    while let Ok(first) = rx.recv() {
        let mut waiting = Vec::new();
        let mut exclusive = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Wait(w) => waiting.push(w),
                Job::Exclusive(j) => exclusive.push(j),
            }
        }
        let Some(engine) = inner.upgrade() else {
            for w in waiting {
                w(Err(ApiError::unavailable("rota is shutting down")));
            }
            exclusive_pending.fetch_sub(exclusive.len(), Ordering::AcqRel);
            continue;
        };
        {
            let _closed = engine.gate.write();
            for job in exclusive {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                exclusive_pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
        taken.fetch_add(1, Ordering::Relaxed);
        if waiting.is_empty() {
            continue;
        }
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

#[cfg(test)]
mod tests {
    use crate::config::{Config, Sources};
    use crate::engine::Engine;
    use crate::ids::{ProId, TenantId};
    use crate::wal::MemFs;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// Generous bound on each wait: never an assertion about speed.
    const DEADLINE: Duration = Duration::from_secs(60);

    /// Data in memory, the actors on the test's thread, the manual clock.
    fn config() -> Config {
        let flags = vec![
            "data_dir=\"/mem\"".to_string(),
            "arbiters=0".into(),
            "clock=\"manual\"".into(),
            "manual_clock_start_ms=1764000000000".into(),
        ];
        Config::load(&Sources { flags, ..Default::default() }).expect("valid configuration")
    }

    /// A grant (any ledger operation outside a shard) needs the gate closed. While a
    /// decision holds it open (here its read side, held by the test, as a decision
    /// waiting for room in a full log queue holds it), the grant waits on the barrier's
    /// thread and the thread that received it goes on: it used to close the gate itself
    /// and stop every connection and actor of that worker thread with it.
    #[test]
    fn a_grant_waiting_for_the_gate_never_blocks_the_thread_that_received_it() {
        let (engine_tx, engine_rx) = mpsc::channel::<Engine>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (polled_tx, polled_rx) = mpsc::channel::<bool>();
        let (done_tx, done_rx) = mpsc::channel::<bool>();
        std::thread::spawn(move || {
            let cfg = config();
            let fs: Arc<dyn crate::wal::Fs> = Arc::new(MemFs::new().process_handle());
            let sys = actix_rt::System::new();
            let engine = sys.block_on(async { Engine::start_with_fs(cfg, fs).expect("starts").0 });
            engine_tx.send(engine.clone()).unwrap();
            go_rx.recv().unwrap();
            sys.block_on(async {
                let v = serde_json::json!({"id": "g", "type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 100});
                let frame = serde_json::to_vec(&v).unwrap();
                let req = crate::protocol::decode(crate::protocol::Encoding::Json, &frame).unwrap().request;
                let demo = TenantId::new("demo");
                let grant = engine.request(&demo, req);
                futures_util::pin_mut!(grant);
                let first = futures_util::poll!(&mut grant);
                polled_tx.send(first.is_pending()).unwrap();
                done_tx.send(grant.await.is_ok()).unwrap();
            });
        });
        let engine = engine_rx.recv_timeout(DEADLINE).expect("the engine starts");
        let open = engine.inner.gate.read();
        go_tx.send(()).unwrap();
        let polled = polled_rx.recv_timeout(DEADLINE);
        assert_eq!(polled, Ok(true), "the thread that received the grant blocked on the gate");
        assert_eq!(engine.inner.ledger.balance(&TenantId::new("demo"), &ProId::new("p1")).available, 0);
        drop(open);
        assert_eq!(done_rx.recv_timeout(DEADLINE), Ok(true), "the grant is answered once the gate closes");
        assert_eq!(engine.inner.ledger.balance(&TenantId::new("demo"), &ProId::new("p1")).available, 100);
    }

    fn request(v: serde_json::Value) -> crate::protocol::Request {
        let frame = serde_json::to_vec(&v).unwrap();
        crate::protocol::decode(crate::protocol::Encoding::Json, &frame).unwrap().request
    }

    /// A grant takes effect as it is read when the gate is free, in its connection's
    /// order: the requests read after it see the credits (rota decides in the order
    /// requests reach it on one connection), even while the barrier's thread is busy
    /// waiting for an earlier read's sync.
    #[test]
    fn a_grant_takes_effect_before_the_next_request_of_its_connection_is_read() {
        let cfg = config();
        let fs = MemFs::new();
        let handle: Arc<dyn crate::wal::Fs> = Arc::new(fs.process_handle());
        let sys = actix_rt::System::new();
        let engine = sys.block_on(async { Engine::start_with_fs(cfg, handle).expect("starts").0 });
        let demo = TenantId::new("demo");
        sys.block_on(async {
            let hold = fs.hold_syncs();
            let grant = |op: &str, credits: u64| {
                request(serde_json::json!({"id": op, "type": "grant_credits", "pro": "p1", "op": op, "credits": credits}))
            };
            // A first grant, written and waiting for the held sync.
            let first = engine.request(&demo, grant("pay-0", 50));
            futures_util::pin_mut!(first);
            assert!(futures_util::poll!(&mut first).is_pending(), "answered once durable");
            // A read waits at the barrier's thread for that sync (once the barrier has
            // closed and opened the gate for it, the thread waits for the sync).
            let before = engine.read_barriers();
            let read = engine.request(&demo, request(serde_json::json!({"id": "r", "type": "balance", "pro": "p1"})));
            futures_util::pin_mut!(read);
            assert!(futures_util::poll!(&mut read).is_pending());
            let since = std::time::Instant::now();
            while engine.read_barriers() == before {
                assert!(since.elapsed() < DEADLINE, "the barrier never closed the gate for the read");
                std::thread::sleep(Duration::from_millis(1));
            }
            let second = engine.request(&demo, grant("pay-1", 100));
            futures_util::pin_mut!(second);
            assert!(futures_util::poll!(&mut second).is_pending(), "answered once durable");
            assert_eq!(
                engine.inner.ledger.balance(&demo, &ProId::new("p1")).available,
                150,
                "the next request of the connection sees the grant"
            );
            drop(hold);
            assert!(first.await.is_ok());
            assert!(second.await.is_ok());
            assert!(read.await.is_ok());
        });
    }
}
