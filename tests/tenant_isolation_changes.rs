//! Changes of pros (`upsert_pro`, `remove_pro`, `set_availability`) run one at a time
//! per pro, each waiting for its turn on a lock stripe chosen by hashing its tenant and
//! pro. Every tenant has its own stripes: a tenant whose changes hold a stripe (slow
//! changes, each step waiting for a log sync) never delays another tenant's change, even
//! one whose pro hashes to the same stripe index. And a tenant has a bounded number of
//! changes in flight: beyond it, a change is refused `overloaded` before it is queued.
//!
//! The log's syncs are held (`MemFs::hold_syncs`) to keep a change in flight: its first
//! step is decided and applied in memory, and waits there for its sync. Everything else
//! runs on the test's one thread, so whether a change got to its first step is a fact
//! of the state in memory, not of timing.

mod engine_support;

use engine_support::{req, T0};
use rota::config::{Config, Sources};
use rota::engine::{Engine, MAX_PRO_CHANGES_PER_TENANT};
use rota::ids::{ProId, TenantId, ZoneId};
use rota::protocol::{ApiError, OkResult};
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::future::Future;
use std::task::Poll;

/// Tenants `alpha` and `beta`, both on the example `zaask` policy, in memory, on the
/// manual clock at [`T0`], every record synced.
fn config(dir: &std::path::Path) -> Config {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants");
    let policy = std::fs::read_to_string(root.join("zaask.toml")).unwrap();
    let mut text = format!(
        "data_dir = \"/mem\"\nclock = \"manual\"\nmanual_clock_start_ms = {T0}\nstream_spill_bytes = 0\n\
         [wal]\nfsync = \"always\"\n"
    );
    for t in ["alpha", "beta"] {
        std::fs::write(
            dir.join(format!("{t}.toml")),
            policy.replace("tenant = \"zaask\"", &format!("tenant = \"{t}\"")),
        )
        .unwrap();
        text += &format!("[[tenants]]\nid = \"{t}\"\npolicy = \"{t}.toml\"\n");
    }
    let path = dir.join("rota.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&Sources { file: Some(path), ..Default::default() })
        .expect("the test configuration is valid")
}

/// Runs `body` on an engine started on a fresh in-memory disk ([`config`]), with that
/// disk (to hold its syncs or inject faults into).
fn on_engine<Fut: std::future::Future<Output = ()>>(body: impl FnOnce(Engine, MemFs) -> Fut) {
    let dir = tempfile::tempdir().unwrap();
    engine_support::on_engine_with(config(dir.path()), body);
}

fn call(e: &Engine, tenant: &str, v: Value) -> impl Future<Output = Result<OkResult, ApiError>> + 'static {
    let e = e.clone();
    let tenant = TenantId::new(tenant);
    async move { e.request(&tenant, req(v)).await }
}

fn upsert(id: &str, zone: &str) -> Value {
    json!({"type": "upsert_pro", "pro": {"id": id, "categories": ["painting"], "zones": [zone]}})
}

/// The stripe index a change of `pro` of `tenant` waits on: the engine hashes the
/// tenant and the pro (FxHash, unseeded) modulo its 64 stripes. Before each tenant had
/// stripes of its own, all tenants shared those 64.
fn stripe(tenant: &str, pro: &str) -> usize {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one((&TenantId::new(tenant), &ProId::new(pro))) as usize % 64
}

/// Whether `pro` of `tenant` is in the rotation of `zone` x painting, in memory, with
/// its slot's availability at `at`: `None` when not there.
fn in_memory(e: &Engine, tenant: &str, zone: &str, pro: &str, at: i64) -> Option<bool> {
    let (_, shard) = e
        .shard_states()
        .into_iter()
        .find(|(k, _)| k.tenant == TenantId::new(tenant) && k.zone == ZoneId::new(zone))?;
    shard.pro(&ProId::new(pro)).map(|slot| slot.available(at).is_ok())
}

/// Lets the other tasks of this thread run until `done` holds; false if it still does
/// not after 10,000 turns (the tasks are all waiting for something else).
async fn runs_until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..10_000 {
        if done() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    done()
}

