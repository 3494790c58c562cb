//! Daemon configuration: built-in defaults < TOML file < `ROTA_*` environment < flags.
//!
//! Every key is documented in `config/rota.toml`. The merged TOML tree is parsed into
//! [`RawConfig`] (unknown keys rejected with their name) and validated into
//! [`Config`]. Environment overrides name a key path with `__` between levels:
//! `ROTA_LISTEN=0.0.0.0:7700`, `ROTA_WAL__FSYNC=never`, `ROTA_LOG_LEVEL=debug`.

use crate::core::Policy;
use crate::ids::TenantId;
use crate::protocol::Scope;
use crate::wal::{FsyncPolicy, WalConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The token of the built-in demo tenant (used only when no tenant is configured).
pub const DEMO_TOKEN: &str = "demo-token";

/// Largest `max_frame_bytes`: a quarter of the log's record limit
/// ([`crate::wal::MAX_RECORD_BYTES`]).
pub const MAX_FRAME_BYTES: usize = crate::wal::MAX_RECORD_BYTES / 4;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen: String,
    pub admin_listen: String,
    pub data_dir: PathBuf,
    pub clock: ClockMode,
    /// Start time of the manual clock, ms since the epoch; 0 = the wall clock at start.
    pub manual_clock_start_ms: i64,
    /// Worker threads. Each serves a share of the websocket connections (round
    /// robin), decides their requests inline under the shard's lock, and runs the
    /// timers of a share of the shards. 0 = everything on the accepting thread.
    /// Default: one per CPU the process may use ([`default_workers`]).
    pub arbiters: usize,
    /// Commands in flight per shard (deciding, or decided and waiting for the log);
    /// beyond it requests get `overloaded` with a retry hint.
    pub mailbox_capacity: usize,
    pub shutdown_timeout_ms: u64,
    pub snapshot_interval_s: u64,
    pub max_frame_bytes: usize,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub subscriber_queue_frames: usize,
    pub stream_retention_events: usize,
    /// Stream history on disk, per tenant, in bytes: events evicted from the replay
    /// buffer are kept under `<data_dir>/streams/` so that a subscriber away longer
    /// than the buffer still resumes (see `engine::spill`). 0 = off.
    pub stream_spill_bytes: u64,
    pub max_connections: usize,
    /// Open connections one tenant's tokens may hold at once: past it a new one is
    /// refused at the upgrade (HTTP 429), so one tenant's clients can never take every
    /// connection the daemon accepts.
    pub max_connections_per_tenant: usize,
    /// Zone x category shards one tenant may have: a lead or a pro naming a new pair
    /// past it is refused `shard_limit` (a client could otherwise create shards, each
    /// with its own state, timer and snapshot entry, without bound).
    pub max_shards_per_tenant: usize,
    /// A connection whose peer takes nothing from its socket for this long while rota
    /// has frames to send is dropped (`server::deadline`); 0 = no deadline.
    pub send_timeout_ms: u64,
    /// A connection that has not completed the websocket upgrade by then is closed.
    pub handshake_timeout_ms: u64,
    /// Requests per second one connection may send (token bucket); 0 = no limit.
    pub rate_limit_connection_per_s: u32,
    /// Requests per second all connections of one tenant may send; 0 = no limit.
    pub rate_limit_tenant_per_s: u32,
    /// Admission control: when more than this many bytes of one connection's requests
    /// stay unread in its socket for 20 ms (the gateway is behind, not catching up
    /// after a hiccup), the connection is overloaded and new leads on it are answered
    /// `overloaded` (see `shed_backlog_overloaded_bytes`); beyond four times this,
    /// every request but `subscribe` is, at once. 0 = off.
    pub shed_backlog_bytes: usize,
    /// Admission control once overloaded: for a second after a connection's unread
    /// bytes stood beyond `shed_backlog_bytes`, new leads on it are shed beyond this
    /// lower limit (see `server::admission`). A value above `shed_backlog_bytes` counts
    /// as it.
    pub shed_backlog_overloaded_bytes: usize,
    /// Whether the daemon's heap may use transparent huge pages. Off by default: the
    /// first touch of a fresh 2 MiB page zeroes all of it inside the page fault, so
    /// a thread that grows the heap stalls for that long while requests queue behind
    /// it (on a virtual machine, with the host's own faults, for milliseconds). The
    /// daemon opts out for itself (`prctl(PR_SET_THP_DISABLE)`) at start; the host's
    /// setting is not touched. See BENCHMARKS.md, "Transparent huge pages".
    pub transparent_huge_pages: bool,
    pub log_level: String,
    pub log_format: LogFormat,
    pub wal: RawWal,
    pub tenants: Vec<RawTenant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    Wall,
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text otherwise.
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWal {
    /// `"always"`, `"never"` or `{ interval_ms = N }`.
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub queue_capacity: usize,
    pub preallocate: bool,
    /// See [`WalConfig::min_sync_interval_us`].
    pub min_sync_interval_us: u64,
    /// See [`WalConfig::recycle_segments`].
    pub recycle_segments: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    /// Path of the tenant's policy file (relative to the config file's folder).
    pub policy: PathBuf,
    #[serde(default)]
    pub tokens: Vec<RawToken>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    /// Hex SHA-256 of the bearer token (`rota token hash <token>` prints it).
    pub sha256: String,
    pub scopes: Vec<Scope>,
}

/// The default number of worker threads: one per CPU the process may use (its
/// affinity mask and cgroup quota, as `available_parallelism` reads them), at least 2
/// and at most 16. Two on the 2-core machine the benchmarks ran on: one worker was
/// slower there, and the WAL writer and the accepting thread need little CPU.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16)
}

