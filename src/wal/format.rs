//! On-disk framing: segment headers, records, snapshot headers, file names.
//! The byte tables live in the [module docs](super).
//!
//! Everything here is pure: bytes in, bytes or parsed views out.

use std::path::Path;

/// First 8 bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"ROTAWAL\0";
/// First 8 bytes of every snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"ROTASNP\0";
/// Format version written in both headers; readers refuse other versions.
pub const FORMAT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 24;
pub const SNAPSHOT_HEADER_LEN: usize = 40;
/// Largest record payload accepted (16 MiB). A length field above it is corrupt,
/// whatever its checksum says, so a reader never allocates for a garbage length.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

pub const SEGMENT_SUFFIX: &str = ".wal";
pub const SNAPSHOT_PREFIX: &str = "snapshot-";
pub const SNAPSHOT_SUFFIX: &str = ".snap";
pub const TMP_SUFFIX: &str = ".tmp";
const RECYCLED_PREFIX: &str = "recycled-";
/// The next segment, prepared ahead of the rollover (zero-filled, or a recycled file).
pub const SPARE_NAME: &str = "next-segment.wal.tmp";

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("slice of 4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// `00000000000000000001.wal`: 20 digits so names sort like their first seq.
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// `recycled-00000000000000000001.wal.tmp`: a compacted segment kept for reuse
/// (its content is garbage; recovery may delete it like any `*.tmp`).
pub fn recycled_name(first_seq: u64) -> String {
    format!("{RECYCLED_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}{TMP_SUFFIX}")
}

/// Whether a file name is a recycled segment's, or the prepared next segment's (found
/// at start-up, it is reused like a recycled one: zero-filled, partly zero-filled, or
/// a recycled file, all of it garbage the next segment overwrites).
pub fn is_recycled_name(name: &str) -> bool {
    name == SPARE_NAME
        || name
            .strip_prefix(RECYCLED_PREFIX)
            .and_then(|n| n.strip_suffix(TMP_SUFFIX))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(parse_digits)
            .is_some()
}

/// `snapshot-00000000000000001000.snap`.
pub fn snapshot_name(covers_seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{covers_seq:020}{SNAPSHOT_SUFFIX}")
}

fn parse_digits(s: &str) -> Option<u64> {
    if s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// The first seq a segment file name claims, if it is a segment name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    parse_digits(name.strip_suffix(SEGMENT_SUFFIX)?)
}

/// The covered seq a snapshot file name claims, if it is a snapshot name.
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    parse_digits(name.strip_prefix(SNAPSHOT_PREFIX)?.strip_suffix(SNAPSHOT_SUFFIX)?)
}

pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a segment header, returning its first seq, or why it is invalid.
pub fn decode_segment_header(b: &[u8]) -> Result<u64, String> {
    if b.len() < SEGMENT_HEADER_LEN {
        return Err(format!("segment header truncated ({} of {SEGMENT_HEADER_LEN} bytes)", b.len()));
    }
    if b[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    if crc32c::crc32c(&b[0..28]) != u32_at(b, 28) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u16_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "unsupported segment format version {version} (this build reads {FORMAT_VERSION})"
        ));
    }
    Ok(u64_at(b, 16))
}

/// Appends one framed record to `buf`.
pub fn encode_record(buf: &mut Vec<u8>, seq: u64, kind: u8, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_RECORD_BYTES, "callers check the size before framing");
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12] = kind;
    let header_crc = crc32c::crc32c(&h[0..16]);
    h[16..20].copy_from_slice(&header_crc.to_le_bytes());
    let record_crc = crc32c::crc32c_append(header_crc, payload);
    h[20..24].copy_from_slice(&record_crc.to_le_bytes());
    buf.extend_from_slice(&h);
    buf.extend_from_slice(payload);
}

/// Bytes a record with this payload takes on disk.
pub fn framed_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len
}

/// A record as it sits in a buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub kind: u8,
    pub crc: u32,
    /// Byte offset of the record header within its segment.
    pub offset: u64,
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    pub fn framed_len(&self) -> usize {
        framed_len(self.payload.len())
    }
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Fewer bytes than a header or than the payload length says.
    Truncated(String),
    /// A checksum failed, a reserved byte is set, or the length is absurd.
    Invalid(String),
}

impl Bad {
    pub fn reason(&self) -> &str {
        match self {
            Bad::Truncated(s) | Bad::Invalid(s) => s,
        }
    }
}

