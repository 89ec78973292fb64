//! A worker process: holds the sockets of the users it owns and plays its part of the
//! scenario, taking orders from the coordinator on stdin and reporting on stdout (see
//! [`crate::ipc`]).
//!
//! One single-threaded tokio runtime per worker (the coordinator starts as many workers as the
//! scenario asks, so the harness uses every core while each worker stays free of locks). Each
//! user is one task that owns its `WebSocketStream` and lives across that user's sessions: it
//! connects from one of the worker's source addresses, sends `hello`, subscribes, reads
//! frames, and on an order leaves (`bye`, reset, or going silent) and rejoins.
//!
//! Lean on purpose: no SDK state per socket, a 2 KiB read buffer, and the watched users' states
//! kept as a small vector, so one worker can hold 19,000 sockets in little memory and CPU.
//!
//! The same user tasks drive a peer server instead of reachd ([`crate::peer`]): a [`Conn`] is a
//! reach WebSocket, a Pusher WebSocket or an MQTT connection, and each kind's driver knows how
//! to connect, subscribe, read a notification and leave, one file per target: [`reach`],
//! [`pusher`], [`mqtt`]. Everything else (this file: the phases, the users' tasks, events,
//! latencies, views, the final comparison with the truth) is shared.

mod mqtt;
mod pusher;
mod reach;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::Rng;
use reach_proto::Encoding;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::ipc::{Event, EventKind, FromWorker, Phase, Plan, Tick, ToWorker, WorkerResult};
use crate::peer::Target;
use crate::scenario::{Kind, Scenario};
use crate::stats::{encode_hist, new_hist, now_ns, proc_sample, record_ns};
use mqtt::MqttConn;
use pusher::PusherConn;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One user's connection to the server under test.
enum Conn {
    Reach(Ws),
    Pusher(PusherConn),
    Mqtt(MqttConn),
}

impl Conn {
    /// Resets the TCP connection (linger 0): the server sees an abrupt close.
    fn reset(self) {
        match self {
            Conn::Reach(ws) => reset(tcp_of(ws.get_ref())),
            Conn::Pusher(p) => reset(tcp_of(p.ws.get_ref())),
            Conn::Mqtt(m) => reset(&m.stream),
        }
    }
}

/// How long a clean leave reads on for the server's close.
const BYE_DRAIN: Duration = Duration::from_secs(3);
/// Connection attempts before a user is given up.
const CONNECT_ATTEMPTS: u32 = 20;
/// A notification is matched to its event after this long, so that events relayed from other
/// workers have arrived.
const RESOLVE_DELAY_NS: u64 = 300_000_000;
/// A notification that contradicts an event younger than this is taken as a late delivery of
/// the event before it.
const LATE_WINDOW_NS: u64 = 2_000_000_000;

#[derive(Debug, Clone, Copy)]
enum Leave {
    Bye,
    Abrupt,
    Silent,
    /// Reset and reconnect at once (reconnect storm): invisible to watchers.
    Storm,
}

#[derive(Debug)]
enum Cmd {
    Subscribe,
    Leave(Leave),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Connecting,
    /// Authenticated, not subscribed yet (initial ramp).
    Connected,
    /// Authenticated and subscribed.
    Ready,
    /// Left; rejoins later.
    Out,
    Failed,
}

struct Slot {
    st: Cell<St>,
    tx: RefCell<Option<mpsc::UnboundedSender<Cmd>>>,
    /// Watched user -> last known `is_online`.
    view: RefCell<Vec<(u32, Option<bool>)>>,
}

#[derive(Default)]
struct Counters {
    connects: u64,
    notifications: u64,
    /// Notifications received during the active phase (between `Go(Run)` and `Ran`).
    run_notifications: u64,
    events: u64,
    matched: u64,
    errors: u64,
    error_samples: Vec<String>,
    unexpected_closes: u64,
    spurious_repeat: u64,
    spurious_state: u64,
    spurious_snapshot: u64,
    unmatched: u64,
    late: u64,
    final_mismatch: u64,
}

struct Hists {
    latency: [Histogram<u64>; 4],
    prompt: Histogram<u64>,
    upgrade: Histogram<u64>,
    hello: Histogram<u64>,
    subscribe: Histogram<u64>,
}

