//! The dashboard and alerts against a real Prometheus scraping a real rota.
//!
//! Starts `rota serve --demo` (synthetic traffic) on free loopback ports, then runs
//! `tests/observability/check.sh live <admin-url>`, which starts Prometheus, scrapes
//! rota, and evaluates every dashboard panel query and every alert expression.
//!
//! Needs `prometheus` and `promtool` (Debian package `prometheus`; `.ci/run` installs
//! it). Without them the test fails under CI (`CI` set) and is skipped otherwise, with
//! a message saying so.

mod e2e_support;

use std::process::{Command, Stdio};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn every_panel_query_and_alert_expression_works_on_live_metrics() {
    if !(have("prometheus") && have("promtool") && have("python3")) {
        assert!(std::env::var_os("CI").is_none(), "CI must install prometheus (see .ci/run)");
        eprintln!("SKIPPED: prometheus/promtool not installed (apt-get install prometheus)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rota"))
        .args(["serve", "--demo", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--set", "admin_listen=\"127.0.0.1:0\"", "--set", "log_level=\"warn\""])
        .stderr(Stdio::piped())
        .spawn()
        .expect("rota starts");
    let line = e2e_support::wait_for_line(&mut child, "metrics and health on ");
    let admin = line.split("/metrics").next().unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/observability/check.sh");
    let out = Command::new("bash").arg(script).args(["live", &admin]).output().expect("check.sh runs");
    let _ = child.kill();
    let _ = child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "check.sh live failed:\n{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
