//! Shared helpers of the end-to-end tests: the real `rota` binary on 127.0.0.1:0 and a
//! small websocket client speaking protocol v1 in either encoding.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub const HOUR: i64 = 3_600_000;
pub const T0: i64 = 1_764_000_000_000;
pub const MIN: i64 = 60_000;

/// How long a daemon may take from spawn to listening (recovery included).
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Daemon {
    pub child: Child,
    pub addr: String,
    /// `host:port` of the admin listener (`/metrics`).
    pub admin: String,
}

impl Daemon {
    pub fn start(dir: &std::path::Path) -> Daemon {
        Self::spawn(dir, None, T0)
    }

    pub fn start_with(dir: &std::path::Path, config: &std::path::Path) -> Daemon {
        Self::spawn(dir, Some(config), T0)
    }

    /// With the manual clock starting at `t0`.
    pub fn start_at(dir: &std::path::Path, config: &std::path::Path, t0: i64) -> Daemon {
        Self::spawn(dir, Some(config), t0)
    }

    /// With the wall clock (timers fire by themselves).
    pub fn start_wall(dir: &std::path::Path, config: &std::path::Path) -> Daemon {
        Self::spawn(dir, Some(config), 0)
    }

    /// With the wall clock, plus `--set` overrides (which win over the file).
    pub fn start_wall_with_flags(dir: &std::path::Path, config: &std::path::Path, flags: &[&str]) -> Daemon {
        Self::spawn_flags(dir, Some(config), 0, flags)
    }

    /// Demo tenant, manual clock, plus `--set` overrides.
    pub fn start_with_flags(dir: &std::path::Path, flags: &[&str]) -> Daemon {
        Self::spawn_flags(dir, None, T0, flags)
    }

    fn spawn(dir: &std::path::Path, config: Option<&std::path::Path>, t0: i64) -> Daemon {
        Self::spawn_flags(dir, config, t0, &[])
    }

    /// With the manual clock, `--set` overrides, and the daemon's open-file limit (soft
    /// and hard) set to `nofile`; also returns what follows `marker` on the line the
    /// daemon prints with it before it listens.
    pub fn start_with_nofile_limit(
        dir: &std::path::Path,
        config: &std::path::Path,
        flags: &[&str],
        nofile: u64,
        marker: &str,
    ) -> (Daemon, String) {
        let (d, mut extra) = Self::spawn_limited(dir, Some(config), T0, flags, Some(nofile), &[marker]);
        (d, extra.remove(0))
    }

    fn spawn_flags(
        dir: &std::path::Path,
        config: Option<&std::path::Path>,
        t0: i64,
        flags: &[&str],
    ) -> Daemon {
        Self::spawn_limited(dir, config, t0, flags, None, &[]).0
    }

    fn spawn_limited(
        dir: &std::path::Path,
        config: Option<&std::path::Path>,
        t0: i64,
        flags: &[&str],
        nofile: Option<u64>,
        markers: &[&str],
    ) -> (Daemon, Vec<String>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rota"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("serve");
        // 8 MiB segments instead of 64: every daemon zero-fills its first segment and a
        // spare, and many run at once; the tests write far less than a segment anyway,
        // except those that want rollovers and set their own size.
        cmd.args(["--set", "wal.segment_bytes=8388608"]);
        for f in flags {
            cmd.args(["--set", f]);
        }
        if let Some(c) = config {
            cmd.arg("-c").arg(c);
        }
        let clock = if t0 == 0 { "wall" } else { "manual" };
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--clock", clock])
            .arg("--data-dir")
            .arg(dir)
            .args(["--set", &format!("manual_clock_start_ms={t0}"), "--set", "log_level=\"warn\""])
            .args(["--set", "admin_listen=\"127.0.0.1:0\""])
            .stderr(Stdio::piped())
            .spawn()
            .expect("the rota binary starts");
        let mut wanted = vec!["metrics and health on http://", "listening on ws://"];
        wanted.extend_from_slice(markers);
        let mut lines = wait_for_lines(&mut child, &wanted);
        let admin = lines[0].split('/').next().unwrap().to_string();
        let addr = lines[1].split_whitespace().next().unwrap().to_string();
        (Daemon { child, addr, admin }, lines.split_off(2))
    }

