//! Attacks on the limits of connections, against the real reachd, each checking both that the
//! attacker is stopped and that an honest client on another address is served meanwhile:
//!
//! - a half-open flood: 20,000 connections from two addresses that send half an HTTP request
//!   (10,000 from this process, 10,000 from a helper process: one process may hold 20,000
//!   descriptors at most);
//! - a process whose open-file limit cannot hold its configured caps: they are lowered so
//!   that at the socket cap REST and the admin endpoints still answer.

mod common;
mod ws_client;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HALF_REQUEST: &[u8] = b"GET /v1/Services HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";

async fn metric(d: &Reachd, name: &str) -> f64 {
    let text = d.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A REST request from the loopback address `from`: its status and how long it took.
async fn rest_from(from: &str, to: SocketAddr) -> (String, Duration) {
    let started = Instant::now();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(to).await.unwrap();
    // A connection closed at accept (reset, or closed before the request is read) is an
    // empty status, for the caller to judge or retry.
    let _ = tcp
        .write_all(b"GET /v1/Services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut response = String::new();
    let _ = tcp.read_to_string(&mut response).await;
    let status = response.lines().next().unwrap_or_default().to_owned();
    (status, started.elapsed())
}

/// Opens `count` connections from `from` that each send half a request; returns them.
async fn half_open(from: &str, to: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let Ok(mut tcp) = socket.connect(to).await else {
            continue;
        };
        let _ = tcp.write_all(HALF_REQUEST).await;
        held.push(tcp);
    }
    held
}

/// Waits until the server has closed every connection (EOF or reset); how many took longer
/// than `limit`.
async fn still_open_after(conns: &mut [TcpStream], limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    let mut open = 0;
    let mut buf = [0u8; 256];
    for c in conns.iter_mut() {
        let closed = tokio::time::timeout_at(deadline, async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        if closed.is_err() {
            open += 1;
        }
    }
    open
}

/// The helper process of the flood: run with `REACH_FLOOD=<from>,<to>,<count>`, it opens the
/// connections, prints `open N`, and prints `closed-late N` once the server has closed them.
#[tokio::test]
#[ignore = "the helper of half_open_flood_from_two_addresses, started by it"]
async fn flood_helper() {
    let Ok(spec) = std::env::var("REACH_FLOOD") else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let to: SocketAddr = parts[1].parse().unwrap();
    let count: usize = parts[2].parse().unwrap();
    let limit = Duration::from_millis(parts[3].parse().unwrap());
    let mut conns = half_open(parts[0], to, count).await;
    println!("open {}", conns.len());
    let late = still_open_after(&mut conns, limit).await;
    println!("closed-late {late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_flood_from_two_addresses_leaves_rest_answering_for_a_third() {
    // The defaults: each address holds 512, the rest are closed at once.
    let d = Reachd::start_with_env("", &[("REACH_SERVER__HEADER_READ_TIMEOUT_MS", "3000")]);
    flood(&d, 10_000, 2 * 512, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_flood_held_in_full_is_gone_within_the_header_timeout() {
    // Caps raised past the flood: reachd holds all 18,000 (its own limit is 20,000 open
    // files), and the header read timeout alone ends them. The timeout is longer than the
    // flood takes to connect (~3 s on a slow kernel), so all are held at once.
    let d = Reachd::start_with_env(
        "",
        &[
            ("REACH_SERVER__HEADER_READ_TIMEOUT_MS", "8000"),
            ("REACH_LIMITS__MAX_PENDING_CONNECTIONS", "19000"),
            ("REACH_LIMITS__MAX_PENDING_PER_ADDRESS", "19000"),
        ],
    );
    flood(&d, 9_000, 18_000, 8000).await;
}

/// Floods `d` with `per_address` half-open requests from each of 127.0.0.2 (this process)
/// and 127.0.0.3 (a helper process), of which it should hold `held`; checks that REST from
/// 127.0.0.4 answers within a second meanwhile, and that all are closed within the header
/// read timeout (`header_timeout_ms`, as `d` was started with) and a margin of 3 s.
async fn flood(d: &Reachd, per_address: usize, held: usize, header_timeout_ms: u64) {
    // One flood at a time: this process may hold 20,000 descriptors.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let grace = Duration::from_millis(header_timeout_ms + 3000);
    let flood_started = Instant::now();
    let helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "flood_helper", "--ignored", "--nocapture"])
        .env(
            "REACH_FLOOD",
            format!("127.0.0.3,{},{per_address},{}", d.http, grace.as_millis()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut mine = half_open("127.0.0.2", d.http, per_address).await;
    // Wait until the server holds what it should (the helper may still be connecting).
    let deadline = Instant::now() + ws_client::WAIT;
    let mut pending = 0.0;
    while Instant::now() < deadline {
        pending = metric(d, "reach_pending_connections").await;
        if pending >= held as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pending, held as f64,
        "pending connections at the height of the flood"
    );
    // The honest client on 127.0.0.4, while both floods hold their connections.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let (status, took) = rest_from("127.0.0.4", d.http).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status}");
        slowest = slowest.max(took);
    }
    eprintln!(
        "flood: {} connections from each of 127.0.0.2 and .3, {held} held after {:?}; slowest REST answer to 127.0.0.4: {slowest:?}",
        mine.len(),
        flood_started.elapsed()
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    let late_here = still_open_after(&mut mine, grace).await;
    let out = helper.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let line = |key: &str| -> usize {
        report
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("no {key:?} in {report}"))
    };
    assert_eq!(line("open "), per_address, "{report}");
    assert_eq!(
        line("closed-late "),
        0,
        "the helper's connections were all closed in time"
    );
    assert_eq!(
        late_here, 0,
        "this process's connections were all closed in time"
    );
    eprintln!(
        "flood: all {} closed within {:?} of the start",
        2 * per_address,
        flood_started.elapsed()
    );
    let refused = metric(
        d,
        "reach_connections_refused_total{reason=\"pending_per_address\"}",
    )
    .await;
    assert_eq!(refused, (2 * per_address - held) as f64);
    assert_eq!(metric(d, "reach_pending_connections").await, 0.0);
    assert_eq!(metric(d, "reach_accept_errors_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_lowers_the_caps_so_rest_and_admin_still_answer() {
    let d = Reachd::start_with_env("", &[("ULIMIT_NOFILE", "700")]);
    let logs = d.startup_logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("the open-file limit cannot hold")),
        "{logs:?}"
    );
    // (700 - 128) / 4 = 143 pending, 429 sockets.
    let svc = d.client().create_service("fds").await;
    let token = d.token(&svc, "alice");
    let mut sockets = Vec::new();
    for _ in 0..429 {
        sockets.push(ws_client::Ws::hello(&d.ws_url(), &token, None).await.0);
    }
    // The next socket is refused with 4029; REST and the admin endpoints still answer.
    let mut extra = ws_client::Ws::connect(&d.ws_url(), None).await;
    extra
        .send(&reach_proto::ClientFrame::Hello {
            token: token.clone(),
            client: None,
        })
        .await;
    let closed = extra.closed().await;
    assert_eq!(
        (closed.error_code(), closed.code),
        (Some(20429), Some(4029))
    );
    let (status, took) = rest_from("127.0.0.5", d.http).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let ready = reqwest::get(format!("http://{}/readyz", d.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(metric(&d, "reach_connections").await, 429.0);
    // A stranger takes the rest of the descriptors: past the budget (572 connections) its
    // connections are closed at once, reachd never runs out, and the admin endpoints answer.
    let mut stranger = half_open("127.0.0.6", d.http, 200).await;
    let open_files = "reach_connections_refused_total{reason=\"open_files\"}";
    // The stranger's connections are all made (client side) before reachd has accepted and
    // refused them: wait for the count to get there.
    let deadline = Instant::now() + ws_client::WAIT;
    let mut refused = metric(&d, open_files).await;
    while refused < 50.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        refused = metric(&d, open_files).await;
    }
    assert!(
        (50.0..=60.0).contains(&refused),
        "{refused} refused for open files"
    );
    assert_eq!(metric(&d, "reach_accept_errors_total").await, 0.0);
    let ready = reqwest::get(format!("http://{}/readyz", d.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    // It holds what the budget had left (572 - 429), no more; once it is gone, REST answers.
    let held = still_open_after(&mut stranger, Duration::from_millis(200)).await;
    assert!((140..=146).contains(&held), "{held} held");
    drop(stranger);
    let (status, _) = wait_for_rest("127.0.0.5", d.http).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    drop(sockets);
}

/// REST from `from`, retried until it is answered (connections may be refused meanwhile).
async fn wait_for_rest(from: &str, to: SocketAddr) -> (String, Duration) {
    let deadline = Instant::now() + ws_client::WAIT;
    loop {
        let answer = rest_from(from, to).await;
        if !answer.0.is_empty() || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() {
    let d = Reachd::start_with_env("", &[("REACH_SERVER__KEEPALIVE_IDLE_TIMEOUT_MS", "1000")]);
    let mut tcp = TcpStream::connect(d.http).await.unwrap();
    for _ in 0..2 {
        // Two requests on one connection: it is kept alive between them.
        tcp.write_all(b"GET /v1/Services HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
    let answered = Instant::now();
    wait_closed(&mut tcp).await;
    let idle = answered.elapsed();
    // Closed by the keep-alive timeout (1 s), long before the header read timeout (10 s).
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
}

/// Waits until the server closes `tcp` (within the wait), sending nothing first.
async fn wait_closed(tcp: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(ws_client::WAIT, tcp.read(&mut buf))
        .await
        .expect("closed within the wait")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server closed it without a response");
}

/// Reads one response (head and `Content-Length` body); returns its head.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return head;
            }
        }
        let n = tokio::time::timeout(ws_client::WAIT, tcp.read(&mut buf))
            .await
            .expect("a response within the wait")
            .unwrap();
        assert!(n > 0, "closed before the response");
        data.extend_from_slice(&buf[..n]);
    }
}

/// A kept-alive plain connection whose first request came late (the gateway looks at a plain
/// connection's first bytes before the HTTP server takes it) still gives each later request
/// the whole header read timeout (2 s here): the second request, 1.5 s after the first
/// answer, is answered too.
#[tokio::test]
async fn a_late_first_request_leaves_later_ones_the_whole_header_timeout() {
    let d = Reachd::start_with_env("", &[("REACH_SERVER__HEADER_READ_TIMEOUT_MS", "2000")]);
    let mut tcp = TcpStream::connect(d.http).await.unwrap();
    for _ in 0..2 {
        // A client that takes its time, within the timeout (what the test is about).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tcp.write_all(b"GET /v1/Services HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
}

/// The first request's head is due within the header read timeout from the accept (2 s
/// here), also for a client that sends its first byte late and then nothing more: closed
/// about 2 s after the connect, not 2 s after that byte.
#[tokio::test]
async fn a_first_head_sent_late_is_due_from_the_accept() {
    let d = Reachd::start_with_env("", &[("REACH_SERVER__HEADER_READ_TIMEOUT_MS", "2000")]);
    let connected = Instant::now();
    let mut tcp = TcpStream::connect(d.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tcp.write_all(b"G").await.unwrap();
    wait_closed(&mut tcp).await;
    let open = connected.elapsed();
    assert!(
        open >= Duration::from_millis(1800) && open < Duration::from_millis(2800),
        "{open:?}"
    );
}

/// A connection that has sent nothing does not hold a draining gateway for the header read
/// timeout (60 s here): SIGTERM ends the process within seconds.
#[tokio::test]
async fn a_silent_connection_does_not_hold_the_drain() {
    let d = Reachd::start_with_env("", &[("REACH_SERVER__HEADER_READ_TIMEOUT_MS", "60000")]);
    let _silent = TcpStream::connect(d.http).await.unwrap();
    // The accept loop has taken it once the pending gauge counts it.
    let deadline = Instant::now() + ws_client::WAIT;
    while metric(&d, "reach_pending_connections").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the connection was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    let status = tokio::task::spawn_blocking(move || d.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
}
