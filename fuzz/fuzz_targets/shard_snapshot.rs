//! Shard state inside snapshots (MessagePack): decode and restore must not panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut shard) = rmp_serde::from_slice::<rota::core::Shard>(data) {
        shard.restore(std::sync::Arc::new(rota::core::Policy::shared_default("fuzz")));
        let _ = shard.check_invariants();
    }
});
