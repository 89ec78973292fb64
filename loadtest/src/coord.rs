//! The coordinator: prepares the server, starts the workers, walks them through the phases
//! (see [`crate::ipc`]), samples the server's `/proc` every second, and writes the results.
//! Against a peer server (`--target pusher|mqtt`) there is no reachd to start, no service to
//! create and no `/metrics` to read: deliveries are what the workers received.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::RunArgs;
use crate::ipc::{EventKind, FromWorker, Phase, Plan, ToWorker, WorkerResult};
use crate::peer::{self, Target};
use crate::report::{self, Correctness, Point, Results, ServerFigures};
use crate::scenario::{Kind, Scenario};
use crate::stats::{
    ProcSample, decode_hist, find_pid, new_hist, now_ns, proc_sample, proc_sample_sum, summarize,
};

pub fn main(scenario: Scenario, args: RunArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reach-loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(scenario, args)) {
        Ok(ok) => {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("reach-loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A reachd started for the run; killed when dropped.
struct Server {
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

fn http_base(url: &str) -> Result<String, String> {
    // With several nodes (`--url a,b`), REST goes to the first: records are shared.
    let url = url.split(',').next().unwrap_or_default();
    let (scheme, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => ("http", rest),
        (_, Some(rest)) => ("https", rest),
        _ => return Err("url must start with ws:// or wss://".into()),
    };
    Ok(format!(
        "{scheme}://{}",
        rest.split('/').next().unwrap_or_default()
    ))
}

/// The trust for `wss://` and `https://`: the system's roots, plus `--ca-file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<reach_client::TlsConfig, String> {
    let system = reach_client::TlsConfig::system();
    match ca_file {
        Some(path) => system.with_ca_file(path).map_err(|e| e.to_string()),
        None => Ok(system),
    }
}

async fn spawn_reachd(args: &RunArgs, bin: &Path, out: &Path) -> Result<Server, String> {
    let ready = format!("{}/readyz", args.admin);
    let client = reqwest::Client::new();
    // Another server on the same admin address would answer for the spawned one (which then
    // fails to bind and exits): refuse to start rather than measure the wrong server.
    if client.get(&ready).send().await.is_ok() {
        return Err(format!(
            "something already answers at {ready}: stop it, or give the spawned reachd other \
             ports (--reachd-env REACH_SERVER__LISTEN=.. REACH_SERVER__ADMIN_LISTEN=.. with \
             --url and --admin)"
        ));
    }
    let data = out.join("reachd-data");
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let log = std::fs::File::create(out.join("reachd.log")).map_err(|e| e.to_string())?;
    let mut cmd = match &args.server_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--config")
        .arg(&args.reachd_config)
        .env("REACH_STORAGE__SQLITE_PATH", data.join("reach.db"))
        // As the image runs it (deploy/Dockerfile); `--reachd-env MALLOC_ARENA_MAX=8` undoes it.
        .env("MALLOC_ARENA_MAX", "2")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for kv in &args.reachd_env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--reachd-env wants KEY=VALUE, got {kv}"))?;
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut server = Server { child: Some(child) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A reachd that exited (say, its port was taken) must not be mistaken for another
        // process answering on the same admin address.
        if let Some(c) = server.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(format!(
                "reachd exited at start ({status}); see {}/reachd.log",
                out.display()
            ));
        }
        if let Ok(r) = client.get(&ready).send().await
            && r.status().is_success()
        {
            return Ok(server);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "reachd not ready at {ready} after 30 s (see {}/reachd.log)",
                out.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server's URL: `--url`, or the target's default; for Pusher, with the app's path.
fn target_url(args: &RunArgs) -> String {
    let url = args.url.clone().unwrap_or_else(|| {
        match args.target {
            Target::Reach => "ws://127.0.0.1:18080/v1/ws",
            Target::Pusher => "ws://127.0.0.1:6001",
            Target::Mqtt => "mqtt://127.0.0.1:18830",
        }
        .to_string()
    });
    if args.target == Target::Pusher && !url.contains("/app/") {
        peer::pusher_url(&url, &args.pusher_key)
    } else {
        url
    }
}

async fn create_service(args: &RunArgs, url: &str, name: &str) -> Result<String, String> {
    let base = http_base(url)?;
    let tls = tls_config(args.ca_file.as_deref())?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls((*tls.client_config()).clone())
        .build()
        .map_err(|e| format!("REST client: {e}"))?;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", args.account_sid, args.auth_token))
    );
    let r = client
        .post(format!("{base}/v1/Services"))
        .header("Authorization", &auth)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("FriendlyName={name}"))
        .send()
        .await
        .map_err(|e| format!("create service: {e}"))?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let sid = body["sid"]
        .as_str()
        .ok_or_else(|| format!("create service: {status} {body}"))?
        .to_owned();
    let r = client
        .post(format!("{base}/v1/Services/{sid}/Configuration"))
        .header("Authorization", &auth)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("ReachabilityEnabled=true")
        .send()
        .await
        .map_err(|e| format!("enable reachability: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("enable reachability: {}", r.status()));
    }
    Ok(sid)
}

/// Sums the named counters from the server's /metrics (0 when unavailable; none for peers).
async fn scrape(admin: Option<&str>, names: &[&str]) -> Vec<f64> {
    let text = match admin {
        Some(admin) => match reqwest::get(format!("{admin}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        },
        None => String::new(),
    };
    names
        .iter()
        .map(|n| {
            text.lines()
                .filter(|l| {
                    l.starts_with(n) && matches!(l.as_bytes().get(n.len()), Some(b' ') | Some(b'{'))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .collect()
}

const METRICS: [&str; 4] = [
    "reach_updates_queued_total",
    "reach_frames_sent_total",
    "reach_diffs_emitted_total",
    "reach_updates_coalesced_total",
];

struct WorkerHandle {
    stdin: ChildStdin,
    child: Child,
}

async fn tell(w: &mut WorkerHandle, msg: &ToWorker) -> Result<(), String> {
    let mut line = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    line.push(b'\n');
    w.stdin
        .write_all(&line)
        .await
        .map_err(|e| format!("worker stdin: {e}"))
}

async fn tell_all(ws: &mut [WorkerHandle], msg: &ToWorker) -> Result<(), String> {
    for w in ws.iter_mut() {
        tell(w, msg).await?;
    }
    Ok(())
}

fn spawn_workers(
    scenario: &Scenario,
    args: &RunArgs,
    tx: &mpsc::UnboundedSender<(usize, FromWorker)>,
) -> Result<Vec<WorkerHandle>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut out = Vec::new();
    for i in 0..scenario.workers as usize {
        let mut cmd = match &args.worker_cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let stdin = child.stdin.take().ok_or("worker stdin")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<FromWorker>(&line) {
                    Ok(m) => {
                        let _ = tx.send((i, m));
                    }
                    Err(e) => {
                        let message = format!("bad line from worker {i}: {e}: {line}");
                        let _ = tx.send((i, FromWorker::Fatal { message }));
                    }
                }
            }
            let message = format!("worker {i} exited");
            let _ = tx.send((i, FromWorker::Fatal { message }));
        });
        out.push(WorkerHandle { stdin, child });
    }
    Ok(out)
}

/// Per-second aggregation of the workers' ticks.
#[derive(Default)]
struct Second {
    connects: u64,
    notifications: u64,
    errors: u64,
    prompt: Option<Histogram<u64>>,
}

async fn run(scenario: Scenario, args: RunArgs) -> Result<bool, String> {
    let started_unix = now_ns() / 1_000_000_000;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("loadtest/results/{}-{started_unix}", scenario.name))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let reach = args.target == Target::Reach;
    let url = target_url(&args);
    let admin = reach.then_some(args.admin.as_str());
    let server = match &args.spawn_reachd {
        Some(_) if !reach => {
            return Err(format!(
                "--spawn-reachd with --target {}: start the peer with loadtest/peers/start.sh",
                args.target.name()
            ));
        }
        Some(bin) => Some(spawn_reachd(&args, bin, &out).await?),
        None => None,
    };
    let server_pids: Vec<String> = if args.server_pid.is_empty() {
        server
            .as_ref()
            .and_then(|s| s.child.as_ref().and_then(Child::id))
            .or_else(|| find_pid(args.target.process_name()))
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    } else {
        args.server_pid.iter().map(u32::to_string).collect()
    };
    if server_pids.is_empty() {
        eprintln!(
            "reach-loadtest: no server PID (give --server-pid): no server memory or CPU figures"
        );
    }
    let server_pid = (!server_pids.is_empty()).then(|| server_pids.join(","));
    let sample = || proc_sample_sum(&server_pids);
    let service_sid = if reach {
        create_service(&args, &url, &format!("loadtest-{}", scenario.name)).await?
    } else {
        String::new()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = sample();

    // Not on a terminal (CI logs, `2> file`) the bar draws nothing: plain lines instead.
    let plain_progress = !args.quiet && !std::io::stderr().is_terminal();
    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("valid template"),
        );
        pb
    };

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = spawn_workers(&scenario, &args, &tx)?;
    drop(tx);
    for (i, w) in workers.iter_mut().enumerate() {
        let plan = Plan {
            scenario: scenario.clone(),
            worker: i as u32,
            target: args.target,
            url: url.clone(),
            app_key: args.pusher_key.clone(),
            app_secret: args.pusher_secret.clone(),
            service_sid: service_sid.clone(),
            account_sid: args.account_sid.clone(),
            key_sid: args.key_sid.clone(),
            key_secret: args.key_secret.clone(),
            ca_file: args.ca_file.clone(),
        };
        tell(w, &ToWorker::Plan(Box::new(plan))).await?;
    }

    let n = workers.len();
    let t_start = Instant::now();
    let mut phase = Phase::Connected;
    let mut reached = 0usize;
    let mut marks: Vec<(String, f64)> = vec![("start".into(), 0.0)];
    let mut sockets_in = vec![0u32; n];
    let mut second = Second::default();
    let mut series: Vec<Point> = Vec::new();
    let mut truth: Vec<bool> = vec![false; scenario.sockets as usize];
    let mut truths = 0usize;
    let mut results: Vec<WorkerResult> = Vec::new();
    // Workers that sent their result; their exit right after is not a failure.
    let mut finished = vec![false; n];
    let mut last_sample = sample();
    let mut loaded: Option<ProcSample> = None;
    // RSS 5 s after every socket was subscribed (a garbage-collected server settles later).
    let mut subscribed_at: Option<Instant> = None;
    let mut after_5s: Option<ProcSample> = None;
    let mut run_start: Option<(ProcSample, Vec<f64>, Instant, u64)> = None;
    let mut run_end: Option<(ProcSample, Vec<f64>, Instant)> = None;
    let mut total_notifications = 0u64;
    let mut peak_rss = 0u64;
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let limit = Duration::from_secs_f64(
        600.0 + scenario.hold_s + scenario.settle_s + f64::from(scenario.sockets) / 100.0,
    );

    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some((i, msg)) = msg else { return Err("all workers ended".into()) };
                match msg {
                    FromWorker::Fatal { message } => {
                        if results.len() == n || finished[i] {
                            continue;
                        }
                        return Err(message);
                    }
                    FromWorker::Event(e) => {
                        let m = ToWorker::Event(e);
                        for (j, w) in workers.iter_mut().enumerate() {
                            if j != i {
                                tell(w, &m).await?;
                            }
                        }
                    }
                    FromWorker::Tick(t) => {
                        sockets_in[i] = t.sockets_in;
                        second.connects += t.connects;
                        second.notifications += t.notifications;
                        second.errors += t.errors;
                        total_notifications += t.notifications;
                        if let Some(h) = decode_hist(&t.prompt_hist) {
                            second.prompt.get_or_insert_with(new_hist).add(&h).ok();
                        }
                    }
                    FromWorker::Reached { phase: p } => {
                        if p != phase {
                            return Err(format!("worker {i} reached {p:?} during {phase:?}"));
                        }
                        reached += 1;
                        if reached < n {
                            continue;
                        }
                        reached = 0;
                        let at = t_start.elapsed().as_secs_f64();
                        match phase {
                            Phase::Connected => {
                                marks.push(("connected".into(), at));
                                phase = Phase::Subscribed;
                                tell_all(&mut workers, &ToWorker::Go { phase: Phase::Subscribe }).await?;
                            }
                            Phase::Subscribed => {
                                marks.push(("subscribed".into(), at));
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                loaded = sample();
                                subscribed_at = Some(Instant::now());
                                let m = scrape(admin, &METRICS).await;
                                run_start = Some((loaded.unwrap_or_default(), m, Instant::now(), now_ns()));
                                phase = Phase::Ran;
                                tell_all(&mut workers, &ToWorker::Go { phase: Phase::Run }).await?;
                            }
                            Phase::Ran => {
                                marks.push(("ran".into(), at));
                                let m = scrape(admin, &METRICS).await;
                                run_end = Some((sample().unwrap_or_default(), m, Instant::now()));
                                phase = Phase::Settle;
                                tell_all(&mut workers, &ToWorker::Go { phase: Phase::Settle }).await?;
                            }
                            other => return Err(format!("unexpected phase {other:?}")),
                        }
                    }
                    FromWorker::Truth { start, online } => {
                        for (k, v) in online.into_iter().enumerate() {
                            if let Some(t) = truth.get_mut(start as usize + k) {
                                *t = v;
                            }
                        }
                        truths += 1;
                        if truths == n {
                            marks.push(("settled".into(), t_start.elapsed().as_secs_f64()));
                            let m = ToWorker::Truth { online: truth.clone() };
                            tell_all(&mut workers, &m).await?;
                        }
                    }
                    FromWorker::Done(r) => {
                        finished[i] = true;
                        results.push(*r);
                        if results.len() == n {
                            break;
                        }
                    }
                }
            }
            _ = iv.tick() => {
                let now = sample();
                if after_5s.is_none() && subscribed_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(5)) {
                    after_5s = now;
                }
                let t = t_start.elapsed().as_secs_f64();
                let (cpu_pct, rss) = match (now, last_sample) {
                    (Some(a), Some(b)) => ((a.cpu_s - b.cpu_s) * 100.0, a.rss_bytes),
                    (Some(a), None) => (0.0, a.rss_bytes),
                    _ => (0.0, 0),
                };
                peak_rss = peak_rss.max(rss);
                last_sample = now;
                let s = std::mem::take(&mut second);
                let lat = s.prompt.as_ref().map(summarize).unwrap_or_default();
                let p = Point {
                    t_s: t,
                    phase: format!("{phase:?}").to_lowercase(),
                    sockets_in: sockets_in.iter().map(|&x| u64::from(x)).sum(),
                    connects_per_s: s.connects,
                    deliveries_per_s: s.notifications,
                    errors: s.errors,
                    p50_ms: lat.p50_ms,
                    p99_ms: lat.p99_ms,
                    max_ms: lat.max_ms,
                    server_cpu_pct: cpu_pct,
                    server_rss_mib: rss as f64 / 1048576.0,
                };
                let progress = format!(
                    "{} | ready {} / {} | conn/s {} | deliveries/s {} | p99 {:.2} ms | server {:.0} MiB, {:.0}% CPU | errors {}",
                    p.phase, p.sockets_in, scenario.sockets, p.connects_per_s, p.deliveries_per_s,
                    p.p99_ms, p.server_rss_mib, p.server_cpu_pct, s.errors
                );
                if plain_progress && series.len().is_multiple_of(5) {
                    eprintln!("[{t:.0} s] {progress}");
                }
                pb.set_message(progress);
                pb.tick();
                series.push(p);
                if t_start.elapsed() > limit {
                    return Err(format!("the run passed its time limit ({limit:?}) in phase {phase:?}"));
                }
            }
        }
    }
    pb.finish_and_clear();
    // Every worker has compared its views: closing their stdin lets them all close their
    // sockets and exit.
    let mut children: Vec<Child> = workers.into_iter().map(|w| w.child).collect();
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    if let Some(mut c) = server.and_then(|mut s| s.child.take()) {
        // Kill and wait, so the next run finds the ports free.
        let _ = c.kill().await;
    }

    // Merge the workers' measurements.
    let mut lat: Vec<Histogram<u64>> = EventKind::ALL.iter().map(|_| new_hist()).collect();
    let (mut up, mut hello, mut sub) = (new_hist(), new_hist(), new_hist());
    let mut c = Correctness::default();
    let (mut connects, mut errors, mut unexpected, mut harness_cpu) = (0, 0, 0, 0.0);
    let mut error_samples = Vec::new();
    let mut converged_ns: Option<u64> = None;
    let mut harness_rss = 0u64;
    let mut run_notifications = 0u64;
    for r in &results {
        for (k, s) in r.latency.iter().enumerate() {
            if let Some(h) = decode_hist(s) {
                lat[k].add(&h).ok();
            }
        }
        for (dst, s) in [
            (&mut up, &r.upgrade_hist),
            (&mut hello, &r.hello_hist),
            (&mut sub, &r.subscribe_hist),
        ] {
            if let Some(h) = decode_hist(s) {
                dst.add(&h).ok();
            }
        }
        connects += r.connects;
        errors += r.errors;
        unexpected += r.unexpected_closes;
        harness_cpu += r.cpu_s;
        harness_rss += r.rss_bytes;
        run_notifications += r.run_notifications;
        c.notifications += r.notifications;
        c.events += r.events;
        c.matched += r.matched;
        c.spurious_repeat += r.spurious_repeat;
        c.spurious_state += r.spurious_state;
        c.spurious_snapshot += r.spurious_snapshot;
        c.unmatched += r.unmatched;
        c.late += r.late;
        c.final_mismatch += r.final_mismatch;
        for e in &r.error_samples {
            if error_samples.len() < 20 && !error_samples.contains(e) {
                error_samples.push(e.clone());
            }
        }
        if let Some(t) = r.converged_ns {
            converged_ns = Some(converged_ns.map_or(t, |c: u64| c.max(t)));
        }
    }
    harness_cpu += proc_sample("self").map_or(0.0, |s| s.cpu_s);
    if scenario.kind == Kind::Fanout {
        // Watchers never leave in fanout: each visible event must reach every watcher.
        let watchers = u64::from(scenario.sockets - scenario.flappers);
        let expected = c.events * watchers;
        c.expected = Some(expected);
        c.missed_deliveries = Some(expected.saturating_sub(c.matched));
    }
    c.missed = c.final_mismatch;
    c.spurious = c.spurious_state + c.spurious_snapshot + c.unmatched;

    let mut server_fig = ServerFigures {
        pid: server_pid.clone(),
        baseline_rss_bytes: baseline.map(|s| s.rss_bytes),
        loaded_rss_bytes: loaded.map(|s| s.rss_bytes),
        peak_rss_bytes: Some(peak_rss),
        ..ServerFigures::default()
    };
    let per_socket = |b: ProcSample, l: ProcSample| {
        (l.rss_bytes as f64 - b.rss_bytes as f64) / f64::from(scenario.sockets)
    };
    if let (Some(b), Some(l)) = (baseline, loaded) {
        server_fig.bytes_per_socket = Some(per_socket(b, l));
    }
    if let (Some(b), Some(l)) = (baseline, after_5s) {
        server_fig.rss_5s_bytes = Some(l.rss_bytes);
        server_fig.bytes_per_socket_5s = Some(per_socket(b, l));
    }
    if let (Some((s0, m0, i0, wall0)), Some((s1, m1, i1))) = (&run_start, &run_end) {
        let secs = (*i1 - *i0).as_secs_f64();
        let cpu = s1.cpu_s - s0.cpu_s;
        server_fig.run_s = Some(secs);
        server_fig.run_cpu_s = Some(cpu);
        server_fig.run_cpu_pct = Some(100.0 * cpu / secs.max(1e-9));
        if reach {
            let deliveries = m1[0] - m0[0];
            server_fig.run_deliveries = Some(deliveries);
            server_fig.run_frames_sent = Some(m1[1] - m0[1]);
            server_fig.run_diffs = Some(m1[2] - m0[2]);
            c.server_coalesced = Some(m1[3] - m0[3]);
            server_fig.deliveries_per_s = Some(deliveries / secs.max(1e-9));
            if deliveries > 0.0 {
                server_fig.cpu_us_per_delivery = Some(cpu * 1e6 / deliveries);
            }
        }
        let received = run_notifications as f64;
        server_fig.run_received = Some(received);
        server_fig.received_per_s = Some(received / secs.max(1e-9));
        if received > 0.0 {
            server_fig.cpu_us_per_received = Some(cpu * 1e6 / received);
        }
        server_fig.end_rss_bytes = Some(s1.rss_bytes);
        if let Some(b) = baseline {
            server_fig.bytes_per_socket_end = Some(per_socket(b, *s1));
        }
        if let Some(t) = converged_ns {
            server_fig.storm_convergence_ms = Some((t.saturating_sub(*wall0)) as f64 / 1e6);
        }
    }
    let peak_deliveries = series.iter().map(|p| p.deliveries_per_s).max().unwrap_or(0);
    let results = Results {
        scenario: scenario.clone(),
        target: args.target,
        url: url.clone(),
        reachd_config: args
            .spawn_reachd
            .as_ref()
            .map(|_| args.reachd_config.display().to_string()),
        reachd_env: args.reachd_env.clone(),
        started_unix,
        marks,
        latency: EventKind::ALL
            .iter()
            .map(|k| (k.label().to_string(), summarize(&lat[k.index()])))
            .collect(),
        upgrade: summarize(&up),
        hello: summarize(&hello),
        subscribe: summarize(&sub),
        connects,
        notifications: total_notifications.max(c.notifications),
        peak_deliveries_per_s: peak_deliveries,
        errors,
        error_samples,
        unexpected_closes: unexpected,
        correctness: c,
        server: server_fig,
        harness_cpu_s: harness_cpu,
        harness_rss_bytes: harness_rss,
        series,
    };
    report::write(&out, &results)?;
    let ok = results.errors == 0
        && results.unexpected_closes == 0
        && results.correctness.missed == 0
        && results.correctness.spurious == 0;
    println!("{}", report::markdown(&results));
    println!("results: {}", out.display());
    Ok(ok || !args.strict)
}