/// Decodes the record starting at `b[0]`; `offset` is only for reporting.
pub fn decode_record(b: &[u8], offset: u64) -> Result<RecordRef<'_>, Bad> {
    if b.len() < RECORD_HEADER_LEN {
        return Err(Bad::Truncated(format!(
            "record header truncated ({} of {RECORD_HEADER_LEN} bytes)",
            b.len()
        )));
    }
    let header_crc = crc32c::crc32c(&b[0..16]);
    if header_crc != u32_at(b, 16) {
        return Err(Bad::Invalid("record header checksum mismatch".into()));
    }
    // The header checksum held, so the length is what the writer wrote; still refuse
    // anything a writer never would.
    let len = u32_at(b, 0) as usize;
    if len > MAX_RECORD_BYTES {
        return Err(Bad::Invalid(format!("record length {len} exceeds the {MAX_RECORD_BYTES}-byte limit")));
    }
    if b[13..16] != [0, 0, 0] {
        return Err(Bad::Invalid("record reserved bytes are not zero".into()));
    }
    let end = RECORD_HEADER_LEN + len;
    if b.len() < end {
        return Err(Bad::Truncated(format!(
            "record payload truncated ({} of {len} bytes)",
            b.len() - RECORD_HEADER_LEN
        )));
    }
    let payload = &b[RECORD_HEADER_LEN..end];
    let crc = u32_at(b, 20);
    if crc32c::crc32c_append(header_crc, payload) != crc {
        return Err(Bad::Invalid("record checksum mismatch".into()));
    }
    Ok(RecordRef { seq: u64_at(b, 4), kind: b[12], crc, offset, payload })
}

/// How a scan of a segment's records ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// The last record ends exactly at the end of the file.
    Clean { end: u64 },
    /// Only zeros follow the last record (a preallocated segment): end of log.
    ZeroTail { end: u64 },
    /// A valid record with a seq below the segment's first seq follows the last
    /// record: a leftover from the file's earlier life as an older segment (a
    /// recycled segment, see the module docs). End of log, like `ZeroTail`.
    Stale { end: u64, found: u64 },
    /// The bytes at `offset` are not a valid record.
    Bad {
        offset: u64,
        reason: String,
        /// Whether a complete, valid record of this segment's life (seq at least its
        /// first seq) starts somewhere after `offset`: if so the damage is in the
        /// middle of the log, not a torn tail.
        valid_follows: bool,
    },
    /// A valid record carries the wrong seq (a gap or a regression).
    SeqMismatch { offset: u64, found: u64 },
}

/// Walks the records of a segment body starting at `start` (just after the header),
/// expecting consecutive seqs from `first_seq`, calling `f` for each valid record.
/// `f` returns `false` to stop early; the scan then reports `Clean` at that point.
pub fn scan_records<'a>(
    seg: &'a [u8],
    start: usize,
    first_seq: u64,
    mut f: impl FnMut(RecordRef<'a>) -> bool,
) -> ScanEnd {
    let mut at = start;
    let mut expected = first_seq;
    loop {
        if at == seg.len() {
            return ScanEnd::Clean { end: at as u64 };
        }
        let rest = &seg[at..];
        match decode_record(rest, at as u64) {
            Ok(rec) => {
                if rec.seq < first_seq {
                    return ScanEnd::Stale { end: at as u64, found: rec.seq };
                }
                if rec.seq != expected {
                    return ScanEnd::SeqMismatch { offset: at as u64, found: rec.seq };
                }
                at += rec.framed_len();
                expected += 1;
                if !f(rec) {
                    return ScanEnd::Clean { end: at as u64 };
                }
            }
            Err(bad) => {
                if rest.iter().all(|&b| b == 0) {
                    return ScanEnd::ZeroTail { end: at as u64 };
                }
                let bad = |valid_follows| ScanEnd::Bad {
                    offset: at as u64,
                    reason: bad.reason().to_owned(),
                    valid_follows,
                };
                return match records_after(seg, at + 1, first_seq) {
                    After::Fresh => bad(true),
                    // The end of this segment's records inside a recycled file: the
                    // rest is the file's earlier content (cut in the middle of a
                    // record), or a record torn by a crash over it. Either way
                    // nothing of this segment follows; the writer overwrites it.
                    After::Stale { seq } => ScanEnd::Stale { end: at as u64, found: seq },
                    After::Nothing => bad(false),
                };
            }
        }
    }
}

/// What follows a damaged spot in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// A complete, checksum-valid record with a seq of at least the segment's first:
    /// part of this segment's life, so the damage is in the middle of the log.
    Fresh,
    /// Only leftovers of the file's earlier life as an older segment (valid records
    /// with lower seqs; `seq` is the first found) and fragments of them.
    Stale { seq: u64 },
    /// Nothing valid at all.
    Nothing,
}

