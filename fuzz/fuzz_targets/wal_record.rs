//! WAL record payloads read back at recovery: decode must refuse, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rota::engine::record::decode(data);
});