    /// The value of an unlabelled metric on `/metrics` (0 when not exported yet).
    pub fn metric(&self, name: &str) -> f64 {
        self.metric_with(name, &[])
    }

    /// The value of the series of `name` with these labels (0 when not exported yet).
    pub fn metric_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.admin).expect("the admin listener accepts");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.admin).unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .find_map(|l| l.rsplit_once(' ').map(|(_, v)| v.trim().parse().expect("a number")))
            .unwrap_or(0.0)
    }

    /// Waits for the process to exit by itself (after a signal sent elsewhere).
    pub fn wait_exit(mut self) -> i32 {
        self.child.wait().unwrap().code().unwrap_or(-1)
    }

    pub fn stop(mut self) -> i32 {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // Reaped: its data directory's lock is free for the next daemon on it.
        let _ = self.child.wait();
    }
}

/// Reads `child`'s stderr until a line contains `marker` and returns what follows the
/// marker on that line. stderr is read on a thread of its own, drained for the child's
/// whole life, so a daemon that neither prints the line nor exits fails the test after
/// `START_TIMEOUT` with what it printed, instead of hanging the suite.
pub fn wait_for_line(child: &mut Child, marker: &str) -> String {
    wait_for_lines(child, &[marker]).remove(0)
}

/// [`wait_for_line`] for several markers, each on its own line, in any order: what
/// follows each, in the order of `markers`.
pub fn wait_for_lines(child: &mut Child, markers: &[&str]) -> Vec<String> {
    let stderr = child.stderr.take().expect("the child's stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        // Until EOF, whatever the bytes: a reader that stopped would fill the pipe and
        // block the daemon's next log line.
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let _ = tx.send(String::from_utf8_lossy(&buf).trim_end().to_string());
            buf.clear();
        }
    });
    let mut printed = Vec::new();
    let mut found: Vec<Option<String>> = vec![None; markers.len()];
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(i) = markers.iter().position(|m| line.contains(m)) {
                    found[i] = line.split(markers[i]).nth(1).map(str::to_string);
                    if found.iter().all(Option::is_some) {
                        return found.into_iter().flatten().collect();
                    }
                }
                printed.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                panic!(
                    "rota exited ({status}) before printing {markers:?}; it printed:\n{}",
                    printed.join("\n")
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "rota did not print {markers:?} within {START_TIMEOUT:?}; it printed:\n{}",
                    printed.join("\n")
                );
            }
        }
    }
}

pub fn unsafe_kill(pid: u32, sig: &str) {
    Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(
    addr: &str,
    token: &str,
    proto: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}/").into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", proto.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), proto);
    Ok(ws)
}

pub struct Client {
    pub ws: Ws,
    pub msgpack: bool,
    pub n: u64,
}

impl Client {
    pub async fn new(addr: &str, msgpack: bool) -> Client {
        Self::connect(addr, "demo-token", msgpack).await
    }

    pub async fn connect(addr: &str, token: &str, msgpack: bool) -> Client {
        let proto = if msgpack { "rota.v1.msgpack" } else { "rota.v1.json" };
        Client { ws: connect(addr, token, proto).await.unwrap(), msgpack, n: 0 }
    }

