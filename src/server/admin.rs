//! The admin HTTP listener: `/metrics`, `/livez`, `/readyz`.
//!
//! Plain HTTP/1.1 on tokio, one request per connection (`Connection: close`). An
//! HTTP framework would be the only one in the daemon and buys nothing for three
//! fixed GET routes; what matters here is that a scraper, a probe or a stray client
//! can never make the listener hold memory or tasks without bound:
//! - the request head is capped ([`AdminLimits::max_header_bytes`], 431 past it);
//! - reading the head and writing the answer each have a deadline
//!   ([`AdminLimits::io_timeout`], 408 for a head that never completes), so idle
//!   connections cannot pile up;
//! - at most [`AdminLimits::max_connections`] connections are served at once; more
//!   are closed on accept.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | 200, Prometheus text format 0.0.4 |
//! | `GET /livez` | 200 `ok`; 503 with the reason when the health check fails (e.g. the WAL failed) |
//! | `GET /readyz` | 200 `ready` once recovery finished and the gateway listens, while the health check passes; else 503 `recovering` (the log is being replayed), 503 `stopping` (a shutdown began: balancers should send nothing more), or 503 with the health check's reason |
//! | other path | 404 |
//! | other method | 405 with `Allow: GET` |
//! | malformed request | 400 |
//!
//! The listener also runs the Prometheus recorder's upkeep (draining histogram
//! buffers) every [`AdminLimits::upkeep_interval`], so memory stays bounded even if
//! nobody scrapes.

use crate::telemetry;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// A liveness check: `Err(reason)` makes `/livez` answer 503 with the reason.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Where the daemon is in its life, as `/readyz` reports it. Shared between the
/// server, which moves it forward, and the admin routes.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    const RECOVERING: u8 = 0;
    const READY: u8 = 1;
    const STOPPING: u8 = 2;

    /// Recovery finished and the gateway accepts traffic.
    pub fn set_ready(&self) {
        let _ = self.0.compare_exchange(Self::RECOVERING, Self::READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// A shutdown began: never ready again.
    pub fn set_stopping(&self) {
        self.0.store(Self::STOPPING, Ordering::Release);
    }

    /// `Err(why)` while not ready.
    pub fn check(&self) -> Result<(), &'static str> {
        match self.0.load(Ordering::Acquire) {
            Self::READY => Ok(()),
            Self::RECOVERING => Err("recovering"),
            _ => Err("stopping"),
        }
    }
}

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<Readiness>,
    pub prometheus: PrometheusHandle,
    pub health: HealthCheck,
}

/// Bounds of the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Request line plus headers.
    pub max_header_bytes: usize,
    /// Deadline for reading the request head, and again for writing the answer.
    pub io_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How often the recorder's upkeep runs.
    pub upkeep_interval: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_header_bytes: 8 * 1024,
            io_timeout: Duration::from_secs(5),
            max_connections: 64,
            upkeep_interval: Duration::from_secs(5),
        }
    }
}

/// Serves the admin routes on `listener` until `shutdown` turns true (or its sender
/// is dropped). Requests in flight get one more `io_timeout` to finish.
pub async fn serve_admin(listener: TcpListener, state: AdminState, shutdown: watch::Receiver<bool>) {
    serve_admin_with(listener, state, shutdown, AdminLimits::default()).await
}

/// [`serve_admin`] with explicit limits.
pub async fn serve_admin_with(
    listener: TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
    limits: AdminLimits,
) {
    let state = Arc::new(state);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    let mut upkeep = tokio::time::interval(limits.upkeep_interval);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let state = state.clone();
                        tasks.spawn(async move {
                            if let Err(e) = serve_conn(stream, &state, limits).await {
                                tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(peer = %peer, "admin listener at max_connections; closing a connection");
                        drop(stream);
                    }
                },
                Err(e) => {
                    // Typically EMFILE: back off a little instead of spinning on accept.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = upkeep.tick() => state.prometheus.run_upkeep(),
        }
    }
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.io_timeout, drain).await.is_err() {
        tasks.abort_all();
    }
}

/// An answer: status, content type, body, extra header lines.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
    extra: &'static str,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Answer { status, content_type: "text/plain; charset=utf-8", body: body.into(), extra: "" }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.extra,
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

enum Head {
    /// The peer closed before sending anything: nothing to answer.
    Closed,
    Complete(Vec<u8>),
    TooLarge,
    /// The peer closed mid-head.
    Truncated,
}

