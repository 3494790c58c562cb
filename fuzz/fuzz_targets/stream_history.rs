//! Stream history segments read back at start and on resume: reading must refuse
//! damaged entries, never panic, and never serve an event out of sequence.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rota::wal::{Fs, MemFs, OpenMode};
use std::path::Path;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let fs = Arc::new(MemFs::new());
    let dir = Path::new("/h/t");
    fs.create_dir_all(dir).unwrap();
    let mut f = fs.open(&dir.join("00000000000000000001.spill"), OpenMode::Create).unwrap();
    f.write_at(0, data).unwrap();
    drop(f);
    let spill = rota::engine::spill::Spill::open(fs, Path::new("/h"), &rota::ids::TenantId::new("t"), 1 << 20, 16);
    let mut after = 0;
    while let Ok(chunk) = spill.read_after(after, 64, 1 << 16) {
        if chunk.is_empty() {
            break;
        }
        for o in &chunk {
            assert_eq!(o.seq, after + 1);
            after = o.seq;
        }
    }
});
