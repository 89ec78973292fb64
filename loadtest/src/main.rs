//! `reach-loadtest`: drives thousands of WebSockets against a `reachd` and reports notification
//! latency (HDR histograms), deliveries and connections per second, the server's memory and CPU
//! (from `/proc`), the harness's own CPU, errors, and whether every watcher ended with the true
//! presence of the users it watches.
//!
//! Parts:
//! - [`scenario`]: what the sockets do (TOML files in `loadtest/scenarios/`, flags override);
//! - [`coord`]: the coordinator: starts reachd (optionally), creates a service, re-executes this
//!   binary as worker processes, drives the phases, relays events, samples `/proc`, shows
//!   progress and writes the results;
//! - [`worker`]: a worker process holding up to 19,000 sockets on a single-threaded runtime,
//!   with one driver per target server (`worker/reach.rs`, `pusher.rs`, `mqtt.rs`);
//! - [`ipc`]: the JSON lines between them;
//! - [`peer`]: the peer servers it can drive instead of reachd (Soketi's Pusher protocol,
//!   Mosquitto's MQTT), and how reach's presence maps onto each;
//! - [`stats`], [`report`]: histograms, `/proc` readings, and the JSON / Markdown / SVG output.

mod coord;
mod ipc;
mod peer;
mod report;
mod scaling;
mod scenario;
mod stats;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::peer::Target;
use crate::scenario::{Kind, Scenario};

#[derive(Parser, Debug)]
#[command(
    name = "reach-loadtest",
    version,
    about = "Load-test harness for reachd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario against reachd.
    Run(Box<RunArgs>),
    /// How cost grows: one table (stdout) and one SVG chart from the result folders of `idle`
    /// and `fanout` runs at several sizes, one node or a cluster, reachd or a peer.
    Scaling(ScalingArgs),
    /// (internal) A worker process, started by `run`.
    #[command(hide = true)]
    Worker,
}

/// Scenario fields that flags override.
#[derive(Args, Debug, Default)]
pub struct Overrides {
    /// Scenario kind: idle, rooms, storm or fanout.
    #[arg(long)]
    kind: Option<Kind>,
    /// Name in the results (and the default results folder).
    #[arg(long)]
    name: Option<String>,
    /// Sockets (= users) in total, over all workers.
    #[arg(long)]
    sockets: Option<u32>,
    /// Ring topology (idle, storm): subscriptions per socket.
    #[arg(long)]
    subs: Option<u32>,
    /// Rooms topology: users per room (each watches the others).
    #[arg(long)]
    room_size: Option<u32>,
    /// Fanout: users that flap, each watched by all the others.
    #[arg(long)]
    flappers: Option<u32>,
    /// Fanout: flap cycles (bye, rejoin) per second, over all flappers.
    #[arg(long)]
    flaps_per_s: Option<f64>,
    /// Rooms: leave+rejoin cycles per second, over all workers.
    #[arg(long)]
    churn_per_s: Option<f64>,
    /// Weights of the ways to leave in `rooms`: BYE,ABRUPT,SILENT (e.g. 0.8,0.2,0; missing
    /// weights are 0).
    #[arg(long, value_delimiter = ',', value_name = "BYE,ABRUPT,SILENT")]
    mix: Option<Vec<f64>>,
    /// Time between a bye and the rejoin (ms).
    #[arg(long)]
    rejoin_ms: Option<u64>,
    /// Time between an abrupt close and the rejoin (ms): under offline_grace - 500 the close
    /// must stay invisible, over offline_grace + 500 it must be seen.
    #[arg(long)]
    abrupt_rejoin_ms: Option<u64>,
    /// Length of the active phase (s).
    #[arg(long)]
    hold_s: Option<f64>,
    /// Quiet time after the active phase before final views are checked (s).
    #[arg(long)]
    settle_s: Option<f64>,
    /// New connections per second during the initial ramp (0: as fast as possible).
    #[arg(long)]
    connect_per_s: Option<f64>,
    /// Connections in flight at once per worker during the ramp.
    #[arg(long)]
    connect_concurrency: Option<u32>,
    /// Worker processes (each holds sockets / workers; keep that under 19,000).
    #[arg(long)]
    workers: Option<u32>,
    /// Source addresses 127.0.<worker+1>.<1..=n> per worker.
    #[arg(long)]
    source_ips: Option<u32>,
    /// msgpack or json.
    #[arg(long)]
    encoding: Option<String>,
    /// How long a socket waits for one reply (welcome, subscribed, ...) before counting an
    /// error (s).
    #[arg(long)]
    reply_timeout_s: Option<f64>,
    /// Offline grace the harness assumes (must match the server's).
    #[arg(long)]
    offline_grace_ms: Option<u64>,
    /// Heartbeat timeout the harness assumes (must match the server's).
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
}

