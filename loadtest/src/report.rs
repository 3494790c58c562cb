//! What a run leaves behind: a table on stdout, a JSON summary, HdrHistogram
//! percentile distributions (`.hgrm`, readable by HdrHistogram's plotter), an
//! HdrHistogram interval log (`.hlog`) and a PNG chart.

use crate::replay::{Outcome, Percentiles, Summary};
use anyhow::Context;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

pub fn table(s: &Summary) -> String {
    let mut out = String::new();
    let row = |out: &mut String, name: &str, p: &Percentiles| {
        let _ = writeln!(
            out,
            "{name:<10} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            p.count, p.p50, p.p90, p.p99, p.p999, p.p9999, p.max
        );
    };
    let _ = writeln!(
        out,
        "latency ms {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    row(&mut out, "ack", &s.ack);
    if s.ack_error.count > 0 {
        row(&mut out, "ack ok", &s.ack_ok);
        row(&mut out, "ack error", &s.ack_error);
    }
    row(&mut out, "delivery", &s.delivery);
    if s.leads_refused > 0 {
        // What --max-rate bounds: each refused lead counts as delivered after 10 min.
        row(&mut out, "dlv+refus", &s.delivery_counting_refused);
    }
    if let Some(r) = &s.resubscribe {
        // Leads whose first offer came in a resume's catch-up carry the time away.
        row(&mut out, "dlv live", &r.delivery_outside_catch_up);
    }
    row(&mut out, "other", &s.other_replies);
    // Each request from its intended time to the flush of its connection that wrote it.
    row(&mut out, "send lag", &s.send_lag);
    // The daemon's share: accepted publishes from the end of their send lag.
    row(&mut out, "ok service", &s.ack_ok_service);
    if s.ack_ok_service_missing > 0 {
        let _ = writeln!(
            out,
            "ok service: {} accepted publishes have no sample (answered, but their write was never recorded)",
            s.ack_ok_service_missing
        );
    }
    let _ = writeln!(
        out,
        "throughput: {:.0} leads/s acknowledged of {:.0} leads/s targeted ({:.1}%), over {:.1} s measured \
         (sending took {:.1} s{}), {} connection(s), {:?}",
        s.achieved_leads_per_s,
        s.target_leads_per_s,
        100.0 * s.achieved_leads_per_s / s.target_leads_per_s.max(1e-9),
        s.measured_s,
        s.duration_s,
        if s.warmup_s > 0.0 { ", warm-up included" } else { "" },
        s.connections,
        s.encoding
    );
    if s.warmup_s > 0.0 {
        let _ = writeln!(
            out,
            "warm-up: the first {:.1} s of sends are checked but not in the figures above (the intervals show them)",
            s.warmup_s
        );
    }
    let _ = writeln!(
        out,
        "sent {} ({} leads), not sent {} ({} leads), replies {} (missing {}), accepted {}, rejected {}, stream events {}",
        s.sent,
        s.sent_leads,
        s.not_sent,
        s.not_sent_leads,
        s.replies,
        s.missing_replies,
        s.acks_accepted,
        s.acks_rejected,
        s.stream_events
    );
    if s.followups_skipped > 0 {
        let _ = writeln!(
            out,
            "not sent: {} requests about leads whose publish was refused (a platform does not act on those)",
            s.followups_skipped
        );
    }
    if s.errors_by_code.is_empty() {
        let _ = writeln!(out, "errors: none");
    } else {
        let list: Vec<String> = s.errors_by_code.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "errors: {}", list.join(", "));
    }
    if let Some(h) = &s.host {
        let _ = writeln!(out, "{}", h.describe(s.tool_threads));
    }
    for (i, end) in s.stalled_subscribers.iter().enumerate() {
        let _ = writeln!(out, "stalled subscriber {i}: {end}");
    }
    if let Some(r) = &s.resubscribe {
        let _ = writeln!(
            out,
            "resubscribe every {:.1} s, away {:.1} s: {} departure(s), {} server close(s), {} resume(s), {} resume_too_old, {} failed; catch-up events sum {} max {}; catch-up ms mean {:.1} max {:.1}{}; back to live (a delivery within {} ms) ms mean {:.1} max {:.1}{}; dlv live = delivery outside catch-ups",
            r.every_s,
            r.away_s,
            r.departures,
            r.server_closes,
            r.resumes,
            r.resumes_too_old,
            r.resume_failures,
            r.catch_up_events_sum,
            r.catch_up_events_max,
            r.catch_up_ms_mean,
            r.catch_up_ms_max,
            if r.catch_ups_unfinished > 0 {
                format!(" ({} unfinished)", r.catch_ups_unfinished)
            } else {
                String::new()
            },
            crate::replay::LIVE_MS,
            r.back_to_live_ms_mean,
            r.back_to_live_ms_max,
            if r.back_to_live_never > 0 {
                format!(" ({} never)", r.back_to_live_never)
            } else {
                String::new()
            }
        );
        if r.resumes_too_old > 0 {
            let _ = writeln!(
                out,
                "STREAM NOT CONTINUOUS: {} resume(s) answered resume_too_old, {} seq(s) lost:",
                r.resumes_too_old, r.resume_too_old_lost_seqs
            );
            for d in r.resume_too_old_details.iter().take(5) {
                let _ = writeln!(out, "  {d}");
            }
        }
    }
    let v = &s.violations;
    let _ = writeln!(
        out,
        "exactly-once: {} violation(s) (missing {}, duplicate leads {}, duplicate offers {}, acked offers not delivered {}, delivered after error {}, status mismatches {}, offers for unaccepted leads {}, wrong stream {}); stream seq gaps {}{}",
        v.total(),
        v.missing_deliveries,
        v.duplicate_deliveries,
        v.duplicate_offers,
        v.acked_offers_not_delivered,
        v.delivered_after_error,
        v.status_mismatches,
        v.offers_for_unaccepted_leads,
        v.wrong_stream,
        s.stream_seq_gaps,
        if s.stream_closed_early { "; the stream was closed by the server" } else { "" }
    );
    for e in v.examples.iter().take(5) {
        let _ = writeln!(out, "  {e}");
    }
    let failures = s.failures();
    if failures.is_empty() {
        let _ = writeln!(out, "checks: passed");
    } else {
        let _ = writeln!(out, "checks: FAILED: {}", failures.join("; "));
    }
    out
}