impl Default for RawConfig {
    fn default() -> Self {
        let w = WalConfig::default();
        RawConfig {
            listen: "127.0.0.1:7700".into(),
            admin_listen: "127.0.0.1:7701".into(),
            data_dir: PathBuf::from("rota-data"),
            clock: ClockMode::Wall,
            manual_clock_start_ms: 0,
            arbiters: default_workers(),
            mailbox_capacity: 4096,
            shutdown_timeout_ms: 10_000,
            snapshot_interval_s: 300,
            max_frame_bytes: 1 << 20,
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 45_000,
            subscriber_queue_frames: 65_536,
            stream_retention_events: 100_000,
            stream_spill_bytes: 1 << 30,
            max_connections: 10_000,
            max_connections_per_tenant: 5_000,
            max_shards_per_tenant: 100_000,
            send_timeout_ms: 10_000,
            handshake_timeout_ms: 10_000,
            rate_limit_connection_per_s: 50_000,
            shed_backlog_bytes: 32 * 1024,
            shed_backlog_overloaded_bytes: 4 * 1024,
            rate_limit_tenant_per_s: 200_000,
            transparent_huge_pages: false,
            log_level: "info".into(),
            log_format: LogFormat::Auto,
            wal: RawWal {
                fsync: w.fsync,
                segment_bytes: w.segment_bytes,
                queue_capacity: w.queue_capacity,
                preallocate: w.preallocate,
                min_sync_interval_us: w.min_sync_interval_us,
                recycle_segments: w.recycle_segments,
            },
            tenants: Vec::new(),
        }
    }
}

