//! Output of a run: `result.json` (everything), `summary.md` (the figures people read) and
//! `chart.svg` (notification latency percentiles and throughput over time).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::peer::Target;
use crate::scenario::Scenario;
use crate::stats::Summary;

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Point {
    pub t_s: f64,
    pub phase: String,
    pub sockets_in: u64,
    pub connects_per_s: u64,
    /// Notifications received by the harness in this second.
    pub deliveries_per_s: u64,
    pub errors: u64,
    /// Connect and bye notification latencies resolved in this second.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub server_cpu_pct: f64,
    pub server_rss_mib: f64,
}

/// Did every watcher see exactly the truth?
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Correctness {
    /// Notifications received (other users only).
    pub notifications: u64,
    /// Visible presence changes the harness caused.
    pub events: u64,
    /// Notifications matched to the event that caused them (these give the latencies).
    pub matched: u64,
    /// Fanout: deliveries that should have happened (events x watchers).
    pub expected: Option<u64>,
    pub missed_deliveries: Option<u64>,
    /// Watched users whose final view differs from the truth.
    pub final_mismatch: u64,
    pub spurious_repeat: u64,
    pub spurious_state: u64,
    pub spurious_snapshot: u64,
    pub unmatched: u64,
    /// Delivered after a newer, opposite event (a backlog; matched to the older event).
    pub late: u64,
    /// Server-side `reach_updates_coalesced_total` over the run: updates merged into a still
    /// queued one for a subscriber that fell behind (by design: the latest state is kept).
    pub server_coalesced: Option<f64>,
    /// Watched users whose final view is wrong: must be 0.
    pub missed: u64,
    /// Notifications contradicting the truth (offline inside the grace, offline snapshot in a
    /// storm, no event at all): must be 0. Repeats are listed apart: a coalesced flap arrives
    /// as one update that repeats the state the watcher already had.
    pub spurious: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    pub pid: Option<String>,
    /// RSS after start-up and service creation, before any socket.
    pub baseline_rss_bytes: Option<u64>,
    /// RSS with every socket connected and subscribed.
    pub loaded_rss_bytes: Option<u64>,
    pub end_rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// (loaded - baseline) / sockets.
    pub bytes_per_socket: Option<f64>,
    /// RSS 5 s after every socket was subscribed, and (that - baseline) / sockets.
    pub rss_5s_bytes: Option<u64>,
    pub bytes_per_socket_5s: Option<f64>,
    /// (RSS at the end of the active phase - baseline) / sockets: settled, for an idle run.
    pub bytes_per_socket_end: Option<f64>,
    /// The active phase: wall time, server CPU seconds and percent of one core.
    pub run_s: Option<f64>,
    pub run_cpu_s: Option<f64>,
    pub run_cpu_pct: Option<f64>,
    /// `reach_updates_queued_total` over the active phase.
    pub run_deliveries: Option<f64>,
    pub run_frames_sent: Option<f64>,
    pub run_diffs: Option<f64>,
    pub deliveries_per_s: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
    /// Notifications the harness received during the active phase, per second, and the
    /// server's CPU per received notification: the same measure for every target.
    pub run_received: Option<f64>,
    pub received_per_s: Option<f64>,
    pub cpu_us_per_received: Option<f64>,
    /// Storm: from the drop order to the last socket subscribed again.
    pub storm_convergence_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub scenario: Scenario,
    pub target: Target,
    pub url: String,
    pub reachd_config: Option<String>,
    pub reachd_env: Vec<String>,
    pub started_unix: u64,
    /// Phase boundaries, seconds since the start.
    pub marks: Vec<(String, f64)>,
    /// Notification latency per event kind.
    pub latency: Vec<(String, Summary)>,
    pub upgrade: Summary,
    pub hello: Summary,
    pub subscribe: Summary,
    pub connects: u64,
    pub notifications: u64,
    pub peak_deliveries_per_s: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub unexpected_closes: u64,
    pub correctness: Correctness,
    pub server: ServerFigures,
    pub harness_cpu_s: f64,
    pub harness_rss_bytes: u64,
    pub series: Vec<Point>,
}

