//! The operator's files in deploy/ checked against the real thing:
//!
//! - `promtool` checks deploy/prometheus/prometheus.yml and rules.yml and runs rules.test.yml
//!   (a unit test of every alert);
//! - a real Prometheus scrapes a real reachd (a node of a cluster, so that every metric family
//!   exists) under a little load, loads rules.yml, and every query of the Grafana dashboard
//!   (deploy/grafana/reach-dashboard.json) and every alert's query (its expression without the
//!   threshold) returns data through the HTTP API: a typo'd metric or label name returns none.
//!
//! Needs Prometheus (`prometheus` and `promtool`, Debian's package `prometheus`), and for the
//! live part `REACH_TEST_REDIS_URL` and `REACH_TEST_POSTGRES_URL`; without them the tests say
//! `skipped: ...` on stderr and pass. `.ci/run` installs and sets them.

mod common;
mod receiver;
mod ws_client;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reach_proto::ClientFrame;
use ws_client::Ws;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

fn skip(test: &str, why: &str) {
    // Straight to stderr: the harness hides an eprintln! of a passing test.
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

fn have(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_config_and_unit_tests_every_alert() {
    if !have("promtool") {
        return skip(
            "promtool_checks_the_config_and_unit_tests_every_alert",
            "promtool is not installed (apt-get install prometheus)",
        );
    }
    let config = deploy("prometheus/prometheus.yml");
    let rules = deploy("prometheus/rules.yml");
    let tests = deploy("prometheus/rules.test.yml");
    promtool(&["check", "config", config.to_str().unwrap()]);
    promtool(&["check", "rules", rules.to_str().unwrap()]);
    promtool(&["test", "rules", tests.to_str().unwrap()]);
    // Every alert of rules.yml has a test of its own in rules.test.yml.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let tests_text = std::fs::read_to_string(&tests).unwrap();
    for alert in alert_names(&rules_text) {
        assert!(
            tests_text.contains(&format!("alertname: {alert}\n")),
            "{alert} has no test in rules.test.yml"
        );
    }
}

/// The `alert:` names of a rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

/// Each alert's query: its `expr` without the trailing comparison with a number.
fn alert_queries(rules: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = None;
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = Some(name.to_owned());
        } else if let (Some(expr), Some(name)) = (line.strip_prefix("expr: "), alert.take()) {
            let (query, threshold) = expr
                .rsplit_once(['>', '<', '='])
                .unwrap_or_else(|| panic!("{name}: no comparison in {expr}"));
            assert!(
                threshold.trim().parse::<f64>().is_ok(),
                "{name}: `{expr}` does not end with a comparison with a number"
            );
            let query = query.trim_end_matches(['>', '<', '=', '!', ' ']);
            out.push((name, query.to_owned()));
        }
    }
    out
}

/// Every query of the dashboard, with Grafana's variables replaced by values Prometheus takes.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/reach-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["uid"], "reach-gateway");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                expr.replace("$__rate_interval", "30s")
                    .replace("$instance", ".+"),
            ));
        }
    }
    out
}

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn query(prometheus: &str, expr: &str) -> serde_json::Value {
    let r: serde_json::Value = reqwest::Client::new()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "success", "{expr}: {r}");
    r["data"]["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data_from_a_live_reachd() {
    let test = "every_dashboard_and_alert_query_returns_data_from_a_live_reachd";
    if !have("prometheus") {
        return skip(
            test,
            "prometheus is not installed (apt-get install prometheus)",
        );
    }
    let Some((redis, pg)) = servers(test) else {
        return;
    };
    let db = TestDb::create(&pg).await;
    let redis = redis_db(&redis, 10);
    let mut rx = receiver::Receiver::start().await;
    let d = Reachd::start_with_env(
        "[presence]\noffline_grace_ms = 300\n",
        &[
            ("REACH_STORAGE__POSTGRES_URL", &db.url),
            ("REACH_CLUSTER__REDIS_URL", &redis),
            (
                "REACH_CLUSTER__NODE_ID",
                &format!("observability-{:08x}", rand_u64() as u32),
            ),
            ("REACH_CLUSTER__NODE_TTL_MS", "1000"),
            ("REACH_WEBHOOKS__POLL_INTERVAL_MS", "100"),
        ],
    );

    // Prometheus, scraping this reachd every second and loading the alerting rules.
    let dir = tempfile::tempdir().unwrap();
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: reachd\n    static_configs:\n      - targets: [\"{}\"]\n",
            deploy("prometheus/rules.yml").display(),
            d.admin
        ),
    )
    .unwrap();
    let _prometheus = Process(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let prometheus = format!("http://{web}");

    // A little load: sockets coming and going, watchers, REST (with a wrong password), a
    // webhook receiver taking events.
    let rest = d.client();
    let svc = rest.create_service("observability").await;
    rest.set_reachability(&svc, true).await;
    let hooks = format!("/v1/Services/{svc}/Configuration/Webhooks");
    let filters = [
        ("PostWebhookUrl", rx.url("/hook")),
        ("Filters", "onUserAdded".into()),
        ("Filters", "onUserUpdated".into()),
    ];
    let form: Vec<(&str, &str)> = filters.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(rest.post(&hooks, &form).await.status, 200);
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    bob.request(ClientFrame::Subscribe {
        id: 1,
        identities: vec!["bob".into()],
    })
    .await;
    let wrong = d.client_as(ACCOUNT_SID, "not-the-auth-token");
    let load_until = Instant::now() + Duration::from_secs(8);
    let mut round = 0;
    while Instant::now() < load_until {
        round += 1;
        let identity = format!("user{}", round % 3);
        let (mut user, _) = Ws::hello(&d.ws_url(), &d.token(&svc, &identity), None).await;
        let _ = bob
            .request(ClientFrame::Subscribe {
                id: round,
                identities: vec![identity.clone()],
            })
            .await;
        user.send(&ClientFrame::Bye).await;
        let _ = rest
            .get(&format!("/v1/Services/{svc}/Users/{identity}"))
            .await;
        if round % 4 == 0 {
            // A few refused credentials (fewer than the address's burst, so it is not blocked).
            assert_eq!(wrong.get("/v1/Services").await.status, 401);
        }
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(10), async { Some(rx.next().await) }).await
        {
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Prometheus has the samples, and the rules evaluate without errors.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(&prometheus, "up{job=\"reachd\"} == 1").await;
        if up.as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped reachd");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rules_text = std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap();
    let rules: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["health"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let names: Vec<String> = loaded.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, alert_names(&rules_text), "every alert loaded");

    let mut empty = Vec::new();
    let queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .chain(alert_queries(&rules_text))
        .collect();
    for (what, expr) in &queries {
        if query(&prometheus, expr)
            .await
            .as_array()
            .is_none_or(|r| r.is_empty())
        {
            empty.push(format!("{what}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data (a metric or label that does not exist?):\n{}",
        empty.join("\n")
    );
    // And the rules' health, now that they had samples to evaluate.
    let rules: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "{} dashboard and alert queries returned data",
        queries.len()
    );
}
