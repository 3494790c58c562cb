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

/// A reload adding a tenant whose policy record the log refuses changes nothing: the
/// tenant is not open, and no stream history directory was made for it (the tenant
/// was opened before its record was logged).
#[test]
fn a_tenant_added_by_a_reload_the_log_refuses_is_not_opened() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(config(dir.path(), 3), handle).expect("starts");
        // The same file with a second tenant on the same policy file.
        let path = dir.path().join("rota.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}[[tenants]]\nid = \"beta\"\npolicy = \"acme.toml\"\n")).unwrap();
        let policy = std::fs::read_to_string(dir.path().join("acme.toml")).unwrap();
        std::fs::write(
            dir.path().join("beta.toml"),
            policy.replace("tenant = \"acme\"", "tenant = \"beta\""),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("id = \"beta\"\npolicy = \"acme.toml\"", "id = \"beta\"\npolicy = \"beta.toml\"");
        std::fs::write(&path, text).unwrap();
        let two = Config::load(&Sources { file: Some(path), ..Default::default() }).expect("valid");
        let streams =
            |fs: &MemFs| rota::wal::Fs::list(fs, std::path::Path::new("/mem/streams")).unwrap_or_default();
        let before = streams(&fs);
        fs.inject(Fault::WriteError);
        let err = e.reload(&two).expect_err("the log refused the record");
        assert!(matches!(err, ReloadError::Log(_)), "{err}");
        assert!(e.tenant(&TenantId::new("beta")).is_none(), "beta is not open");
        assert_eq!(streams(&fs), before, "no stream history opened for beta");
    });
}