pub fn write(dir: &Path, r: &Results) -> Result<(), String> {
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("result.json"), json).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("summary.md"), markdown(r)).map_err(|e| e.to_string())?;
    chart(&dir.join("chart.svg"), r).map_err(|e| format!("chart: {e}"))?;
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

pub fn markdown(r: &Results) -> String {
    let s = &r.scenario;
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# reach-loadtest: {} ({:?}) against {}\n",
        s.name,
        s.kind,
        r.target.name()
    );
    let _ = writeln!(
        m,
        "{} sockets, {} workers, {} source addresses each, encoding {}, hold {} s. Phases (s): {}.\n",
        s.sockets,
        s.workers,
        s.source_ips,
        match r.target {
            Target::Reach => s.encoding.as_str(),
            Target::Pusher => "json (Pusher)",
            Target::Mqtt => "MQTT 3.1.1",
        },
        s.hold_s,
        r.marks
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(m, "## Notification latency (ms)\n");
    let _ = writeln!(m, "| event | count | p50 | p90 | p99 | p99.9 | max |");
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    let rows = r.latency.iter().map(|(k, v)| (k.as_str(), v)).chain([
        ("tcp+upgrade", &r.upgrade),
        ("hello->welcome", &r.hello),
        ("subscribe->subscribed", &r.subscribe),
    ]);
    for (k, v) in rows {
        if v.count == 0 {
            continue;
        }
        let _ = writeln!(
            m,
            "| {k} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            v.count, v.p50_ms, v.p90_ms, v.p99_ms, v.p999_ms, v.max_ms
        );
    }
    let sv = &r.server;
    let mib = |b: Option<u64>| opt(b.map(|b| b as f64 / 1048576.0), 1);
    let _ = writeln!(
        m,
        "\n## Server ({}, pid {})\n",
        r.target.process_name(),
        sv.pid.as_deref().unwrap_or("?")
    );
    let _ = writeln!(m, "| figure | value |\n|---|---|");
    let _ = writeln!(
        m,
        "| RSS baseline / loaded / end / peak (MiB) | {} / {} / {} / {} |",
        mib(sv.baseline_rss_bytes),
        mib(sv.loaded_rss_bytes),
        mib(sv.end_rss_bytes),
        mib(sv.peak_rss_bytes)
    );
    let _ = writeln!(
        m,
        "| bytes per socket ((loaded - baseline) / sockets) | {} |",
        opt(sv.bytes_per_socket, 0)
    );
    let _ = writeln!(
        m,
        "| bytes per socket 5 s after subscribed / at the end of the active phase | {} / {} |",
        opt(sv.bytes_per_socket_5s, 0),
        opt(sv.bytes_per_socket_end, 0)
    );
    let _ = writeln!(
        m,
        "| active phase: wall s / server CPU s / % of one core | {} / {} / {} |",
        opt(sv.run_s, 1),
        opt(sv.run_cpu_s, 2),
        opt(sv.run_cpu_pct, 0)
    );
    let _ = writeln!(
        m,
        "| deliveries (server `reach_updates_queued_total`) / per s | {} / {} |",
        opt(sv.run_deliveries, 0),
        opt(sv.deliveries_per_s, 0)
    );
    let _ = writeln!(
        m,
        "| diffs / frames sent | {} / {} |",
        opt(sv.run_diffs, 0),
        opt(sv.run_frames_sent, 0)
    );
    let _ = writeln!(
        m,
        "| server CPU per delivery (us) | {} |",
        opt(sv.cpu_us_per_delivery, 2)
    );
    if r.scenario.kind == crate::scenario::Kind::Rooms {
        // Every connect after the first of each socket is a leave + reconnect + rejoin cycle.
        let cycles = r.connects.saturating_sub(u64::from(r.scenario.sockets));
        let per_cycle = sv
            .run_cpu_s
            .filter(|_| cycles > 0)
            .map(|cpu| cpu * 1e6 / cycles as f64);
        let _ = writeln!(
            m,
            "| leave + reconnect + rejoin cycles / server CPU per cycle (us) | {} / {} |",
            cycles,
            opt(per_cycle, 1)
        );
    }
    let _ = writeln!(
        m,
        "| notifications received in the active phase / per s / server CPU per one (us) | {} / {} / {} |",
        opt(sv.run_received, 0),
        opt(sv.received_per_s, 0),
        opt(sv.cpu_us_per_received, 2)
    );
    if sv.storm_convergence_ms.is_some() {
        let _ = writeln!(
            m,
            "| storm convergence (ms) | {} |",
            opt(sv.storm_convergence_ms, 0)
        );
    }
    let c = &r.correctness;
    let _ = writeln!(m, "\n## Harness and correctness\n");
    let _ = writeln!(m, "| figure | value |\n|---|---|");
    let _ = writeln!(m, "| connects (authenticated) | {} |", r.connects);
    let _ = writeln!(
        m,
        "| notifications received / peak per s | {} / {} |",
        r.notifications, r.peak_deliveries_per_s
    );
    let _ = writeln!(
        m,
        "| visible events caused / notifications matched | {} / {} |",
        c.events, c.matched
    );
    if let (Some(e), Some(mi)) = (c.expected, c.missed_deliveries) {
        let _ = writeln!(
            m,
            "| fanout: events x watchers / not delivered as such (coalesced) | {e} / {mi} |"
        );
    }
    let _ = writeln!(
        m,
        "| server-side coalesced updates / repeats seen / late deliveries | {} / {} / {} |",
        opt(c.server_coalesced, 0),
        c.spurious_repeat,
        c.late
    );
    let _ = writeln!(m, "| **missed** (final view != truth) | **{}** |", c.missed);
    let _ = writeln!(
        m,
        "| **spurious** (contradicting {}, offline snapshot {}, no event {}) | **{}** |",
        c.spurious_state, c.spurious_snapshot, c.unmatched, c.spurious
    );
    let _ = writeln!(
        m,
        "| errors / unexpected closes | {} / {} |",
        r.errors, r.unexpected_closes
    );
    let _ = writeln!(
        m,
        "| harness CPU s / RSS MiB (workers) | {:.2} / {:.1} |",
        r.harness_cpu_s,
        r.harness_rss_bytes as f64 / 1048576.0
    );
    if !r.error_samples.is_empty() {
        let _ = writeln!(m, "\nError samples:\n");
        for e in &r.error_samples {
            let _ = writeln!(m, "- `{e}`");
        }
    }
    m
}