struct Worker {
    sc: Scenario,
    plan: Plan,
    enc: Encoding,
    /// The server, or the nodes of a cluster (`--url a,b`): user `u` goes to node
    /// `u % servers.len()`, so every room has members on every node.
    servers: Vec<(SocketAddr, String)>,
    start: u32,
    slots: Vec<Slot>,
    c: RefCell<Counters>,
    h: RefCell<Hists>,
    /// Visible events per user (own and relayed), in time order.
    events: RefCell<HashMap<u32, Vec<Event>>>,
    /// Notifications not matched to their event yet: (user, online, receipt ns).
    pending: RefCell<Vec<(u32, bool, u64)>>,
    storm: Cell<bool>,
    /// Storm: when every socket of this worker was back.
    converged: Cell<Option<u64>>,
    ws_config: WebSocketConfig,
    /// TLS for `wss://` URLs (the system's roots and the plan's CA file).
    tls: Option<Connector>,
    next_req: Cell<i64>,
    /// The active phase has started: notifications count from now on. Before it, a peer's
    /// notifications of the ramp (members joining a presence channel) only update views.
    started: Cell<bool>,
    /// Inside the active phase (counts `run_notifications`).
    active: Cell<bool>,
    /// Makes MQTT client ids unique per connection, so a rejoin never takes over a session.
    next_client: Cell<u64>,
}

fn send(msg: &FromWorker) {
    let mut out = std::io::stdout().lock();
    let ok = serde_json::to_writer(&mut out, msg).is_ok()
        && out.write_all(b"\n").is_ok()
        && out.flush().is_ok();
    if !ok {
        // The coordinator is gone: nothing left to report to.
        std::process::exit(1);
    }
}

/// Entry point of `reach-loadtest worker`.
pub fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&rt, run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            send(&FromWorker::Fatal { message: e });
            ExitCode::FAILURE
        }
    }
}

fn server_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .or_else(|| url.strip_prefix("mqtt://"))
        .ok_or_else(|| format!("url must start with ws://, wss:// or mqtt://: {url}"))?;
    let host = rest.split('/').next().unwrap_or_default();
    host.parse()
        .map_err(|e| format!("url host must be IP:PORT ({host}): {e}"))
}

