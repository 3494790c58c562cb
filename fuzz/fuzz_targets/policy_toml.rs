//! Tenant policy files: parse and validate must answer with an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = rota::core::Policy::from_toml(text);
    }
});