async fn read_head(stream: &mut TcpStream, max: usize) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() { Head::Closed } else { Head::Truncated });
        }
        // Search only where the terminator can newly appear.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() > max {
            return Ok(Head::TooLarge);
        }
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses the request line: `(method, path without query)`, or `None` if garbage.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !target.bytes().all(|b| b.is_ascii_graphic())
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some((method, path))
}

fn route(method: &str, path: &str, state: &AdminState) -> Answer {
    if method != "GET" {
        return Answer { extra: "Allow: GET\r\n", ..Answer::text(405, "method not allowed\n") };
    }
    match path {
        "/metrics" => {
            telemetry::refresh_process_metrics();
            Answer {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: state.prometheus.render(),
                extra: "",
            }
        }
        "/livez" => match (state.health)() {
            Ok(()) => Answer::text(200, "ok\n"),
            Err(why) => Answer::text(503, format!("{why}\n")),
        },
        // Not ready while the health check fails either: a daemon whose log failed
        // refuses every write, so a balancer should send nothing its way.
        "/readyz" => match (state.ready.check(), (state.health)()) {
            (Err(why), _) => Answer::text(503, format!("{why}\n")),
            (Ok(()), Err(why)) => Answer::text(503, format!("{why}\n")),
            (Ok(()), Ok(())) => Answer::text(200, "ready\n"),
        },
        _ => Answer::text(404, "not found\n"),
    }
}

