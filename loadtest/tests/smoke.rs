//! The harness end to end, a few seconds long: it starts the reachd built next to it, runs the
//! smoke scenario (rooms with churn, two worker processes) and must report no error, no missed
//! and no spurious notification.

use std::path::{Path, PathBuf};
use std::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn smoke_scenario_runs_clean_against_a_spawned_reachd() {
    smoke_against_spawned_reachd("reach-loadtest-smoke", None);
}

#[test]
fn smoke_scenario_runs_clean_over_wss_with_a_self_signed_certificate() {
    let dir = std::env::temp_dir().join(format!("reach-loadtest-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (crt, key) = (dir.join("reach.crt"), dir.join("reach.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key, signing_key.serialize_pem()).unwrap();
    smoke_against_spawned_reachd("reach-loadtest-smoke-wss", Some((&crt, &key)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the smoke scenario against a reachd the harness spawns (over wss:// with `tls`, a
/// certificate and its key, trusted with --ca-file) and checks it ran clean.
fn smoke_against_spawned_reachd(name: &str, tls: Option<(&Path, &Path)>) {
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_reach-loadtest"));
    let reachd = harness.with_file_name("reachd");
    if !reachd.exists() {
        skip(&format!(
            "{} not built (cargo build -p reach-gateway)",
            reachd.display()
        ));
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let (port, admin) = (free_port(), free_port());
    let mut cmd = Command::new(&harness);
    cmd.current_dir(root.parent().unwrap())
        .args(["run", "--quiet", "--strict", "--scenario"])
        .arg(root.join("scenarios/smoke.toml"))
        .arg("--spawn-reachd")
        .arg(&reachd)
        .arg("--reachd-config")
        .arg(root.join("reachd-bench.toml"))
        .arg(format!(
            "--reachd-env=REACH_SERVER__LISTEN=127.0.0.1:{port}"
        ))
        .arg(format!(
            "--reachd-env=REACH_SERVER__ADMIN_LISTEN=127.0.0.1:{admin}"
        ))
        .arg(format!("--admin=http://127.0.0.1:{admin}"))
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null());
    match tls {
        Some((crt, key)) => {
            cmd.arg(format!(
                "--reachd-env=REACH_SERVER__TLS_CERT_PATH={}",
                crt.display()
            ))
            .arg(format!(
                "--reachd-env=REACH_SERVER__TLS_KEY_PATH={}",
                key.display()
            ))
            .arg(format!("--url=wss://127.0.0.1:{port}/v1/ws"))
            .arg("--ca-file")
            .arg(crt);
        }
        None => {
            cmd.arg(format!("--url=ws://127.0.0.1:{port}/v1/ws"));
        }
    }
    let status = cmd.status().expect("run reach-loadtest");
    assert!(status.success(), "reach-loadtest failed: {status}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert!(result["correctness"]["matched"].as_u64().unwrap() > 0);
    assert_eq!(result["correctness"]["missed"], 0);
    assert_eq!(result["correctness"]["spurious"], 0);
    assert!(out.join("chart.svg").exists() && out.join("summary.md").exists());
    if tls.is_some() {
        assert!(
            result["url"].as_str().unwrap().starts_with("wss://"),
            "{}",
            result["url"]
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Says why a test does not run, straight to the process's stderr (libtest captures
/// `eprintln!` of a passing test), so `.ci/test` can count it.
fn skip(why: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("skipped: {why}\n").as_bytes());
}
