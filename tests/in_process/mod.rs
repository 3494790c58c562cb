//! The daemon run in the test's own process (`rota::server::run_with_seams`), for the
//! start and stop paths a child process cannot be held at: a replay held at a gate, an
//! in-memory disk whose syncs the test holds, periodic work stuck at a seam. One such
//! daemon per test binary: it installs the process's metrics recorder.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous bound on every wait: a daemon that never gets there fails the test instead
/// of hanging it. Never an assertion about speed.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The manual clock's start.
pub const T0: i64 = 1_764_000_000_000;

/// `GET path` on the admin port: (status, the whole response).
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("GET {path}: the admin port is closed: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {out:?}")), out)
}

/// Both ports on free loopback ports, data in `dir`, the manual clock at [`T0`], warn
/// logs, then `extra` settings (`key=value`, as `--set` takes them).
pub fn config(dir: &Path, extra: &[&str]) -> rota::config::Config {
    let mut flags = vec![
        "listen=\"127.0.0.1:0\"".to_string(),
        "admin_listen=\"127.0.0.1:0\"".to_string(),
        format!("data_dir={:?}", dir.display().to_string()),
        "clock=\"manual\"".to_string(),
        format!("manual_clock_start_ms={T0}"),
        "log_level=\"warn\"".to_string(),
    ];
    flags.extend(extra.iter().map(|f| f.to_string()));
    rota::config::Config::load(&rota::config::Sources { flags, ..Default::default() }).unwrap()
}

/// A daemon running on a thread of this process.
pub struct InProcess {
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    /// What `run_with_seams` returned (its exit status), once it has.
    pub exited: mpsc::Receiver<Result<i32, String>>,
}

impl InProcess {
    /// Starts the daemon with `hooks` (their `listening` is this helper's) and `seams`,
    /// and waits until both ports listen.
    pub fn start(
        cfg: rota::config::Config,
        mut hooks: rota::server::Hooks,
        seams: rota::server::Seams,
    ) -> Self {
        let (told, listening) = mpsc::channel();
        hooks.listening = Some(told);
        let (exit_tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = exit_tx.send(rota::server::run_with_seams(cfg, hooks, seams).map_err(|e| e.to_string()));
        });
        let (ws, admin) = listening.recv_timeout(DEADLINE).expect("both ports listen");
        InProcess { ws, admin, exited }
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let since = Instant::now();
        while get(self.admin, "/readyz").0 != 200 {
            assert!(since.elapsed() < DEADLINE, "never ready");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Hooks with only a stop the test sends.
pub fn stop_hook() -> (tokio::sync::oneshot::Sender<()>, rota::server::Hooks) {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let hooks = rota::server::Hooks {
        before_recovery: None,
        before_start: None,
        listening: None,
        stop: Some(stopped),
    };
    (stop, hooks)
}

/// Sends SIGTERM to this process (the daemon's handler takes it).
pub fn sigterm_self() {
    // SAFETY: kill with this process's own id and a signal number; no memory passed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
}