    /// Reads (and discards) frames until the server closes; returns the close code and
    /// reason.
    pub async fn drain_until_close(&mut self) -> (u16, String) {
        loop {
            let m = tokio::time::timeout(std::time::Duration::from_secs(30), self.ws.next())
                .await
                .expect("the server closes within 30 s");
            match m {
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return (1006, e.to_string()),
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame within 20 s")
                .expect("the connection stays open")
                .unwrap();
            match m {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Binary(b) => return rmp_serde::from_slice(&b).unwrap(),
                _ => continue,
            }
        }
    }

    /// Sends a request and returns its reply (stream events in between are returned
    /// in the second value).
    pub async fn call(&mut self, mut req: Value) -> (Value, Vec<Value>) {
        self.n += 1;
        let id = format!("r{}", self.n);
        req["id"] = json!(id);
        let msg = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&req).unwrap())
        } else {
            Message::Text(req.to_string())
        };
        self.ws.send(msg).await.unwrap();
        let mut events = Vec::new();
        loop {
            let v = self.recv().await;
            if v["type"] == "event" {
                events.push(v);
            } else {
                assert_eq!(v["id"], json!(id), "reply to {req}");
                return (v, events);
            }
        }
    }

    pub async fn ok(&mut self, req: Value) -> Value {
        let (r, _) = self.call(req.clone()).await;
        assert_eq!(r["type"], "ok", "request {req} answered {r}");
        r["result"].clone()
    }

    /// `n` events from a `batch: true` subscription, flattened from its `events`
    /// frames; also returns how many frames carried them.
    pub async fn batched_events(&mut self, n: usize) -> (Vec<Value>, usize) {
        let (mut out, mut frames) = (Vec::new(), 0);
        while out.len() < n {
            let v = self.recv().await;
            assert_eq!(v["type"], "events", "{v}");
            let batch = v["events"].as_array().expect("an array of events");
            assert!(!batch.is_empty(), "no empty events frame");
            out.extend(batch.iter().cloned());
            frames += 1;
        }
        (out, frames)
    }

    /// [`Client::events`], or the close code and reason if the server closes first.
    pub async fn events_or_close(&mut self, n: usize) -> Result<Vec<Value>, (u16, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = tokio::time::timeout(std::time::Duration::from_secs(20), self.ws.next())
                .await
                .expect("a frame within 20 s");
            let v: Value = match m {
                Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Binary(b))) => rmp_serde::from_slice(&b).unwrap(),
                Some(Ok(Message::Close(f))) => {
                    return Err(f.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string())))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err((1006, e.to_string())),
                None => return Err((1006, "closed".into())),
            };
            assert_eq!(v["type"], "event", "{v}");
            out.push(v);
        }
        Ok(out)
    }

    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let v = self.recv().await;
            assert_eq!(v["type"], "event", "{v}");
            out.push(v);
        }
        out
    }
}

/// A config file with the example tenants `habitissimo` (token `habi-token`),
/// `prontopro` (`pp-token`, plus the stream-only `pp-stream-only`) and `zaask`
/// (`zk-token`), their policy files copied beside it, and `extra` top-level lines.
pub fn tenants_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants");
    let hash = |t: &str| rota::config::hex(&rota::config::hash_token(t));
    let mut text = format!("{extra}\n");
    let tenants: [(&str, &[(&str, &str)]); 3] = [
        ("habitissimo", &[("habi-token", r#"["ingest", "stream", "admin"]"#)]),
        (
            "prontopro",
            &[("pp-token", r#"["ingest", "stream", "admin"]"#), ("pp-stream-only", r#"["stream"]"#)],
        ),
        ("zaask", &[("zk-token", r#"["ingest", "stream", "admin"]"#)]),
    ];
    for (t, tokens) in tenants {
        std::fs::copy(root.join(format!("{t}.toml")), dir.join(format!("{t}.toml"))).unwrap();
        text += &format!("[[tenants]]\nid = \"{t}\"\npolicy = \"{t}.toml\"\n");
        for (token, scopes) in tokens {
            text += &format!("[[tenants.tokens]]\nsha256 = \"{}\"\nscopes = {scopes}\n", hash(token));
        }
    }
    let path = dir.join("rota.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// xorshift64*: small, seeded, no dependency (the crash loops' random choices).
#[allow(dead_code)]
pub struct Rng(pub u64);

#[allow(dead_code)]
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// One pro (`p1`) in Bologna painting with plenty of credits, then `n` leads there with
/// 16 KB descriptions, each offered to it: large stream events, quickly (300 of them
/// are about 5 MB, far more than the kernel's socket buffers hold while nothing is
/// read).
pub async fn publish_big_leads(c: &mut Client, n: usize) {
    c.ok(
        json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["bologna"]}}),
    )
    .await;
    c.ok(json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 1_000_000})).await;
    let big = "x".repeat(16_000);
    for i in 0..n {
        let lead = json!({
            "id": format!("S{i}"), "category": "painting", "zone": "bologna",
            "description": big, "details": {"rooms": "2"},
            "client": {"id": format!("client-{i}"), "name": "Ana Garcia", "phone": "+34 600 000 000",
                       "phone_verified": true, "contact": {"call": true, "chat": true}},
            "created_at": T0
        });
        c.ok(json!({"type": "publish_lead", "lead": lead})).await;
    }
}