async fn serve_conn(mut stream: TcpStream, state: &AdminState, limits: AdminLimits) -> std::io::Result<()> {
    let answer = match tokio::time::timeout(
        limits.io_timeout,
        read_head(&mut stream, limits.max_header_bytes),
    )
    .await
    {
        Err(_) => Answer::text(408, "request timeout\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => Answer::text(431, "request head too large\n"),
        Ok(Ok(Head::Truncated)) => Answer::text(400, "bad request\n"),
        Ok(Ok(Head::Complete(head))) => match parse_request_line(&head) {
            Some((method, path)) => route(method, path, state),
            None => Answer::text(400, "bad request\n"),
        },
    };
    let write = async {
        stream.write_all(&answer.to_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(limits.io_timeout, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "admin response write timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusRecorder;
    use std::sync::atomic::AtomicBool;

    /// Generous bound on every client operation: a hung server fails the test
    /// instead of hanging it. Never an assertion about speed.
    const CLIENT_DEADLINE: Duration = Duration::from_secs(20);

    struct Server {
        addr: std::net::SocketAddr,
        ready: Arc<Readiness>,
        healthy: Arc<AtomicBool>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        _recorder: PrometheusRecorder,
    }

    async fn start(limits: AdminLimits) -> Server {
        let recorder = telemetry::builder().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            telemetry::describe_all();
            telemetry::TenantMetrics::new("acme").leads_received.increment(7);
        });
        let ready = Arc::new(Readiness::default());
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let state = AdminState {
            ready: ready.clone(),
            prometheus: recorder.handle(),
            health: Arc::new(
                move || if h.load(Ordering::SeqCst) { Ok(()) } else { Err("wal failed: EIO".into()) },
            ),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve_admin_with(listener, state, rx, limits));
        Server { addr, ready, healthy, stop, task, _recorder: recorder }
    }

    /// Sends `raw`, reads until the server closes, returns (status, whole answer).
    async fn send(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String) {
        let io = async {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(raw).await.unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            String::from_utf8(out).unwrap()
        };
        let text = tokio::time::timeout(CLIENT_DEADLINE, io).await.expect("admin server did not answer");
        let status =
            text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text:?}"));
        (status, text)
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        send(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await
    }

    #[tokio::test]
    async fn metrics_serves_prometheus_text() {
        let s = start(AdminLimits::default()).await;
        let (status, text) = get(s.addr, "/metrics?x=1").await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4"), "{text}");
        assert!(text.contains("# TYPE rota_leads_received_total counter"), "{text}");
        assert!(text.contains("rota_leads_received_total{tenant=\"acme\"} 7"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
    }

    #[tokio::test]
    async fn readyz_follows_the_ready_flag() {
        let s = start(AdminLimits::default()).await;
        let (status, text) = get(s.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(text.ends_with("recovering\n"), "{text}");
        s.ready.set_ready();
        assert_eq!(get(s.addr, "/readyz").await.0, 200);
        // A failed log: not ready any more, with the reason.
        s.healthy.store(false, Ordering::SeqCst);
        let (status, text) = get(s.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(text.ends_with("wal failed: EIO\n"), "{text}");
        // A shutdown: not ready, and never again.
        s.healthy.store(true, Ordering::SeqCst);
        s.ready.set_stopping();
        s.ready.set_ready();
        let (status, text) = get(s.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(text.ends_with("stopping\n"), "{text}");
    }

    #[tokio::test]
    async fn livez_reports_the_health_check_reason() {
        let s = start(AdminLimits::default()).await;
        assert_eq!(get(s.addr, "/livez").await.0, 200);
        s.healthy.store(false, Ordering::SeqCst);
        let (status, text) = get(s.addr, "/livez").await;
        assert_eq!(status, 503);
        assert!(text.ends_with("wal failed: EIO\n"), "{text}");
    }

    #[tokio::test]
    async fn unknown_paths_methods_and_garbage_are_refused() {
        let s = start(AdminLimits::default()).await;
        assert_eq!(get(s.addr, "/nope").await.0, 404);
        let (status, text) = send(s.addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status, 405);
        assert!(text.contains("Allow: GET"), "{text}");
        assert_eq!(send(s.addr, b"HELLO\r\n\r\n").await.0, 400);
        assert_eq!(send(s.addr, b"GET metrics HTTP/1.1\r\n\r\n").await.0, 400);
        assert_eq!(send(s.addr, b"GET /metrics HTTP/9\r\n\r\n").await.0, 400);
        assert_eq!(send(s.addr, b"\xff\xfe /x HTTP/1.1\r\n\r\n").await.0, 400);
        // The peer closes mid-head.
        let io = async {
            let mut c = TcpStream::connect(s.addr).await.unwrap();
            c.write_all(b"GET /metr").await.unwrap();
            c.shutdown().await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let out = tokio::time::timeout(CLIENT_DEADLINE, io).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }

    #[tokio::test]
    async fn oversized_heads_are_refused() {
        let s = start(AdminLimits { max_header_bytes: 1024, ..AdminLimits::default() }).await;
        let mut raw = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 4096));
        let (status, _) = send(s.addr, &raw).await;
        assert_eq!(status, 431);
    }

    #[tokio::test]
    async fn idle_connections_are_answered_408_and_closed() {
        let s = start(AdminLimits { io_timeout: Duration::from_millis(100), ..AdminLimits::default() }).await;
        // Connect and send nothing: the server must close on its own.
        let io = async {
            let mut c = TcpStream::connect(s.addr).await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let out = tokio::time::timeout(CLIENT_DEADLINE, io).await.expect("idle connection was never closed");
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_without_blocking_the_listener() {
        let s = start(AdminLimits { max_connections: 1, ..AdminLimits::default() }).await;
        // Hold the only permit with a connection that sent half a head.
        let mut holder = TcpStream::connect(s.addr).await.unwrap();
        holder.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();
        // A second connection is closed without an answer.
        let io = async {
            let mut c = TcpStream::connect(s.addr).await.unwrap();
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out).await;
            out
        };
        let out = tokio::time::timeout(CLIENT_DEADLINE, io).await.expect("extra connection was never closed");
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        // The holder finishes its request and is answered.
        holder.write_all(b"\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(CLIENT_DEADLINE, holder.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    #[tokio::test]
    async fn shutdown_stops_the_listener() {
        let s = start(AdminLimits::default()).await;
        assert_eq!(get(s.addr, "/livez").await.0, 200);
        s.stop.send(true).unwrap();
        tokio::time::timeout(CLIENT_DEADLINE, s.task).await.expect("serve_admin did not return").unwrap();
        assert!(TcpStream::connect(s.addr).await.is_err(), "listener still accepting after shutdown");
    }

    #[test]
    fn request_line_parser() {
        assert_eq!(parse_request_line(b"GET /a?b HTTP/1.1\r\n\r\n"), Some(("GET", "/a")));
        assert_eq!(parse_request_line(b"GET /a HTTP/1.0\r\n\r\n"), Some(("GET", "/a")));
        assert_eq!(parse_request_line(b"GET  /a HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"get /a HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET /a HTTP/1.1 x\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET /a\x01 HTTP/1.1\r\n\r\n"), None);
    }
}
