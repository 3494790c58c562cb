//! `rota-loadtest`: thin; everything lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rota_loadtest::gen::{self, GenConfig};
use rota_loadtest::replay::{self, ReplayConfig, Resubscribe};
use rota_loadtest::schedule::Pacing;
use rota_loadtest::wire::Encoding;
use rota_loadtest::{report, search, trace};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The tool allocates and frees per frame on its reader and sender threads; glibc's
/// malloc took about 6 % of its CPU at 20,000 leads/s.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rota-loadtest",
    version,
    about = "Generate marketplace traces and replay them against rota"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a synthetic trace (deterministic from --seed).
    Gen {
        #[command(flatten)]
        cfg: GenConfig,
        /// Output file: .jsonl (JSON lines) or .msgpack.
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay a trace against a running rota, open loop.
    Replay(Box<ReplayArgs>),
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[arg(long, default_value = "ws://127.0.0.1:7700")]
    url: String,
    /// Token (`TOKEN`) or per-tenant token (`TENANT=TOKEN`); repeatable.
    #[arg(long, default_value = "demo-token")]
    token: Vec<String>,
    #[arg(long)]
    trace: PathBuf,
    /// Ingest connections per tenant.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Replay the trace's own timeline this much faster: `10x` or `10`.
    #[arg(long, conflicts_with = "rate")]
    speed: Option<String>,
    /// Evenly paced, this many leads per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop sending after this long (the trace loops if shorter): `30s`, `500ms`, `2m`.
    #[arg(long, value_parser = parse_positive_duration)]
    duration: Option<Duration>,
    #[arg(long, value_enum, default_value_t = Encoding::Msgpack)]
    encoding: Encoding,
    /// Send at the schedule's pace for this long first, on top of --duration (required),
    /// and leave it out of the latency figures and the throughput (everything is still
    /// checked exactly once; the intervals still show it): `2s`. wrk2's calibration period.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Wait this long after the last send for replies and stream events (at most 2m).
    #[arg(long, value_parser = parse_drain, default_value = "5s")]
    drain: Duration,
    /// Shortest gap between two send batches.
    #[arg(long, value_parser = parse_duration, default_value = "50us")]
    batch: Duration,
    /// Interval of the interval log, the chart and the live display.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    interval: Duration,
    /// Prefix of ids in this run (default: from the clock).
    #[arg(long)]
    run_tag: Option<String>,
    /// Tool threads (1 = one thread for everything; leaves the other cores to rota).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A non-loopback host that may be targeted; repeatable.
    #[arg(long)]
    allow_host: Vec<String>,
    /// Skip the trace's setup records (pros, credits): they were sent by an earlier
    /// run against the same daemon data, e.g. before a restart.
    #[arg(long)]
    skip_setup: bool,
    /// Write every request sent and every reply received as JSON lines to this file
    /// (`{"sent": frame}` / `{"reply": frame}`, paired by `id`).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Open this many subscriptions that are never read (slow consumers); the report
    /// says how each ended (the daemon should close them with 4008).
    #[arg(long, default_value_t = 0)]
    stalled_subscribers: usize,
    /// How the stream subscription receives events: `batched` (`subscribe` with
    /// `batch: true`: what is ready at once in one `events` frame) or `single` (one
    /// frame per event, the protocol's default).
    #[arg(long, value_enum, default_value_t = StreamFrames::Batched)]
    stream_frames: StreamFrames,
    /// During the timed phase, each tenant's stream subscription closes its websocket
    /// this often (`5s`), stays away for --away, reconnects and resumes with
    /// `resume_from` = the last seq it received; tenants are staggered. The report counts
    /// resumes, `resume_too_old` answers (lost seqs, a failure), each catch-up's events
    /// and time, and the time until deliveries are within 50 ms again. Delivery latency
    /// stays measured from the intended send time, so leads published while a
    /// subscriber was away include the time away (the `dlv live` row leaves out the
    /// catch-ups). Default: stay connected.
    #[arg(long, value_parser = parse_duration)]
    resubscribe_every: Option<Duration>,
    /// How long a resubscribing subscription stays away (shorter than
    /// --resubscribe-every). The drain waits this much longer too.
    #[arg(long, value_parser = parse_duration, default_value = "2s", requires = "resubscribe_every")]
    away: Duration,
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Writes PREFIX.ack.hgrm, PREFIX.delivery.hgrm and PREFIX.hlog.
    #[arg(long)]
    hdr_out: Option<PathBuf>,
    #[arg(long)]
    chart_out: Option<PathBuf>,
    #[arg(long)]
    no_progress: bool,
    /// Search the highest rate within --p99-bound-ms, starting at --rate (default 1000);
    /// each step sends for --duration (required). A lead refused with an error (e.g.
    /// shed as `overloaded`) counts as delivered above the bound in the p99 a step is
    /// held to: refusals and slow deliveries together must stay within 1% of the
    /// measured leads (the `dlv+refus` row). A step also fails on anything that fails a
    /// plain replay, below 95% of the rate acknowledged, or errors over 1% of requests.
    #[arg(long)]
    max_rate: bool,
    /// The bound on p99 delivery latency a --max-rate step is held to, in ms (> 0).
    #[arg(long, default_value_t = 3.0, value_parser = parse_bound_ms)]
    p99_bound_ms: f64,
    /// Highest rate the search tries.
    #[arg(long, default_value_t = 200_000.0)]
    rate_ceiling: f64,
    /// Bisection steps after the first failure.
    #[arg(long, default_value_t = 4)]
    search_steps: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a number with a unit (30s, 500ms, 2m)"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (us, ms, s, m)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?}: must be between 0 and 24 h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--duration`: a run of no time sends nothing and measures nothing.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than 0"));
    }
    Ok(d)
}