async fn run() -> Result<(), String> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no plan on stdin")?;
    let ToWorker::Plan(plan) =
        serde_json::from_str(&first).map_err(|e| format!("bad plan: {e}"))?
    else {
        return Err("the first line must be a plan".into());
    };
    let plan = *plan;
    let sc = plan.scenario.clone();
    let owned = sc.owned(plan.worker);
    let enc = if sc.encoding == "json" {
        Encoding::Json
    } else {
        Encoding::MsgPack
    };
    let tls = match plan.url.contains("wss://") {
        true => Some(Connector::Rustls(
            crate::coord::tls_config(plan.ca_file.as_deref())?.client_config(),
        )),
        false => None,
    };
    let w = Rc::new(Worker {
        servers: plan
            .url
            .split(',')
            .map(|u| server_addr(u).map(|a| (a, u.to_owned())))
            .collect::<Result<_, _>>()?,
        enc,
        start: owned.start,
        slots: owned
            .clone()
            .map(|_| Slot {
                st: Cell::new(St::Connecting),
                tx: RefCell::new(None),
                view: RefCell::new(Vec::new()),
            })
            .collect(),
        c: RefCell::new(Counters::default()),
        h: RefCell::new(Hists {
            latency: [new_hist(), new_hist(), new_hist(), new_hist()],
            prompt: new_hist(),
            upgrade: new_hist(),
            hello: new_hist(),
            subscribe: new_hist(),
        }),
        events: RefCell::new(HashMap::new()),
        pending: RefCell::new(Vec::new()),
        storm: Cell::new(false),
        converged: Cell::new(None),
        ws_config: WebSocketConfig::default().read_buffer_size(2048),
        tls,
        next_req: Cell::new(1),
        started: Cell::new(false),
        active: Cell::new(false),
        next_client: Cell::new(0),
        sc,
        plan,
    });
    tokio::task::spawn_local(ticker(Rc::clone(&w)));
    tokio::task::spawn_local(ramp(Rc::clone(&w)));
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let msg: ToWorker = serde_json::from_str(&line).map_err(|e| format!("bad order: {e}"))?;
        match msg {
            ToWorker::Plan(_) => return Err("a second plan".into()),
            ToWorker::Event(e) => w.events.borrow_mut().entry(e.user).or_default().push(e),
            ToWorker::Go { phase } => match phase {
                Phase::Subscribe => {
                    for slot in &w.slots {
                        if let Some(tx) = &*slot.tx.borrow() {
                            let _ = tx.send(Cmd::Subscribe);
                        }
                    }
                    let w2 = Rc::clone(&w);
                    tokio::task::spawn_local(async move {
                        w2.wait_all(&[St::Ready, St::Failed], None).await;
                        send(&FromWorker::Reached {
                            phase: Phase::Subscribed,
                        });
                    });
                }
                Phase::Run => {
                    w.started.set(true);
                    w.active.set(true);
                    tokio::task::spawn_local(run_phase(Rc::clone(&w)));
                }
                Phase::Settle => {
                    let w2 = Rc::clone(&w);
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(Duration::from_secs_f64(w2.sc.settle_s)).await;
                        let online = w2
                            .slots
                            .iter()
                            .map(|s| matches!(s.st.get(), St::Ready | St::Connected))
                            .collect();
                        send(&FromWorker::Truth {
                            start: w2.start,
                            online,
                        });
                    });
                }
                other => return Err(format!("unexpected phase order {other:?}")),
            },
            ToWorker::Truth { online } => {
                w.resolve(true);
                send(&FromWorker::Done(Box::new(w.finish(&online))));
                // Hold every socket until the coordinator closes stdin: a socket closed now
                // would show its user offline (at once on a peer) to watchers in a worker that
                // has not compared its views yet.
                while lines.next_line().await.is_ok_and(|l| l.is_some()) {}
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Connects every owned user, `connect_concurrency` at a time and at most `connect_per_s`.
async fn ramp(w: Rc<Worker>) {
    let sem = std::sync::Arc::new(Semaphore::new(w.sc.connect_concurrency.max(1) as usize));
    let rate = w.sc.connect_per_s / f64::from(w.sc.workers);
    let mut interval = (rate > 0.0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    for i in 0..w.slots.len() as u32 {
        if let Some(iv) = interval.as_mut() {
            iv.tick().await;
        }
        let permit = std::sync::Arc::clone(&sem)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let (tx, rx) = mpsc::unbounded_channel();
        *w.slots[i as usize].tx.borrow_mut() = Some(tx);
        tokio::task::spawn_local(user_task(Rc::clone(&w), w.start + i, rx, Some(permit)));
    }
    w.wait_all(&[St::Connected, St::Failed], None).await;
    send(&FromWorker::Reached {
        phase: Phase::Connected,
    });
}

/// Every second: a tick report; every 200 ms: match notifications to events.
async fn ticker(w: Rc<Worker>) {
    let mut last = (0u64, 0u64, 0u64);
    let mut n = 0u32;
    let mut iv = tokio::time::interval(Duration::from_millis(200));
    loop {
        iv.tick().await;
        w.resolve(false);
        n += 1;
        if n < 5 {
            continue;
        }
        n = 0;
        let (connects, notifications, errors) = {
            let c = w.c.borrow();
            (c.connects, c.notifications, c.errors)
        };
        let prompt = {
            let mut h = w.h.borrow_mut();
            let s = encode_hist(&h.prompt);
            h.prompt.reset();
            s
        };
        send(&FromWorker::Tick(Tick {
            sockets_in: w.slots.iter().filter(|s| s.st.get() == St::Ready).count() as u32,
            connects: connects - last.0,
            notifications: notifications - last.1,
            errors: errors - last.2,
            prompt_hist: prompt,
        }));
        last = (connects, notifications, errors);
    }
}

/// The scenario's active phase; reports `Ran` when done and every user is back.
async fn run_phase(w: Rc<Worker>) {
    let hold = Duration::from_secs_f64(w.sc.hold_s);
    let started = tokio::time::Instant::now();
    let mut converged = None;
    match w.sc.kind {
        Kind::Idle => tokio::time::sleep(hold).await,
        Kind::Storm => {
            w.storm.set(true);
            for i in 0..w.slots.len() {
                if w.slots[i].st.get() == St::Ready {
                    w.order(i, Leave::Storm);
                }
            }
            w.wait_all(&[St::Ready, St::Failed], None).await;
            converged = Some(now_ns());
            tokio::time::sleep_until(started + hold).await;
        }
        Kind::Rooms => {
            let rate = w.sc.churn_per_s / f64::from(w.sc.workers);
            if rate > 0.0 {
                churn(&w, rate, started + hold, |rng| w.pick_leave(rng)).await;
            } else {
                tokio::time::sleep(hold).await;
            }
        }
        Kind::Fanout => {
            let flappers: Vec<usize> = (0..w.sc.flappers)
                .filter(|u| w.owns(*u))
                .map(|u| (u - w.start) as usize)
                .collect();
            if flappers.is_empty() || w.sc.flaps_per_s <= 0.0 {
                tokio::time::sleep(hold).await;
            } else {
                let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / w.sc.flaps_per_s));
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut next = 0;
                while started.elapsed() < hold {
                    iv.tick().await;
                    for _ in 0..flappers.len() {
                        let i = flappers[next % flappers.len()];
                        next += 1;
                        if w.slots[i].st.get() == St::Ready {
                            w.order(i, Leave::Bye);
                            break;
                        }
                    }
                }
            }
        }
    }
    // Wait for everyone who left to come back (the longest rejoin is a silent peer's).
    let longest = w.sc.rejoin_ms.max(w.sc.abrupt_rejoin_ms)
        + w.sc.heartbeat_timeout_ms
        + w.sc.offline_grace_ms
        + 10_000;
    w.wait_all(
        &[St::Ready, St::Failed],
        Some(Duration::from_millis(longest)),
    )
    .await;
    w.converged.set(converged);
    w.active.set(false);
    send(&FromWorker::Reached { phase: Phase::Ran });
}