/// Looks for valid records starting at any byte offset from `from`; records with a
/// seq below `min_seq` are leftovers of a recycled file (see [`After`]). Only runs
/// when something is already wrong, so it may be slow-ish; runs of zeros
/// (preallocated space) are skipped in one step, and so is every leftover record
/// found (a record of this segment starting inside it would have overwritten it).
pub fn records_after(seg: &[u8], from: usize, min_seq: u64) -> After {
    let mut p = from;
    let mut stale = None;
    while p + RECORD_HEADER_LEN <= seg.len() {
        if seg[p..p + 16].iter().all(|&b| b == 0) {
            // Every window starting before the next non-zero byte minus 15 is all zero,
            // and a valid header never is (its checksum of zeros is not zero).
            match seg[p + 16..].iter().position(|&b| b != 0) {
                None => break,
                Some(k) => {
                    p = p + 16 + k - 15;
                    continue;
                }
            }
        }
        match decode_record(&seg[p..], p as u64) {
            Ok(r) if r.seq >= min_seq => return After::Fresh,
            Ok(r) => {
                stale.get_or_insert(r.seq);
                p += r.framed_len();
            }
            Err(_) => p += 1,
        }
    }
    stale.map_or(After::Nothing, |seq| After::Stale { seq })
}

/// After damage at `from` where the record with seq `expected` should start: the offset
/// and seq of the first valid record further on whose seq is in `expected + 1..=upto`,
/// if there is one (a record of this segment's life that the damage did not touch).
/// Recovery uses it to step over damaged records a snapshot already covers
/// (`upto` = the first seq it needs).
pub fn next_record_within(seg: &[u8], from: usize, expected: u64, upto: u64) -> Option<(usize, u64)> {
    let mut p = from;
    while p + RECORD_HEADER_LEN <= seg.len() {
        match decode_record(&seg[p..], p as u64) {
            Ok(r) if r.seq > expected && r.seq <= upto => return Some((p, r.seq)),
            // A valid record past what the snapshot covers, or a regression: not a place
            // to resume from (the records between would be missing).
            Ok(r) if r.seq > upto => return None,
            Ok(r) => p += r.framed_len(),
            Err(_) => p += 1,
        }
    }
    None
}

#[cfg(test)]
pub fn encode_snapshot(covers_seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN + payload.len());
    out.extend_from_slice(&snapshot_header(covers_seq, payload));
    out.extend_from_slice(payload);
    out
}

/// The header [`encode_snapshot`] puts before `payload` (written on its own, the
/// payload need not be copied behind it).
pub fn snapshot_header(covers_seq: u64, payload: &[u8]) -> [u8; SNAPSHOT_HEADER_LEN] {
    let mut h = [0u8; SNAPSHOT_HEADER_LEN];
    h[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(SNAPSHOT_HEADER_LEN as u16).to_le_bytes());
    h[16..24].copy_from_slice(&covers_seq.to_le_bytes());
    h[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[32..36].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&h[0..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Validates a snapshot file; returns (covers_seq, payload).
pub fn decode_snapshot(b: &[u8]) -> Result<(u64, &[u8]), String> {
    if b.len() < SNAPSHOT_HEADER_LEN {
        return Err(format!("snapshot header truncated ({} of {SNAPSHOT_HEADER_LEN} bytes)", b.len()));
    }
    if b[0..8] != SNAPSHOT_MAGIC {
        return Err("bad snapshot magic".into());
    }
    if crc32c::crc32c(&b[0..36]) != u32_at(b, 36) {
        return Err("snapshot header checksum mismatch".into());
    }
    let version = u16_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(format!("unsupported snapshot format version {version}"));
    }
    let len = u64_at(b, 24);
    if len != (b.len() - SNAPSHOT_HEADER_LEN) as u64 {
        return Err(format!(
            "snapshot length mismatch: header says {len} bytes, file holds {}",
            b.len() - SNAPSHOT_HEADER_LEN
        ));
    }
    let payload = &b[SNAPSHOT_HEADER_LEN..];
    if crc32c::crc32c(payload) != u32_at(b, 32) {
        return Err("snapshot payload checksum mismatch".into());
    }
    Ok((u64_at(b, 16), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 42, 7, b"payload");
        let rec = decode_record(&buf, 0).unwrap();
        assert_eq!((rec.seq, rec.kind, rec.payload), (42, 7, &b"payload"[..]));
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&bad, 0).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn zero_header_is_never_valid() {
        assert!(decode_record(&[0u8; 64], 0).is_err());
    }

    #[test]
    fn names_sort_like_seqs_and_parse_back() {
        assert_eq!(segment_name(1), "00000000000000000001.wal");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_snapshot_name(&snapshot_name(77)), Some(77));
        assert_eq!(parse_segment_name("00000000000000000001.wal.corrupt-1"), None);
    }

    #[test]
    fn snapshot_round_trips_and_detects_damage() {
        let mut snap = encode_snapshot(9, b"state");
        assert_eq!(decode_snapshot(&snap).unwrap(), (9, &b"state"[..]));
        let last = snap.len() - 1;
        snap[last] ^= 1;
        assert!(decode_snapshot(&snap).is_err());
    }

    #[test]
    fn segment_header_round_trips() {
        let h = encode_segment_header(123);
        assert_eq!(decode_segment_header(&h), Ok(123));
        let mut bad = h;
        bad[17] ^= 4;
        assert!(decode_segment_header(&bad).is_err());
    }
}