/// `--drain`: bounded, so the tool always stops by itself; refused above the bound
/// rather than cut to it without a word.
fn parse_drain(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > replay::MAX_DRAIN {
        return Err(format!("{s:?}: at most {:?}", replay::MAX_DRAIN));
    }
    Ok(d)
}

fn parse_bound_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?}: expected milliseconds, e.g. 3 or 0.5"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: must be a finite number of milliseconds above 0"));
    }
    Ok(v)
}

fn parse_speed(s: &str) -> anyhow::Result<f64> {
    let v: f64 =
        s.trim().trim_end_matches(['x', 'X']).parse().with_context(|| format!("--speed {s:?}: e.g. 10x"))?;
    anyhow::ensure!(v > 0.0, "--speed must be positive");
    Ok(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StreamFrames {
    Batched,
    Single,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rota-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<u8> {
    match Cli::parse().cmd {
        Cmd::Gen { cfg, out } => {
            let (records, stats) = gen::generate(&cfg);
            trace::write(&out, &records)?;
            eprintln!("{}", serde_json::to_string_pretty(&stats)?);
            eprintln!("wrote {} records to {}", records.len(), out.display());
            Ok(0)
        }
        Cmd::Replay(a) => replay_cmd(*a),
    }
}

/// Flags that do not go together, refused before the trace is read (it can take a
/// while).
fn check_args(a: &ReplayArgs) -> anyhow::Result<()> {
    if let Some(every) = a.resubscribe_every {
        Resubscribe { every, away: a.away }.validate()?;
    }
    // Without --duration the trace is replayed once, and a warm-up would be carved out
    // of that one pass: fewer leads measured the higher the rate.
    anyhow::ensure!(
        a.warmup.is_zero() || a.duration.is_some(),
        "--warmup needs --duration (the measured time after the warm-up): without it the trace is \
         replayed once and the warm-up would be taken out of that one pass"
    );
    // Every step of the search must measure the same time; one pass of the trace gets
    // shorter as the rate rises.
    anyhow::ensure!(
        !a.max_rate || a.duration.is_some(),
        "--max-rate needs --duration (how long each step sends): one pass of the trace gets shorter as \
         the rate rises"
    );
    // They describe one replay; a search makes many (--json-out has every step and the
    // best step's summary).
    anyhow::ensure!(
        !a.max_rate || (a.hdr_out.is_none() && a.chart_out.is_none()),
        "--hdr-out and --chart-out describe one replay, not a --max-rate search (--json-out writes every \
         step and the best step's summary; replay that rate alone for its histograms and chart)"
    );
    Ok(())
}

fn replay_cmd(a: ReplayArgs) -> anyhow::Result<u8> {
    check_args(&a)?;
    let resubscribe = a.resubscribe_every.map(|every| Resubscribe { every, away: a.away });
    let records = trace::read(&a.trace)?;
    let pacing = match (&a.speed, a.rate) {
        (Some(s), _) => Pacing::Speed(parse_speed(s)?),
        (None, Some(r)) => Pacing::Rate(r),
        (None, None) if a.max_rate => Pacing::Rate(1_000.0),
        (None, None) => Pacing::Speed(1.0),
    };
    let tokens = a
        .token
        .iter()
        .map(|t| match t.split_once('=') {
            Some((tenant, tok)) => (Some(tenant.to_string()), tok.to_string()),
            None => (None, t.clone()),
        })
        .collect();
    let cfg = ReplayConfig {
        url: a.url.clone(),
        tokens,
        connections: a.connections,
        pacing,
        duration: a.duration,
        encoding: a.encoding,
        drain: a.drain,
        batch: a.batch,
        run_tag: a.run_tag.clone().unwrap_or_else(|| format!("r{}", rota_loadtest::clock::wall_ms())),
        progress: !a.no_progress,
        interval: a.interval,
        allowed_hosts: a.allow_host.clone(),
        threads: a.threads,
        skip_setup: a.skip_setup,
        record: a.record.clone(),
        stalled_subscribers: a.stalled_subscribers,
        stream_batch: a.stream_frames == StreamFrames::Batched,
        resubscribe,
        warmup: a.warmup,
    };
    if a.max_rate {
        anyhow::ensure!(a.record.is_none(), "--record records one replay, not a --max-rate search");
        anyhow::ensure!(
            cfg.resubscribe.is_none(),
            "--resubscribe-every does not go with --max-rate: the search bounds delivery latency, which \
             would include the time away"
        );
        let start = match pacing {
            Pacing::Rate(r) => r,
            Pacing::Speed(_) => anyhow::bail!("--max-rate paces by --rate, not --speed"),
        };
        let res = search::max_rate(&cfg, &records, start, a.rate_ceiling, a.search_steps, a.p99_bound_ms)?;
        match res.best_rate {
            Some(r) => println!("max rate with p99 delivery <= {} ms: {r:.0} leads/s", a.p99_bound_ms),
            None => println!("no rate tried kept p99 delivery <= {} ms", a.p99_bound_ms),
        }
        if let Some(best) = &res.best {
            print!("{}", report::table(best));
        }
        if let Some(p) = &a.json_out {
            std::fs::write(p, serde_json::to_vec_pretty(&res)?)?;
        }
        // A search cut short by steps that could not run found a lower bound at most.
        if let Some(why) = &res.stopped {
            println!("search incomplete: {why}");
        }
        return Ok(if res.best_rate.is_some() && res.stopped.is_none() { 0 } else { 1 });
    }
    let outcome = replay::run(&cfg, &records)?;
    let s = &outcome.summary;
    print!("{}", report::table(s));
    if let Some(p) = &a.json_out {
        report::write_json(p, s)?;
    }
    if let Some(p) = &a.hdr_out {
        report::write_hdr(p, &outcome)?;
    }
    if let Some(p) = &a.chart_out {
        report::chart(p, s)?;
    }
    // Exit 1 when the daemon broke a promise (exactly-once, unanswered requests, a
    // continuous stream, resumes) or cut the run short.
    Ok(if s.failures().is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_speeds_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("50us").unwrap(), Duration::from_micros(50));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_speed("10x").unwrap(), 10.0);
        assert!(parse_speed("0x").is_err());
    }

    fn args(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["rota-loadtest", "replay", "--trace", "t.msgpack"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v)
    }

    /// Parses and checks replay flags: the error message, if any.
    fn refused(extra: &[&str]) -> Option<String> {
        match args(extra) {
            Err(e) => Some(e.to_string()),
            Ok(Cli { cmd: Cmd::Replay(a) }) => check_args(&a).err().map(|e| e.to_string()),
            Ok(_) => unreachable!(),
        }
    }

    #[test]
    fn warmup_and_max_rate_need_a_duration() {
        let e = refused(&["--warmup", "2s"]).expect("a warm-up without --duration is refused");
        assert!(e.contains("--warmup") && e.contains("--duration"), "{e}");
        assert_eq!(refused(&["--warmup", "2s", "--duration", "10s"]), None);
        let e = refused(&["--max-rate", "--rate", "500"]).expect("a search without --duration is refused");
        assert!(e.contains("--max-rate") && e.contains("--duration"), "{e}");
        assert_eq!(refused(&["--max-rate", "--rate", "500", "--duration", "5s"]), None);
    }

    #[test]
    fn odd_values_are_refused_by_name() {
        let e = refused(&["--duration", "0s"]).expect("a zero duration is refused");
        assert!(e.contains("--duration") && e.contains("longer than 0"), "{e}");
        let e = refused(&["--drain", "5m"]).expect("a drain above the cap is refused");
        assert!(e.contains("--drain") && e.contains("at most"), "{e}");
        assert_eq!(refused(&["--drain", "2m"]), None);
        for bad in ["0", "-1", "inf", "NaN", "x"] {
            let arg = format!("--p99-bound-ms={bad}");
            let e = refused(&[&arg]).unwrap_or_else(|| panic!("{arg} accepted"));
            assert!(e.contains("--p99-bound-ms"), "{e}");
        }
        assert_eq!(refused(&["--p99-bound-ms", "0.5"]), None);
        for out in ["--hdr-out", "--chart-out"] {
            let e = refused(&["--max-rate", "--duration", "5s", out, "x"])
                .unwrap_or_else(|| panic!("{out} with --max-rate accepted"));
            assert!(e.contains(out) && e.contains("--max-rate"), "{e}");
            assert_eq!(refused(&["--duration", "5s", out, "x"]), None);
        }
    }

    #[test]
    fn away_needs_resubscribe_every() {
        assert!(args(&[]).is_ok());
        assert!(args(&["--resubscribe-every", "5s"]).is_ok());
        assert!(args(&["--away", "1s"]).is_err(), "--away alone does nothing");
        match args(&["--resubscribe-every", "5s", "--away", "1s"]).unwrap().cmd {
            Cmd::Replay(a) => {
                assert_eq!(
                    (a.resubscribe_every, a.away),
                    (Some(Duration::from_secs(5)), Duration::from_secs(1))
                )
            }
            Cmd::Gen { .. } => unreachable!(),
        }
    }
}