impl Default for RawWal {
    fn default() -> Self {
        RawConfig::default().wal
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("tenant {tenant}: policy file {path}: {reason}")]
    Policy { tenant: String, path: PathBuf, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: TenantId,
    pub policy: Arc<Policy>,
    /// (sha256 of token, scopes)
    pub tokens: Vec<([u8; 32], Vec<Scope>)>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub raw: RawConfig,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub wal: WalConfig,
    pub tenants: Vec<TenantConfig>,
    /// True when no tenant was configured and the demo tenant was added.
    pub demo_tenant: bool,
    /// `ROTA_*` environment variables that name no configuration key, ignored (other
    /// programs' variables share the prefix: a Kubernetes Service named `rota` puts
    /// `ROTA_SERVICE_HOST` and `ROTA_PORT` into every pod of its namespace).
    pub ignored_env: Vec<String>,
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Where the layers come from.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// `(KEY, value)` pairs, usually `std::env::vars()`.
    pub env: Vec<(String, String)>,
    /// `key.path=value` overrides from flags (highest priority).
    pub flags: Vec<String>,
}

impl Config {
    pub fn load(src: &Sources) -> Result<Config, ConfigError> {
        let mut tree =
            toml::Value::try_from(RawConfig::default()).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut base_dir = PathBuf::from(".");
        if let Some(path) = &src.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Read { path: path.clone(), source: e })?;
            let file: toml::Value =
                toml::from_str(&text).map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
            merge(&mut tree, file);
            base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        }
        // Every top-level key is in the defaults' tree (none is optional).
        let known: std::collections::BTreeSet<String> =
            tree.as_table().map(|t| t.keys().cloned().collect()).unwrap_or_default();
        let mut ignored_env = Vec::new();
        for (k, v) in &src.env {
            let Some(rest) = k.strip_prefix("ROTA_") else { continue };
            if rest.is_empty() {
                continue;
            }
            let key = rest.to_ascii_lowercase().replace("__", ".");
            if !known.contains(key.split('.').next().unwrap_or_default()) {
                ignored_env.push(k.clone());
                continue;
            }
            set_path(&mut tree, &key, v).map_err(|e| match e {
                ConfigError::Invalid { key, reason } => ConfigError::Invalid {
                    key,
                    reason: format!("{reason} (from the environment variable {k})"),
                },
                other => other,
            })?;
        }
        for f in &src.flags {
            let (k, v) = f.split_once('=').ok_or_else(|| invalid(f, "expected key=value"))?;
            set_path(&mut tree, k.trim(), v.trim())?;
        }
        let raw: RawConfig =
            tree.try_into().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        ignored_env.sort();
        Ok(Config { ignored_env, ..Config::validate(raw, &base_dir)? })
    }

    pub fn validate(raw: RawConfig, base_dir: &Path) -> Result<Config, ConfigError> {
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| invalid("listen", format!("not an ip:port address: {:?}", raw.listen)))?;
        let admin_listen: SocketAddr = raw.admin_listen.parse().map_err(|_| {
            invalid("admin_listen", format!("not an ip:port address: {:?}", raw.admin_listen))
        })?;
        if admin_listen == listen && listen.port() != 0 {
            return Err(invalid("admin_listen", format!("must differ from listen ({listen})")));
        }
        if raw.arbiters > 64 {
            return Err(invalid("arbiters", "must be in 0..=64 (0 = on the gateway's thread)"));
        }
        for (key, v, min) in [
            ("mailbox_capacity", raw.mailbox_capacity, 1),
            ("max_frame_bytes", raw.max_frame_bytes, 1024),
            ("subscriber_queue_frames", raw.subscriber_queue_frames, 16),
            ("stream_retention_events", raw.stream_retention_events, 1),
            ("max_connections", raw.max_connections, 1),
            ("max_connections_per_tenant", raw.max_connections_per_tenant, 1),
            ("max_shards_per_tenant", raw.max_shards_per_tenant, 1),
        ] {
            if v < min {
                return Err(invalid(key, format!("must be at least {min}")));
            }
        }
        if raw.stream_spill_bytes != 0 && raw.stream_spill_bytes < 64 << 10 {
            return Err(invalid("stream_spill_bytes", "must be 0 (off) or at least 65536"));
        }
        if raw.handshake_timeout_ms == 0 {
            return Err(invalid("handshake_timeout_ms", "must be at least 1"));
        }
        // A zero period would make every connection's heartbeat timer panic.
        if raw.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be at least 1"));
        }
        // Zero would end every stop at its deadline: no final sync, no snapshot.
        if raw.shutdown_timeout_ms < 100 {
            return Err(invalid("shutdown_timeout_ms", "must be at least 100"));
        }
        // Bounded queues are allocated (or sized) up front: a value beyond these is a
        // typo, not a plan, and would fail at start or at each subscription unnamed.
        if raw.subscriber_queue_frames > 1 << 24 {
            return Err(invalid("subscriber_queue_frames", format!("must be at most {}", 1 << 24)));
        }
        // What one frame carries (a lead, a pro's profile) goes whole into one log
        // record, which the log refuses above its 16 MiB limit after the state
        // changed: a frame is held to a quarter of that.
        if raw.max_frame_bytes > MAX_FRAME_BYTES {
            return Err(invalid("max_frame_bytes", format!("must be at most {MAX_FRAME_BYTES}")));
        }
        if raw.wal.queue_capacity > 1 << 24 {
            return Err(invalid("wal.queue_capacity", format!("must be at most {}", 1 << 24)));
        }
        if raw.heartbeat_timeout_ms <= raw.heartbeat_interval_ms {
            return Err(invalid("heartbeat_timeout_ms", "must be longer than heartbeat_interval_ms"));
        }
        if tracing_subscriber::EnvFilter::try_new(&raw.log_level).is_err() {
            return Err(invalid("log_level", format!("not a log filter: {:?}", raw.log_level)));
        }
        let wal = WalConfig {
            dir: raw.data_dir.join("wal"),
            segment_bytes: raw.wal.segment_bytes,
            fsync: raw.wal.fsync,
            queue_capacity: raw.wal.queue_capacity,
            preallocate: raw.wal.preallocate,
            min_sync_interval_us: raw.wal.min_sync_interval_us,
            recycle_segments: raw.wal.recycle_segments,
            ..WalConfig::default()
        };
        wal.validate().map_err(|e| invalid("wal", e.to_string()))?;
        let mut tenants = Vec::new();
        for (i, t) in raw.tenants.iter().enumerate() {
            crate::ids::validate_id(&t.id, "id")
                .map_err(|e| invalid(&format!("tenants[{i}].id"), e.reason))?;
            if tenants.iter().any(|x: &TenantConfig| x.id.as_str() == t.id) {
                return Err(invalid(&format!("tenants[{i}].id"), format!("duplicate tenant {:?}", t.id)));
            }
            let path = base_dir.join(&t.policy);
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Policy {
                tenant: t.id.clone(),
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let policy = Policy::from_toml(&text).map_err(|e| ConfigError::Policy {
                tenant: t.id.clone(),
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if policy.tenant != t.id {
                return Err(ConfigError::Policy {
                    tenant: t.id.clone(),
                    path,
                    reason: format!("the policy says tenant = {:?}", policy.tenant),
                });
            }
            let mut tokens = Vec::new();
            for (j, tok) in t.tokens.iter().enumerate() {
                let key = format!("tenants[{i}].tokens[{j}].sha256");
                let h = unhex(&tok.sha256).ok_or_else(|| invalid(&key, "must be 64 hex digits"))?;
                // One token, one tenant and one set of scopes: a token listed twice
                // would be let in as whichever entry came last.
                let earlier = tenants
                    .iter()
                    .flat_map(|x: &TenantConfig| x.tokens.iter().map(move |(th, _)| (x.id.as_str(), th)))
                    .chain(tokens.iter().map(|(th, _): &([u8; 32], Vec<Scope>)| (t.id.as_str(), th)))
                    .find(|(_, th)| **th == h);
                if let Some((owner, _)) = earlier {
                    return Err(invalid(
                        &key,
                        format!("the same token is already listed for tenant {owner:?}"),
                    ));
                }
                if tok.scopes.is_empty() {
                    return Err(invalid(&format!("tenants[{i}].tokens[{j}].scopes"), "must list a scope"));
                }
                // In one order, once each: a reload that lists the same scopes in
                // another order changes nothing (and closes no connection).
                let mut scopes = tok.scopes.clone();
                scopes.sort_unstable();
                scopes.dedup();
                tokens.push((h, scopes));
            }
            tenants.push(TenantConfig { id: TenantId::new(&t.id), policy: Arc::new(policy), tokens });
        }
        let demo_tenant = tenants.is_empty();
        if demo_tenant {
            tenants.push(TenantConfig {
                id: TenantId::new("demo"),
                policy: Arc::new(Policy::shared_default("demo")),
                tokens: vec![(hash_token(DEMO_TOKEN), vec![Scope::Ingest, Scope::Stream, Scope::Admin])],
            });
        }
        Ok(Config { raw, listen, admin_listen, wal, tenants, demo_tenant, ignored_env: Vec::new() })
    }

    /// The effective configuration as TOML, token hashes redacted.
    pub fn redacted_toml(&self) -> String {
        let mut raw = self.raw.clone();
        for t in &mut raw.tenants {
            for tok in &mut t.tokens {
                tok.sha256 = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&raw).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn set_path(tree: &mut toml::Value, key: &str, value: &str) -> Result<(), ConfigError> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(invalid(key, "empty key segment"));
    }
    // A value that parses as TOML (number, bool, inline table) keeps its type;
    // anything else is a string.
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut cur = tree;
    for p in &parts[..parts.len() - 1] {
        let table = cur.as_table_mut().ok_or_else(|| invalid(key, "is not a table"))?;
        cur = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = cur.as_table_mut().ok_or_else(|| invalid(key, "is not a table"))?;
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_a_demo_tenant() {
        let c = Config::load(&Sources::default()).unwrap();
        assert!(c.demo_tenant);
        assert_eq!(c.tenants[0].id.as_str(), "demo");
        assert_eq!(c.listen.port(), 7700);
    }

    /// Other programs' `ROTA_*` variables (a Kubernetes Service named `rota` puts
    /// `ROTA_SERVICE_HOST` and `ROTA_PORT` into every pod of its namespace) are ignored
    /// and listed, not a refused start; a variable of a known key still applies, and a
    /// bad value of one, or an unknown key under a known table, is still refused.
    #[test]
    fn environment_variables_naming_no_key_are_ignored_and_listed() {
        let env = |pairs: &[(&str, &str)]| Sources {
            env: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Sources::default()
        };
        let c = Config::load(&env(&[
            ("ROTA_SERVICE_HOST", "10.0.0.1"),
            ("ROTA_PORT", "tcp://10.0.0.1:7700"),
            ("ROTA_ARBITERS", "3"),
        ]))
        .expect("starts");
        assert_eq!(c.ignored_env, ["ROTA_PORT", "ROTA_SERVICE_HOST"]);
        assert_eq!(c.raw.arbiters, 3);
        let e = Config::load(&env(&[("ROTA_WAL__NO_SUCH", "1")])).unwrap_err().to_string();
        assert!(e.contains("no_such"), "a misspelt key under a known table is refused: {e}");
        let e = Config::load(&env(&[("ROTA_ARBITERS", "many")])).unwrap_err().to_string();
        assert!(e.contains("arbiters"), "a bad value of a known key names it: {e}");
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rota.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1000\"\narbiters = 3\n[wal]\nfsync = \"never\"\n")
            .unwrap();
        let src = Sources {
            file: Some(path),
            env: vec![
                ("ROTA_ARBITERS".into(), "4".into()),
                ("ROTA_WAL__SEGMENT_BYTES".into(), "65536".into()),
            ],
            flags: vec!["arbiters=5".into()],
        };
        let c = Config::load(&src).unwrap();
        assert_eq!(c.listen.port(), 1000, "file beats defaults");
        assert_eq!(c.raw.arbiters, 5, "flags beat env");
        assert_eq!(c.wal.segment_bytes, 65536, "env beats defaults");
        assert_eq!(c.wal.fsync, FsyncPolicy::Never);
    }

    #[test]
    fn values_that_would_break_the_daemon_at_run_time_are_refused_by_name() {
        for (flag, key) in [
            ("heartbeat_interval_ms=0", "heartbeat_interval_ms"),
            ("shutdown_timeout_ms=0", "shutdown_timeout_ms"),
            ("subscriber_queue_frames=100000000", "subscriber_queue_frames"),
            ("wal.queue_capacity=100000000", "wal.queue_capacity"),
            // A frame's content goes whole into one log record (at most 16 MiB).
            ("max_frame_bytes=16777216", "max_frame_bytes"),
        ] {
            let src = Sources { flags: vec![flag.into()], ..Default::default() };
            let e = Config::load(&src).expect_err(flag).to_string();
            assert!(e.contains(key), "{flag}: {e}");
        }
        let ok = [
            "heartbeat_interval_ms=1",
            "shutdown_timeout_ms=100",
            "subscriber_queue_frames=16777216",
            "max_frame_bytes=4194304",
        ];
        let src = Sources { flags: ok.iter().map(|f| f.to_string()).collect(), ..Default::default() };
        Config::load(&src).expect("the bounds themselves are accepted");
    }

    #[test]
    fn min_sync_interval_reaches_the_log_and_an_excessive_one_is_refused_by_name() {
        let flags =
            |v: &str| Sources { flags: vec![format!("wal.min_sync_interval_us={v}")], ..Default::default() };
        assert_eq!(Config::load(&Sources::default()).unwrap().wal.min_sync_interval_us, 300);
        assert_eq!(Config::load(&flags("0")).unwrap().wal.min_sync_interval_us, 0);
        let e = Config::load(&flags("250000")).unwrap_err().to_string();
        assert!(e.contains("min_sync_interval_us = 250000") && e.contains("at most 100000"), "{e}");
    }

    #[test]
    fn recycle_segments_reaches_the_log_and_a_negative_count_is_refused_by_name() {
        let flags =
            |v: &str| Sources { flags: vec![format!("wal.recycle_segments={v}")], ..Default::default() };
        assert_eq!(Config::load(&Sources::default()).unwrap().wal.recycle_segments, 8);
        assert_eq!(Config::load(&flags("0")).unwrap().wal.recycle_segments, 0);
        let e = Config::load(&flags("-1")).unwrap_err().to_string();
        assert!(e.contains("recycle_segments"), "{e}");
    }

    #[test]
    fn stream_spill_bytes_may_be_off_or_at_least_64_kib_and_a_smaller_value_is_refused_by_name() {
        let flags =
            |v: &str| Sources { flags: vec![format!("stream_spill_bytes={v}")], ..Default::default() };
        assert_eq!(Config::load(&Sources::default()).unwrap().raw.stream_spill_bytes, 1 << 30);
        assert_eq!(Config::load(&flags("0")).unwrap().raw.stream_spill_bytes, 0);
        assert_eq!(Config::load(&flags("65536")).unwrap().raw.stream_spill_bytes, 65536);
        let e = Config::load(&flags("4096")).unwrap_err().to_string();
        assert!(e.contains("stream_spill_bytes") && e.contains("65536"), "{e}");
    }

    #[test]
    fn the_documented_example_config_loads_and_names_every_key() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/rota.toml");
        let c = Config::load(&Sources { file: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!(c.listen.port(), 7700);
        let text = std::fs::read_to_string(path).unwrap();
        let defaults = toml::Value::try_from(RawConfig::default()).unwrap();
        for key in defaults.as_table().unwrap().keys().filter(|k| *k != "tenants") {
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("[{key}]")),
                "{key} undocumented"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let src = Sources { flags: vec!["lisen=1".into()], ..Default::default() };
        let e = Config::load(&src).unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let src = Sources { flags: vec!["arbiters=65".into()], ..Default::default() };
        let e = Config::load(&src).unwrap_err().to_string();
        assert!(e.contains("arbiters"), "{e}");
        let src = Sources {
            flags: vec!["listen=\"127.0.0.1:7790\"".into(), "admin_listen=\"127.0.0.1:7790\"".into()],
            ..Default::default()
        };
        let e = Config::load(&src).unwrap_err().to_string();
        assert!(e.contains("admin_listen") && e.contains("must differ from listen"), "{e}");
    }

    /// Loads a `rota.toml` written in `dir` with `tenants` (`id`, then its tokens as
    /// `(sha256 hex, scopes as TOML)`), each with a shared-mode policy file beside it.
    fn load_tenants(dir: &Path, tenants: &[(&str, &[(&str, &str)])]) -> Result<Config, ConfigError> {
        let mut text = String::new();
        for (id, tokens) in tenants {
            std::fs::write(dir.join(format!("{id}.toml")), format!("tenant = \"{id}\"\nmode = \"shared\"\n"))
                .unwrap();
            text += &format!("[[tenants]]\nid = \"{id}\"\npolicy = \"{id}.toml\"\n");
            for (h, scopes) in *tokens {
                text += &format!("[[tenants.tokens]]\nsha256 = \"{h}\"\nscopes = {scopes}\n");
            }
        }
        let path = dir.join("rota.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&Sources { file: Some(path), ..Default::default() })
    }

    #[test]
    fn token_hashes_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let h = hex(&hash_token("secret"));
        let c = load_tenants(dir.path(), &[("acme", &[(&h, "[\"ingest\"]")])]).unwrap();
        assert!(!c.demo_tenant);
        assert_eq!(c.tenants[0].tokens[0].0, hash_token("secret"));
        let shown = c.redacted_toml();
        assert!(!shown.contains(&h) && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn a_token_listed_twice_is_refused_naming_where() {
        let dir = tempfile::tempdir().unwrap();
        let h = hex(&hash_token("secret"));
        let other = hex(&hash_token("other"));
        let ingest = "[\"ingest\"]";
        // Across two tenants: which tenant it opens would depend on the order.
        let e = load_tenants(
            dir.path(),
            &[("acme", &[(&h, ingest)]), ("globex", &[(&other, ingest), (&h, ingest)])],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tenants[1].tokens[1].sha256") && e.contains("\"acme\""), "{e}");
        // Twice in one tenant.
        let e = load_tenants(dir.path(), &[("acme", &[(&h, ingest), (&h, ingest)])]).unwrap_err().to_string();
        assert!(e.contains("tenants[0].tokens[1].sha256"), "{e}");
        load_tenants(dir.path(), &[("acme", &[(&h, ingest)]), ("globex", &[(&other, ingest)])])
            .expect("distinct tokens");
    }

    #[test]
    fn a_tokens_scopes_are_kept_in_one_order_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let h = hex(&hash_token("secret"));
        let c =
            load_tenants(dir.path(), &[("acme", &[(&h, "[\"stream\", \"ingest\", \"stream\"]")])]).unwrap();
        assert_eq!(c.tenants[0].tokens[0].1, [Scope::Ingest, Scope::Stream]);
    }
}