/// R16: tenant beta's pro goes on vacation while tenant alpha has a change in flight
/// on the same stripe index (its step waiting for a held sync). Beta's change takes its
/// first step at once (its pro is unavailable in the shard, in memory) instead of
/// waiting behind alpha's queue, and both complete once the sync goes ahead.
#[test]
fn r16_a_tenants_availability_change_does_not_wait_behind_another_tenants_changes_on_its_stripe() {
    on_engine(|e, fs| async move {
        call(&e, "beta", upsert("b1", "lisboa")).await.expect("beta's pro joins lisboa");
        assert_eq!(in_memory(&e, "beta", "lisboa", "b1", T0), Some(true));
        // An alpha pro whose change waits on beta's b1's stripe index.
        let a = (0..)
            .map(|i| format!("a{i}"))
            .find(|a| stripe("alpha", a) == stripe("beta", "b1"))
            .expect("some pro id hashes to that stripe");

        let hold = fs.hold_syncs();
        let alpha = actix_rt::spawn(call(&e, "alpha", upsert(&a, "porto")));
        assert!(
            runs_until(|| in_memory(&e, "alpha", "porto", &a, T0).is_some()).await,
            "alpha's change takes its first step and waits for the held sync"
        );
        let vacation = json!({"type": "set_availability", "pro": "b1",
                              "availability": {"vacation": [T0, T0 + 7 * 86_400_000]}});
        let beta = actix_rt::spawn(call(&e, "beta", vacation));
        assert!(
            runs_until(|| in_memory(&e, "beta", "lisboa", "b1", T0 + 60_000) == Some(false)).await,
            "beta's vacation waited behind alpha's change of {a} (stripe {}) instead of taking its \
             first step",
            stripe("beta", "b1")
        );
        assert!(!alpha.is_finished(), "alpha's change still waits for its sync");

        drop(hold);
        beta.await.unwrap().expect("beta's pro is on vacation");
        alpha.await.unwrap().expect("alpha's pro joins porto");
        assert_eq!(in_memory(&e, "beta", "lisboa", "b1", T0 + 60_000), Some(false), "R16: on vacation");
    });
}

/// A tenant with `MAX_PRO_CHANGES_PER_TENANT` changes of pros in flight (each waiting
/// for a held sync, or for its stripe) is refused `overloaded`, with a retry hint, for
/// one more, before it is queued; the refused change changed nothing, another tenant's
/// change is still admitted, and once the queue drains the same change goes through.
#[test]
fn changes_of_pros_past_a_tenants_bound_in_flight_are_refused_overloaded_before_queueing() {
    on_engine(|e, fs| async move {
        let hold = fs.hold_syncs();
        // Each polled once: admitted (and queued on its stripe, or running its first
        // step), then waiting for the held sync.
        let mut queued: Vec<_> = (0..MAX_PRO_CHANGES_PER_TENANT)
            .map(|i| Box::pin(call(&e, "alpha", upsert(&format!("p{i}"), "lisboa"))))
            .collect();
        for change in &mut queued {
            assert!(futures_util::poll!(change.as_mut()).is_pending(), "the syncs are held");
        }

        let mut one_more = std::pin::pin!(call(&e, "alpha", upsert("late", "lisboa")));
        let refused = match futures_util::poll!(one_more.as_mut()) {
            Poll::Ready(r) => r.expect_err("past the bound"),
            Poll::Pending => {
                panic!("a change past {MAX_PRO_CHANGES_PER_TENANT} in flight was queued instead of refused")
            }
        };
        assert_eq!(refused.code, "overloaded", "{refused:?}");
        assert!(refused.retry_after_ms.is_some_and(|ms| ms > 0), "{refused:?}");

        // Another tenant's change is admitted (it waits for the held sync, not refused).
        let mut other = std::pin::pin!(call(&e, "beta", upsert("b1", "lisboa")));
        assert!(futures_util::poll!(other.as_mut()).is_pending(), "beta's change is admitted");

        drop(hold);
        let answers = futures_util::future::join_all(queued).await;
        assert!(answers.iter().all(Result::is_ok), "{:?}", answers.iter().find(|a| a.is_err()));
        other.await.expect("beta's pro joins");
        // The refused upsert changed nothing: its pro is unknown; sent again, it joins.
        let unknown = call(&e, "alpha", json!({"type": "remove_pro", "pro": "late"})).await;
        assert_eq!(unknown.expect_err("never joined").code, "unknown_pro");
        call(&e, "alpha", upsert("late", "lisboa")).await.expect("the queue drained: admitted again");
        assert_eq!(in_memory(&e, "alpha", "lisboa", "late", T0), Some(true));
    });
}
