//! `rota serve`: recovery, listeners, periodic work, signals and graceful shutdown.
//!
//! Start-up order: bind both listeners (a port in use fails the start before a long
//! replay, not after it), serve the admin port, then recover from the WAL and snapshot
//! and start the shards on a thread of its own. Meanwhile `/livez` answers 200 and `/readyz`
//! 503 `recovering`, and the websocket port answers every connection with HTTP 503
//! (`Retry-After: 1`) instead of leaving it waiting: nothing connects before the state
//! is whole. Then the gateway takes the port over and `/readyz` turns 200.
//! SIGTERM/SIGINT: stop accepting, close streams with code 1001 and a resume cursor,
//! drain the shard mailboxes, sync the WAL, snapshot, exit 0. A second signal, or
//! `shutdown_timeout_ms` passing, forces exit 1. SIGTERM/SIGINT while recovering ends
//! the process at once (exit 0). SIGHUP: reload the tenants' policies and tokens
//! (`engine::reload`).
//!
//! The thread that runs [`serve`] accepts connections, serves the admin port and waits
//! for signals; nothing on it may wait for the disk, which can stall for seconds: the
//! recovery, the periodic engine work and the final sync and snapshot each run on a
//! thread of their own, and this one only waits for them among other things.

pub mod admin;
pub mod admission;
pub mod deadline;
pub mod demo;
pub mod fdlimit;
pub mod ws;

use crate::config::{Config, Sources};
use crate::engine::Engine;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// How long after a refund its R22 retry runs (on the wall clock): the refunds of
/// that time are retried together.
const REFUND_RETRY_BATCH: Duration = Duration::from_secs(1);

/// Structured logs to stderr: JSON when stderr is not a terminal (or when asked),
/// level from `log_level` (an `EnvFilter` expression; `ROTA_LOG_LEVEL` overrides).
/// Stable field names: `tenant`, `shard`, `lead_id`, `pro_id`, `code`; never client
/// PII or tokens.
pub fn init_logging(cfg: &Config) {
    use crate::config::LogFormat;
    use crate::telemetry::LogOutput;
    let output = match cfg.raw.log_format {
        LogFormat::Json => LogOutput::Json,
        LogFormat::Text => LogOutput::Text,
        LogFormat::Auto => LogOutput::auto(),
    };
    if let Err(e) = crate::telemetry::init_logging(&cfg.raw.log_level, output) {
        eprintln!("rota: logging not initialised: {e}");
    }
    for variable in &cfg.ignored_env {
        tracing::warn!(%variable, "environment variable matches no configuration key; ignored");
    }
}

