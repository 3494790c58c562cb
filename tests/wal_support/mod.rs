//! Helpers shared by the `wal_*` integration tests.
#![allow(dead_code)]

use rota::wal::{Fs, MemFs, WalConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The data directory used on `MemFs`.
pub const MEM_DIR: &str = "/data/wal";

/// Small segments so rollover happens in tests; no preallocation unless asked.
pub fn small_cfg(dir: impl Into<PathBuf>) -> WalConfig {
    WalConfig { segment_bytes: 4096, preallocate: false, ..WalConfig::new(dir) }
}

pub fn mem() -> (MemFs, Arc<dyn Fs>) {
    let fs = MemFs::new();
    let dynfs: Arc<dyn Fs> = Arc::new(fs.clone());
    (fs, dynfs)
}

pub fn as_dyn(fs: &MemFs) -> Arc<dyn Fs> {
    Arc::new(fs.clone())
}

/// The payload the tests write for the n-th record: MessagePack, like real callers.
pub fn payload(n: u64, len: usize) -> Vec<u8> {
    let mut body = rmp_serde::to_vec(&("record", n)).expect("a tuple of str and u64 always encodes");
    body.resize(body.len().max(len), b'x');
    body
}

/// Appends `n` records of `payload(seq, 100)`, one append each; returns the last seq.
pub fn append_many(wal: &rota::wal::Wal, n: u64) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let seq = wal.last_seq() + 1;
        last = wal.append_blocking(vec![(2, payload(seq, 100))]).unwrap().start;
    }
    last
}

/// Segment files in `dir`, sorted.
pub fn segments(fs: &dyn Fs, dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs
        .list(dir)
        .expect("test dir exists")
        .into_iter()
        .filter(|n| n.ends_with(".wal"))
        .map(|n| dir.join(n))
        .collect();
    v.sort();
    v
}

/// A small deterministic generator; tests print their seed on failure.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