/// Sends leave orders to random ready users at `rate` per second until `until`.
async fn churn(
    w: &Worker,
    rate: f64,
    until: tokio::time::Instant,
    mut pick: impl FnMut(&mut rand::rngs::ThreadRng) -> Leave,
) {
    let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = rand::rng();
    while tokio::time::Instant::now() < until {
        iv.tick().await;
        for _ in 0..32 {
            let i = rng.random_range(0..w.slots.len());
            if w.slots[i].st.get() == St::Ready {
                let leave = pick(&mut rng);
                w.order(i, leave);
                break;
            }
        }
    }
}

impl Worker {
    /// How long to wait for one reply (`welcome`, `subscribed`, ...) before counting an error.
    fn reply_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.sc.reply_timeout_s)
    }

    fn owns(&self, user: u32) -> bool {
        user >= self.start && ((user - self.start) as usize) < self.slots.len()
    }

    fn slot(&self, user: u32) -> &Slot {
        &self.slots[(user - self.start) as usize]
    }

    fn order(&self, i: usize, leave: Leave) {
        let slot = &self.slots[i];
        if let Some(tx) = &*slot.tx.borrow() {
            slot.st.set(St::Out);
            let _ = tx.send(Cmd::Leave(leave));
        }
    }

    fn pick_leave(&self, rng: &mut rand::rngs::ThreadRng) -> Leave {
        let m = self.sc.mix;
        let total = m.bye + m.abrupt + m.silent;
        let x = rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
        if x < m.bye {
            Leave::Bye
        } else if x < m.bye + m.abrupt {
            Leave::Abrupt
        } else {
            Leave::Silent
        }
    }

    async fn wait_all(&self, states: &[St], limit: Option<Duration>) {
        let started = tokio::time::Instant::now();
        loop {
            if self.slots.iter().all(|s| states.contains(&s.st.get())) {
                return;
            }
            if limit.is_some_and(|l| started.elapsed() >= l) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn error(&self, what: impl Into<String>) {
        let mut c = self.c.borrow_mut();
        c.errors += 1;
        let what = what.into();
        if c.error_samples.len() < 10 && !c.error_samples.contains(&what) {
            c.error_samples.push(what);
        }
    }

    /// Records a visible presence change caused now, and tells the coordinator when some
    /// watcher lives in another worker.
    fn event(&self, user: u32, online: bool, kind: EventKind) {
        let e = Event {
            user,
            online,
            kind,
            t0_ns: now_ns(),
        };
        self.c.borrow_mut().events += 1;
        self.events.borrow_mut().entry(user).or_default().push(e);
        if self.sc.watched_across_workers(user) {
            send(&FromWorker::Event(e));
        }
    }

    fn source_ip(&self, user: u32) -> Ipv4Addr {
        let third = (self.plan.worker + 1).min(254) as u8;
        let fourth = (1 + user % self.sc.source_ips) as u8;
        Ipv4Addr::new(127, 0, third, fourth)
    }

    /// The server (node) `user` connects to, and its URL.
    fn server(&self, user: u32) -> &(SocketAddr, String) {
        &self.servers[user as usize % self.servers.len()]
    }

    /// A TCP connection to the server from one of this worker's source addresses.
    async fn tcp(&self, user: u32) -> Result<TcpStream, String> {
        let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        sock.bind(SocketAddr::new(self.source_ip(user).into(), 0))
            .map_err(|e| format!("bind {}: {e}", self.source_ip(user)))?;
        let stream = sock
            .connect(self.server(user).0)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A WebSocket to the server, offering `subprotocol` if any.
    async fn upgrade(&self, user: u32, subprotocol: Option<&str>) -> Result<Ws, String> {
        let started = now_ns();
        let stream = self.tcp(user).await?;
        let mut req = self
            .server(user)
            .1
            .as_str()
            .into_client_request()
            .map_err(|e| format!("url: {e}"))?;
        if let Some(subprotocol) = subprotocol {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                subprotocol
                    .parse()
                    .map_err(|e| format!("subprotocol: {e}"))?,
            );
        }
        let connector = match self.server(user).1.starts_with("wss://") {
            true => self.tls.clone(),
            false => Some(Connector::Plain),
        };
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            req,
            stream,
            Some(self.ws_config),
            connector,
        )
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
        record_ns(&mut self.h.borrow_mut().upgrade, now_ns() - started);
        Ok(ws)
    }

    /// Runs `attempt` until it succeeds, up to [`CONNECT_ATTEMPTS`] times with a backoff.
    async fn retrying<T, F: Future<Output = Result<T, String>>>(
        &self,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, String> {
        let mut n = 0;
        loop {
            n += 1;
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if n < CONNECT_ATTEMPTS => {
                    self.error(e);
                    let backoff = 50 * u64::from(n) + rand::random_range(0..100);
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects and authenticates `user`; a visible connect is recorded as an event (on
    /// Pusher, where a user is present only once subscribed, by [`Worker::subscribe`]).
    async fn establish(&self, user: u32, visible: bool) -> Result<Conn, String> {
        match self.plan.target {
            Target::Reach => self.establish_reach(user, visible).await.map(Conn::Reach),
            Target::Pusher => self.establish_pusher(user).await.map(Conn::Pusher),
            Target::Mqtt => self.establish_mqtt(user, visible).await.map(Conn::Mqtt),
        }
    }
    /// Reads the next message of `conn` and handles it. Cancel-safe as far as reading goes
    /// (a `pusher:pong` being sent may be cut short; the next write flushes it).
    async fn recv(&self, user: u32, conn: &mut Conn) -> Result<(), String> {
        match conn {
            Conn::Reach(ws) => self.recv_reach(user, ws).await,
            Conn::Pusher(p) => self.recv_pusher(user, p).await,
            Conn::Mqtt(m) => self.recv_mqtt(user, m).await,
        }
    }

    /// Sets what `user` knows of `x`, without counting a notification.
    fn set_view(&self, user: u32, x: u32, is_online: Option<bool>) {
        if x == user {
            return;
        }
        let mut view = self.slot(user).view.borrow_mut();
        match view.iter_mut().find(|(w, _)| *w == x) {
            Some((_, v)) => *v = is_online,
            None => view.push((x, is_online)),
        }
    }

    /// A notification to `user` that `x` is now `is_online`.
    fn notify(&self, user: u32, x: u32, is_online: Option<bool>) {
        let t1 = now_ns();
        if x == user {
            return;
        }
        if !self.started.get() && self.plan.target != Target::Reach {
            // A member joining during the ramp: it sets the view, it measures nothing.
            self.set_view(user, x, is_online);
            return;
        }
        let online = is_online == Some(true);
        let mut c = self.c.borrow_mut();
        c.notifications += 1;
        if self.active.get() {
            c.run_notifications += 1;
        }
        let slot = self.slot(user);
        let mut view = slot.view.borrow_mut();
        match view.iter_mut().find(|(w, _)| *w == x) {
            Some((_, v)) if *v == is_online => c.spurious_repeat += 1,
            Some((_, v)) => *v = is_online,
            None => view.push((x, is_online)),
        }
        self.pending.borrow_mut().push((x, online, t1));
    }

    /// Subscribes `user` to the users it watches and waits for the reply; on Pusher this is
    /// also when the user becomes present, recorded as an event when `visible`.
    async fn subscribe(&self, user: u32, conn: &mut Conn, visible: bool) -> Result<(), String> {
        match conn {
            Conn::Reach(ws) => self.subscribe_reach(user, ws).await,
            Conn::Pusher(p) => self.subscribe_pusher(user, p, visible).await,
            Conn::Mqtt(m) => self.subscribe_mqtt(user, m).await,
        }
    }

    /// Matches received notifications to the events that caused them.
    fn resolve(&self, all: bool) {
        let cutoff = now_ns().saturating_sub(RESOLVE_DELAY_NS);
        let ready: Vec<(u32, bool, u64)> = {
            let mut p = self.pending.borrow_mut();
            if all {
                std::mem::take(&mut *p)
            } else {
                let (ready, keep) = p.drain(..).partition(|n| n.2 <= cutoff);
                *p = keep;
                ready
            }
        };
        if ready.is_empty() {
            return;
        }
        let events = self.events.borrow();
        let mut c = self.c.borrow_mut();
        let mut h = self.h.borrow_mut();
        for (x, online, t1) in ready {
            let Some(log) = events.get(&x) else {
                c.unmatched += 1;
                continue;
            };
            // The latest event before the receipt; if it says the opposite, the notification
            // may still be a late one of the event before it (a backlog), as long as the
            // contradicting event is recent.
            let mut before = log.iter().rev().filter(|e| e.t0_ns <= t1);
            let found = match before.next() {
                Some(e) if e.online == online => Some(e),
                Some(e) if t1 - e.t0_ns < LATE_WINDOW_NS => {
                    let prev = before.find(|p| p.online == online);
                    if prev.is_some() {
                        c.late += 1;
                    }
                    prev
                }
                Some(_) => None,
                None => {
                    c.unmatched += 1;
                    continue;
                }
            };
            match found {
                Some(e) => {
                    c.matched += 1;
                    let lat = t1 - e.t0_ns;
                    record_ns(&mut h.latency[e.kind.index()], lat);
                    if matches!(e.kind, EventKind::Connect | EventKind::Bye) {
                        record_ns(&mut h.prompt, lat);
                    }
                }
                None => c.spurious_state += 1,
            }
        }
    }

    fn finish(&self, truth: &[bool]) -> WorkerResult {
        let mut c = self.c.borrow_mut();
        for slot in &self.slots {
            if slot.st.get() != St::Ready {
                continue;
            }
            for (x, v) in slot.view.borrow().iter() {
                let want = truth.get(*x as usize).copied().unwrap_or(false);
                if *v != Some(want) {
                    c.final_mismatch += 1;
                }
            }
        }
        let h = self.h.borrow();
        let me = proc_sample("self").unwrap_or_default();
        WorkerResult {
            latency: h.latency.iter().map(encode_hist).collect(),
            upgrade_hist: encode_hist(&h.upgrade),
            hello_hist: encode_hist(&h.hello),
            subscribe_hist: encode_hist(&h.subscribe),
            connects: c.connects,
            notifications: c.notifications,
            run_notifications: c.run_notifications,
            events: c.events,
            matched: c.matched,
            errors: c.errors,
            error_samples: c.error_samples.clone(),
            unexpected_closes: c.unexpected_closes,
            spurious_repeat: c.spurious_repeat,
            spurious_state: c.spurious_state,
            spurious_snapshot: c.spurious_snapshot,
            unmatched: c.unmatched,
            late: c.late,
            final_mismatch: c.final_mismatch,
            converged_ns: self.converged.get(),
            cpu_s: me.cpu_s,
            rss_bytes: me.rss_bytes,
        }
    }
}

/// Sets linger 0 on the socket, so that dropping it resets the TCP connection.
/// The TCP connection under a WebSocket, with TLS or without.
fn tcp_of(stream: &MaybeTlsStream<TcpStream>) -> &TcpStream {
    match stream {
        MaybeTlsStream::Rustls(tls) => tls.get_ref().0,
        MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("the harness makes plain and rustls streams only"),
    }
}

fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

impl Worker {
    /// Leaves cleanly: `bye` on reach, unsubscribe + close on Pusher, the retained `0` +
    /// DISCONNECT on MQTT; then reads to the server's close (at most [`BYE_DRAIN`]), so the
    /// close handshake completes.
    async fn bye(&self, user: u32, conn: Conn) {
        match conn {
            Conn::Reach(ws) => self.bye_reach(user, ws).await,
            Conn::Pusher(p) => self.bye_pusher(user, p).await,
            Conn::Mqtt(m) => self.bye_mqtt(user, m).await,
        }
    }
}

/// One user's life: sessions separated by leaves, until the worker ends.
async fn user_task(
    w: Rc<Worker>,
    user: u32,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let slot = w.slot(user);
    let mut subscribe_now = false;
    let mut visible = false;
    loop {
        slot.st.set(St::Connecting);
        let mut conn = match w.establish(user, visible).await {
            Ok(c) => c,
            Err(e) => {
                w.error(e);
                slot.st.set(St::Failed);
                return;
            }
        };
        drop(permit.take());
        if subscribe_now {
            if let Err(e) = w.subscribe(user, &mut conn, visible).await {
                w.error(e);
                slot.st.set(St::Failed);
                return;
            }
            slot.st.set(St::Ready);
        } else {
            slot.st.set(St::Connected);
        }
        let leave = loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Subscribe) => match w.subscribe(user, &mut conn, false).await {
                        Ok(()) => slot.st.set(St::Ready),
                        Err(e) => {
                            w.error(e);
                            slot.st.set(St::Failed);
                            return;
                        }
                    },
                    Some(Cmd::Leave(l)) => break l,
                },
                r = w.recv(user, &mut conn) => {
                    if let Err(e) = r {
                        w.c.borrow_mut().unexpected_closes += 1;
                        w.error(e);
                        slot.st.set(St::Failed);
                        return;
                    }
                }
            }
        };
        slot.st.set(St::Out);
        let sc = &w.sc;
        match leave {
            Leave::Bye => {
                w.event(user, false, EventKind::Bye);
                w.bye(user, conn).await;
                tokio::time::sleep(Duration::from_millis(sc.rejoin_ms)).await;
                visible = true;
            }
            Leave::Abrupt => {
                // Peers have no offline grace: they show every abrupt close.
                let shown = !w.plan.target.has_grace() || sc.abrupt_visible();
                if shown {
                    w.event(user, false, EventKind::Abrupt);
                }
                conn.reset();
                tokio::time::sleep(Duration::from_millis(sc.abrupt_rejoin_ms)).await;
                visible = shown;
            }
            Leave::Silent => {
                w.event(user, false, EventKind::Silent);
                // Hold the socket without reading it: no pongs, no frames.
                let hold = sc.heartbeat_timeout_ms + sc.offline_grace_ms + 1500;
                tokio::time::sleep(Duration::from_millis(hold)).await;
                conn.reset();
                visible = true;
            }
            Leave::Storm => {
                conn.reset();
                visible = false;
            }
        }
        subscribe_now = true;
    }
}