/// Runs the daemon until a signal stops it. Returns the process exit code. With
/// `sources` (where `cfg` was loaded from), SIGHUP loads them again and applies the
/// tenants' new policies and tokens ([`Engine::reload`]).
pub fn run(cfg: Config, demo: bool, sources: Option<Sources>) -> anyhow::Result<i32> {
    if demo && !cfg.demo_tenant {
        // The feed would write its pros, a million credits each and a lead every 200
        // ms into a real tenant's log and stream, for good (tenants are never removed).
        anyhow::bail!(
            "--demo feeds synthetic pros and leads into the built-in demo tenant, and this \
             configuration has tenants of its own ({}): refused (run --demo without tenants)",
            cfg.tenants.iter().map(|t| t.id.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    match opt_out_of_huge_pages(cfg.raw.transparent_huge_pages) {
        Ok(true) => tracing::info!("transparent huge pages disabled for this process"),
        Ok(false) => {}
        // Not fatal: the daemon works with them, with longer stalls while its heap grows.
        Err(e) => tracing::warn!(error = %e, "could not disable transparent huge pages"),
    }
    let max_connections = cfg.raw.max_connections;
    match fdlimit::raise() {
        Ok(l) if !l.fits(max_connections) => tracing::warn!(
            soft = l.soft,
            hard = l.hard,
            max_connections,
            "the open-file limit is below max_connections plus {} for the log and streams: \
             at most {} connections are taken (raise LimitNOFILE or ulimit -n, or lower \
             max_connections)",
            fdlimit::RESERVED_FDS,
            fdlimit::connection_cap(max_connections, l.soft)
        ),
        Ok(l) => {
            if let Some(from) = l.raised_from {
                tracing::info!(from, to = l.soft, "open-file limit raised to the hard limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
    let system = actix_rt::System::new();
    let stopped = system
        .block_on(async move { serve(cfg, demo, sources, Hooks::default(), Seams::default()).await })?;
    if stopped.abandoned {
        // A thread may be blocked in disk I/O (the replay, the final sync or snapshot):
        // the process ends now, without waiting for it as dropping the runtime could.
        // As safe as a kill -9 at this point, which every write path is made for.
        std::process::exit(stopped.code);
    }
    Ok(stopped.code)
}

/// Seams for tests of the start-up and stop of [`run`]; `rota serve` uses none.
#[doc(hidden)]
#[derive(Default)]
pub struct Hooks {
    /// Runs on the recovery thread before the replay starts.
    pub before_recovery: Option<Box<dyn FnOnce() + Send>>,
    /// Runs on the recovery thread after the replay, before the shards start.
    pub before_start: Option<Box<dyn FnOnce() + Send>>,
    /// Told the websocket and admin addresses once both listen.
    pub listening: Option<std::sync::mpsc::Sender<(std::net::SocketAddr, std::net::SocketAddr)>>,
    /// Stops the daemon as SIGTERM does when it resolves.
    pub stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// More seams for tests of [`run`] ([`run_with_seams`]); `rota serve` uses none.
#[doc(hidden)]
#[derive(Default)]
pub struct Seams {
    /// The filesystem of the log and the stream history (the real one when `None`).
    pub fs: Option<Arc<dyn crate::wal::Fs>>,
    /// Runs on the thread of the periodic engine work, at each of its rounds (every
    /// second), before the engine's figures are sampled.
    pub periodic: Option<Box<dyn FnMut() + Send>>,
}

/// [`run`] with test seams and no signal handling beyond it.
#[doc(hidden)]
pub fn run_with(cfg: Config, hooks: Hooks) -> anyhow::Result<i32> {
    run_with_seams(cfg, hooks, Seams::default())
}

/// [`run_with`] with [`Seams`]. Returns when the daemon stops; a stop that did not
/// wait for a thread (the recovery, a shutdown past its deadline) leaves that thread
/// running, where [`run`] would end the process.
#[doc(hidden)]
pub fn run_with_seams(cfg: Config, hooks: Hooks, seams: Seams) -> anyhow::Result<i32> {
    let system = actix_rt::System::new();
    system.block_on(async move { serve(cfg, false, None, hooks, seams).await }).map(|s| s.code)
}

/// How [`serve`] ended.
struct Stopped {
    /// The process's exit status.
    code: i32,
    /// Ended without waiting for a thread that may still be blocked (on the disk).
    abandoned: bool,
}

/// Applies `transparent_huge_pages`: unless they are allowed, opts this process out of
/// transparent huge pages (`PR_SET_THP_DISABLE`, which also overrides the allocator's
/// `MADV_HUGEPAGE` advice on its arenas), before recovery grows the heap. Returns
/// whether it opted out. The host's setting is not changed.
pub fn opt_out_of_huge_pages(allowed: bool) -> std::io::Result<bool> {
    if allowed {
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments only; no memory is passed.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(false)
}

async fn serve(
    cfg: Config,
    demo: bool,
    sources: Option<Sources>,
    mut hooks: Hooks,
    mut seams: Seams,
) -> anyhow::Result<Stopped> {
    use anyhow::Context;
    let listen = cfg.listen;
    let admin_listen = cfg.admin_listen;
    let prometheus = crate::telemetry::install()?;
    let shutdown_timeout = Duration::from_millis(cfg.raw.shutdown_timeout_ms);
    let snapshot_every = cfg.raw.snapshot_interval_s;
    let demo_tenant = cfg.demo_tenant;
    let data_dir = cfg.raw.data_dir.clone();
    // SIGTERM and SIGINT are taken before anything is announced: their default action
    // ends the process at once, and one sent right after the listening line (a
    // supervisor stopping a daemon that just started) must stop it cleanly.
    let mut stops = Stops { signals: Signals::install(), hook: hooks.stop.take() };
    // Taken before recovery: SIGHUP's default action ends the process, and a reload
    // sent while a large log is replayed must wait for it, not kill the daemon.
    let hangups = match sources {
        Some(sources) => match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hup) => Some((hup, sources)),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: configuration reload unavailable");
                None
            }
        },
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (listen)"))?;
    let local = listener.local_addr()?;
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("cannot listen on {admin_listen} (admin_listen)"))?;
    let admin_local = admin.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The admin port answers from here on: alive while the log is replayed, ready once
    // the gateway has the websocket port, and `stopping` (alive, with its metrics) for
    // the whole graceful stop. It has its own stop, the last thing this function does:
    // closed with the rest at the first signal, `/readyz` 503 `stopping` would hardly
    // ever be served, and `/livez` and `/metrics` would vanish for the whole stop.
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let ready = Arc::new(admin::Readiness::default());
    let started: Arc<std::sync::OnceLock<Engine>> = Default::default();
    let state = admin::AdminState {
        ready: ready.clone(),
        prometheus,
        health: {
            let started = started.clone();
            Arc::new(move || started.get().map_or(Ok(()), Engine::health))
        },
    };
    actix_rt::spawn(admin::serve_admin(admin, state, admin_stop_rx));
    let (recovered_tx, recovered_rx) = oneshot::channel();
    let refusing = actix_rt::spawn(ws::refuse_while_recovering(listener, recovered_rx));
    if let Some(tx) = hooks.listening.take() {
        let _ = tx.send((local, admin_local));
    }
    eprintln!("  metrics and health on http://{admin_local}/metrics, /livez, /readyz");
    eprintln!("rota: recovering from {}", data_dir.display());
    // The same as a structured line, with the data directory made absolute: a relative
    // `data_dir` is read from the working directory, which a log should not leave to
    // guessing.
    let absolute = std::path::absolute(&data_dir).unwrap_or_else(|_| data_dir.clone());
    tracing::info!(listen = %local, admin = %admin_local, data_dir = %absolute.display(), "recovering");
    let before_recovery = hooks.before_recovery.take();
    let before_start = hooks.before_start.take();
    let fs: Arc<dyn crate::wal::Fs> = seams.fs.take().unwrap_or_else(|| Arc::new(crate::wal::RealFs));
    // The whole start runs off this thread, which serves the admin port and the
    // websocket port's 503s meanwhile: the replay, then spawning every shard and
    // logging the policies that changed (a sync of the log). A thread of its own
    // rather than the runtime's blocking pool: a stop during recovery leaves it behind
    // (see below), and the runtime, when dropped, waits for its pool.
    let system = actix_rt::System::current();
    let accepting = actix_rt::Arbiter::current();
    let (start_tx, start_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("rota-recovery".into())
        .spawn(move || {
            actix_rt::System::set_current(system);
            if let Some(f) = before_recovery {
                f();
            }
            let started = Engine::recover_with_fs(cfg, fs).and_then(|recovered| {
                if let Some(f) = before_start {
                    f();
                }
                recovered.start_on(accepting)
            });
            let _ = start_tx.send(started);
        })
        .context("cannot start the recovery thread")?;
    // A stop while recovering ends the process at once (docs/OPERATIONS.md): nothing
    // has been acknowledged yet, and the next start replays again. Abandoning the
    // replay midway is what a kill -9 does: the log's torn tail is cut (truncated and
    // synced) the same way again at the next start, the replayed segments are only
    // rewritten with the bytes they hold, the stream history is checked from its last
    // sync at every start after an unclean stop (its `end` mark is consumed as it is
    // read), and snapshots are only ever renamed into place.
    let (engine, report) = tokio::select! {
        started = start_rx => started.context("the recovery thread failed")??,
        () = stops.recv() => {
            eprintln!("rota: stopped while recovering; exiting now (nothing was acknowledged yet: the next start replays the log again)");
            return Ok(Stopped { code: 0, abandoned: true });
        }
    };
    tracing::info!(
        records_replayed = report.records_replayed,
        snapshot_seq = ?report.snapshot_seq,
        last_seq = report.last_seq,
        shards = report.shards,
        torn_tail = ?report.torn_tail,
        duration_ms = report.duration.as_millis() as u64,
        "recovered"
    );
    let _ = started.set(engine.clone());
    let _ = recovered_tx.send(());
    let listener = refusing.await.context("the websocket port's start-up task failed")?;
    let gateway = actix_rt::spawn(ws::serve(listener, engine.clone(), stop_rx.clone()));
    ready.set_ready();
    eprintln!(
        "rota {} listening on ws://{local} (data in {})",
        env!("CARGO_PKG_VERSION"),
        data_dir.display()
    );
    if demo_tenant {
        eprintln!(
            "  no tenants configured: demo tenant \"demo\", token \"{}\"\n  connect: Authorization: Bearer {} with subprotocol rota.v1.json or rota.v1.msgpack",
            crate::config::DEMO_TOKEN,
            crate::config::DEMO_TOKEN
        );
    }
    // Periodic work (snapshots, weekly recharges, order ticks, refund retries, the
    // engine's figures) on a worker of its own: each can wait for the disk (a full
    // log queue, the gate, the stream history's lock), and on this thread a stalled
    // disk would stop the accept loop, the admin port and the signals with it.
    {
        let (engine, stop, each_round) = (engine.clone(), stop_rx.clone(), seams.periodic.take());
        actix_rt::Arbiter::new().spawn_fn(move || {
            actix_rt::spawn(async move {
                periodic_work(engine, stop, snapshot_every, each_round).await;
                actix_rt::Arbiter::current().stop();
            });
        });
    }
    if demo {
        actix_rt::spawn(demo::feed(engine.clone(), stop_rx.clone()));
    }
    if let Some((hup, sources)) = hangups {
        actix_rt::spawn(reload_on_hangup(engine.clone(), hup, sources, stop_rx.clone()));
    }
    stops.recv().await;
    ready.set_stopping();
    eprintln!("rota: shutting down (send the signal again to force)");
    let _ = stop_tx.send(true);
    let graceful = async {
        // Connections (on the worker threads) answer what is in flight and close
        // their streams before the workers stop.
        let _ = gateway.await;
        // The final sync, snapshot and stop of the stream history block on the disk:
        // on a thread of their own, so that the deadline and a second signal below
        // are still heard while they run, and the admin port still answers.
        let (done_tx, done_rx) = oneshot::channel();
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("rota-shutdown".into())
            .spawn(move || {
                let done = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| rt.block_on(engine.shutdown()).map_err(|e| e.to_string()));
                let _ = done_tx.send(done);
            })
            .map_err(|e| format!("cannot start the shutdown thread: {e}"))?;
        done_rx.await.unwrap_or_else(|_| Err("the shutdown thread failed".into()))
    };
    let stopped = tokio::select! {
        r = graceful => match r {
            Ok(()) => {
                eprintln!("rota: stopped cleanly");
                tracing::info!("stopped cleanly");
                Stopped { code: 0, abandoned: false }
            }
            Err(e) => {
                eprintln!("rota: shutdown failed: {e}");
                tracing::error!(error = %e, "shutdown failed");
                Stopped { code: 1, abandoned: false }
            }
        },
        _ = tokio::time::sleep(shutdown_timeout) => {
            eprintln!("rota: shutdown deadline passed; exiting");
            tracing::error!("shutdown deadline passed; exiting without the final sync and snapshot");
            Stopped { code: 1, abandoned: true }
        }
        () = stops.recv() => {
            eprintln!("rota: second signal; exiting now");
            tracing::warn!("second signal; exiting now without the final sync and snapshot");
            Stopped { code: 1, abandoned: true }
        }
    };
    let _ = admin_stop.send(true);
    Ok(stopped)
}

/// The periodic engine work, until `stop` turns true: snapshots, and on the wall
/// clock weekly recharges (R20), order ticks and refund retries (R22); the engine's
/// figures every second (`each_round` first, a test's seam).
async fn periodic_work(
    engine: Engine,
    mut stop: watch::Receiver<bool>,
    snapshot_every: u64,
    mut each_round: Option<Box<dyn FnMut() + Send>>,
) {
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    let mut observe = tokio::time::interval(Duration::from_secs(1));
    let mut snap = tokio::time::interval(Duration::from_secs(snapshot_every.max(1)));
    snap.tick().await;
    // R22 after a refund (R12, R23): the missed leads are retried about a second
    // after the first refund, with every refund of that second (a retry scans the
    // shard's open leads, so refunds are batched rather than retried one by one). On
    // the manual clock `advance_clock` does it.
    let manual = engine.inner.clock.is_manual();
    let mut refund_retry_at: Option<tokio::time::Instant> = None;
    // R20/R24: a weekly recharge is due at the start of a tenant's local week, a
    // resume's when an auto-buy pause ends; the housekeeping runs then as well as every
    // minute, so a budget whose week is over (nothing to spend until it is recharged)
    // waits moments, not a minute, and a resumed config is topped up as it resumes.
    // Kept across rounds of the loop until it has run: a round busy across that time
    // (a snapshot's encoding, a housekeeping) runs it as soon as it is free.
    let mut looked = (!manual).then(|| engine.next_housekeeping_at(engine.inner.clock.now())).flatten();
    loop {
        let due = (!manual).then(|| engine.housekeeping_due(looked)).flatten();
        let until_week = due.map(|t| Duration::from_millis(engine.inner.clock.ms_until(t) as u64));
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(until_week.unwrap_or_default()), if until_week.is_some() => {
                let started = engine.inner.clock.now();
                run_housekeeping(&engine).await;
                looked = engine.next_housekeeping_at(started);
            }
            _ = engine.budget_returned(), if !manual && refund_retry_at.is_none() => {
                refund_retry_at = Some(tokio::time::Instant::now() + REFUND_RETRY_BATCH);
            }
            _ = tokio::time::sleep_until(refund_retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if refund_retry_at.is_some() => {
                refund_retry_at = None;
                if let Err(e) = engine.retry_refunded().await {
                    tracing::warn!(error = %e, "retry after refunds failed; retried at the next refund or housekeeping");
                }
            }
            _ = observe.tick() => {
                if let Some(f) = each_round.as_mut() {
                    f();
                }
                engine.observe();
            }
            _ = housekeeping.tick() => {
                if !manual {
                    let started = engine.inner.clock.now();
                    run_housekeeping(&engine).await;
                    looked = engine.next_housekeeping_at(started);
                }
            }
            _ = snap.tick(), if snapshot_every > 0 => {
                let failed = || engine.inner.metrics.m.wal.snapshot_failures.increment(1);
                match background_snapshot(engine.clone()).await {
                    Ok(Ok(seq)) => tracing::info!(covers_seq = seq, "snapshot written"),
                    // The stop's final snapshot, taken while this one was encoding,
                    // is newer: nothing failed (`RotaSnapshotFailing` must not fire).
                    Ok(Err(e @ crate::wal::WalError::Superseded { .. })) => {
                        tracing::info!(error = %e, "snapshot superseded")
                    }
                    Ok(Err(e)) => {
                        failed();
                        tracing::error!(error = %e, "snapshot failed");
                    }
                    Err(e) => {
                        failed();
                        tracing::error!(error = %e, "snapshot thread failed");
                    }
                }
            }
        }
    }
}

/// Every tenant's housekeeping (weekly recharges and resumes, R20/R24, with the R22
/// retries they bring) and order tick.
async fn run_housekeeping(engine: &Engine) {
    let ids: Vec<_> = engine.tenants().iter().map(|t| t.id.clone()).collect();
    for t in ids {
        if let Err(e) = engine.housekeeping(&t).await {
            tracing::warn!(tenant = %t, error = %e, "housekeeping failed");
        }
        // Record expired order requests and custom offers (they are already refused as
        // expired before this runs), and forget the chains that ended longer than the
        // retention ago.
        if let Err(e) = engine.order_tick(&t).await {
            tracing::warn!(tenant = %t, error = %e, "order tick failed");
        }
    }
}

/// A periodic snapshot on a thread of its own. Its cut (`rota_snapshot_pause_seconds`:
/// every decision waits for it) runs at normal priority, so a busy host cannot stretch
/// it; then the thread drops to the lowest priority (nice 19) to encode and write the
/// whole state, seconds of CPU with a million open leads, which on a small host should
/// come from idle time, not from the requests. Nice 19 rather than `SCHED_IDLE`: under
/// sustained overload an idle-class thread might never finish, and the log could not
/// be compacted. (The final snapshot at shutdown runs at normal priority.)
async fn background_snapshot(engine: Engine) -> anyhow::Result<Result<u64, crate::wal::WalError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("rota-snapshot".into()).spawn(move || {
        let lower = || {
            crate::engine::lower_this_thread_priority();
        };
        let _ = tx.send(engine.snapshot_then(lower));
    })?;
    Ok(rx.await?)
}

/// SIGHUP: loads the configuration again from where it came from and applies what a
/// running daemon can take (see `engine::reload`). A configuration that does not load,
/// or that removes a tenant, is refused whole: rota keeps running on the one
/// it has, and says why.
async fn reload_on_hangup(
    engine: Engine,
    mut hup: tokio::signal::unix::Signal,
    sources: Sources,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        // Off this thread, which serves the admin port, accepts connections and waits
        // for SIGTERM: a reload reads files, waits for the gate and for its record's
        // sync, and on a stalled disk that would freeze them all.
        let (e, src) = (engine.clone(), sources.clone());
        let outcome = tokio::task::spawn_blocking(move || Config::load(&src).map(|cfg| e.reload(&cfg))).await;
        let reloaded = match outcome {
            Ok(Ok(reloaded)) => reloaded,
            Ok(Err(e)) => {
                engine.inner.metrics.m.config_reloads.get("error").increment(1);
                tracing::error!(error = %e, "configuration reload refused; still running on the previous configuration");
                continue;
            }
            Err(e) => {
                engine.inner.metrics.m.config_reloads.get("error").increment(1);
                tracing::error!(error = %e, "configuration reload failed; still running on the previous configuration");
                continue;
            }
        };
        // `Engine::reload` counts its own outcome in `rota_config_reloads_total`.
        match reloaded {
            Ok(r) => {
                tracing::info!(
                    added = ?r.added.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                    policies = ?r.policies.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                    tokens = ?r.tokens.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                    "configuration reloaded"
                );
                if !r.restart_needed.is_empty() {
                    tracing::warn!(settings = ?r.restart_needed, "these settings changed and take effect at the next restart");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; still running on the previous configuration")
            }
        }
    }
}

/// What stops the daemon: SIGTERM, SIGINT, or (tests) the `stop` hook, once.
struct Stops {
    signals: Signals,
    hook: Option<oneshot::Receiver<()>>,
}

impl Stops {
    /// Resolves at the next stop. Cancel safe: a stop that arrives while this is
    /// dropped unresolved is seen by the next call.
    async fn recv(&mut self) {
        let Stops { signals, hook } = self;
        let Some(h) = hook.as_mut() else { return signals.recv().await };
        let by_hook = tokio::select! {
            () = signals.recv() => false,
            _ = h => true,
        };
        if by_hook {
            *hook = None;
        }
    }
}

/// SIGTERM and SIGINT, taken once for the life of the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on Unix"),
            int: signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail on Unix"),
        }
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
