//! Trace files: one record per request, in send order.
//!
//! A record is `{"at_ms": N, "request": {...}}` with an optional `"tenant"`:
//! * `at_ms`: when to send it, in ms from the start of the trace (non-decreasing);
//! * `request`: a protocol v1 request object without its correlation `id` (the
//!   replayer adds one);
//! * `tenant`: which tenant's token sends it; absent = the default tenant.
//!
//! Absolute times inside requests (`lead.created_at`, `paused_until`, ...) are written
//! on the trace's own clock, which starts at [`TRACE_EPOCH_MS`]; the replayer moves
//! them to its wall clock.
//!
//! Two encodings, chosen by the file extension: `.jsonl` (one JSON object per line)
//! and `.msgpack` (MessagePack maps with named fields, concatenated).

use crate::wire::Request;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

/// Time zero of a trace's own clock: 2025-11-24T16:00:00Z.
pub const TRACE_EPOCH_MS: i64 = 1_764_000_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub request: Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Msgpack,
}

impl Format {
    pub fn of(path: &Path) -> anyhow::Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("ndjson") => Ok(Format::JsonLines),
            Some("msgpack") | Some("mp") => Ok(Format::Msgpack),
            _ => bail!("{}: trace files end in .jsonl or .msgpack", path.display()),
        }
    }
}

pub fn write(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let fmt = Format::of(path)?;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(f);
    write_to(fmt, records, &mut w)?;
    w.flush()?;
    Ok(())
}

pub fn write_to(fmt: Format, records: &[Record], w: &mut impl Write) -> anyhow::Result<()> {
    for r in records {
        match fmt {
            Format::JsonLines => {
                serde_json::to_writer(&mut *w, r)?;
                w.write_all(b"\n")?;
            }
            Format::Msgpack => rmp_serde::encode::write_named(w, r)?,
        }
    }
    Ok(())
}

pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let fmt = Format::of(path)?;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    read_from(fmt, BufReader::new(f)).with_context(|| format!("reading {}", path.display()))
}

/// Upper bound on records read from one file, so a wrong file cannot exhaust memory.
pub const MAX_RECORDS: usize = 50_000_000;

pub fn read_from(fmt: Format, mut r: impl BufRead) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    match fmt {
        Format::JsonLines => {
            for (i, line) in r.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let rec: Record = serde_json::from_str(&line).with_context(|| format!("line {}", i + 1))?;
                out.push(rec);
                if out.len() > MAX_RECORDS {
                    bail!("more than {MAX_RECORDS} records");
                }
            }
        }
        Format::Msgpack => loop {
            if r.fill_buf()?.is_empty() {
                break;
            }
            let rec: Record = rmp_serde::from_read(&mut r as &mut dyn Read)
                .with_context(|| format!("record {}", out.len() + 1))?;
            out.push(rec);
            if out.len() > MAX_RECORDS {
                bail!("more than {MAX_RECORDS} records");
            }
        },
    }
    check(&out)?;
    Ok(out)
}

/// The rules a trace must follow: times never go backwards.
pub fn check(records: &[Record]) -> anyhow::Result<()> {
    for (i, w) in records.windows(2).enumerate() {
        if w[1].at_ms < w[0].at_ms {
            bail!("record {}: at_ms {} is before the previous record's {}", i + 2, w[1].at_ms, w[0].at_ms);
        }
    }
    Ok(())
}