impl Overrides {
    fn apply(self, s: &mut Scenario) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { s.$f = v; } )* };
        }
        set!(
            kind,
            name,
            sockets,
            subs,
            room_size,
            flappers,
            flaps_per_s,
            churn_per_s,
            rejoin_ms,
            abrupt_rejoin_ms,
            hold_s,
            settle_s,
            connect_per_s,
            connect_concurrency,
            workers,
            source_ips,
            encoding,
            reply_timeout_s,
            offline_grace_ms,
            heartbeat_timeout_ms
        );
        if let Some(m) = self.mix {
            let weight = |i: usize| m.get(i).copied().unwrap_or(0.0);
            s.mix.bye = weight(0);
            s.mix.abrupt = weight(1);
            s.mix.silent = weight(2);
        }
    }
}

#[derive(Args, Debug)]
struct ScalingArgs {
    /// Where to write the chart.
    #[arg(long, default_value = "scaling.svg")]
    svg: PathBuf,
    /// Result folders (each with the result.json of one run).
    #[arg(required = true)]
    results: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Scenario file (TOML), e.g. loadtest/scenarios/rooms.toml; flags override its fields.
    #[arg(long, short)]
    scenario: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
    /// The server to drive: reachd, or a peer server (pusher: Soketi, mqtt: Mosquitto; start
    /// them with loadtest/peers/start.sh).
    #[arg(long, alias = "peer", value_enum, default_value_t = Target::Reach)]
    pub target: Target,
    /// The server's URL (an IPv4 address, not a name; ws:// or wss://). Default: reach
    /// ws://127.0.0.1:18080/v1/ws, pusher ws://127.0.0.1:6001 (the app path is added),
    /// mqtt mqtt://127.0.0.1:18830. Several nodes of a reachd cluster: comma-separated; user
    /// `u` connects to node `u % n` (so rooms span the nodes) and REST goes to the first.
    #[arg(long)]
    pub url: Option<String>,
    /// For a `wss://` URL: a PEM CA certificate to trust besides the system's roots (e.g. the
    /// gateway's self-signed certificate). REST then goes over https:// with the same trust.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The gateway's admin listener (for /readyz and /metrics).
    #[arg(long, default_value = "http://127.0.0.1:19090")]
    pub admin: String,
    /// Start this reachd binary for the run (killed at the end), with a fresh database.
    #[arg(long)]
    pub spawn_reachd: Option<PathBuf>,
    /// Config file of the spawned reachd.
    #[arg(long, default_value = "loadtest/reachd-bench.toml")]
    pub reachd_config: PathBuf,
    /// Extra environment of the spawned reachd, e.g. REACH_LIMITS__READ_BUFFER_BYTES=1024.
    #[arg(long = "reachd-env", value_name = "KEY=VALUE")]
    pub reachd_env: Vec<String>,
    /// CPUs for the spawned reachd (taskset -c), e.g. 0.
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// CPUs for the workers (taskset -c), e.g. 1.
    #[arg(long)]
    pub worker_cpus: Option<String>,
    /// PID of a server started elsewhere (default: the spawned reachd, or the only process
    /// named `reachd` / `soketi-server` / `mosquitto`; loadtest/peers/start.sh writes the
    /// peers' PIDs to loadtest/peers/run/<peer>.pid). The nodes of a cluster: comma-separated;
    /// their CPU and memory are added up.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Account, auth token and API key configured in reachd (defaults: the test fixtures of
    /// loadtest/reachd-bench.toml).
    #[arg(long, default_value = "AC10ad7e5710ad7e5710ad7e5710ad7e57")]
    pub account_sid: String,
    #[arg(long, default_value = "loadtest-fixture-auth-token")]
    pub auth_token: String,
    #[arg(long, default_value = "SK10ad7e5710ad7e5710ad7e5710ad7e57")]
    pub key_sid: String,
    #[arg(long, default_value = "loadtest-fixture-key-secret")]
    pub key_secret: String,
    /// Pusher app key and secret (defaults: the test fixtures of loadtest/peers/start.sh).
    #[arg(long, default_value = "loadtest-fixture-key")]
    pub pusher_key: String,
    #[arg(long, default_value = "loadtest-fixture-secret")]
    pub pusher_secret: String,
    /// Folder for result.json, summary.md and chart.svg (default:
    /// loadtest/results/<name>-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar (on a terminal) or progress lines every 5 s (otherwise).
    #[arg(long)]
    pub quiet: bool,
    /// Exit with code 3 unless errors, unexpected closes, missed and spurious notifications
    /// are all 0.
    #[arg(long)]
    pub strict: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker => worker::main(),
        Command::Scaling(a) => match scaling::run(&a.results, &a.svg) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("reach-loadtest: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run(args) => {
            let mut args = *args;
            let mut scenario = match &args.scenario {
                Some(p) => match Scenario::load(p) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("reach-loadtest: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => Scenario::default(),
            };
            std::mem::take(&mut args.overrides).apply(&mut scenario);
            if let Err(e) = scenario
                .validate()
                .and_then(|()| args.target.check(&scenario))
            {
                eprintln!("reach-loadtest: invalid scenario: {e}");
                return ExitCode::from(2);
            }
            coord::main(scenario, args)
        }
    }
}