pub fn write_json(path: &Path, s: &Summary) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(f), s)?;
    Ok(())
}

/// HdrHistogram's percentile distribution format, values in milliseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        return out;
    }
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let ms = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            let _ = writeln!(out, "{ms:>12.3} {q:>14.12} {total:>10} {:>14.2}", 1.0 / (1.0 - q));
        } else {
            let _ = writeln!(out, "{ms:>12.3} {q:>14.12} {total:>10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(out, "#[Max     = {:>12.3}, Total count    = {:>12}]", h.max() as f64 / 1000.0, h.len());
    let _ = writeln!(out, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", h.buckets(), h.distinct_values());
    out
}

/// Writes `<prefix>.ack.hgrm`, `<prefix>.delivery.hgrm` and `<prefix>.hlog`.
pub fn write_hdr(prefix: &Path, o: &Outcome) -> anyhow::Result<()> {
    let name = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        std::path::PathBuf::from(p)
    };
    std::fs::write(name(".ack.hgrm"), hgrm(&o.ack))?;
    std::fs::write(name(".delivery.hgrm"), hgrm(&o.delivery))?;
    let f = std::fs::File::create(name(".hlog"))?;
    let mut w = std::io::BufWriter::new(f);
    let mut ser = V2DeflateSerializer::new();
    {
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment("rota-loadtest interval log; values in microseconds; tags: ack, delivery")
            .with_max_value_divisor(1000.0)
            .begin_log_with(&mut w, &mut ser)?;
        for (start, ack, delivery) in &o.interval_hists {
            log.write_histogram(ack, *start, o.interval, Tag::new("ack"))
                .map_err(|e| anyhow::anyhow!("interval log: {e:?}"))?;
            log.write_histogram(delivery, *start, o.interval, Tag::new("delivery"))
                .map_err(|e| anyhow::anyhow!("interval log: {e:?}"))?;
        }
    }
    w.flush()?;
    Ok(())
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Latency (p50, p99 of ack and delivery, log scale) and throughput over time.
pub fn chart(path: &Path, s: &Summary) -> anyhow::Result<()> {
    use plotters::prelude::*;
    // ab_glyph renders text from this embedded font: no system font libraries.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (top, bottom) = root.split_vertically(440);
    let iv = &s.intervals;
    let t_max = iv.last().map(|i| i.t_s).unwrap_or(1.0).max(1.0);
    let lat_max =
        iv.iter().flat_map(|i| [i.ack_p99_ms, i.delivery_p99_ms]).fold(1.0f64, f64::max).max(0.1) * 1.5;
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("chart: {e:?}");
    let mut c = ChartBuilder::on(&top)
        .caption(
            format!("rota latency, target {:.0} leads/s ({:?})", s.target_leads_per_s, s.encoding),
            ("sans-serif", 22),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, (0.01f64..lat_max).log_scale())
        .map_err(err)?;
    c.configure_mesh().x_desc("seconds").y_desc("ms (log)").draw().map_err(err)?;
    type Pick = fn(&crate::replay::IntervalStat) -> f64;
    let series: [(&str, RGBColor, Pick); 4] = [
        ("ack p50", BLUE, |i| i.ack_p50_ms),
        ("ack p99", RGBColor(0, 0, 120), |i| i.ack_p99_ms),
        ("delivery p50", RED, |i| i.delivery_p50_ms),
        ("delivery p99", RGBColor(140, 0, 0), |i| i.delivery_p99_ms),
    ];
    for (name, color, f) in series {
        // Intervals without samples are left out rather than drawn at zero.
        c.draw_series(LineSeries::new(
            iv.iter().filter(|i| f(i) > 0.0).map(|i| (i.t_s, f(i))),
            color.stroke_width(2),
        ))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;

    let rate_max =
        iv.iter().map(|i| i.sent_per_s.max(i.acks_per_s)).fold(s.target_leads_per_s, f64::max) * 1.2;
    let mut c = ChartBuilder::on(&bottom)
        .caption("throughput", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..rate_max.max(1.0))
        .map_err(err)?;
    c.configure_mesh().x_desc("seconds").y_desc("per second").draw().map_err(err)?;
    c.draw_series(LineSeries::new(iv.iter().map(|i| (i.t_s, i.sent_per_s)), GREEN.stroke_width(2)))
        .map_err(err)?
        .label("records sent")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    c.draw_series(LineSeries::new(
        iv.iter().map(|i| (i.t_s, i.acks_per_s - i.lead_errors_per_s)),
        BLUE.stroke_width(2),
    ))
    .map_err(err)?
    .label("leads acknowledged")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    // Under overload: the leads rota refused (`overloaded` and other errors).
    if iv.iter().any(|i| i.lead_errors_per_s > 0.0) {
        c.draw_series(LineSeries::new(iv.iter().map(|i| (i.t_s, i.lead_errors_per_s)), RED.stroke_width(2)))
            .map_err(err)?
            .label("leads refused (errors)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    c.draw_series(LineSeries::new([(0.0, s.target_leads_per_s), (t_max, s.target_leads_per_s)], BLACK))
        .map_err(err)?
        .label("target leads/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(|e| anyhow::anyhow!("chart: {e:?}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The throughput line names the span of the rate (warm-up left out) apart from the
    /// time spent sending; accepted publishes without an `ok service` sample are said.
    #[test]
    fn the_table_says_what_the_rate_is_over_and_what_ok_service_lacks() {
        let s = Summary {
            achieved_leads_per_s: 1_000.0,
            target_leads_per_s: 1_000.0,
            measured_s: 10.0,
            duration_s: 12.0,
            warmup_s: 2.0,
            ..Default::default()
        };
        let t = table(&s);
        assert!(t.contains("over 10.0 s measured (sending took 12.0 s, warm-up included)"), "{t}");
        assert!(!t.contains("no sample"), "{t}");
        let t = table(&Summary { warmup_s: 0.0, ack_ok_service_missing: 3, ..s });
        assert!(t.contains("over 10.0 s measured (sending took 12.0 s),"), "{t}");
        assert!(t.contains("ok service: 3 accepted publishes have no sample"), "{t}");
    }

    #[test]
    fn hgrm_has_the_hdrhistogram_layout() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"), "{text}");
        assert!(text.contains("#[Max     ="), "{text}");
        let last_row = text.lines().rfind(|l| !l.starts_with('#') && !l.trim().is_empty()).unwrap();
        assert!(last_row.contains("1.000000000000"), "{last_row}");
    }
}
