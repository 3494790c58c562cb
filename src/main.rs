//! The `rota` command: thin; everything lives in the library.

use clap::{Parser, Subcommand};
use rota::config::{Config, Sources};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: the WAL writer thread frees, at every durable batch, stream frames and
/// events that the worker threads allocated; glibc's malloc takes the owning arena's
/// lock for each such free (1.4 futex calls per lead at 20,000 leads/s), mimalloc
/// hands them back through a lock-free list (0.01). See BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "rota", version, about = "Lead dispatch daemon for service marketplaces")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// Config file (TOML); every key is documented in config/rota.toml.
    #[arg(long, short = 'c', env = "ROTA_CONFIG")]
    config: Option<PathBuf>,
    /// Override any config key: --set wal.fsync=never (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Websocket listen address (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `wall` (default) or `manual` (tests and replays move time with advance_clock).
    #[arg(long)]
    clock: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.sources())?)
    }

    /// Where the configuration comes from: the file, `ROTA_*` variables and flags (read
    /// again, the same way, at a reload).
    fn sources(&self) -> Sources {
        let mut flags = self.set.clone();
        if let Some(l) = &self.listen {
            flags.push(format!("listen={l:?}"));
        }
        if let Some(d) = &self.data_dir {
            flags.push(format!("data_dir={:?}", d.display().to_string()));
        }
        if let Some(c) = &self.clock {
            flags.push(format!("clock={c:?}"));
        }
        // `vars_os`: a variable that is not UTF-8 (anyone's, not only rota's) must not
        // stop the daemon; a `ROTA_` one that is not is named by the config's error.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                (k.starts_with("ROTA_") && k != "ROTA_CONFIG").then(|| (k, v.to_string_lossy().into_owned()))
            })
            .collect();
        Sources { file: self.config.clone(), env, flags }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (built-in defaults: demo tenant, ./rota-data, 127.0.0.1:7700).
    Serve {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Feed a small synthetic marketplace into the daemon.
        #[arg(long)]
        demo: bool,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// WAL tools (read-only unless `repair`).
    Wal {
        #[command(subcommand)]
        cmd: WalCmd,
    },
    /// Stream history tools (read-only).
    Streams {
        #[command(subcommand)]
        cmd: StreamsCmd,
    },
    /// Token tools.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand)]
enum StreamsCmd {
    /// Check every tenant's stream history under DIR (`<data_dir>/streams`): entries
    /// intact and consecutive, frames decodable; exit 1 if any is damaged.
    Verify { dir: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate and print the effective configuration (secrets redacted).
    Check {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum WalCmd {
    /// Check every segment and snapshot; exit 1 on corruption.
    Verify { dir: PathBuf },
    /// Print records, one per line.
    Dump {
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        #[arg(long, default_value_t = u64::MAX)]
        limit: u64,
    },
    /// Cut the log at the first bad record (copies the damaged segment aside first).
    Repair {
        dir: PathBuf,
        /// Required: repair can drop records after the damage.
        #[arg(long)]
        yes_i_understand_records_after_the_damage_are_dropped: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print the SHA-256 to put in a tenant's `tokens` (the token itself is never stored).
    /// The token is read from standard input (one line; `printf %s "$TOKEN" | rota token
    /// hash`), which keeps it out of the shell's history and the process list; given as
    /// an argument it works too.
    Hash { token: Option<String> },
}

/// The token on the first line of `input`, without its line ending; refused if empty
/// (an empty token would hash to a value anyone can send).
fn read_token(mut input: impl std::io::BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input.read_line(&mut line).map_err(|e| anyhow::anyhow!("reading the token from standard input: {e}"))?;
    let token = line.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        anyhow::bail!("no token on standard input (printf %s \"$TOKEN\" | rota token hash)");
    }
    Ok(token.to_string())
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let chain = error_chain(&e);
            eprintln!("rota: {chain}");
            // Once `serve` has set up logging, also as a structured line: a pipeline
            // that reads only those (`log_format = "json"`) sees why the start failed.
            if tracing::dispatcher::has_been_set() {
                tracing::error!(error = %chain, "rota stopped");
            }
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause its outer message
/// already quotes (rota's own errors name the OS error in their text).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { cfg, demo } => {
            let sources = cfg.sources();
            let cfg = Config::load(&sources)?;
            rota::server::init_logging(&cfg);
            rota::server::run(cfg, demo, Some(sources))
        }
        Cmd::Config { cmd: ConfigCmd::Check { cfg } } => {
            let cfg = cfg.load()?;
            for v in &cfg.ignored_env {
                eprintln!("warning: environment variable {v} matches no configuration key; ignored");
            }
            println!("{}", cfg.redacted_toml());
            eprintln!("config OK: {} tenant(s)", cfg.tenants.len());
            Ok(0)
        }
        Cmd::Wal { cmd } => wal_tool(cmd),
        Cmd::Streams { cmd: StreamsCmd::Verify { dir } } => {
            let report = rota::engine::spill::verify(&rota::wal::RealFs, &dir)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?;
            for h in &report {
                println!("{h}");
            }
            if report.is_empty() {
                println!("no stream history under {}", dir.display());
            }
            Ok(if report.iter().any(|h| h.damage.is_some()) { 1 } else { 0 })
        }
        Cmd::Token { cmd: TokenCmd::Hash { token } } => {
            let token = match token {
                Some(t) if t.is_empty() => anyhow::bail!("the token is empty"),
                Some(t) if t != "-" => t,
                _ => {
                    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                        eprintln!("token (then Enter):");
                    }
                    read_token(std::io::stdin().lock())?
                }
            };
            println!("{}", rota::config::hex(&rota::config::hash_token(&token)));
            Ok(0)
        }
    }
}

fn wal_tool(cmd: WalCmd) -> anyhow::Result<i32> {
    use rota::wal::{tools, RealFs};
    let mut out = std::io::stdout().lock();
    let fs = RealFs;
    let (WalCmd::Verify { dir } | WalCmd::Dump { dir, .. } | WalCmd::Repair { dir, .. }) = &cmd;
    tools::check_holds_a_log(&fs, dir).map_err(anyhow::Error::msg)?;
    match cmd {
        WalCmd::Verify { dir } => {
            let report = tools::verify(&fs, &dir)?;
            print!("{report}");
            Ok(if report.is_recoverable() { 0 } else { 1 })
        }
        WalCmd::Dump { dir, from_seq, limit } => {
            tools::dump(&fs, &dir, from_seq, limit, &mut out)?;
            Ok(0)
        }
        WalCmd::Repair { dir, yes_i_understand_records_after_the_damage_are_dropped: yes } => {
            if !yes {
                anyhow::bail!("repair drops records after the damage; pass --yes-i-understand-records-after-the-damage-are-dropped");
            }
            tools::repair(&fs, &dir, &mut out)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn a_cause_already_quoted_by_its_outer_error_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let quoted = anyhow::Error::new(io).context("preallocate wal/1.wal: No space left on device");
        assert_eq!(error_chain(&quoted), "preallocate wal/1.wal: No space left on device");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let wrapped = anyhow::Error::new(io).context("reading rota.toml");
        assert_eq!(error_chain(&wrapped), "reading rota.toml: No such file or directory");
    }
}
