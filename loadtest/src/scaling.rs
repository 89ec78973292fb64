//! `reach-loadtest scaling`: how cost grows with sockets per process, from the result folders
//! of several runs (`idle` and `fanout` at a few sizes, one node or a cluster, reachd or a
//! peer), as one Markdown table on stdout and one SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::peer::Target;
use crate::report::Results;
use crate::scenario::Kind;

/// One server setup: a target and how many nodes it ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Setup {
    target: Target,
    nodes: usize,
}

impl Setup {
    fn label(self) -> String {
        let name = match self.target {
            Target::Reach => "reachd",
            Target::Pusher => "Soketi",
            Target::Mqtt => "Mosquitto",
        };
        match self.nodes {
            1 => name.to_string(),
            n => format!("{name}, {n} nodes"),
        }
    }
}

/// The figures of one setup at one size.
#[derive(Debug, Default, Clone, Copy)]
struct Cell {
    bytes_per_socket: Option<f64>,
    us_per_delivery: Option<f64>,
    deliveries_per_s: Option<f64>,
    cpu_pct: Option<f64>,
}

type Table = BTreeMap<Setup, BTreeMap<u32, Cell>>;

/// Reads `<dir>/result.json` of every folder; writes the chart to `svg` and returns the table.
pub fn run(dirs: &[PathBuf], svg: &Path) -> Result<String, String> {
    let mut table = Table::new();
    for dir in dirs {
        let path = dir.join("result.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r: Results =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        add(&mut table, &r).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if table.is_empty() {
        return Err("no results given".into());
    }
    chart(svg, &table).map_err(|e| format!("{}: {e}", svg.display()))?;
    Ok(markdown(&table))
}

fn add(table: &mut Table, r: &Results) -> Result<(), String> {
    let setup = Setup {
        target: r.target,
        nodes: r.url.split(',').count(),
    };
    let cell = table
        .entry(setup)
        .or_default()
        .entry(r.scenario.sockets)
        .or_default();
    let sv = &r.server;
    match r.scenario.kind {
        Kind::Idle => cell.bytes_per_socket = sv.bytes_per_socket,
        Kind::Fanout => {
            // Notifications the harness received: the same measure for every target and for
            // a cluster, where deliveries happen on every node.
            cell.us_per_delivery = sv.cpu_us_per_received;
            cell.deliveries_per_s = sv.received_per_s;
            cell.cpu_pct = sv.run_cpu_pct;
        }
        k => return Err(format!("a {k:?} run: give idle and fanout runs")),
    }
    Ok(())
}

fn markdown(table: &Table) -> String {
    let fmt = |v: Option<f64>, d: usize| v.map_or("".into(), |v| format!("{v:.d$}"));
    let mut m = String::new();
    let _ = writeln!(
        m,
        "| server | sockets | idle: bytes per socket | fanout: CPU per delivery (us) | fanout: deliveries/s (server CPU %) |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|");
    for (setup, sizes) in table {
        for (sockets, c) in sizes {
            let rate = match (c.deliveries_per_s, c.cpu_pct) {
                (Some(d), Some(p)) => format!("{d:.0} ({p:.0} %)"),
                (Some(d), None) => format!("{d:.0}"),
                _ => String::new(),
            };
            let _ = writeln!(
                m,
                "| {} | {sockets} | {} | {} | {rate} |",
                setup.label(),
                fmt(c.bytes_per_socket, 0),
                fmt(c.us_per_delivery, 2),
            );
        }
    }
    m
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A panel's value of a cell.
type Pick = fn(&Cell) -> Option<f64>;

fn chart(path: &Path, table: &Table) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    let x_max = table
        .values()
        .flat_map(|s| s.keys())
        .copied()
        .max()
        .unwrap_or(1) as f64
        * 1.05;
    let specs: [(&str, &str, Pick); 2] = [
        (
            "idle: bytes per socket (each watching the 9 others of its room)",
            "bytes",
            |c| c.bytes_per_socket,
        ),
        ("fanout: server CPU per delivery (all nodes)", "us", |c| {
            c.us_per_delivery
        }),
    ];
    for (area, (caption, unit, pick)) in panels.iter().zip(specs) {
        let y_max = table
            .values()
            .flat_map(|s| s.values())
            .filter_map(pick)
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.15;
        let mut c = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        c.configure_mesh()
            .x_desc("sockets per run")
            .y_desc(unit)
            .draw()?;
        for (i, (setup, sizes)) in table.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = sizes
                .iter()
                .filter_map(|(n, cell)| pick(cell).map(|v| (f64::from(*n), v)))
                .collect();
            if points.is_empty() {
                continue;
            }
            c.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(setup.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            c.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ServerFigures;
    use crate::scenario::Scenario;

    fn result(target: Target, url: &str, kind: Kind, sockets: u32, fig: ServerFigures) -> Results {
        let scenario = Scenario {
            kind,
            sockets,
            ..Scenario::default()
        };
        Results {
            scenario,
            target,
            url: url.into(),
            reachd_config: None,
            reachd_env: Vec::new(),
            started_unix: 0,
            marks: Vec::new(),
            latency: Vec::new(),
            upgrade: Default::default(),
            hello: Default::default(),
            subscribe: Default::default(),
            connects: 0,
            notifications: 0,
            peak_deliveries_per_s: 0,
            errors: 0,
            error_samples: Vec::new(),
            unexpected_closes: 0,
            correctness: Default::default(),
            server: fig,
            harness_cpu_s: 0.0,
            harness_rss_bytes: 0,
            series: Vec::new(),
        }
    }

    #[test]
    fn runs_group_by_target_and_nodes_and_fill_one_row_per_size() {
        let mut t = Table::new();
        let idle = ServerFigures {
            bytes_per_socket: Some(3000.4),
            ..Default::default()
        };
        let fan = ServerFigures {
            cpu_us_per_received: Some(7.5),
            received_per_s: Some(120_000.0),
            run_cpu_pct: Some(98.0),
            ..Default::default()
        };
        let two = "ws://a/v1/ws,ws://b/v1/ws";
        add(
            &mut t,
            &result(
                Target::Reach,
                "ws://a/v1/ws",
                Kind::Idle,
                10_000,
                idle.clone(),
            ),
        )
        .unwrap();
        add(
            &mut t,
            &result(
                Target::Reach,
                "ws://a/v1/ws",
                Kind::Fanout,
                10_000,
                fan.clone(),
            ),
        )
        .unwrap();
        add(
            &mut t,
            &result(Target::Reach, two, Kind::Idle, 10_000, idle),
        )
        .unwrap();
        add(
            &mut t,
            &result(Target::Mqtt, "mqtt://m", Kind::Fanout, 2_000, fan),
        )
        .unwrap();
        let rooms = result(
            Target::Reach,
            "ws://a",
            Kind::Rooms,
            2_000,
            Default::default(),
        );
        assert!(add(&mut t, &rooms).is_err());
        let md = markdown(&t);
        assert!(
            md.contains("| reachd | 10000 | 3000 | 7.50 | 120000 (98 %) |"),
            "{md}"
        );
        assert!(
            md.contains("| reachd, 2 nodes | 10000 | 3000 |  |  |"),
            "{md}"
        );
        assert!(md.contains("| Mosquitto | 2000 |  | 7.50 |"), "{md}");
        let svg = std::env::temp_dir().join(format!("scaling-{}.svg", std::process::id()));
        chart(&svg, &t).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        std::fs::remove_file(&svg).unwrap();
        assert!(text.contains("reachd, 2 nodes") && text.contains("Mosquitto"));
    }
}
