//! The runtime around the pure core: shard actors, the shared ledger, the WAL,
//! recovery, snapshots and the per-tenant stream hubs.
//!
//! ```text
//! gateway thread --request--> Engine::request --> actor::execute (under the shard's lock)
//!                                                  decide, money, apply, append
//!                                                  WAL writer thread: group commit
//!                                       <--reply-- durability callback --publish--> StreamHub
//! ShardActor (arbiter thread): the shard's timer, runs Tick at its earliest deadline
//! ```
//!
//! Ordering promise: a reply or a stream event leaves rota only from a WAL
//! durability callback, so nothing is acknowledged or published before it is
//! durable under the configured fsync policy.

pub mod actor;
mod fairness;
pub mod hub;
pub mod lead_index;
pub mod money;
mod read_barrier;
pub mod record;
mod reload;
pub mod spill;

use crate::clock::Clock;
use crate::config::{ClockMode, Config, TenantConfig};
use crate::core::orders::{OrderBook, OrderCommand, OrderReply};
use crate::core::shard::{Command, Event, Reply as CoreReply, Shard};
use crate::core::{AutoBuyConfig, Pro, Reject};
use crate::ids::{CategoryId, LeadId, Millis, ProId, ShardKey, TenantId, ZoneId};
use crate::ledger::{BudgetName, Ledger, LedgerError, LedgerSnapshot, OpId, Receipt, TopupRule};
use crate::protocol::{ApiError, BalanceWire, OkResult, Request, Scope, StreamEvent};
use crate::wal::{Fs, RealFs, Replayed, Wal, WalError};
use actix::prelude::*;
use actor::{Exec, ShardActor, ShardCell};
use chrono::{Datelike, TimeZone};
use dashmap::DashMap;
use hub::StreamHub;
use lead_index::LeadIndex;
use parking_lot::{Mutex, RwLock};
use record::{WalRecord, RECORD_KIND};
use rustc_hash::{FxBuildHasher, FxHashMap};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use metrics_facade::EngineMetrics;
pub use reload::{ReloadError, Reloaded};

/// A shard's answer, sent once the decision is durable.
#[derive(Debug)]
pub struct ShardReply {
    pub reply: CoreReply,
}

