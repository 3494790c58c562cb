//! Admin reads at a fixed rate beside the traffic: one JSON connection sends
//! `{"type":"balance","pro":...}` every `1/rate` s for `seconds` s (open loop: sends are
//! scheduled by the clock, latency measured from each one's intended time) and prints
//! the reads' latency percentiles. Run it beside `rota-loadtest replay` to see what
//! reads (each answered once what it saw is durable) cost the leads' latency.
//!
//! ```sh
//! cargo run --release --example read_load -- ws://127.0.0.1:7740 1000 12
//! ```

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).map_or("ws://127.0.0.1:7740", String::as_str).to_string();
    let rate: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000.0);
    let seconds: f64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert("authorization", "Bearer demo-token".parse()?);
    req.headers_mut().insert("sec-websocket-protocol", "rota.v1.json".parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let (mut tx, mut rx) = ws.split();
    let n = (rate * seconds) as u64;
    let start = Instant::now();
    let due = move |i: u64| start + Duration::from_secs_f64(i as f64 / rate);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tokio::time::sleep_until(due(i).into()).await;
            let frame = format!(r#"{{"id":"{i}","type":"balance","pro":"p{}"}}"#, i % 100);
            tx.send(Message::Text(frame)).await?;
        }
        anyhow::Ok(tx)
    });
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    while ok + errors < n {
        let Some(msg) = rx.next().await else { break };
        let Message::Text(text) = msg? else { continue };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let Some(i) = v["id"].as_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        hist.record(due(i).elapsed().as_micros() as u64)?;
        match v["type"].as_str() {
            Some("ok") => ok += 1,
            _ => errors += 1,
        }
    }
    let _ = sender.await?;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{n} reads at {rate}/s: {ok} ok, {errors} errors; latency ms p50 {:.3} p90 {:.3} p99 {:.3} max {:.3}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    Ok(())
}