/// A plotted line: its name, colour and value.
type Line = (&'static str, RGBColor, fn(&Point) -> f64);

fn chart(path: &Path, r: &Results) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(350);
    let t_max = r.series.last().map_or(1.0, |p| p.t_s).max(1.0);
    let lat_max = r
        .series
        .iter()
        .map(|p| p.max_ms)
        .fold(0.0f64, f64::max)
        .max(1.0);
    let mut c = ChartBuilder::on(&top)
        .caption(
            format!("{}: connect/bye notification latency (ms)", r.scenario.name),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..lat_max * 1.05)?;
    c.configure_mesh().x_desc("s").y_desc("ms").draw()?;
    let series: [Line; 3] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p99", RED, |p| p.p99_ms),
        ("max", BLACK, |p| p.max_ms),
    ];
    for (name, color, f) in series {
        c.draw_series(LineSeries::new(
            r.series
                .iter()
                .filter(|p| p.max_ms > 0.0)
                .map(|p| (p.t_s, f(p))),
            color,
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    let thr_max = r
        .series
        .iter()
        .map(|p| p.deliveries_per_s.max(p.connects_per_s))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut c = ChartBuilder::on(&bottom)
        .caption("throughput (per second)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..thr_max * 1.05)?;
    c.configure_mesh().x_desc("s").draw()?;
    let series: [Line; 2] = [
        ("deliveries/s", GREEN, |p| p.deliveries_per_s as f64),
        ("connects/s", MAGENTA, |p| p.connects_per_s as f64),
    ];
    for (name, color, f) in series {
        c.draw_series(LineSeries::new(
            r.series.iter().map(|p| (p.t_s, f(p))),
            color,
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