/// Gives back a slot of a shard's in-flight bound when the request ends, however
/// it ends (answered, or its connection gone).
struct InFlight(Arc<ShardCell>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.depth.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Tenant {
    pub id: TenantId,
    /// Policy and tokens: replaced whole by [`Engine::reload`].
    cfg: RwLock<Arc<TenantConfig>>,
    pub hub: Arc<StreamHub>,
    /// The tenant's order requests (R25-R27): one book, decided under its lock.
    orders: Mutex<OrderBook>,
    /// Request rate limit (`rate_limit_tenant_per_s`), if set.
    limit: Option<crate::ratelimit::Limiter>,
    /// Shards of the tenant (bounded by `max_shards_per_tenant` when created).
    shards: AtomicUsize,
    /// Changes of one pro (upsert, removal, availability: each several shard steps and
    /// a directory record) run one at a time: a lock per stripe of the tenant's pros
    /// ([`Engine::pro_change`]). The tenant's own: however many changes another tenant
    /// queues, on whichever stripes, they never delay this tenant's.
    pro_locks: Box<[tokio::sync::Mutex<()>]>,
    /// Changes of the tenant's pros admitted and not finished (waiting for their stripe
    /// or running): at most [`MAX_PRO_CHANGES_PER_TENANT`] ([`ProChangeSlot`]).
    pro_changes: AtomicUsize,
}

/// Every tenant, by id: read by every request, replaced whole when a reload adds one
/// (copy on write; a reader keeps the map it took).
type Tenants = Arc<FxHashMap<TenantId, Arc<Tenant>>>;

impl Tenant {
    /// The tenant's current policy and tokens.
    pub fn cfg(&self) -> Arc<TenantConfig> {
        self.cfg.read().clone()
    }

    /// Builds tenant `t` from what recovery rebuilt of it (nothing, for a tenant new
    /// to the log): its stream with its replay buffer and history on disk (joined to
    /// `spills`), its order book and its rate limit.
    fn open(
        cfg: &Config,
        fs: &Arc<dyn Fs>,
        t: &TenantConfig,
        spills: &spill::Spills,
        rec: &mut Recovering,
    ) -> Tenant {
        let spill = (cfg.raw.stream_spill_bytes > 0).then(|| {
            spill::Spill::open(
                fs.clone(),
                &cfg.raw.data_dir.join("streams"),
                &t.id,
                cfg.raw.stream_spill_bytes,
                // Transit absorbs a writer held up by the disk: at least 32,768
                // events (a fraction of a second at peak), more with a bigger buffer.
                cfg.raw.stream_retention_events.max(32_768),
            )
        });
        let hub = Arc::new(StreamHub::with_spill(cfg.raw.stream_retention_events, spill.clone()));
        let buffered = rec.hub_buffer.remove(&t.id).unwrap_or_default();
        if let Some(&(first, _)) = buffered.first() {
            hub.set_next_seq(first);
            hub.publish(buffered.into_iter().map(|(_, e)| e));
        }
        if let Some(&n) = rec.hub_next.get(&t.id) {
            if n != hub.next_seq() {
                hub.set_next_seq(n);
            }
        }
        if let Some(evs) = rec.hub_events.remove(&t.id) {
            hub.publish_recovered(evs);
        }
        if let Some(sp) = spill {
            // A history left by an earlier life that does not join is dropped here.
            sp.align_with(hub.oldest_buffered(), hub.next_seq());
            spills.add(&sp);
        }
        let mut book = rec.orders.remove(&t.id).unwrap_or_else(|| OrderBook::new(&t.policy));
        book.set_policy(&t.policy);
        let limit = crate::ratelimit::per_second(cfg.raw.rate_limit_tenant_per_s);
        Tenant {
            id: t.id.clone(),
            cfg: RwLock::new(Arc::new(t.clone())),
            hub,
            orders: Mutex::new(book),
            limit,
            shards: AtomicUsize::new(0),
            pro_locks: (0..PRO_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            pro_changes: AtomicUsize::new(0),
        }
    }
}

/// Stripes of [`Tenant::pro_locks`]: two changes of different pros of one tenant wait
/// for each other only when their pros share one (changes of pros are rare next to
/// leads).
const PRO_LOCK_STRIPES: usize = 64;

/// Most changes of pros (`upsert_pro`, `remove_pro`, `set_availability`) one tenant may
/// have in flight, waiting for their stripe or running; beyond, a change is refused
/// `overloaded` before it is queued, and nothing changes. A change takes one log sync per
/// shard of the pro (up to 1,024), and a queued change holds its whole profile (an
/// upsert's zones and categories): unbounded, pipelined changes would queue for minutes,
/// refused by nothing, and hold memory without limit. 256 is four per stripe, far more
/// than a client loading its pros needs to keep the log busy.
pub const MAX_PRO_CHANGES_PER_TENANT: usize = 256;

/// `retry_after_ms` of a change refused for [`MAX_PRO_CHANGES_PER_TENANT`].
const PRO_CHANGES_RETRY_AFTER_MS: u64 = 100;

/// A change of a pro counted in its tenant's [`Tenant::pro_changes`] until dropped (when
/// the change ends, however it ends).
struct ProChangeSlot(Arc<Tenant>);

impl ProChangeSlot {
    /// `None` when the tenant has [`MAX_PRO_CHANGES_PER_TENANT`] changes in flight.
    fn take(tenant: Arc<Tenant>) -> Option<ProChangeSlot> {
        let before = tenant.pro_changes.fetch_add(1, Ordering::AcqRel);
        if before >= MAX_PRO_CHANGES_PER_TENANT {
            tenant.pro_changes.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ProChangeSlot(tenant))
    }
}

impl Drop for ProChangeSlot {
    fn drop(&mut self) {
        self.0.pro_changes.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Inner {
    pub cfg: Config,
    pub clock: Clock,
    pub wal: Wal,
    pub ledger: Ledger,
    pub metrics: EngineMetrics,
    tenants: RwLock<Tenants>,
    shards: DashMap<ShardKey, Arc<ShardCell>, FxBuildHasher>,
    /// Pro directory: the current profile of every pro (which shards it covers).
    pros: DashMap<(TenantId, ProId), Arc<Pro>, FxBuildHasher>,
    /// Which shards have each pro in their rotation, as their events say (the
    /// directory says which they should have: the two differ while a change of the pro
    /// is under way, or after one was cut off; see [`Engine::pro_change`]). Rebuilt from
    /// the shards at start-up.
    pro_members: DashMap<(TenantId, ProId), Vec<ShardKey>, FxBuildHasher>,
    /// The shards each pro left keeping its history there (`Shard::has_departed`), as
    /// their events say; a superset (a pro that left with no history there is listed
    /// too, and found with nothing). Rebuilt from the shards at start-up.
    pro_departed: DashMap<(TenantId, ProId), Vec<ShardKey>, FxBuildHasher>,
    /// Which shard holds a lead (offer actions name only the lead).
    lead_index: LeadIndex,
    /// Publishes under way, by lead id: the shard each is for, and how many
    /// ([`PublishClaim`]).
    publishing: DashMap<(TenantId, LeadId), (ShardKey, u32), FxBuildHasher>,
    /// Readers: every decide -> log -> apply step (shard decisions, directory records,
    /// order commands). Writers: a snapshot's cut, a ledger operation outside any
    /// shard (`ledger_ops`), a policy change (`set_tenant_configs`).
    pub(crate) gate: RwLock<()>,
    /// Where reads and refusals wait until what they saw is durable
    /// ([`Engine::durable_read`]).
    read_barrier: read_barrier::ReadBarrier,
    /// The fairness figure's window ([`Engine::observe`]).
    fairness: Mutex<fairness::FairnessWindow>,
    arbiters: Vec<ArbiterHandle>,
    /// False when the actors run on the gateway's own arbiter (not ours to stop).
    own_arbiters: bool,
    next_arbiter: AtomicUsize,
    next_worker: AtomicUsize,
    pub ready: Arc<AtomicBool>,
    stopping: AtomicBool,
    /// Size of the last snapshot's encoding: the next one is encoded into a buffer
    /// of about that size, not one grown by doubling from empty.
    last_snapshot_bytes: AtomicUsize,
    /// The thread writing the streams' history to disk, and its stop flag.
    spill_stop: Arc<AtomicBool>,
    spill_writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The histories the spill thread writes (a tenant added by a reload joins them).
    spills: spill::Spills,
    /// The filesystem of the stream histories (a tenant added by a reload opens its own).
    fs: Arc<dyn Fs>,
    /// Pros whose auto-buy budget a refund gave back (R12/R23), for a retry of the
    /// leads they missed (R22): on the wall clock within about a second of the refund
    /// ([`Engine::retry_refunded`], woken by `budget_notify`), on the manual clock at
    /// the next `advance_clock`; and, after recovery, every pro parked for its budget.
    /// In memory; recovery queues again the refunds of the log it replays (those
    /// before the snapshot it starts from were retried when made, unless the process
    /// died in it).
    budget_returned: Arc<Mutex<Vec<(TenantId, ProId)>>>,
    /// Woken when a refund is queued in `budget_returned`.
    budget_notify: Arc<tokio::sync::Notify>,
    /// Counts configuration reloads ([`Engine::reload`]): connections watch it to
    /// check their token again.
    reloads: tokio::sync::watch::Sender<u64>,
    /// Held by [`Engine::reload`]: one at a time.
    reloading: Mutex<()>,
    /// The earliest end of an auto-buy pause set since the housekeeping last looked
    /// (`i64::MAX`: none), for [`Engine::next_housekeeping_at`].
    pause_ends: std::sync::atomic::AtomicI64,
}

/// A change of a pro that spans its shards and the directory.
enum ProChange {
    Upsert(Pro),
    Remove,
    Availability(crate::core::Availability),
}

/// Cheap to clone; all clones share one runtime.
#[derive(Clone)]
pub struct Engine {
    pub inner: Arc<Inner>,
}

/// What a snapshot holds: everything replay would otherwise rebuild.
#[derive(Serialize, Deserialize)]
/// `B`: a replay-buffer entry, `(seq, event)` as read back, [`hub::Buffered`] (the
/// same bytes, no copy) as written.
struct EngineSnapshot<B = (u64, StreamEvent)> {
    ledger: LedgerSnapshot,
    shards: Vec<Arc<Shard>>,
    directory: Vec<(TenantId, Arc<Pro>)>,
    /// Empty: the lead index is rebuilt from the shards at every start
    /// ([`LeadIndex::from_shards`]). Kept for the layout; older snapshots' entries are
    /// ignored.
    lead_index: Vec<(TenantId, LeadId, ZoneId, CategoryId)>,
    hub_next_seq: Vec<(TenantId, u64)>,
    /// The streams' replay buffers, so a subscriber can resume across a restart.
    hub_buffer: Vec<(TenantId, Vec<B>)>,
    #[serde(default)]
    orders: Vec<(TenantId, OrderBook)>,
    /// rota's time at the cut: the floor of the wall clock after a restart
    /// ([`Clock::not_before`]). 0 in snapshots written before it was kept.
    #[serde(default)]
    clock_ms: Millis,
    /// Each tenant's policy at the cut ([`WalRecord::Policy`]). Empty in snapshots
    /// written before it was kept: the configuration's policy is used then.
    #[serde(default)]
    policies: Vec<(TenantId, String)>,
    /// Whether the ledger at the cut forgot each forgotten lead's op ids with it
    /// ([`money::forget_lead`]): true in every snapshot written since 2026-12-07, so
    /// a start from one skips the pass over the ledger that a snapshot of an earlier
    /// release needs ([`money::forget_ops_of_leads_not_held`]). False (absent) before.
    #[serde(default)]
    lead_ops_forgotten: bool,
}

/// Lowers the calling thread to the lowest priority (nice 19), for background work
/// that should run on idle time: the periodic snapshot's encoding and write, the
/// stream history's writes. Returns whether it took effect.
pub fn lower_this_thread_priority() -> bool {
    // SAFETY: setpriority with `who = 0` changes only the calling thread on Linux (the
    // nice value is per thread); no pointers are involved.
    let ok = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0;
    if !ok {
        tracing::debug!("thread priority not lowered");
    }
    ok
}

/// The outcome of start-up recovery, for logs and metrics.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub snapshot_seq: Option<u64>,
    pub records_replayed: u64,
    pub last_seq: u64,
    pub torn_tail: Option<String>,
    pub duration: std::time::Duration,
    pub shards: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("snapshot cannot be decoded: {0}")]
    Snapshot(String),
    #[error("WAL record {seq} cannot be decoded: {reason}")]
    Record { seq: u64, reason: String },
    #[error("cannot start the stream-history thread: {0}")]
    Thread(std::io::Error),
    #[error("{}", unconfigured_message(.0))]
    UnconfiguredTenants(Vec<String>),
}

fn unconfigured_message(tenants: &[String]) -> String {
    let mut text = format!(
        "the log holds tenants that are not in the configuration: {}; their leads, rotation \
         and money would be dropped at the next snapshot. Add them back to `tenants` (with no \
         `tokens` to keep them closed), or start with another data_dir; nothing was changed",
        tenants.join(", ")
    );
    if tenants.iter().any(|t| t == "demo") {
        text += ". (`demo` is the built-in tenant of a start with no tenants configured: a data_dir \
                 used to try rota out holds it; give the configured tenants a data_dir of their own)";
    }
    text
}

/// State rebuilt by replay before the actors start.
#[derive(Default)]
struct Recovering {
    shards: FxHashMap<ShardKey, Shard>,
    ledger: Option<Ledger>,
    directory: FxHashMap<(TenantId, ProId), Arc<Pro>>,
    lead_index: LeadIndex,
    hub_events: FxHashMap<TenantId, Vec<StreamEvent>>,
    hub_next: FxHashMap<TenantId, u64>,
    hub_buffer: FxHashMap<TenantId, Vec<(u64, StreamEvent)>>,
    orders: FxHashMap<TenantId, OrderBook>,
    /// Size of the snapshot recovered from (sizes the next one's buffer).
    snapshot_bytes: usize,
    /// Refunded auto-buy spends in the replayed log: their R22 retries are queued
    /// again (the queue is in memory; a retry that already ran finds nothing new).
    budget_returned: Vec<(TenantId, ProId)>,
    /// The latest time of the recovered state: the snapshot's and every replayed
    /// shard event's (the wall clock's floor, [`Clock::not_before`]).
    latest_ms: Millis,
    /// Each tenant's policy as the snapshot and the log say (the last
    /// [`WalRecord::Policy`]); a tenant not in it is replayed under the
    /// configuration's policy.
    policies: FxHashMap<TenantId, Arc<crate::core::Policy>>,
    /// Tenants found in the snapshot or the log but not configured: the start is
    /// refused ([`StartError::UnconfiguredTenants`]).
    unconfigured: std::collections::BTreeSet<String>,
    error: Option<StartError>,
    /// Records of a split decision whose last record has not come yet, per shard
    /// (`record::Part`): applied with it, or dropped if it never comes.
    held: FxHashMap<ShardKey, (u64, Vec<(u64, WalRecord)>)>,
    /// Records of split decisions dropped because their last record never came.
    dropped_parts: usize,
}

impl Engine {
    /// Recovers from the WAL and snapshot, then starts the shard actors. Must run
    /// inside an actix `System`.
    pub fn start(cfg: Config) -> Result<(Engine, RecoveryReport), StartError> {
        Self::start_with_fs(cfg, Arc::new(RealFs))
    }

    pub fn start_with_fs(cfg: Config, fs: Arc<dyn Fs>) -> Result<(Engine, RecoveryReport), StartError> {
        Self::recover_with_fs(cfg, fs)?.start()
    }

    /// The first half of [`Engine::start`]: reads the snapshot and replays the log into
    /// memory. Needs no runtime and may run on any thread (`rota serve` runs it on one
    /// of its own, so the admin port answers `/livez` and `/readyz` while a long log is
    /// replayed). [`Recovered::start`] then starts the actors.
    pub fn recover(cfg: Config) -> Result<Recovered, StartError> {
        Self::recover_with_fs(cfg, Arc::new(RealFs))
    }

    pub fn recover_with_fs(cfg: Config, fs: Arc<dyn Fs>) -> Result<Recovered, StartError> {
        let clock = match cfg.raw.clock {
            ClockMode::Wall => Clock::wall(),
            ClockMode::Manual => Clock::manual(match cfg.raw.manual_clock_start_ms {
                0 => crate::clock::wall_now(),
                t => t,
            }),
        };
        Self::recover_with_clock(cfg, fs, clock)
    }

    /// [`Engine::recover_with_fs`] on `clock` rather than the one the configuration
    /// names (a wall clock reading a stand-in for the system's, [`Clock::wall_reading`]).
    pub fn recover_with_clock(cfg: Config, fs: Arc<dyn Fs>, clock: Clock) -> Result<Recovered, StartError> {
        let policies: FxHashMap<TenantId, Arc<crate::core::Policy>> =
            cfg.tenants.iter().map(|t| (t.id.clone(), t.policy.clone())).collect();
        let mut rec = Recovering { ledger: Some(Ledger::new()), ..Default::default() };
        let spill_fs = fs.clone();
        let (wal, recovered) = Wal::open_with(cfg.wal.clone(), fs, |item| {
            if rec.error.is_some() {
                return;
            }
            match item {
                Replayed::Snapshot { bytes, .. } => match rmp_serde::from_slice::<EngineSnapshot>(bytes) {
                    Ok(s) => {
                        rec.snapshot_bytes = bytes.len();
                        restore_snapshot(&mut rec, s, &policies)
                    }
                    Err(e) => rec.error = Some(StartError::Snapshot(e.to_string())),
                },
                Replayed::Record { seq, kind, payload } => {
                    if kind != RECORD_KIND {
                        rec.error =
                            Some(StartError::Record { seq, reason: format!("unknown record kind {kind}") });
                        return;
                    }
                    match record::decode(payload) {
                        Ok(r) => replay_whole_decisions(&mut rec, seq, r, &policies),
                        Err(e) => rec.error = Some(StartError::Record { seq, reason: e.to_string() }),
                    }
                }
            }
        })?;
        if let Some(e) = rec.error.take() {
            return Err(e);
        }
        for (key, (group, parts)) in std::mem::take(&mut rec.held) {
            drop_unfinished(&mut rec, &key, group, parts.len());
        }
        // R1: lead -> shard as the recovered shards hold them. Not kept in snapshots:
        // one copied it after its cut, and a power cut losing records on both sides of
        // the cut (a shard forgetting an id, another accepting it) left an entry naming
        // a shard that did not hold the lead.
        rec.lead_index = LeadIndex::from_shards(rec.shards.values());
        if !rec.unconfigured.is_empty() {
            return Err(StartError::UnconfiguredTenants(
                std::mem::take(&mut rec.unconfigured).into_iter().collect(),
            ));
        }
        let behind_ms = clock.not_before(rec.latest_ms);
        if behind_ms > 0 {
            tracing::warn!(
                behind_ms,
                latest_logged_ms = rec.latest_ms,
                "the wall clock is behind the latest time in the log; rota's time holds there until the wall clock catches up"
            );
        }
        // Each tenant's stream and its history on disk (after a crash the history checks
        // what was written since its last sync): still on the recovering thread.
        let mut tenants = FxHashMap::default();
        let spills = spill::Spills::default();
        for t in &cfg.tenants {
            let tenant = Tenant::open(&cfg, &spill_fs, t, &spills, &mut rec);
            tenants.insert(t.id.clone(), Arc::new(tenant));
        }
        Ok(Recovered { cfg, fs: spill_fs, clock, wal, recovered, rec, tenants, spills })
    }
}

/// The state a replay rebuilt ([`Engine::recover`]), not yet running.
pub struct Recovered {
    cfg: Config,
    fs: Arc<dyn Fs>,
    clock: Clock,
    wal: Wal,
    recovered: crate::wal::Recovered,
    rec: Recovering,
    tenants: FxHashMap<TenantId, Arc<Tenant>>,
    spills: spill::Spills,
}

impl Recovered {
    /// Starts the shard actors on the recovered state. Must run inside an actix
    /// `System`.
    pub fn start(self) -> Result<(Engine, RecoveryReport), StartError> {
        self.start_on(Arbiter::current())
    }

    /// [`Recovered::start`] from any thread of a running actix system (`rota serve`
    /// runs it on the recovery thread, so that spawning every shard and logging changed
    /// policies do not stall the admin port): `accepting` is the arbiter of the thread
    /// that accepts connections, which runs everything when `arbiters = 0`. The thread
    /// must know the system (`actix_rt::System::set_current`) when `arbiters > 0`.
    pub fn start_on(self, accepting: ArbiterHandle) -> Result<(Engine, RecoveryReport), StartError> {
        let Recovered { cfg, fs: spill_fs, clock, wal, recovered, mut rec, tenants, spills } = self;
        // The worker threads: connections, inline decisions, shard timers (see
        // `config::RawConfig::arbiters`). `arbiters = 0`: all on the accepting thread.
        let arbiters: Vec<ArbiterHandle> = match cfg.raw.arbiters {
            0 => vec![accepting],
            n => (0..n).map(|_| Arbiter::new().handle()).collect(),
        };
        let own_arbiters = cfg.raw.arbiters > 0;
        let ready = Arc::new(AtomicBool::new(false));
        let spill_stop = Arc::new(AtomicBool::new(false));
        let spill_writer = match spills.is_empty() {
            true => None,
            false => {
                Some(spill::spawn_writer(spills.clone(), spill_stop.clone()).map_err(StartError::Thread)?)
            }
        };
        let inner = Arc::new_cyclic(|weak| Inner {
            read_barrier: read_barrier::ReadBarrier::start(weak.clone()),
            fairness: Mutex::new(fairness::FairnessWindow::default()),
            metrics: EngineMetrics::new(cfg.tenants.iter().map(|t| &t.id)),
            clock,
            wal,
            ledger: rec.ledger.take().expect("set before replay"),
            tenants: RwLock::new(Arc::new(tenants)),
            shards: DashMap::with_hasher(FxBuildHasher),
            pros: rec.directory.drain().collect(),
            pro_members: DashMap::with_hasher(FxBuildHasher),
            pro_departed: DashMap::with_hasher(FxBuildHasher),
            lead_index: std::mem::take(&mut rec.lead_index),
            publishing: DashMap::with_hasher(FxBuildHasher),
            gate: RwLock::new(()),
            arbiters,
            own_arbiters,
            next_arbiter: AtomicUsize::new(0),
            next_worker: AtomicUsize::new(0),
            ready,
            stopping: AtomicBool::new(false),
            last_snapshot_bytes: AtomicUsize::new(rec.snapshot_bytes),
            spill_stop,
            spill_writer: Mutex::new(spill_writer),
            spills,
            fs: spill_fs,
            budget_returned: Arc::new(Mutex::new(std::mem::take(&mut rec.budget_returned))),
            budget_notify: Arc::new(tokio::sync::Notify::new()),
            reloads: tokio::sync::watch::Sender::new(0),
            reloading: Mutex::new(()),
            pause_ends: std::sync::atomic::AtomicI64::new(i64::MAX),
            cfg,
        });
        let engine = Engine { inner };
        engine.inner.wal.set_observer(Arc::new(engine.inner.metrics.m.wal.clone()));
        let shard_count = rec.shards.len();
        for (key, shard) in rec.shards.drain() {
            for pro in shard.pro_ids() {
                engine
                    .inner
                    .pro_members
                    .entry((key.tenant.clone(), pro.clone()))
                    .or_default()
                    .push(key.clone());
            }
            for pro in shard.departed_pros() {
                engine
                    .inner
                    .pro_departed
                    .entry((key.tenant.clone(), pro.clone()))
                    .or_default()
                    .push(key.clone());
            }
            // A recharge logged just before a crash told no shard: every pro parked for
            // its budget is told by the first housekeeping (R22; `Shard::budget_parked`).
            let parked = shard.budget_parked();
            if !parked.is_empty() {
                engine
                    .inner
                    .budget_returned
                    .lock()
                    .extend(parked.into_iter().map(|p| (key.tenant.clone(), p)));
            }
            engine.spawn_shard(key, shard);
        }
        // A policy that differs from the last one logged (changed while rota was
        // stopped, or never logged: a new log, or one written before policies were)
        // is logged from here on.
        let changed: Vec<_> = engine
            .tenants()
            .into_iter()
            .filter(|t| rec.policies.get(&t.id).is_none_or(|p| **p != *t.cfg().policy))
            .map(|t| {
                let cfg = t.cfg();
                (t, cfg, true)
            })
            .collect();
        engine.set_tenant_configs(changed, Vec::new())?;
        engine.inner.metrics.recovered(recovered.records_replayed, recovered.duration);
        let report = RecoveryReport {
            snapshot_seq: recovered.snapshot_seq,
            records_replayed: recovered.records_replayed,
            last_seq: recovered.last_seq,
            torn_tail: recovered.torn_tail.as_ref().map(|t| format!("{t:?}")),
            duration: recovered.duration,
            shards: shard_count,
        };
        engine.inner.ready.store(true, Ordering::Release);
        Ok((engine, report))
    }
}

impl Engine {
    pub fn tenant(&self, id: &TenantId) -> Option<Arc<Tenant>> {
        self.inner.tenants.read().get(id).cloned()
    }

    /// Every tenant now (a reload may add one afterwards).
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
        let mut all: Vec<Arc<Tenant>> = self.tenants_map().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Gives each tenant of `changes` its new configuration. Where the flag says its
    /// policy changed, the policy is logged first ([`WalRecord::Policy`]) and then set
    /// on every shard of the tenant and on its order book. All with the gate closed:
    /// no decision is in flight, so every decision logged before the record was made
    /// under the old policy and every one after it under the new one, which is how
    /// recovery replays them. `added` (tenants new to the log, already in `changes`)
    /// join the tenants map in the same step, so that a snapshot holds a new tenant's
    /// policy whenever it covers its record. Nothing changes when the log refuses the
    /// record.
    /// Applies a reload's tenant changes: logs the policy of every tenant whose policy
    /// changed and of every tenant `added`, sets the changed ones with no decision in
    /// flight, then opens the added ones (their stream, stream history, order book,
    /// metrics) and makes them reachable. Logged first: a log that refuses the records
    /// leaves everything as it was, nothing of a new tenant opened.
    fn set_tenant_configs(
        &self,
        changes: Vec<(Arc<Tenant>, Arc<TenantConfig>, bool)>,
        added: Vec<TenantConfig>,
    ) -> Result<(), WalError> {
        let closed = self.inner.gate.write();
        let records: Vec<(u8, Vec<u8>)> = changes
            .iter()
            .filter(|c| c.2)
            .map(|(t, cfg, _)| (&t.id, cfg.as_ref()))
            .chain(added.iter().map(|t| (&t.id, t)))
            .map(|(id, cfg)| {
                let rec = WalRecord::Policy { tenant: id.clone(), policy: cfg.policy.to_toml() };
                (RECORD_KIND, record::encode(&rec))
            })
            .collect();
        if !records.is_empty() {
            self.inner.wal.append_blocking(records)?;
        }
        for (tenant, cfg, policy_changed) in changes {
            // Swapped first: a shard created from now on starts with the new policy
            // (`shard_cell` reads it under the shard map's entry lock), and every one
            // that exists already is visited below.
            *tenant.cfg.write() = cfg.clone();
            if policy_changed {
                for e in self.inner.shards.iter().filter(|e| e.key().tenant == tenant.id) {
                    let mut state = e.value().state.lock();
                    Arc::make_mut(&mut *state).set_policy(cfg.policy.clone());
                }
                tenant.orders.lock().set_policy(&cfg.policy);
            }
        }
        if !added.is_empty() {
            // Nothing of a new tenant is in the log before its policy (a start refuses a
            // log holding an unconfigured one), so it opens empty; a stream history left
            // on disk by an earlier life does not join its stream and is dropped. No one
            // reaches it before it is in the map (its tokens are read from there). With
            // the gate still closed: a snapshot whose cut came between the record and
            // the map would cover the record without the tenant's policy, and a start
            // from it would replay the tenant's decisions under the policy file as it
            // is then (a directory and a marker file made under the gate, on a reload
            // that adds a tenant).
            let inner = &self.inner;
            let opened = added.iter().map(|t| {
                inner.metrics.add_tenant(&t.id);
                let tenant =
                    Tenant::open(&inner.cfg, &inner.fs, t, &inner.spills, &mut Recovering::default());
                (t.id.clone(), Arc::new(tenant))
            });
            let mut map = (*self.tenants_map()).clone();
            map.extend(opened);
            *self.inner.tenants.write() = Arc::new(map);
        }
        drop(closed);
        Ok(())
    }

    fn tenants_map(&self) -> Tenants {
        self.inner.tenants.read().clone()
    }

    /// Takes one request from the tenant's rate budget; `Err(retry_after_ms)` when it
    /// is spent.
    pub fn tenant_rate_check(&self, id: &TenantId) -> Result<(), u64> {
        if self.inner.cfg.raw.rate_limit_tenant_per_s == 0 {
            return Ok(());
        }
        let Some(t) = self.tenant(id) else { return Ok(()) };
        match &t.limit {
            None => Ok(()),
            Some(l) => crate::ratelimit::check(l),
        }
    }

    pub fn hub(&self, id: &TenantId) -> Option<Arc<StreamHub>> {
        self.inner.tenants.read().get(id).map(|t| t.hub.clone())
    }

    /// The tenant and scopes of a bearer token, if it is valid. Compares hashes in
    /// constant time.
    pub fn authenticate(&self, token: &str) -> Option<(TenantId, Vec<Scope>)> {
        let h = crate::config::hash_token(token);
        let mut found = None;
        for t in self.tenants_map().values() {
            for (hash, scopes) in &t.cfg().tokens {
                let diff = hash.iter().zip(h.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
                if diff == 0 {
                    found = Some((t.id.clone(), scopes.clone()));
                }
            }
        }
        found
    }

    /// Starts the actor of a shard on the next arbiter (round robin).
    fn new_cell(&self, key: &ShardKey, shard: Shard) -> Arc<ShardCell> {
        let cell = Arc::new(ShardCell::new(key.clone(), shard));
        let i = self.inner.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        let actor = ShardActor::new(cell.clone(), self.clone());
        let addr = ShardActor::start_in_arbiter(&self.inner.arbiters[i], move |_| actor);
        let _ = cell.timer.set(addr);
        cell
    }

    /// The worker thread for the next connection (round robin over the arbiters;
    /// with `arbiters = 0`, the gateway's own thread).
    pub fn next_worker(&self) -> &ArbiterHandle {
        let i = self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        &self.inner.arbiters[i]
    }

    fn spawn_shard(&self, key: ShardKey, shard: Shard) {
        if let Some(t) = self.tenant(&key.tenant) {
            t.shards.fetch_add(1, Ordering::Relaxed);
        }
        let c = self.new_cell(&key, shard);
        self.inner.shards.insert(key, c);
        self.inner.metrics.shards_alive(self.inner.shards.len());
    }

    /// The shard, created on first use.
    /// `limited`: a shard it creates counts against `max_shards_per_tenant` (a change of
    /// a pro checks its new shards up front instead, [`Engine::admit_change`], so that
    /// none of its later steps is refused).
    /// `admit`: asked before a shard is created, never for one that exists (a request
    /// refused whatever the new shard would hold must not create it).
    fn shard_cell(
        &self,
        key: &ShardKey,
        limited: bool,
        admit: impl FnOnce(&Tenant) -> Result<(), ApiError>,
    ) -> Result<Arc<ShardCell>, ApiError> {
        if let Some(h) = self.inner.shards.get(key) {
            return Ok(h.clone());
        }
        let tenant = self
            .tenant(&key.tenant)
            .ok_or_else(|| ApiError::new("unknown_tenant", "tenant is not configured"))?;
        admit(&tenant)?;
        if limited {
            self.room_for_shards(&tenant, 1)?;
        }
        // Two requests may race to create the same shard: the entry lock decides. The
        // policy is read under that lock, so a reload that swaps it and then updates
        // every shard either sees this one or was done before it read the policy.
        let h = self.inner.shards.entry(key.clone()).or_insert_with(|| {
            tenant.shards.fetch_add(1, Ordering::Relaxed);
            self.new_cell(key, Shard::new(key.clone(), tenant.cfg().policy.clone()))
        });
        let out = h.clone();
        drop(h);
        self.inner.metrics.shards_alive(self.inner.shards.len());
        Ok(out)
    }

    /// Refuses (`shard_limit`) when `tenant` has no room for `more` new shards. Two
    /// requests creating shards at once may both pass at the bound: it can be passed by
    /// the number of requests in flight, never without bound.
    fn room_for_shards(&self, tenant: &Tenant, more: usize) -> Result<(), ApiError> {
        let max = self.inner.cfg.raw.max_shards_per_tenant;
        let have = tenant.shards.load(Ordering::Relaxed);
        if have.saturating_add(more) > max {
            return Err(ApiError::new(
                "shard_limit",
                format!(
                    "tenant {} has {have} zone x category shards and {more} more would pass \
                     max_shards_per_tenant ({max}); use an existing zone and category",
                    tenant.id
                ),
            ));
        }
        Ok(())
    }

    /// Every shard's state now, ordered by key: what checks that recovery rebuilds
    /// exactly the state that ran compare (tests and tools; a copy-on-write share,
    /// no copy).
    pub fn shard_states(&self) -> Vec<(ShardKey, Arc<Shard>)> {
        let mut all: Vec<(ShardKey, Arc<Shard>)> =
            self.inner.shards.iter().map(|e| (e.key().clone(), e.value().state.lock().clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn shard_state(&self, key: &ShardKey) -> Option<actor::ShardState> {
        self.inner.shards.get(key).map(|h| h.state.clone())
    }

    /// Runs one command on its shard, on this thread (see [`actor`]); resolves once
    /// the result is durable.
    pub async fn exec(&self, key: ShardKey, cmd: Command) -> Result<CoreReply, ApiError> {
        self.exec_bounded(key, cmd, true).await
    }

    /// [`Engine::exec`]; with `shed = false` the shard's in-flight bound is not
    /// enforced (still counted): for the later steps of a change whose first steps
    /// are logged already, which must not be refused halfway (see
    /// [`Engine::pro_change`]).
    async fn exec_bounded(&self, key: ShardKey, cmd: Command, shed: bool) -> Result<CoreReply, ApiError> {
        // A publish refused whatever its shard would hold must not create the shard
        // (`max_shards_per_tenant`; a shard in memory that the log does not know).
        // Once the shard exists, it answers (a republish first).
        let cell = self.shard_cell(&key, shed, |tenant| match &cmd {
            Command::PublishLead { lead } => {
                let now = self.inner.clock.now();
                let refusal = crate::core::shard::publish_refusal(&tenant.cfg().policy, now, lead);
                refusal.map_or(Ok(()), |r| Err(r.into()))
            }
            _ => Ok(()),
        })?;
        if cell.depth.fetch_add(1, Ordering::AcqRel) >= self.inner.cfg.raw.mailbox_capacity && shed {
            cell.depth.fetch_sub(1, Ordering::AcqRel);
            self.inner.metrics.overloaded(&key.tenant);
            return Err(ApiError::overloaded(50));
        }
        // Counted out however this ends, a panic in the decision included.
        let slot = InFlight(cell);
        let (tx, rx) = tokio::sync::oneshot::channel();
        actor::execute(self, &slot.0, &cmd, Some(tx), Instant::now(), true);
        match rx.await {
            Ok(r) => r.map(|s| s.reply),
            Err(_) => Err(ApiError::unavailable("the request was dropped (shutdown or WAL failure)")),
        }
    }

    /// Appends to the WAL; `done` runs once durable (or failed). Waits for room in
    /// the WAL queue rather than refusing: money has already moved for this record,
    /// and back-pressure belongs at the bounded shard mailboxes.
    pub(crate) fn append(&self, records: Vec<(u8, Vec<u8>)>, done: crate::wal::OnDurable) {
        self.inner.wal.append(records, done);
    }

    /// Appends `rec`; once it is durable publishes `stream` on `tenant`'s stream, then
    /// runs `done` with the outcome (the stream never shows what the log refused).
    fn append_then_publish(
        &self,
        tenant: &TenantId,
        rec: &WalRecord,
        stream: Vec<StreamEvent>,
        done: impl FnOnce(Result<(), ApiError>) + Send + 'static,
    ) {
        let hub = self.hub(tenant);
        self.append(
            vec![(RECORD_KIND, record::encode(rec))],
            Box::new(move |r| {
                if r.is_ok() {
                    if let Some(h) = hub {
                        h.publish(stream);
                    }
                }
                done(r.map(|_| ()).map_err(wal_api_error));
            }),
        );
    }

    /// Runs `done` once everything appended so far is durable.
    pub(crate) fn after_durable(&self, done: Box<dyn FnOnce(Result<(), ApiError>) + Send>) {
        self.inner.wal.append(vec![], Box::new(move |r| done(r.map(|_| ()).map_err(wal_api_error))));
    }

    /// Answers a read (`balance`, `explain`, `candidates`, `search`), or its refusal
    /// (`unknown_lead`, `unknown_pro`, also an `offer`'s `unknown_lead`), once
    /// everything it may have seen is durable: a
    /// read made from memory can see a decision whose record is still on its way to the
    /// disk (a lead forgotten, a pro removed), and a power cut would then take away what
    /// it showed. Every change holds the gate's read side from its first step in memory
    /// to its record's place in the log's queue, so once the write side has been had,
    /// every change the read saw is queued, and the log makes them durable in order. On
    /// a failed log the answer is `unavailable`. The write side is had by the barrier's
    /// own thread, once for every answer waiting ([`read_barrier`]): a flood of reads
    /// closes the gate about once per sync, and no worker blocks on it. Costs a read
    /// one or two syncs, and a wake-up of that thread.
    async fn durable_read(&self, answer: Result<OkResult, ApiError>) -> Result<OkResult, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_barrier(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.map_err(|_| ApiError::unavailable("WAL closed"))??;
        answer
    }

    /// Runs `done` once everything in memory now, in every shard, is durable: through
    /// the gate's write side, had on a thread of its own once for all the answers
    /// waiting (see [`read_barrier`]).
    pub(crate) fn after_barrier(&self, done: Box<dyn FnOnce(Result<(), ApiError>) + Send>) {
        self.inner.read_barrier.wait(done);
    }

    /// Keeps the lead index (lead -> shard) and the pros' shard memberships in step
    /// with a shard's events.
    pub(crate) fn index_event(&self, key: &ShardKey, ev: &Event) {
        self.inner.lead_index.on_event(key, ev);
        fn add(map: &DashMap<(TenantId, ProId), Vec<ShardKey>, FxBuildHasher>, key: &ShardKey, pro: &ProId) {
            let mut keys = map.entry((key.tenant.clone(), pro.clone())).or_default();
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        fn drop_key(
            map: &DashMap<(TenantId, ProId), Vec<ShardKey>, FxBuildHasher>,
            key: &ShardKey,
            pro: &ProId,
        ) {
            if let dashmap::mapref::entry::Entry::Occupied(mut e) =
                map.entry((key.tenant.clone(), pro.clone()))
            {
                e.get_mut().retain(|k| k != key);
                if e.get().is_empty() {
                    e.remove();
                }
            }
        }
        match ev {
            Event::ProUpserted { pro, .. } => {
                add(&self.inner.pro_members, key, &pro.id);
                // Back: its history is its slot's again.
                drop_key(&self.inner.pro_departed, key, &pro.id);
            }
            Event::ProRemoved { pro, left, .. } => {
                drop_key(&self.inner.pro_members, key, pro);
                // `left`: it moved away and the shard keeps its history; a removal from
                // the tenant forgets it.
                match left {
                    true => add(&self.inner.pro_departed, key, pro),
                    false => drop_key(&self.inner.pro_departed, key, pro),
                }
            }
            _ => {}
        }
    }

    /// How many times the barrier's thread closed the gate: for reads and refusals
    /// waiting for durability ([`Engine::durable_read`]) and for ledger operations
    /// outside any shard, each batch once. For tests.
    #[doc(hidden)]
    pub fn read_barriers(&self) -> u64 {
        self.inner.read_barrier.taken()
    }

    /// The lead index (lead -> shard), for tests that stage what a crash can leave.
    #[doc(hidden)]
    pub fn lead_index(&self) -> &LeadIndex {
        &self.inner.lead_index
    }

    fn lead_shard(&self, tenant: &TenantId, lead: &LeadId) -> Result<ShardKey, ApiError> {
        self.inner
            .lead_index
            .shard_of(tenant, lead)
            .ok_or_else(|| ApiError::from(Reject::UnknownLead(lead.clone())))
    }

    fn pro_shards(pro: &Pro, tenant: &TenantId) -> Vec<ShardKey> {
        let mut keys = Vec::new();
        for z in &pro.zones {
            for c in &pro.categories {
                keys.push(ShardKey { tenant: tenant.clone(), zone: z.clone(), category: c.clone() });
            }
        }
        keys
    }

    /// Handles one request of an authenticated tenant (every request but
    /// `subscribe`, which the gateway handles with [`Engine::subscribe`]).
    pub async fn request(&self, tenant: &TenantId, req: Request) -> Result<OkResult, ApiError> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(ApiError::unavailable("rota is shutting down"));
        }
        if let Some(reason) = self.inner.wal.is_failed() {
            return Err(ApiError::unavailable(format!("the WAL has failed: {reason}")));
        }
        match req {
            Request::PublishLead { lead } => {
                self.inner.metrics.lead_received(tenant);
                lead.validate().map_err(Reject::from)?;
                let key = ShardKey {
                    tenant: tenant.clone(),
                    zone: lead.zone.clone(),
                    category: lead.category.clone(),
                };
                // R1: a lead id rota still remembers in another zone or category is a
                // different payload under the same id (its shard answers repeats); so
                // is one being published into another shard right now, which the
                // index names only once that shard has decided.
                let conflict = || Reject::IdempotencyConflict(lead.id.clone());
                let _claim = PublishClaim::take(&self.inner.publishing, tenant, &lead.id, &key)
                    .ok_or_else(conflict)?;
                if let Some(other) = self.inner.lead_index.shard_of(tenant, &lead.id).filter(|k| *k != key) {
                    // Checked against the shard the index names (its lock waits for a
                    // decision under way there): an entry whose shard does not hold
                    // the lead is stale. The index is rebuilt from the shards at each
                    // start and kept in step with them since, so this is a safeguard
                    // that should never fire. With the claim held, no publish of the id
                    // into that shard can start meanwhile.
                    // A lead the other shard's quality gate refused holds its id too
                    // (R1: repeats are answered there) until its publish is forgotten.
                    // The shard's state is taken out of the map before its lock: a
                    // reference into the map held while waiting on a shard's lock
                    // (a decision there blocked on a full log queue) would block
                    // every shard created in that part of the map meanwhile.
                    let held = self.shard_state(&other).is_some_and(|st| st.lock().remembers(&lead.id));
                    if held {
                        return Err(conflict().into());
                    }
                    tracing::warn!(%tenant, lead_id = %lead.id, shard = %other, "lead index entry its shard does not hold: dropped");
                    // Only if it still names that shard: a concurrent publish of the
                    // same id into this shard may have indexed it here meanwhile.
                    self.inner.lead_index.remove_if_at(&other, &lead.id);
                }
                match self.exec(key, Command::PublishLead { lead: lead.into() }).await? {
                    CoreReply::Lead(o) => Ok(OkResult::Lead(o)),
                    other => Err(unexpected(other)),
                }
            }
            Request::UpsertPro { pro } => {
                pro.validate().map_err(Reject::from)?;
                self.pro_change(tenant, pro.id.clone(), ProChange::Upsert(pro)).await
            }
            Request::RemovePro { pro } => self.pro_change(tenant, pro, ProChange::Remove).await,
            Request::SetAvailability { pro, availability } => {
                availability.validate("availability").map_err(Reject::from)?;
                self.pro_change(tenant, pro, ProChange::Availability(availability)).await
            }
            Request::Offer { lead, pro, action } => {
                let key = match self.lead_shard(tenant, &lead) {
                    Ok(key) => key,
                    Err(e) => {
                        // Refused before any shard: counted as the shards count theirs,
                        // and answered as a read (the lead's forgetting, or its publish
                        // being refused, may still be on its way to the disk).
                        self.inner.metrics.refused(tenant, Reject::UnknownLead(lead.clone()).code());
                        return self.durable_read(Err(e)).await;
                    }
                };
                match self.exec(key, Command::Offer { lead, pro, action }).await? {
                    CoreReply::Offer(v) => Ok(OkResult::Offer(v)),
                    CoreReply::Done => Ok(OkResult::Done { done: true }),
                    other => Err(unexpected(other)),
                }
            }
            Request::GrantCredits { pro, op, credits } => {
                pro.validate("pro").map_err(|e| Reject::from(crate::core::FieldError::from(e)))?;
                crate::ids::validate_id(&op, "op")
                    .map_err(|e| Reject::from(crate::core::FieldError::from(e)))?;
                at_most_max_credits("credits", credits)?;
                let t = tenant.clone();
                self.ledger_op(tenant, move |l| l.grant(OpId::grant(&op), &t, &pro, credits)).await?;
                Ok(OkResult::Done { done: true })
            }
            Request::SetTopupRule { pro, rule } => {
                // As `grant_credits`: a rule creates the pro's account, so a bad id
                // would leave one (and a record) behind.
                pro.validate("pro").map_err(|e| Reject::from(crate::core::FieldError::from(e)))?;
                if let Some(r) = &rule {
                    at_most_max_credits("rule.threshold_credits", r.threshold_credits)?;
                    at_most_max_credits("rule.amount_credits", r.amount_credits)?;
                }
                let t = tenant.clone();
                let rule =
                    rule.map(|r| TopupRule { threshold: r.threshold_credits, amount: r.amount_credits });
                // R10: the request has no idempotency key; each one is the account's
                // next rule change (last write wins), however close together.
                self.ledger_op(tenant, move |l| l.change_topup_rule(&t, &pro, rule)).await?;
                Ok(OkResult::Done { done: true })
            }
            Request::Balance { pro } => {
                let b = self.inner.ledger.balance(tenant, &pro);
                self.durable_read(Ok(OkResult::Balance(BalanceWire {
                    pro,
                    available: b.available,
                    held: b.held,
                    captured: b.captured,
                    refunded: b.refunded,
                    granted: b.granted,
                    topup_pending: b.topup_pending,
                })))
                .await
            }
            Request::Explain { lead } => {
                let explained = self.lead_shard(tenant, &lead).and_then(|key| {
                    let state = self
                        .shard_state(&key)
                        .ok_or_else(|| ApiError::from(Reject::UnknownLead(lead.clone())))?;
                    let e = state.lock().explain(&lead);
                    Ok(OkResult::Explain(e?))
                });
                self.durable_read(explained).await
            }
            Request::Candidates { zone, category, location, attributes } => {
                zone.validate("zone").map_err(|e| Reject::from(crate::core::FieldError::from(e)))?;
                category.validate("category").map_err(|e| Reject::from(crate::core::FieldError::from(e)))?;
                if let Some(l) = &location {
                    l.validate("location").map_err(Reject::from)?;
                }
                // As a lead's (R4): each attribute is compared with every pro's refused
                // ones under the shard's lock.
                crate::core::validate_attributes(&attributes, "attributes").map_err(Reject::from)?;
                let key = ShardKey { tenant: tenant.clone(), zone, category };
                let now = self.inner.clock.now();
                let c = match self.shard_state(&key) {
                    Some(s) => {
                        let funds = money::LedgerFunds {
                            ledger: &self.inner.ledger,
                            tenant: &key.tenant,
                            directory: Some(&self.inner.pros),
                            now,
                        };
                        s.lock().candidates(now, location, &attributes, &funds)
                    }
                    None => crate::core::shard::Candidates {
                        pros: vec![],
                        reason: Some("not_enough_pros".into()),
                    },
                };
                self.durable_read(Ok(OkResult::Candidates(c))).await
            }
            Request::Search { pro, query } => {
                let profile = match self.pro_profile(tenant, &pro) {
                    Ok(p) => p,
                    Err(e) => return self.durable_read(Err(e)).await,
                };
                let mut offers = Vec::new();
                // R18: also where it had offers before a change of its zones (those
                // offers can still be acted on).
                let mut keys = Self::pro_shards(&profile, tenant);
                for key in self.shards_left_by(tenant, &pro) {
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                for key in keys {
                    if let Some(s) = self.shard_state(&key) {
                        offers.extend(s.lock().search(&pro, &query));
                    }
                }
                offers.sort_by(|a, b| (b.offered_at, &b.lead).cmp(&(a.offered_at, &a.lead)));
                self.durable_read(Ok(OkResult::Search { offers })).await
            }
            Request::AdvanceClock { to_ms } => {
                let now = self.inner.clock.advance_to(to_ms).ok_or_else(|| {
                    ApiError::new("clock_not_manual", "the clock is the wall clock; set clock = \"manual\"")
                })?;
                // The clock has moved: every step runs whatever an earlier one
                // answered (a refused housekeeping must not leave the shards' due
                // deadlines unprocessed until the next advance); the first error is the
                // answer, and sending the same `to_ms` again runs what is left.
                let steps = [
                    self.housekeeping(tenant).await,
                    self.tick_tenant(tenant).await,
                    self.order_tick(tenant).await,
                ];
                steps.into_iter().collect::<Result<Vec<()>, ApiError>>()?;
                Ok(OkResult::Clock { now_ms: now })
            }
            Request::Order { command } => Ok(OkResult::Order(self.order(tenant, command).await?)),
            Request::Subscribe { .. } => {
                Err(ApiError::new("bad_request", "subscribe is handled by the gateway"))
            }
        }
    }

    fn pro_profile(&self, tenant: &TenantId, pro: &ProId) -> Result<Arc<Pro>, ApiError> {
        self.inner
            .pros
            .get(&(tenant.clone(), pro.clone()))
            .map(|p| p.value().clone())
            .ok_or_else(|| Reject::UnknownPro(pro.clone()).into())
    }

    /// Runs a change of a pro (several shard steps, then the directory record) to
    /// its end, and one change of a pro at a time.
    ///
    /// Every step is logged on its own, so a change can be cut between two steps: by
    /// a crash or a failing disk (the client is answered `unavailable`, in doubt).
    /// Such a change is completed by sending it again, as any request in doubt:
    ///
    /// * the shards a pro leaves are the ones that have it (not the ones the
    ///   directory's old profile names, which a cut change never replaced), and
    ///   leaving a shard the pro already left is done, not `unknown_pro`;
    /// * joining a shard again, or setting the same availability again, changes
    ///   nothing;
    /// * the directory record comes last: while it says the pro exists, every step
    ///   can run again.
    ///
    /// Nothing else cuts a change midway: the shards' in-flight bound is checked for
    /// every shard of the change before its first step (`overloaded` then changes
    /// nothing) and not after; the change runs on a task of its own, so a client that
    /// goes away (its connection closed) does not stop it between two steps; and the
    /// ledger step of an upsert, the only one bad input can fail after validation,
    /// comes first.
    ///
    /// Changes wait for their turn on the stripes of their own tenant
    /// ([`Tenant::pro_locks`]), never behind another tenant's; a tenant with
    /// [`MAX_PRO_CHANGES_PER_TENANT`] changes in flight is answered `overloaded` before
    /// this one is queued.
    async fn pro_change(
        &self,
        tenant: &TenantId,
        id: ProId,
        change: ProChange,
    ) -> Result<OkResult, ApiError> {
        let t =
            self.tenant(tenant).ok_or_else(|| ApiError::new("unknown_tenant", "tenant is not configured"))?;
        let Some(slot) = ProChangeSlot::take(t) else {
            self.inner.metrics.m.overload_refusals.get("pro_changes").increment(1);
            return Err(ApiError::overloaded(PRO_CHANGES_RETRY_AFTER_MS));
        };
        let this = self.clone();
        let task = actix_rt::spawn(async move {
            let t = &slot.0;
            let stripe = {
                use std::hash::BuildHasher;
                FxBuildHasher.hash_one((&t.id, &id)) as usize % t.pro_locks.len()
            };
            let _turn = t.pro_locks[stripe].lock().await;
            let tenant = &t.id;
            match change {
                ProChange::Upsert(pro) => this.upsert_pro(tenant, pro).await,
                ProChange::Remove => this.remove_pro(tenant, &id).await,
                ProChange::Availability(a) => this.set_availability(tenant, &id, a).await,
            }
        });
        task.await.unwrap_or_else(|_| Err(ApiError::unavailable("the change was stopped (shutdown)")))
    }

    /// The shards of `tenant` whose rotation has `pro`, whatever the directory says.
    fn shards_with_pro(&self, tenant: &TenantId, pro: &ProId) -> Vec<ShardKey> {
        self.inner.pro_members.get(&(tenant.clone(), pro.clone())).map(|k| k.clone()).unwrap_or_default()
    }

    /// The shards of `tenant` that `pro` left keeping its history there (R14/R15: its
    /// stats, kept for a return, and so the offers it had there), from the index the
    /// shards' events keep (no lock of any shard taken); perhaps a few where it left no
    /// history, which hold nothing of it.
    fn shards_left_by(&self, tenant: &TenantId, pro: &ProId) -> Vec<ShardKey> {
        self.inner.pro_departed.get(&(tenant.clone(), pro.clone())).map(|k| k.clone()).unwrap_or_default()
    }

    /// `overloaded` if any of `keys` is at its in-flight bound (checked before a change
    /// of a pro takes its first step; its steps are then not shed).
    fn admit_change<'a>(
        &self,
        tenant: &TenantId,
        keys: impl IntoIterator<Item = &'a ShardKey>,
    ) -> Result<(), ApiError> {
        let cap = self.inner.cfg.raw.mailbox_capacity;
        let mut new: Vec<&ShardKey> = Vec::new();
        for key in keys {
            match self.inner.shards.get(key) {
                Some(c) if c.depth.load(Ordering::Acquire) >= cap => {
                    self.inner.metrics.overloaded(tenant);
                    return Err(ApiError::overloaded(50));
                }
                Some(_) => {}
                None if !new.contains(&key) => new.push(key),
                None => {}
            }
        }
        if !new.is_empty() {
            let t = self
                .tenant(tenant)
                .ok_or_else(|| ApiError::new("unknown_tenant", "tenant is not configured"))?;
            self.room_for_shards(&t, new.len())?;
        }
        Ok(())
    }

    /// Takes `pro` out of the rotation of `key`; done if it is not there. `for_good`:
    /// the pro leaves the tenant, and the shard forgets its history.
    async fn leave_shard(&self, key: ShardKey, pro: &ProId, for_good: bool) -> Result<(), ApiError> {
        let cmd = match for_good {
            true => Command::RemovePro { pro: pro.clone() },
            false => Command::LeaveShard { pro: pro.clone() },
        };
        match self.exec_bounded(key.clone(), cmd, false).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == Reject::UnknownPro(pro.clone()).code() => {
                // Neither in the rotation nor with history there: an entry of the
                // departed index's superset (a pro that left with no history), gone now.
                if for_good {
                    if let dashmap::mapref::entry::Entry::Occupied(mut e) =
                        self.inner.pro_departed.entry((key.tenant.clone(), pro.clone()))
                    {
                        e.get_mut().retain(|k| *k != key);
                        if e.get().is_empty() {
                            e.remove();
                        }
                    }
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn upsert_pro(&self, tenant: &TenantId, pro: Pro) -> Result<OkResult, ApiError> {
        let old = self.inner.pros.get(&(tenant.clone(), pro.id.clone())).map(|p| p.value().clone());
        let new_keys = Self::pro_shards(&pro, tenant);
        let leave: Vec<ShardKey> =
            self.shards_with_pro(tenant, &pro.id).into_iter().filter(|k| !new_keys.contains(k)).collect();
        self.admit_change(tenant, leave.iter().chain(&new_keys))?;
        // Auto-buy budgets live in the ledger (shared by every shard of the pro). First:
        // a ledger refusal then leaves the shards as they were.
        let now = self.inner.clock.now();
        let mut budget_back = false;
        for cfg in &pro.autobuy {
            let before = old.as_ref().and_then(|o| o.autobuy.iter().find(|c| c.name == cfg.name));
            budget_back |= self.sync_budget(tenant, &pro.id, cfg, before, now).await?;
        }
        for key in leave {
            self.leave_shard(key, &pro.id, false).await?;
        }
        for key in &new_keys {
            self.exec_bounded(key.clone(), Command::UpsertPro { pro: pro.clone() }, false).await?;
        }
        let id = pro.id.clone();
        self.log_directory(tenant, &id, Some(Arc::new(pro))).await?;
        if budget_back && old.is_some() {
            // R22: budget back through the profile (a config added, activated or
            // resumed) retries the leads the pro missed for lack of it, as a refund's
            // does: queued for the next retry (within about a second on the wall clock,
            // at `advance_clock` on the manual one), once its shards have the profile.
            // A pro new to the tenant missed nothing for want of budget.
            self.inner.budget_returned.lock().push((tenant.clone(), id));
            self.inner.budget_notify.notify_one();
        }
        Ok(OkResult::Done { done: true })
    }

    async fn remove_pro(&self, tenant: &TenantId, pro: &ProId) -> Result<OkResult, ApiError> {
        let listed = self.inner.pros.contains_key(&(tenant.clone(), pro.clone()));
        let mut leave = self.shards_with_pro(tenant, pro);
        // And the history it left where it stopped covering a shard: removed for good,
        // a pro that comes back later starts afresh everywhere.
        for key in self.shards_left_by(tenant, pro) {
            if !leave.contains(&key) {
                leave.push(key);
            }
        }
        if !listed && leave.is_empty() {
            return Err(Reject::UnknownPro(pro.clone()).into());
        }
        self.admit_change(tenant, &leave)?;
        for key in leave {
            self.leave_shard(key, pro, true).await?;
        }
        self.log_directory(tenant, pro, None).await?;
        Ok(OkResult::Done { done: true })
    }

    async fn set_availability(
        &self,
        tenant: &TenantId,
        pro: &ProId,
        availability: crate::core::Availability,
    ) -> Result<OkResult, ApiError> {
        let profile = self.pro_profile(tenant, pro)?;
        // The shards that have the pro: after a change of it was cut off, not quite
        // those its profile names (the change, sent again, brings them in line).
        let keys = self.shards_with_pro(tenant, pro);
        self.admit_change(tenant, &keys)?;
        for key in keys {
            let cmd = Command::SetAvailability { pro: pro.clone(), availability: availability.clone() };
            self.exec_bounded(key, cmd, false).await?;
        }
        let mut p = (*profile).clone();
        p.availability = availability;
        self.log_directory(tenant, pro, Some(Arc::new(p))).await?;
        Ok(OkResult::Done { done: true })
    }

    /// Creates or updates an auto-buy budget: weekly amount (R19), and a recharge
    /// when the config is new or resumes (R20, R24). Returns whether a recharge was
    /// made now (not a repeat of one already logged): budget that may have come back.
    async fn sync_budget(
        &self,
        tenant: &TenantId,
        pro: &ProId,
        cfg: &AutoBuyConfig,
        before: Option<&AutoBuyConfig>,
        now: Millis,
    ) -> Result<bool, ApiError> {
        let name = BudgetName::new(&cfg.name);
        // R24: the housekeeping resumes (and recharges) it when its pause ends.
        if let Some(t) = cfg.paused_until.filter(|&t| t > now && cfg.active) {
            self.inner.pause_ends.fetch_min(t, Ordering::Relaxed);
        }
        let current = self.inner.ledger.budget(tenant, pro, &name);
        if current.map(|b| b.weekly_budget) != Some(cfg.weekly_budget_credits) {
            let (t, p, n, w) = (tenant.clone(), pro.clone(), name.clone(), cfg.weekly_budget_credits);
            // The next setting's number: changes of one pro run one at a time
            // (`Engine::pro_change`), so nothing sets this budget meanwhile.
            let next = current.map_or(1, |b| b.settings + 1);
            self.ledger_op(tenant, move |l| l.set_budget(OpId::set_budget(&p, &n, now, next), &t, &p, &n, w))
                .await?;
        }
        // New or resumed as the directory knows the pro: the ledger may hold more. A
        // change cut off midway (a crash, a failing disk) and sent again finds the
        // budget it made, recharged, and the directory as before the change; a config
        // dropped from a profile and added again finds the budget it left.
        let was_buying = before.is_some_and(|b| b.is_buying(now));
        if cfg.is_buying(now) && !was_buying {
            // This week's recharge comes first, for a new config and a resumed one
            // alike (R20): the week's housekeeping must find it done. A new config's
            // first recharge is this week's; a config paused or inactive at Monday's
            // housekeeping never got it, and the next housekeeping would top the budget
            // up a second time in the week once the config buys again. (For a config
            // that got it on Monday, or a change sent again after it was cut off, it
            // is a repeat and changes nothing.)
            let mut ops: Vec<OpId> = self
                .week_of(tenant, now)
                .map(|monday| OpId::weekly_recharge(pro, &name, monday))
                .into_iter()
                .collect();
            // A resumed config recharges now (R24). So does a new config whose pause
            // is already over (a profile sent again with a past `paused_until`): this
            // first recharge is its resume too, which the housekeeping must find done.
            // Taken right after the week's, with nothing spent between, it leaves the
            // same budget. A config new to the directory is not resumed otherwise:
            // added back after it was dropped, it keeps what is left of the week (a
            // drop and an add must not top a week's budget up again), and sent again
            // after a cut, its first recharge is a repeat.
            if before.is_some() || cfg.paused_until.is_some() || ops.is_empty() {
                ops.push(resume_op(pro, cfg, now, self.day_of(tenant, now)));
            }
            // One closing of the gate for both (a new config's first recharge and its
            // resume): a spend between them would be topped up again.
            let (t, p, until) = (tenant.clone(), pro.clone(), self.week_end(tenant, now));
            let rs = self
                .ledger_ops(tenant, ops.len(), move |l, i| {
                    l.recharge_until(ops[i].clone(), &t, &p, &name, until)
                })
                .await?;
            return Ok(rs.iter().any(|r| !r.replayed));
        }
        Ok(false)
    }

    async fn log_directory(
        &self,
        tenant: &TenantId,
        pro: &ProId,
        profile: Option<Arc<Pro>>,
    ) -> Result<(), ApiError> {
        let rec = {
            let _g = self.inner.gate.read();
            // The record is queued before the directory changes in memory: a decision
            // of another shard that reads the new profile (R2's competitor check) is
            // then logged after it, so no power cut keeps that decision and loses the
            // profile it rested on.
            let rec = WalRecord::ProDirectory {
                tenant: tenant.clone(),
                pro: pro.clone(),
                profile: profile.clone(),
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.append(
                vec![(RECORD_KIND, record::encode(&rec))],
                Box::new(move |r| {
                    let _ = tx.send(r.map(|_| ()).map_err(wal_api_error));
                }),
            );
            match profile {
                Some(p) => {
                    self.inner.pros.insert((tenant.clone(), pro.clone()), p);
                }
                None => {
                    self.inner.pros.remove(&(tenant.clone(), pro.clone()));
                }
            }
            rx
        };
        rec.await.map_err(|_| ApiError::unavailable("WAL closed"))?
    }

    /// A ledger operation outside any shard, logged and acknowledged once durable.
    async fn ledger_op(
        &self,
        tenant: &TenantId,
        f: impl FnOnce(&Ledger) -> Result<Receipt, LedgerError> + Send + 'static,
    ) -> Result<Receipt, ApiError> {
        let mut f = Some(f);
        let mut receipts =
            self.ledger_ops(tenant, 1, move |l, _| (f.take().expect("called once"))(l)).await?;
        Ok(receipts.pop().expect("one operation, one receipt"))
    }

    /// `n` ledger operations outside any shard (`f(ledger, i)` for `i` in `0..n`, in
    /// order, stopping at the first refusal), applied under one closing of the gate and
    /// logged in one record, acknowledged once durable: no decision can come between
    /// them (two recharges of one budget with a spend between them would top that spend
    /// up again). On a refusal, the operations before it stay applied and are logged;
    /// the refusal is the answer.
    async fn ledger_ops(
        &self,
        tenant: &TenantId,
        n: usize,
        mut f: impl FnMut(&Ledger, usize) -> Result<Receipt, LedgerError> + Send + 'static,
    ) -> Result<Vec<Receipt>, ApiError> {
        type Outcome = (Result<(), ApiError>, Vec<Receipt>, Option<LedgerError>);
        let (tx, rx) = tokio::sync::oneshot::channel::<Outcome>();
        let (engine, tenant) = (self.clone(), tenant.clone());
        // The gate closed (no decision in flight, none starting) from the change to its
        // record's place in the log: a grant's credits (or a recharge's budget) are
        // spent only by decisions logged after it. With the gate open, a shard on
        // another worker could spend them and log its charge first; a crash whose last
        // sync covered the charge and not the grant (never acknowledged, so the
        // platform sends it again) left the account below zero until then. Closed on
        // the barrier's thread, once for every such job waiting: the change and a push
        // onto the log's queue, not the sync. A worker thread never waits for the gate
        // (behind decisions that may wait for room in a full log queue), and a client
        // sending grants or top-up rules by the thousand costs the other tenants'
        // decisions one closing per batch, not one each. When the gate can be had
        // within a millisecond (decisions hold it for microseconds, unless one waits
        // for room in a full log queue) and no such job waits there, the work is done
        // here instead, as the request is read: in its connection's order with the
        // requests after it (a `balance` or a response sent right after a grant sees
        // the grant), and without a wake-up of the barrier's thread.
        let job = move || {
            let mut receipts = Vec::with_capacity(n);
            let mut refused = None;
            for i in 0..n {
                match f(&engine.inner.ledger, i) {
                    Ok(r) => receipts.push(r),
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            let money: Vec<crate::ledger::LedgerEvent> =
                receipts.iter().filter(|r| !r.replayed).map(|r| r.event.clone()).collect();
            if money.is_empty() {
                engine.after_durable(Box::new(move |r| {
                    let _ = tx.send((r, receipts, refused));
                }));
            } else {
                engine.inner.metrics.money(&tenant, &money);
                let mut stream = Vec::new();
                record::money_stream_events(&money, &mut stream);
                let rec = WalRecord::Ledger { tenant: tenant.clone(), money };
                engine.append_then_publish(&tenant, &rec, stream, move |r| {
                    let _ = tx.send((r, receipts, refused));
                });
            }
        };
        let barrier = &self.inner.read_barrier;
        let wait = std::time::Duration::from_millis(1);
        match barrier.idle_for_exclusive().then(|| self.inner.gate.try_write_for(wait)).flatten() {
            Some(closed) => {
                job();
                drop(closed);
            }
            None => barrier.exclusive(Box::new(job)),
        }
        let (durable, receipts, refused) = rx.await.map_err(|_| ApiError::unavailable("WAL closed"))?;
        durable?;
        match refused {
            Some(e) => Err(ledger_api_error(e)),
            None => Ok(receipts),
        }
    }

    /// One order-request command (R25-R27): decide on the tenant's book, log the
    /// facts, apply them, answer once durable.
    pub async fn order(&self, tenant: &TenantId, cmd: OrderCommand) -> Result<OrderReply, ApiError> {
        let t =
            self.tenant(tenant).ok_or_else(|| ApiError::new("unknown_tenant", "tenant is not configured"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let _g = self.inner.gate.read();
            let mut book = t.orders.lock();
            match book.decide(self.inner.clock.now(), &cmd) {
                // Refused on the book in memory, which may hold facts still on their
                // way to the disk (a cancel in flight makes a completion
                // `illegal_transition`): answered once those are durable, `unavailable`
                // if they never become so (as the shards' refusals are).
                Err(refusal) => {
                    let refusal: ApiError = refusal.into();
                    self.after_durable(Box::new(move |durable| {
                        let _ = tx.send(Err(durable.err().unwrap_or(refusal)));
                    }));
                }
                Ok(decision) if decision.events.is_empty() => {
                    let reply = decision.reply;
                    self.after_durable(Box::new(move |r| {
                        let _ = tx.send(r.map(|_| reply));
                    }));
                }
                Ok(decision) => {
                    let reply = decision.reply;
                    let stream = order_stream(&mut book, &decision.events);
                    let rec = WalRecord::Orders { tenant: tenant.clone(), events: decision.events };
                    self.append_then_publish(tenant, &rec, stream, move |r| {
                        let _ = tx.send(r.map(|_| reply));
                    });
                }
            }
        }
        rx.await.map_err(|_| ApiError::unavailable("WAL closed"))?
    }

    /// The tenant's order tick (R26 expiries, forgetting ended chains): ticks again
    /// while the book still has something due, as one tick records a bounded number
    /// (so that one record stays small), up to [`MAX_ORDER_TICKS`] records a round. Run
    /// once a minute, a single bounded tick fell behind a tenant ending more chains
    /// than it forgets a minute, and its book grew for ever.
    pub async fn order_tick(&self, tenant: &TenantId) -> Result<(), ApiError> {
        let Some(t) = self.tenant(tenant) else { return Ok(()) };
        for _ in 0..MAX_ORDER_TICKS {
            self.order(tenant, OrderCommand::Tick).await?;
            let now = self.inner.clock.now();
            if t.orders.lock().next_deadline().is_none_or(|due| due > now) {
                break;
            }
        }
        Ok(())
    }

    /// The local date of the Monday that starts the week of `now` in the tenant's
    /// time zone: the key of that week's recharge (R20), so it happens once per local
    /// week whatever the UTC offset (DST changes included).
    fn week_of(&self, tenant: &TenantId, now: Millis) -> Option<chrono::NaiveDate> {
        let today = self.day_of(tenant, now)?;
        Some(today - chrono::Duration::days(i64::from(today.weekday().num_days_from_monday())))
    }

    /// The start of the tenant's next local week after `now` (the next Monday 00:00
    /// in its time zone): when the weekly recharge is due (R20), and until when what
    /// a recharge now tops up may be spent.
    fn week_end(&self, tenant: &TenantId, now: Millis) -> Option<Millis> {
        let monday = self.week_of(tenant, now)?;
        self.local_midnight(tenant, monday + chrono::Duration::days(7))
    }

    /// When the housekeeping is next due beyond its every minute: the earliest start
    /// of a local week of any tenant (R20's weekly recharge), or end of an auto-buy
    /// pause (R24's resume, which recharges), after now. Run then, a recharge is made
    /// within moments of its time, not up to a minute late. Looks through the
    /// directory for the pauses (call it after each housekeeping); pauses set since are
    /// noted as they are set.
    ///
    /// `after`: the time the last housekeeping started (what passed while it ran is
    /// still due, and comes back as a time already past, run at once).
    pub fn next_housekeeping_at(&self, after: Millis) -> Option<Millis> {
        // Taken before the directory is read: a pause set meanwhile is either in the
        // directory or noted again (its change writes the directory after noting it).
        let noted = self.inner.pause_ends.swap(i64::MAX, Ordering::Relaxed);
        let pauses = self
            .inner
            .pros
            .iter()
            .flat_map(|e| {
                // A config switched off does not resume when its pause ends.
                let ends = e.value().autobuy.iter().filter(|c| c.active).filter_map(|c| c.paused_until);
                ends.collect::<Vec<_>>()
            })
            .chain((noted != i64::MAX).then_some(noted))
            .filter(|&t| t > after)
            .min();
        let weeks = self.tenants().iter().filter_map(|t| self.week_end(&t.id, after)).min();
        pauses.into_iter().chain(weeks).min()
    }

    /// [`Engine::next_housekeeping_at`], or the end of a pause set since it looked, if
    /// sooner.
    pub fn housekeeping_due(&self, looked: Option<Millis>) -> Option<Millis> {
        let set = self.inner.pause_ends.load(Ordering::Relaxed);
        let set = (set != i64::MAX).then_some(set);
        looked.into_iter().chain(set).min()
    }

    /// The local day of `now` in the tenant's time zone.
    fn day_of(&self, tenant: &TenantId, now: Millis) -> Option<chrono::NaiveDate> {
        let tz = self.tenant(tenant)?.cfg().policy.time_zone;
        Some(tz.timestamp_millis_opt(now).single()?.date_naive())
    }

    /// The first instant of local day `day` in the tenant's time zone (`None` if the
    /// tenant is unknown or the day is out of range).
    fn local_midnight(&self, tenant: &TenantId, day: chrono::NaiveDate) -> Option<Millis> {
        let tz = self.tenant(tenant)?.cfg().policy.time_zone;
        let midnight = day.and_hms_opt(0, 0, 0)?;
        // A day that starts inside a DST gap begins at the first instant after it.
        let start = tz.from_local_datetime(&midnight).earliest().or_else(|| {
            (1..=3).find_map(|h| tz.from_local_datetime(&(midnight + chrono::Duration::hours(h))).earliest())
        })?;
        Some(start.timestamp_millis())
    }

    /// Weekly recharge (R20) and resumed-pause recharge (R24) of every auto-buy
    /// budget of the tenant, then a retry of missed leads (R22) for every pro whose
    /// budget came back (recharged now, or refunded since the last housekeeping). Op
    /// ids make each recharge happen once: per local ISO week, per resume time.
    pub async fn housekeeping(&self, tenant: &TenantId) -> Result<(), ApiError> {
        if self.tenant(tenant).is_none() {
            return Ok(());
        }
        // R22 after a refund: a refund of an auto-buy spend (R12 guarantee, R23 invalid
        // contact) gives budget back, as a recharge does.
        let mut returned = self.take_returned(tenant);
        let now = self.inner.clock.now();
        if let Some(monday) = self.week_of(tenant, now) {
            let week_start = self.local_midnight(tenant, monday);
            let until = self.week_end(tenant, now);
            let pros: Vec<Arc<Pro>> = self
                .inner
                .pros
                .iter()
                .filter(|e| &e.key().0 == tenant && !e.value().autobuy.is_empty())
                .map(|e| e.value().clone())
                .collect();
            for pro in pros {
                let mut recharged = false;
                for cfg in pro.autobuy.iter().filter(|c| c.is_buying(now)) {
                    let name = BudgetName::new(&cfg.name);
                    let Some(b) = self.inner.ledger.budget(tenant, &pro.id, &name) else { continue };
                    let mut ops = vec![OpId::weekly_recharge(&pro.id, &name, monday)];
                    // A pause that ended before this week's Monday needs no resume
                    // now: this week's recharge tops the budget up. Retrying only this
                    // week's resumes keeps the retried ids among those a budget
                    // remembers (`KEPT_RECHARGE_OPS`), however long a past
                    // `paused_until` stays in the profile.
                    if cfg.paused_until.is_some_and(|t| week_start.is_none_or(|w| t >= w)) {
                        ops.push(resume_op(&pro.id, cfg, now, None));
                    }
                    // Done already (every run after the first of the week): no
                    // closing of the gate, no wait for the log, for each of possibly
                    // many thousands of configs a minute.
                    if ops.iter().all(|op| self.inner.ledger.budget_knows(tenant, &pro.id, &name, op)) {
                        continue;
                    }
                    // The week's recharge and a resume in one closing of the gate: a
                    // spend between them would be topped up again (R20).
                    let (t, p) = (tenant.clone(), pro.id.clone());
                    let rs = self
                        .ledger_ops(tenant, ops.len(), move |l, i| {
                            l.recharge_until(ops[i].clone(), &t, &p, &name, until)
                        })
                        .await?;
                    // Budget back: a recharge of a budget that was spent, or that had
                    // nothing to spend since the week began (its pro skipped and parked
                    // by every lead since, R20), or a paused config buying again (its
                    // pro may be parked because every config buying before was spent,
                    // R24: nothing else would tell its shards).
                    let resumed = rs.get(1).is_some_and(|r| !r.replayed);
                    let short = b.available < b.weekly_budget || b.stale_at(now);
                    recharged |= resumed || (rs.iter().any(|r| !r.replayed) && short);
                }
                if recharged {
                    returned.push(pro.id.clone());
                }
            }
        }
        self.retry_for_returned_budgets(tenant, returned).await
    }

    /// The pros of `tenant` queued for an R22 retry since the last one.
    fn take_returned(&self, tenant: &TenantId) -> Vec<ProId> {
        let mut q = self.inner.budget_returned.lock();
        let (mine, others): (Vec<_>, Vec<_>) = q.drain(..).partition(|(t, _)| t == tenant);
        *q = others;
        mine.into_iter().map(|(_, p)| p).collect()
    }

    /// Retries, for every tenant, the leads missed by the pros whose budget a refund
    /// gave back since the last retry (R22 after R12/R23), without the weekly
    /// recharges of [`Engine::housekeeping`]. The server runs it about a second after
    /// [`Engine::budget_returned`] wakes (batching the refunds of that second), on the
    /// wall clock; on the manual clock `advance_clock` does.
    pub async fn retry_refunded(&self) -> Result<(), ApiError> {
        for t in self.tenants().into_iter().map(|t| t.id.clone()) {
            let pros = self.take_returned(&t);
            if !pros.is_empty() {
                self.retry_for_returned_budgets(&t, pros).await?;
            }
        }
        Ok(())
    }

    /// Resolves once a refund has queued a pro for an R22 retry since the last call
    /// (or at once, if one did while no one was waiting).
    pub async fn budget_returned(&self) {
        self.inner.budget_notify.notified().await
    }

    /// R22: tells each shard of `pros` that their budget came back, all of a shard's
    /// pros in one command, so the shard hands the leads they missed out in rotation
    /// order (not in the order the budgets came back: see `Shard::decide`). If a shard
    /// refuses (`overloaded`), its pros and those of the shards not told yet go back in
    /// the queue for the next retry.
    async fn retry_for_returned_budgets(
        &self,
        tenant: &TenantId,
        mut pros: Vec<ProId>,
    ) -> Result<(), ApiError> {
        pros.sort_unstable();
        pros.dedup();
        let mut by_shard: std::collections::BTreeMap<ShardKey, Vec<ProId>> = Default::default();
        for pro in pros {
            let Some(profile) =
                self.inner.pros.get(&(tenant.clone(), pro.clone())).map(|e| e.value().clone())
            else {
                continue;
            };
            for key in Self::pro_shards(&profile, tenant) {
                if self.inner.shards.contains_key(&key) {
                    by_shard.entry(key).or_default().push(pro.clone());
                }
            }
        }
        let mut shards = by_shard.into_iter();
        while let Some((key, pros)) = shards.next() {
            if let Err(e) = self.exec(key, Command::BudgetAvailable { pros: pros.clone() }).await {
                let mut q = self.inner.budget_returned.lock();
                q.extend(pros.into_iter().chain(shards.flat_map(|(_, p)| p)).map(|p| (tenant.clone(), p)));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sends `Tick` to every shard of a tenant (manual clock) and waits.
    async fn tick_tenant(&self, tenant: &TenantId) -> Result<(), ApiError> {
        let keys: Vec<ShardKey> =
            self.inner.shards.iter().filter(|e| &e.key().tenant == tenant).map(|e| e.key().clone()).collect();
        for key in keys {
            self.exec(key, Command::Tick).await?;
        }
        Ok(())
    }

    /// Writes a snapshot of everything; returns the WAL seq it covers.
    ///
    /// Requests wait only while the cut is taken: the gate is closed for the WAL sync,
    /// the ledger's accounts, a reference to every shard's state (copy on write: a
    /// shard decided on while the snapshot still holds it is copied by that decision,
    /// once) and the streams' counters and replay buffers. The lead index is read, and
    /// everything is encoded and written, after the gate reopens.
    pub fn snapshot(&self) -> Result<u64, WalError> {
        self.snapshot_then(|| {})
    }

    /// [`Engine::snapshot`], calling `after_cut` on this thread once the gate has
    /// reopened, before the encoding and the write (the background snapshot lowers
    /// its thread's priority there: the cut itself, with every decision waiting for
    /// it, runs at full priority).
    pub fn snapshot_then(&self, after_cut: impl FnOnce()) -> Result<u64, WalError> {
        self.snapshot_marked(after_cut, true)
    }

    /// A snapshot as a release before 2026-12-07 wrote it: without the mark that its
    /// ledger forgot each forgotten lead's op ids, so a start from it makes the pass
    /// over the ledger that such a snapshot needs. For upgrade tests only.
    #[doc(hidden)]
    pub fn snapshot_as_before_lead_ops_forgotten(&self) -> Result<u64, WalError> {
        self.snapshot_marked(|| {}, false)
    }

    fn snapshot_marked(&self, after_cut: impl FnOnce(), lead_ops_forgotten: bool) -> Result<u64, WalError> {
        let started = Instant::now();
        let (covers, snap) = {
            let _g = self.inner.gate.write();
            // Every record appended before the gate closed is now written and its
            // callbacks (stream publication) have run.
            let covers = self.inner.wal.sync()?;
            // Read inside the cut: a tenant added by a reload is in it with all its
            // events, or has none before it.
            let tenants = self.tenants();
            let snap = EngineSnapshot {
                ledger: self.inner.ledger.snapshot(),
                shards: self.inner.shards.iter().map(|e| e.value().state.lock().clone()).collect(),
                directory: self.inner.pros.iter().map(|e| (e.key().0.clone(), e.value().clone())).collect(),
                lead_index: Vec::new(),
                hub_next_seq: tenants.iter().map(|t| (t.id.clone(), t.hub.next_seq())).collect(),
                hub_buffer: tenants.iter().map(|t| (t.id.clone(), t.hub.buffered_shared())).collect(),
                orders: tenants.iter().map(|t| (t.id.clone(), t.orders.lock().clone())).collect(),
                clock_ms: self.inner.clock.now(),
                policies: Vec::new(),
                lead_ops_forgotten,
            };
            let policies: Vec<_> = tenants.iter().map(|t| (t.id.clone(), t.cfg().policy.clone())).collect();
            (covers, (snap, policies))
        };
        let (mut snap, policies) = snap;
        snap.policies = policies.into_iter().map(|(t, p)| (t, p.to_toml())).collect();
        let paused = started.elapsed();
        after_cut();
        // Growing a buffer of hundreds of MB by doubling copies it about twice over and
        // faults in every page again: most of the encoding's time. Sized from the last
        // snapshot (state grows between two, hence the margin) it is written once.
        let last = self.inner.last_snapshot_bytes.load(Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(last + last / 4 + (1 << 20));
        rmp_serde::encode::write(&mut bytes, &snap)
            .expect("engine state is plain data and always serialises");
        self.inner.last_snapshot_bytes.store(bytes.len(), Ordering::Relaxed);
        drop(snap);
        // The streams' history up to the cut is made durable before the snapshot that
        // starts after it (`spill::Spill::sync`): after a power cut it then joins the
        // stream recovered from this snapshot. Best effort, like the history itself.
        let paced = !self.is_stopping();
        for t in self.tenants() {
            if let Some(sp) = t.hub.spill() {
                if let Err(e) = sp.sync(paced) {
                    tracing::warn!(tenant = %t.id, error = %e, "stream history not synced; after a power cut it may restart");
                }
            }
        }
        // Paced while requests are acknowledged (their syncs must not queue behind
        // hundreds of MB); once stopping (the final snapshot) nothing waits for the
        // log, and pacing would only stretch the shutdown towards its deadline.
        self.inner.wal.write_snapshot_paced(covers, &bytes, paced)?;
        self.inner.metrics.snapshot(started.elapsed(), paused);
        tracing::debug!(covers, bytes = bytes.len(), paused_ms = paused.as_millis() as u64, "snapshot");
        Ok(covers)
    }

    /// Graceful stop: refuse new requests, let mailboxes drain, sync, snapshot.
    pub async fn shutdown(&self) -> Result<(), WalError> {
        self.inner.stopping.store(true, Ordering::Release);
        // A Tick queued behind everything else in each mailbox: when it is answered,
        // the mailbox is drained and the shard's due work done. Every shard is asked
        // first and the answers awaited after: their records share the log's group
        // commits (asked one after another, each cost a cross-thread hop and a sync,
        // and tens of thousands of shards ran past `shutdown_timeout_ms`).
        let addrs: Vec<_> = self.inner.shards.iter().filter_map(|h| h.timer.get().cloned()).collect();
        let mut answers = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // Past the mailbox's bound, as a stop must reach every shard; an actor
            // already stopped drops it, and its answer with it.
            addr.do_send(Exec { cmd: Command::Tick, reply: Some(tx), received: Instant::now() });
            answers.push(rx);
        }
        for rx in answers {
            let _ = rx.await;
        }
        // Stop the actors and hubs whatever happens to the final sync and snapshot: a
        // failed WAL must not leave threads running behind an embedding program.
        let result = self.inner.wal.sync().and_then(|_| self.snapshot().map(|_| ()));
        for t in self.tenants() {
            t.hub.close_all();
        }
        // Transit to disk before stopping: the history then joins the replay buffer
        // the final snapshot holds, and survives the restart.
        self.stop_spill_writer();
        if self.inner.own_arbiters {
            for a in &self.inner.arbiters {
                a.stop();
            }
        }
        result
    }

    /// Stops the stream-history thread after a last write of what is in transit.
    pub fn stop_spill_writer(&self) {
        self.inner.spill_stop.store(true, Ordering::Release);
        if let Some(h) = self.inner.spill_writer.lock().take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }

    /// Writes every tenant's evicted stream events to disk now (tests and tools; the
    /// spill thread does it every few milliseconds).
    pub fn drain_spills(&self) {
        for t in self.tenants() {
            if let Some(s) = t.hub.spill() {
                s.drain();
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    pub fn health(&self) -> Result<(), String> {
        match self.inner.wal.is_failed() {
            Some(r) => Err(format!("WAL failed: {r}")),
            None => Ok(()),
        }
    }

    /// Samples what is not counted on the hot path: WAL statistics and, once a minute,
    /// each tenant's fairness figure (every pro's offers in the last minute vs. its
    /// weight-entitled share of them, per shard: [`fairness`]). Called periodically by
    /// the server.
    pub fn observe(&self) {
        let st = self.inner.wal.stats();
        self.inner.metrics.m.wal.observe(&crate::telemetry::WalStatsLike {
            bytes_written: st.bytes_written,
            records: st.records,
            batches: st.batches,
            syncs: st.syncs,
            sync_interval_waits: st.interval_waits,
            sync_failures: st.sync_failures,
            segments_live: st.segments_live,
            segments_reused: st.segments_reused,
            spare_failures: st.spare_failures,
            snapshots_written: st.snapshots_written,
            durable_seq: self.inner.wal.durable_seq(),
            failed: st.failed,
        });
        for t in self.tenants() {
            if let (Some(sp), Some(tm)) = (t.hub.spill(), self.inner.metrics.tenant(&t.id)) {
                tm.stream_history_bytes.set(sp.disk_bytes() as f64);
                tm.stream_history_restarts.absolute(sp.stats.restarts.load(Ordering::Relaxed));
            }
        }
        let depth_max = self.inner.shards.iter().map(|e| e.value().depth.load(Ordering::Relaxed)).max();
        self.inner.metrics.m.mailbox_depth_max.set(depth_max.unwrap_or(0) as f64);
        self.inner.metrics.m.clock_behind.set(self.inner.clock.behind_ms() as f64 / 1000.0);
        let mut shares: FxHashMap<TenantId, Vec<(f64, f64)>> = FxHashMap::default();
        let mut parked: FxHashMap<TenantId, (usize, usize)> = FxHashMap::default();
        // A shard busy now is left out of this second's figures (its tenant's gauges
        // keep their last values): a decision waiting for room in a full log queue
        // holds its shard's lock for as long as the disk stalls, and the figures of
        // the others must not wait for it.
        let mut busy: rustc_hash::FxHashSet<TenantId> = Default::default();
        // The fairness figure once per window (`fairness::WINDOW`), over that window.
        let mut window = self.inner.fairness.lock();
        let judge = window.due(Instant::now());
        if judge {
            window.restart(Instant::now());
        }
        for e in self.inner.shards.iter() {
            let Some(s) = e.value().state.try_lock() else {
                busy.insert(e.key().tenant.clone());
                continue;
            };
            let (budget, all) = (s.budget_parked_pros(), s.parked_pros());
            let p = parked.entry(e.key().tenant.clone()).or_default();
            p.0 += budget;
            p.1 += all - budget;
            if judge {
                let judged = window.shard(e.key(), s.fairness_inputs());
                if !judged.is_empty() {
                    shares.entry(e.key().tenant.clone()).or_default().extend(judged);
                }
            }
        }
        drop(window);
        if judge {
            for t in self.tenants().into_iter().filter(|t| !busy.contains(&t.id)) {
                if let Some(tm) = self.inner.metrics.tenant(&t.id) {
                    tm.observe_fairness(shares.remove(&t.id).unwrap_or_default());
                }
            }
        }
        for t in self.tenants().into_iter().filter(|t| !busy.contains(&t.id)) {
            if let Some(tm) = self.inner.metrics.tenant(&t.id) {
                let (budget, unavailable) = parked.get(&t.id).copied().unwrap_or_default();
                tm.pros_parked_budget.set(budget as f64);
                tm.pros_parked_unavailable.set(unavailable as f64);
                let shards = t.shards.load(Ordering::Relaxed);
                tm.shards.set(shards as f64);
                tm.shards_used.set(shards as f64 / self.inner.cfg.raw.max_shards_per_tenant as f64);
            }
        }
    }
}

/// A publish of a lead id into one shard, under way: until it is dropped, a publish of
/// the same id into another shard is refused (R1). Without it two publishes racing on
/// two workers both passed the lead index's check (the index names a lead once its
/// shard has decided) and both shards accepted the id; the index then named one of
/// them, and the first to forget the lead forgot the other's money op ids. Held from
/// before the index is checked until the shard has answered (its decision indexed),
/// so a later publish meets either the claim or the index.
struct PublishClaim<'a> {
    map: &'a DashMap<(TenantId, LeadId), (ShardKey, u32), FxBuildHasher>,
    id: (TenantId, LeadId),
}

impl<'a> PublishClaim<'a> {
    /// `None` when a publish of `lead` into another shard is under way.
    fn take(
        map: &'a DashMap<(TenantId, LeadId), (ShardKey, u32), FxBuildHasher>,
        tenant: &TenantId,
        lead: &LeadId,
        key: &ShardKey,
    ) -> Option<Self> {
        let id = (tenant.clone(), lead.clone());
        match map.entry(id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(mut e) => {
                if e.get().0 != *key {
                    return None;
                }
                e.get_mut().1 += 1;
            }
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert((key.clone(), 1));
            }
        }
        Some(Self { map, id })
    }
}

impl Drop for PublishClaim<'_> {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.id, |_, (_, n)| {
            *n -= 1;
            *n == 0
        });
    }
}

/// Decodes a snapshot's body and restores it as a start would, with every tenant it
/// names configured under the default policy, then checks the invariants of the
/// ledger, every shard and every order book. For the `engine_snapshot` fuzz target
/// and the decoder tests: damaged bytes must be refused or restored into a state
/// whose invariants hold (an `Err` names which), never panic.
#[doc(hidden)]
pub fn restore_snapshot_checked(bytes: &[u8]) -> Result<(), String> {
    let s = rmp_serde::from_slice::<EngineSnapshot>(bytes).map_err(|e| e.to_string())?;
    let policies: FxHashMap<TenantId, Arc<crate::core::Policy>> = s
        .ledger
        .tenants()
        .chain(s.shards.iter().map(|sh| &sh.key.tenant))
        .chain(s.policies.iter().map(|(t, _)| t))
        .map(|t| (t.clone(), Arc::new(crate::core::Policy::shared_default("fuzz"))))
        .collect();
    let mut rec = Recovering { ledger: Some(Ledger::new()), ..Default::default() };
    restore_snapshot(&mut rec, s, &policies);
    if let Some(e) = rec.error {
        return Err(e.to_string());
    }
    rec.ledger.as_ref().expect("restored").check_invariants().map_err(|e| e.to_string())?;
    for shard in rec.shards.values() {
        shard.check_invariants()?;
    }
    for book in rec.orders.values() {
        book.check_invariants()?;
    }
    Ok(())
}

fn restore_snapshot(
    rec: &mut Recovering,
    s: EngineSnapshot,
    policies: &FxHashMap<TenantId, Arc<crate::core::Policy>>,
) {
    // A tenant the configuration no longer names: the start is refused, so that
    // nothing of it is dropped by the next snapshot.
    let unknown = s
        .ledger
        .tenants()
        .chain(s.shards.iter().map(|sh| &sh.key.tenant))
        .chain(s.directory.iter().map(|(t, _)| t))
        .chain(s.hub_next_seq.iter().map(|(t, _)| t))
        .chain(s.orders.iter().map(|(t, _)| t))
        .filter(|t| !policies.contains_key(*t))
        .map(|t| t.to_string());
    rec.unconfigured.extend(unknown);
    rec.policies.clear();
    for (tenant, text) in &s.policies {
        match crate::core::Policy::from_toml(text) {
            Ok(p) => {
                rec.policies.insert(tenant.clone(), Arc::new(p));
            }
            Err(e) => {
                rec.error = Some(StartError::Snapshot(format!("the policy of tenant {tenant}: {e}")));
                return;
            }
        }
    }
    rec.ledger = Some(Ledger::restore(s.ledger));
    rec.shards.clear();
    for shard in s.shards {
        let mut shard = Arc::try_unwrap(shard).unwrap_or_else(|shared| (*shared).clone());
        if let Some(p) = rec.policies.get(&shard.key.tenant).or_else(|| policies.get(&shard.key.tenant)) {
            shard.restore(p.clone());
            rec.shards.insert(shard.key.clone(), shard);
        }
    }
    // A snapshot of a release that never forgot a lead's op ids still holds those of
    // leads its shards forgot: they go now, before the log after the cut is replayed
    // (whose `LeadForgotten` events forget theirs as they are applied).
    if !s.lead_ops_forgotten {
        // Such a snapshot holds a copy of the lead index: a quick first look (the
        // index of the start is rebuilt from the shards after the replay).
        let index = LeadIndex::from_entries(s.lead_index);
        let ledger = rec.ledger.as_ref().expect("restored above");
        let forgotten = money::forget_ops_of_leads_not_held(ledger, &index, &rec.shards);
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                "op ids of leads forgotten before this release, forgotten in the ledger"
            );
        }
    }
    rec.directory = s.directory.into_iter().map(|(t, p)| ((t, p.id.clone()), p)).collect();
    rec.hub_next = s.hub_next_seq.into_iter().collect();
    rec.hub_buffer = s.hub_buffer.into_iter().collect();
    rec.orders = s.orders.into_iter().collect();
    rec.hub_events.clear();
    rec.latest_ms = rec.latest_ms.max(s.clock_ms);
}

/// Order ticks in one round of [`Engine::order_tick`]: 64 x (4,096 expiries + 1,024
/// chains forgotten) a minute, far beyond what a tenant ends; the round ends there so
/// that one tenant's backlog does not hold up the others' housekeeping.
const MAX_ORDER_TICKS: usize = 64;

/// Applies order facts to `book`, in order, and returns their stream events, each
/// naming the pro it is about as the book held it just before (live and in replay
/// alike, so a replayed event is the one published).
fn order_stream(book: &mut OrderBook, facts: &[crate::core::orders::OrderEvent]) -> Vec<StreamEvent> {
    facts
        .iter()
        .map(|fact| {
            let pro = book.pro_of(fact);
            book.apply(fact);
            StreamEvent::Order { fact: fact.clone(), pro }
        })
        .collect()
}

/// Replays `r`, holding back the records of a split decision until its last one
/// (`record::Part`), so a decision is applied whole or not at all: a crash between two
/// of its records leaves none applied, as if it had not been decided.
fn replay_whole_decisions(
    rec: &mut Recovering,
    seq: u64,
    r: WalRecord,
    policies: &FxHashMap<TenantId, Arc<crate::core::Policy>>,
) {
    if let WalRecord::Shard { key, part, .. } = &r {
        let part = *part;
        // The next record of a shard whose split decision is held either continues it
        // or shows it was cut off (live, the shard's lock is held from its first
        // record to its last).
        let cut_off = rec.held.get(key).is_some_and(|(group, _)| part.map(|p| p.group) != Some(*group));
        if cut_off {
            let (group, parts) = rec.held.remove(key).expect("held");
            let key = key.clone();
            drop_unfinished(rec, &key, group, parts.len());
        }
        match part {
            Some(p) if !p.last => {
                let key = key.clone();
                rec.held.entry(key).or_insert_with(|| (p.group, Vec::new())).1.push((seq, r));
                return;
            }
            Some(_) => {
                if let Some((_, parts)) = rec.held.remove(key) {
                    for (seq, part) in parts {
                        replay_record(rec, seq, part, policies);
                    }
                }
            }
            None => {}
        }
    }
    replay_record(rec, seq, r, policies);
}

fn drop_unfinished(rec: &mut Recovering, key: &ShardKey, group: u64, parts: usize) {
    tracing::warn!(
        shard = %key,
        group,
        records = parts,
        "a decision logged in several records was cut off before its last; its records are not applied"
    );
    rec.dropped_parts += parts;
}

fn replay_record(
    rec: &mut Recovering,
    seq: u64,
    r: WalRecord,
    policies: &FxHashMap<TenantId, Arc<crate::core::Policy>>,
) {
    let tenant = match &r {
        WalRecord::Shard { key, .. } => &key.tenant,
        WalRecord::Ledger { tenant, .. }
        | WalRecord::Orders { tenant, .. }
        | WalRecord::ProDirectory { tenant, .. }
        | WalRecord::Policy { tenant, .. } => tenant,
    };
    if !policies.contains_key(tenant) {
        // The start is refused once replay ends (every such tenant named at once).
        rec.unconfigured.insert(tenant.to_string());
        return;
    }
    // The policy this tenant's decisions were made with at this point of the log.
    let policy = rec.policies.get(tenant).unwrap_or(&policies[tenant]).clone();
    let policy = &policy;
    let ledger = rec.ledger.as_ref().expect("set before replay");
    match r {
        WalRecord::Shard { key, events, money, .. } => {
            let shard =
                rec.shards.entry(key.clone()).or_insert_with(|| Shard::new(key.clone(), policy.clone()));
            let stream = rec.hub_events.entry(key.tenant.clone()).or_default();
            for ev in &events {
                rec.latest_ms = rec.latest_ms.max(ev.at().unwrap_or(0));
            }
            rec.budget_returned.extend(actor::budget_refunds(&key.tenant, &events));
            // The money first, as live (executed before the events are applied): a
            // lead forgotten in this record forgets its ops after its last facts.
            for m in &money {
                ledger.apply(m);
            }
            actor::replay_into(shard, ledger, &key.tenant, &events, stream);
            record::money_stream_events(&money, stream);
        }
        WalRecord::Ledger { tenant, money } => {
            for m in &money {
                ledger.apply(m);
            }
            record::money_stream_events(&money, rec.hub_events.entry(tenant).or_default());
        }
        WalRecord::Orders { tenant, events } => {
            let book = rec.orders.entry(tenant.clone()).or_insert_with(|| OrderBook::new(policy));
            // Their times hold rota's clock too (the floor after a restart).
            rec.latest_ms = events.iter().map(|e| e.at()).fold(rec.latest_ms, Millis::max);
            let events = order_stream(book, &events);
            rec.hub_events.entry(tenant).or_default().extend(events);
        }
        WalRecord::ProDirectory { tenant, pro, profile } => match profile {
            Some(p) => {
                rec.directory.insert((tenant, pro), p);
            }
            None => {
                rec.directory.remove(&(tenant, pro));
            }
        },
        WalRecord::Policy { tenant, policy } => {
            let p = match crate::core::Policy::from_toml(&policy) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    rec.error = Some(StartError::Record {
                        seq,
                        reason: format!("the policy of tenant {tenant}: {e}"),
                    });
                    return;
                }
            };
            // What [`Engine::set_tenant_configs`] did at this point, in the same order.
            for (_, shard) in rec.shards.iter_mut().filter(|(k, _)| k.tenant == tenant) {
                shard.set_policy(p.clone());
            }
            if let Some(book) = rec.orders.get_mut(&tenant) {
                book.set_policy(&p);
            }
            rec.policies.insert(tenant, p);
        }
    }
}

/// The op id of the recharge (R24) of auto-buy config `cfg` of `pro` resuming, when it
/// is buying at `now`: one resume, one id, whoever sees it first. A pause that ends by
/// itself at `paused_until`, or ends early because an upsert moved `paused_until` into
/// the past, is keyed on that time, by the upsert ([`Engine::sync_budget`]) and by
/// every later [`Engine::housekeeping`] alike (keyed on the upsert's time, the same
/// resume recharged twice). A pause lifted by removing `paused_until` leaves
/// housekeeping nothing to recharge. Nor does one lifted by setting `active` again:
/// these are keyed on `today`, the local day of the upsert (R20: "on the day a paused
/// config becomes active again"), so the same change sent again after it was cut off
/// midway is a repeat (keyed on the time, it was a second top-up), and a config
/// switched off and on several times in a day is topped up once that day. (On the
/// time, when the tenant's day is unknown.)
///
/// A config reactivated with a `paused_until` whose resume was already recharged is
/// not recharged again: the id cannot tell it from a repeat of that resume, and a
/// missed top-up only delays spending, where a second one would overshoot the week's
/// budget.
fn resume_op(pro: &ProId, cfg: &AutoBuyConfig, now: Millis, today: Option<chrono::NaiveDate>) -> OpId {
    debug_assert!(cfg.is_buying(now), "only a buying config resumes");
    let name = BudgetName::new(&cfg.name);
    match (cfg.paused_until, today) {
        (Some(t), _) => OpId::resume(pro, &name, t),
        (None, Some(day)) => OpId::reactivated(pro, &name, day),
        (None, None) => OpId::resume(pro, &name, now),
    }
}

/// An amount of credits from the wire: at most [`crate::core::MAX_CREDITS`] (far from
/// `u64` overflow when summed over millions of operations).
fn at_most_max_credits(field: &str, credits: u64) -> Result<(), Reject> {
    if credits > crate::core::MAX_CREDITS {
        let reason = format!("must be at most {}", crate::core::MAX_CREDITS);
        return Err(Reject::from(crate::core::field_err(field, reason)));
    }
    Ok(())
}

fn unexpected(r: CoreReply) -> ApiError {
    ApiError::new("internal", format!("unexpected reply {r:?}"))
}

pub fn wal_api_error(e: WalError) -> ApiError {
    match e {
        WalError::Full => ApiError::overloaded(50),
        other => ApiError::unavailable(format!("not durable: {other}")),
    }
}

pub fn ledger_api_error(e: LedgerError) -> ApiError {
    let code = match &e {
        LedgerError::InsufficientCredits { .. } => "insufficient_credits",
        LedgerError::BudgetExhausted { .. } => "budget_exhausted",
        LedgerError::OpConflict { .. } => "idempotency_conflict",
        LedgerError::InvalidAmount { .. } | LedgerError::AmountOverflow { .. } => "invalid_field",
        _ => "ledger_refused",
    };
    let mut err = ApiError::new(code, e.to_string());
    err.field = match &e {
        LedgerError::InvalidAmount { field } => Some(wire_field(field).into()),
        // Only a grant adds to a balance: the request's `credits` overflow it.
        LedgerError::AmountOverflow { .. } => Some("credits".into()),
        _ => None,
    };
    err
}

/// The request field a ledger amount comes from, for `invalid_field` errors: the
/// ledger names its own parameters (`topup_rule.threshold`), a client needs the name
/// it sent (`rule.threshold_credits`).
fn wire_field(ledger_field: &'static str) -> &'static str {
    match ledger_field {
        // `grant_credits`' amount (the only ledger amount taken from a request as is).
        "amount" => "credits",
        "topup_rule.threshold" => "rule.threshold_credits",
        "topup_rule.amount" => "rule.amount_credits",
        "weekly_budget" => "pro.autobuy.weekly_budget_credits",
        other => other,
    }
}

mod metrics_facade {
    //! The engine's measurements, through the pre-registered handles of
    //! [`crate::telemetry`] (no metric lookup by name on the hot path).
    use crate::core::shard::Event;
    use crate::ids::TenantId;
    use crate::ledger::LedgerEvent;
    use crate::telemetry::{Metrics, TenantMetrics};
    use parking_lot::RwLock;
    use rustc_hash::FxHashMap;
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Clone)]
    pub struct EngineMetrics {
        pub m: Arc<Metrics>,
        /// Per tenant; a reload that adds a tenant adds its series.
        tenants: Arc<RwLock<FxHashMap<TenantId, Arc<TenantMetrics>>>>,
    }

    impl EngineMetrics {
        pub fn new<'a>(tenants: impl IntoIterator<Item = &'a TenantId>) -> Self {
            let tenants =
                tenants.into_iter().map(|t| (t.clone(), Arc::new(TenantMetrics::new(t.as_str())))).collect();
            Self { m: Arc::new(Metrics::new()), tenants: Arc::new(RwLock::new(tenants)) }
        }
        pub fn add_tenant(&self, t: &TenantId) {
            self.tenants.write().entry(t.clone()).or_insert_with(|| Arc::new(TenantMetrics::new(t.as_str())));
        }
        pub fn tenant(&self, t: &TenantId) -> Option<Arc<TenantMetrics>> {
            self.tenants.read().get(t).cloned()
        }
        pub fn decide_seconds(&self, d: Duration) {
            self.m.decide_duration.record(d.as_secs_f64());
        }
        pub fn durable_seconds(&self, d: Duration) {
            self.m.ingest_to_durable.record(d.as_secs_f64());
        }
        pub fn delivered_seconds(&self, d: Duration) {
            self.m.ingest_to_delivery.record(d.as_secs_f64());
        }
        pub fn refused(&self, tenant: &TenantId, code: &'static str) {
            if let Some(t) = self.tenant(tenant) {
                t.responses_refused.get(code).increment(1);
            }
        }
        pub fn overloaded(&self, _tenant: &TenantId) {
            self.m.overload_refusals.get("mailbox_full").increment(1);
        }
        pub fn lead_received(&self, tenant: &TenantId) {
            if let Some(t) = self.tenant(tenant) {
                t.leads_received.increment(1);
            }
        }
        pub fn shards_alive(&self, n: usize) {
            self.m.shards_alive.set(n as f64);
        }
        pub fn recovered(&self, records: u64, d: Duration) {
            self.m.wal.record_recovery(d, records);
        }
        pub fn snapshot(&self, d: Duration, paused: Duration) {
            self.m.wal.snapshot_duration.record(d.as_secs_f64());
            self.m.wal.snapshot_pause.record(paused.as_secs_f64());
        }
        /// Counts the events of one record of a shard decision (records of a shard
        /// come in the order they were decided), and the ledger facts executed for them.
        /// `first_offers`: the leads whose first offers these events make.
        pub fn events(&self, tenant: &TenantId, events: &[Event], money: &[LedgerEvent], first_offers: u64) {
            let Some(t) = self.tenant(tenant) else { return };
            // A lead counts once, at its first offer (its publish, else its release or a
            // retry): the caller tells them from the state before each event.
            t.leads_dispatched.increment(first_offers);
            for ev in events {
                let status = match ev {
                    Event::LeadRejected { reason, .. } => {
                        t.leads_rejected.get(reason.as_str()).increment(1);
                        None
                    }
                    Event::Offered { grants, .. } => {
                        for g in grants {
                            let kind = match g.kind {
                                crate::core::OfferKind::Direct => "direct",
                                crate::core::OfferKind::Generic => "generic",
                                crate::core::OfferKind::Match => "match",
                                crate::core::OfferKind::AutoBuy => "auto_buy",
                                crate::core::OfferKind::Contact => "contact",
                            };
                            t.offers_dispatched.get(kind).increment(1);
                        }
                        // One transition per offer made (none for a release that
                        // found nobody).
                        t.offer_transitions.get("new").increment(grants.len() as u64);
                        None
                    }
                    Event::OfferOpened { .. } => Some("opened"),
                    Event::Responded { .. } | Event::ProReplied { .. } => Some("replied"),
                    Event::Declined { .. } => Some("declined"),
                    Event::OfferExpired { .. } => Some("expired"),
                    Event::ClientReplied { .. } => Some("awaiting_response"),
                    Event::Completed { .. } => Some("completed"),
                    _ => None,
                };
                if let Some(s) = status {
                    t.offer_transitions.get(s).increment(1);
                }
            }
            self.money(tenant, money);
        }
        /// Offers a decision made inactive (R6, R7), counted from its stream events.
        pub fn offers_inactive(&self, tenant: &TenantId, n: u64) {
            if n > 0 {
                if let Some(t) = self.tenant(tenant) {
                    t.offer_transitions.get("inactive").increment(n);
                }
            }
        }
        pub fn money(&self, tenant: &TenantId, money: &[LedgerEvent]) {
            let Some(t) = self.tenant(tenant) else { return };
            let mut stream = Vec::new();
            super::record::money_stream_events(money, &mut stream);
            for s in stream {
                match s {
                    crate::protocol::StreamEvent::Credits { movement, credits, .. } => {
                        t.credits_moved.get(&movement).increment(credits)
                    }
                    crate::protocol::StreamEvent::TopupRequested { .. } => t.topups_requested.increment(1),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod publish_claim_tests {
    use super::*;
    use crate::ids::{CategoryId, ZoneId};

    fn key(zone: &str) -> ShardKey {
        ShardKey {
            tenant: TenantId::new("t"),
            zone: ZoneId::new(zone),
            category: CategoryId::new("painting"),
        }
    }

    /// R1: while a publish of a lead id into one shard is under way, a publish of the
    /// same id into another shard is refused and one into the same shard goes on (its
    /// shard answers the repeat); the id is free once every claim on it is dropped.
    #[test]
    fn r1_a_lead_id_under_way_in_one_shard_is_refused_to_another_until_it_is_done() {
        let map = DashMap::with_hasher(FxBuildHasher);
        let (t, l) = (TenantId::new("t"), LeadId::new("L1"));
        let first = PublishClaim::take(&map, &t, &l, &key("bologna")).expect("free");
        assert!(PublishClaim::take(&map, &t, &l, &key("milano")).is_none(), "another shard");
        let repeat = PublishClaim::take(&map, &t, &l, &key("bologna")).expect("the same shard");
        assert!(
            PublishClaim::take(&map, &TenantId::new("u"), &l, &key("milano")).is_some(),
            "another tenant"
        );
        drop(first);
        assert!(PublishClaim::take(&map, &t, &l, &key("milano")).is_none(), "the repeat still holds it");
        drop(repeat);
        assert!(PublishClaim::take(&map, &t, &l, &key("milano")).is_some(), "free again");
        assert!(map.is_empty(), "nothing left behind");
    }
}
