//! Shared helpers of the tests that run the whole [`rota::engine::Engine`] in-process
//! (on the in-memory filesystem): an actor system per life, and requests decoded from
//! JSON the daemon's way.

#![allow(dead_code)] // each test binary uses a different subset

use rota::protocol::Request;
use serde_json::{json, Value};
use std::future::Future;

/// Runs `fut` inside a fresh actix system, then stops that system, which stops the
/// engine's arbiters: an engine that lost power is abandoned, never shut down.
pub fn in_system<F: Future>(fut: F) -> F::Output {
    let sys = actix_rt::System::new();
    let out = sys.block_on(fut);
    sys.block_on(async { actix_rt::System::current().stop() });
    sys.run().expect("the actor system stops cleanly");
    out
}

/// A request as a frame would carry it (`{"type": ..., fields}`), decoded the daemon's way.
pub fn req(mut v: Value) -> Request {
    v["id"] = json!("t");
    let frame = serde_json::to_vec(&v).unwrap();
    rota::protocol::decode(rota::protocol::Encoding::Json, &frame)
        .unwrap_or_else(|e| panic!("test request {v} does not decode: {e:?}"))
        .request
}
