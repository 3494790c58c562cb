//! A whole snapshot's body (ledger, shards, pro directory, lead index, stream buffers,
//! order books, policies), restored as a start would: refused or restored with every
//! invariant holding, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rota::engine::restore_snapshot_checked(data);
});
