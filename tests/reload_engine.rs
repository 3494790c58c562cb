//! Configuration reload inside the engine (in-process, on the in-memory filesystem):
//! the paths the real binary cannot reach on demand.

mod engine_support;

use engine_support::in_system;
use rota::config::{Config, Sources};
use rota::engine::{Engine, ReloadError};
use rota::ids::TenantId;
use rota::wal::{Fault, MemFs};
use std::sync::Arc;

/// `rota.toml` in `dir` with tenant `acme`, whose policy is the example `zaask` one
/// with `offer_fanout` set to `fanout`.
fn config(dir: &std::path::Path, fanout: u32) -> Config {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants");
    let policy = std::fs::read_to_string(root.join("zaask.toml")).unwrap();
    let policy = policy.replace("tenant = \"zaask\"", "tenant = \"acme\"");
    assert!(policy.contains("offer_fanout = \"all\""));
    std::fs::write(
        dir.join("acme.toml"),
        policy.replace("offer_fanout = \"all\"", &format!("offer_fanout = {fanout}")),
    )
    .unwrap();
    let path = dir.join("rota.toml");
    std::fs::write(&path, "data_dir = \"/mem\"\n[[tenants]]\nid = \"acme\"\npolicy = \"acme.toml\"\n")
        .unwrap();
    Config::load(&Sources { file: Some(path), ..Default::default() })
        .expect("the test configuration is valid")
}

#[test]
fn r6a_a_policy_change_the_log_refuses_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(config(dir.path(), 3), handle).expect("starts");
        let acme = TenantId::new("acme");
        let fanout = |e: &Engine| e.tenant(&acme).unwrap().cfg().policy.offer_fanout;
        assert_eq!(fanout(&e), Some(3));
        // The disk fails the policy record's write: the reload is refused whole.
        fs.inject(Fault::WriteError);
        let err = e.reload(&config(dir.path(), 1)).expect_err("the log refused the record");
        assert!(matches!(err, ReloadError::Log(_)), "{err}");
        assert_eq!(fanout(&e), Some(3), "the running policy is the old one");
    });
}
