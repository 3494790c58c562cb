//! Untrusted websocket frames, both encodings: decode must answer, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rota::protocol::{decode, Encoding};

fuzz_target!(|data: &[u8]| {
    let _ = decode(Encoding::Json, data);
    let _ = decode(Encoding::Msgpack, data);
});
