//! Shared helpers of the tests that run the whole [`rota::engine::Engine`] in-process
//! (on the in-memory filesystem): an actor system per life, and requests decoded from
//! JSON the daemon's way.

#![allow(dead_code)] // each test binary uses a different subset

use rota::config::{Config, Sources};
use rota::engine::hub::StreamHub;
use rota::protocol::{Encoding, Request, StreamEvent};
use serde_json::{json, Value};
use std::future::Future;
use std::path::Path;

/// Monday 2025-11-24 16:00 UTC: where [`acme_config`] starts the manual clock.
pub const T0: i64 = 1_764_000_000_000;

/// `rota.toml` in `dir` (data in memory, the manual clock at [`T0`], `fsync =
/// "always"`) with tenant `acme` on the example policy `config/tenants/{file}` (whose
/// tenant id is `name`), with `changes` applied to it: (`key`, value) to the first line
/// starting with `key = `, or a literal `key = value` line replaced as written.
pub fn acme_config(dir: &Path, file: &str, name: &str, changes: &[(&str, &str)]) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants");
    let mut policy =
        std::fs::read_to_string(root.join(file)).unwrap().replace(&format!("\"{name}\""), "\"acme\"");
    for (key, value) in changes {
        if key.contains(" = ") {
            assert!(policy.contains(key), "{key}");
            policy = policy.replace(key, value);
            continue;
        }
        let line = policy
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .expect("a key of the policy")
            .to_string();
        policy = policy.replacen(&line, &format!("{key} = {value}"), 1);
    }
    std::fs::write(dir.join("acme.toml"), policy).unwrap();
    let path = dir.join("rota.toml");
    let text = format!(
        "data_dir = \"/mem\"\nclock = \"manual\"\nmanual_clock_start_ms = {T0}\n[wal]\nfsync = \"always\"\n\
         [[tenants]]\nid = \"acme\"\npolicy = \"acme.toml\"\n"
    );
    std::fs::write(&path, text).unwrap();
    Config::load(&Sources { file: Some(path), ..Default::default() })
        .expect("the test configuration is valid")
}

/// Runs `fut` inside a fresh actix system, then stops that system, which stops the
/// engine's arbiters: an engine that lost power is abandoned, never shut down.
pub fn in_system<F: Future>(fut: F) -> F::Output {
    let sys = actix_rt::System::new();
    let out = sys.block_on(fut);
    sys.block_on(async { actix_rt::System::current().stop() });
    sys.run().expect("the actor system stops cleanly");
    out
}

/// Runs `body` on an engine started with `cfg` on a fresh in-memory disk, with that
/// disk (to hold its syncs or inject faults into).
pub fn on_engine_with<Fut: Future<Output = ()>>(
    cfg: Config,
    body: impl FnOnce(rota::engine::Engine, rota::wal::MemFs) -> Fut,
) {
    let fs = rota::wal::MemFs::new();
    in_system(async {
        let handle: std::sync::Arc<dyn rota::wal::Fs> = std::sync::Arc::new(fs.process_handle());
        let (e, _) = rota::engine::Engine::start_with_fs(cfg, handle).expect("starts");
        body(e, fs.clone()).await
    });
}

/// Tenant `acme`, which [`acme_config`] configures.
pub fn acme() -> rota::ids::TenantId {
    rota::ids::TenantId::new("acme")
}

/// Request `v` (as [`req`] decodes it) for tenant `acme`.
pub async fn send(
    e: &rota::engine::Engine,
    v: Value,
) -> Result<rota::protocol::OkResult, rota::protocol::ApiError> {
    e.request(&acme(), req(v)).await
}

/// [`send`], which must succeed (the request is named if it does not).
pub async fn ok(e: &rota::engine::Engine, v: Value) -> rota::protocol::OkResult {
    let what = v.to_string();
    send(e, v).await.unwrap_or_else(|err| panic!("{what}: {err:?}"))
}

/// A request as a frame would carry it (`{"type": ..., fields}`), decoded the daemon's way.
pub fn req(mut v: Value) -> Request {
    v["id"] = json!("t");
    let frame = serde_json::to_vec(&v).unwrap();
    rota::protocol::decode(rota::protocol::Encoding::Json, &frame)
        .unwrap_or_else(|e| panic!("test request {v} does not decode: {e:?}"))
        .request
}

/// Every event from the start of the tenant's stream, as a resume from 0 gets them:
/// the history on disk, then the in-memory buffer. `Err` when the resume is refused.
pub fn stream_from_start(hub: &StreamHub) -> Result<Vec<(u64, StreamEvent)>, String> {
    let spill = hub.spill().ok_or("the stream history is off")?;
    let mut seen: Vec<(u64, StreamEvent)> = Vec::new();
    let mut after = 0;
    loop {
        let chunk = spill
            .read_after(after, 1000, 1 << 20)
            .map_err(|lost| format!("resume after {after} refused: {lost:?}"))?;
        if chunk.is_empty() {
            let s = hub
                .subscribe(Some(after), None, 16, Encoding::Msgpack)
                .map_err(|e| format!("nothing on disk after {after} and the buffer refuses it: {e:?}"))?;
            seen.extend(s.backlog.iter().map(|o| (o.seq, o.event.clone())));
            hub.cancel(&s);
            return Ok(seen);
        }
        seen.extend(chunk.iter().map(|o| (o.seq, o.event.clone())));
        after = chunk.last().expect("not empty").seq;
    }
}
