//! TLS on the public listener, against the real reachd: HTTPS and `wss://` with a self-signed
//! certificate (generated per test), the Rust SDK trusting it through a CA file, a SIGHUP
//! reload that keeps open sockets, start-up errors naming the key, and handshakes that are
//! garbage or never come, cut off while an honest client is served.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use reach_client::{Client, ConnectionState, Error, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A self-signed certificate for 127.0.0.1 and localhost, written as `<name>.crt`/`<name>.key`.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key, signing_key.serialize_pem()).unwrap();
    (crt, key)
}

fn tls_reachd(crt: &Path, key: &Path, env: &[(&str, &str)]) -> Reachd {
    let crt = crt.display().to_string();
    let key = key.display().to_string();
    let mut all = vec![
        ("REACH_SERVER__TLS_CERT_PATH", crt.as_str()),
        ("REACH_SERVER__TLS_KEY_PATH", key.as_str()),
    ];
    all.extend_from_slice(env);
    Reachd::start_with_env("", &all)
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// `GET path` over TLS trusting only `ca`, from `from`; the response's status line.
async fn https_get(d: &Reachd, ca: &Path, from: &str, path: &str) -> std::io::Result<String> {
    let response = https(d, ca, from, "GET", path, "").await?;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}

/// A REST request over TLS trusting only `ca`, from `from`; the whole response.
async fn https(
    d: &Reachd,
    ca: &Path,
    from: &str,
    method: &str,
    path: &str,
    form: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tcp_from(from, d.http).await;
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    tls.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {basic}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{form}",
            form.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    Ok(response)
}

async fn metric(d: &Reachd, name: &str) -> f64 {
    let text = d.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn wss_url(d: &Reachd) -> String {
    format!("wss://127.0.0.1:{}/v1/ws", d.http.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_sockets_over_tls_and_a_reload_that_keeps_open_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = self_signed(dir.path(), "a");
    let d = tls_reachd(&crt, &key, &[]);
    assert_eq!(
        https_get(&d, &crt, "127.0.0.1", "/v1/Services")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
    // Plain HTTP to the TLS port gets no HTTP answer; the failed handshake is counted.
    assert!(
        reqwest::get(format!("{}/v1/Services", d.base()))
            .await
            .is_err()
    );
    assert!(metric(&d, "reach_tls_handshake_failures_total{reason=\"error\"}").await >= 1.0);

    let created = https(
        &d,
        &crt,
        "127.0.0.1",
        "POST",
        "/v1/Services",
        "FriendlyName=tls",
    )
    .await
    .unwrap();
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    let at = created.find("\"sid\":\"").unwrap() + 7;
    let svc = created[at..at + 34].to_owned();
    // Absolute URLs say https (the request's Host is 127.0.0.1).
    let url = format!("\"url\":\"https://127.0.0.1/v1/Services/{svc}\"");
    assert!(created.contains(&url), "{created}");
    let path = format!("/v1/Services/{svc}/Configuration");
    let enabled = https(
        &d,
        &crt,
        "127.0.0.1",
        "POST",
        &path,
        "ReachabilityEnabled=true",
    )
    .await
    .unwrap();
    assert!(enabled.starts_with("HTTP/1.1 200"), "{enabled}");
    let tls_a = TlsConfig::only_ca_file(&crt).unwrap();
    let alice = Client::builder(wss_url(&d), d.token(&svc, "alice"))
        .tls(tls_a.clone())
        .connect()
        .await
        .expect("wss with the CA file");
    assert_eq!(alice.connection_state(), ConnectionState::Connected);
    assert_eq!(alice.user().is_online(), Some(true));
    // An update reaches her over TLS, written by her session: a TLS connection is never lent
    // to the fan-out (its stream may keep bytes until a flush).
    let mut events = alice.events();
    let renamed = https(
        &d,
        &crt,
        "127.0.0.1",
        "POST",
        &format!("/v1/Services/{svc}/Users/alice"),
        "FriendlyName=Alice",
    )
    .await
    .unwrap();
    assert!(renamed.starts_with("HTTP/1.1 200"), "{renamed}");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(reach_client::ClientEvent::UserUpdated { user, .. }))
                if user.friendly_name().as_deref() == Some("Alice") =>
            {
                break;
            }
            Ok(Some(_)) => continue,
            other => panic!("no update over TLS: {other:?}"),
        }
    }
    let text = d.metrics().await;
    assert!(
        text.lines().any(|l| l == "reach_fanout_writes_total 0"),
        "the fan-out wrote nothing: {text}"
    );
    assert!(metric(&d, "reach_frames_sent_total").await >= 2.0);
    // The system's roots do not vouch for a self-signed certificate.
    match Client::connect(&wss_url(&d), &d.token(&svc, "bob")).await {
        Err(Error::Tls(reason)) => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // A new certificate and SIGHUP: new handshakes get it, alice's socket stays.
    let (crt_b, key_b) = self_signed(dir.path(), "b");
    std::fs::copy(&crt_b, &crt).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(d.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d
        .drain_logs()
        .iter()
        .any(|l| l.contains("certificate reloaded"))
    {
        assert!(Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        https_get(&d, &crt_b, "127.0.0.1", "/v1/Services")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
    match Client::builder(wss_url(&d), d.token(&svc, "carol"))
        .tls(tls_a)
        .connect()
        .await
    {
        Err(Error::Tls(_)) => {}
        other => panic!("the old certificate is gone: expected a TLS error, got {other:?}"),
    }
    alice
        .ping()
        .await
        .expect("the socket opened before the reload still answers");
    assert_eq!(alice.connection_state(), ConnectionState::Connected);
    assert!(alice.last_disconnect().is_none(), "never disconnected");

    // A reload that fails keeps the certificate it had.
    std::fs::write(&key, "not a key").unwrap();
    std::process::Command::new("kill")
        .arg("-HUP")
        .arg(d.pid().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d
        .drain_logs()
        .iter()
        .any(|l| l.contains("certificate not reloaded"))
    {
        assert!(Instant::now() < deadline, "no failed reload logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        https_get(&d, &crt_b, "127.0.0.1", "/v1/Services")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
}

#[test]
fn a_bad_certificate_or_key_fails_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = self_signed(dir.path(), "a");
    let (_, other_key) = self_signed(dir.path(), "b");
    let cases = [
        (
            dir.path().join("missing.crt"),
            key.clone(),
            "server.tls_cert_path",
        ),
        (
            crt.clone(),
            dir.path().join("missing.key"),
            "server.tls_key_path",
        ),
        (key.clone(), key.clone(), "no PEM certificate"),
        (crt.clone(), crt.clone(), "no PEM private key"),
        (crt.clone(), other_key, "is not the key of the certificate"),
    ];
    for (cert_path, key_path, expected) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_reachd"))
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env("REACH_SERVER__LISTEN", "127.0.0.1:0")
            .env("REACH_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
            .env("REACH_SERVER__TLS_CERT_PATH", &cert_path)
            .env("REACH_SERVER__TLS_KEY_PATH", &key_path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{expected}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_handshakes_are_cut_off_while_an_honest_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = self_signed(dir.path(), "a");
    let d = tls_reachd(
        &crt,
        &key,
        &[("REACH_SERVER__TLS_HANDSHAKE_TIMEOUT_MS", "700")],
    );
    // From 127.0.0.2: 40 connections that never start the handshake, 40 that send garbage,
    // and one that sends 64 KiB of a "ClientHello" record that never ends.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tcp_from("127.0.0.2", d.http).await);
    }
    let mut garbage = Vec::new();
    for i in 0..40u8 {
        let mut s = tcp_from("127.0.0.2", d.http).await;
        s.write_all(&[i; 300]).await.unwrap();
        garbage.push(s);
    }
    let mut huge = tcp_from("127.0.0.2", d.http).await;
    let mut record = vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb];
    record.resize(64 * 1024, 0x41);
    let _ = huge.write_all(&record).await;
    // Meanwhile an honest client from 127.0.0.3 is answered at once.
    let started = Instant::now();
    assert_eq!(
        https_get(&d, &crt, "127.0.0.3", "/v1/Services")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Every attacker connection is closed by the server within the handshake timeout.
    let mut buf = [0u8; 64];
    for s in silent
        .iter_mut()
        .chain(garbage.iter_mut())
        .chain(std::iter::once(&mut huge))
    {
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "an attacker's connection is still open");
    }
    assert!(metric(&d, "reach_tls_handshake_failures_total{reason=\"timeout\"}").await >= 40.0);
    assert!(metric(&d, "reach_tls_handshake_failures_total{reason=\"error\"}").await >= 40.0);
    assert_eq!(metric(&d, "reach_pending_connections").await, 0.0);
}

#[test]
fn a_key_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = self_signed(dir.path(), "a");
    let warned = |d: &Reachd| {
        d.startup_logs()
            .iter()
            .any(|l| l.contains("can be read by other users"))
    };
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(warned(&tls_reachd(&crt, &key, &[])));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!warned(&tls_reachd(&crt, &key, &[])));
}
