//! The cost of the weekly housekeeping (R20/R24) once the week's recharges are done:
//! what every run after the first of the week costs, each minute, for every auto-buy
//! config of a tenant. `N` buyers in Madrid (the habitissimo example policy), each with
//! one config, on a real data directory with `fsync = "always"`; then five housekeeping
//! runs, each timed.
//!
//! ```text
//! cargo run --release --example housekeeping_cost -- 5000
//! ```

use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::TenantId;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

const T0: i64 = 1_764_000_000_000;

fn config(dir: &Path) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants");
    let policy = std::fs::read_to_string(root.join("habitissimo.toml"))
        .unwrap()
        .replace("\"habitissimo\"", "\"acme\"");
    std::fs::write(dir.join("acme.toml"), policy).unwrap();
    let text = format!(
        "data_dir = {:?}\nclock = \"manual\"\nmanual_clock_start_ms = {T0}\nlog_level = \"warn\"\n[wal]\nfsync = \"always\"\n\
         [[tenants]]\nid = \"acme\"\npolicy = \"acme.toml\"\n",
        dir.join("data").display().to_string()
    );
    let path = dir.join("rota.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&Sources { file: Some(path), ..Default::default() }).expect("valid configuration")
}

fn main() {
    let buyers: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let sys = actix_rt::System::new();
    sys.block_on(async {
        let (e, _) = Engine::start(cfg).expect("starts");
        let acme = TenantId::new("acme");
        let started = Instant::now();
        for i in 0..buyers {
            let v = json!({"id": "t", "type": "upsert_pro", "pro": {"id": format!("b{i}"),
                "categories": ["painting"], "zones": ["madrid"],
                "autobuy": [{"name": "main", "zones": ["madrid"], "categories": ["painting"],
                             "weekly_budget_credits": 24}]}});
            let frame = serde_json::to_vec(&v).unwrap();
            let r = rota::protocol::decode(rota::protocol::Encoding::Json, &frame).unwrap().request;
            e.request(&acme, r).await.expect("upsert");
        }
        println!("{buyers} buyers set up in {:.1} s", started.elapsed().as_secs_f64());
        for run in 1..=5 {
            let started = Instant::now();
            e.housekeeping(&acme).await.expect("housekeeping");
            println!("housekeeping run {run}: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
        }
    });
}
