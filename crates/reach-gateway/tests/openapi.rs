//! The REST contract (`docs/openapi.yaml`) against the code and a real reachd: every route the
//! code declares is in the spec with the same methods, and the reverse; reachd serves the spec
//! at `/v1/openapi.json` without credentials; and every operation of the spec reaches its own
//! route template (counted under it in reach_http_requests_total) with a status the spec lists.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;

const METHODS: [&str; 5] = ["get", "post", "delete", "put", "patch"];

/// `(path template, method)` of every `.route("/v1/...", get(..).post(..))` in the gateway's
/// source: the one way routes are declared, so a new route cannot miss this list. (The admin
/// listener's `/metrics`, `/healthz` and `/readyz` are not part of the API.)
fn routes_in_source() -> BTreeSet<(String, String)> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut paths,
    );
    let mut routes = BTreeSet::new();
    for file in paths {
        let text = std::fs::read_to_string(&file).unwrap();
        for (at, _) in text.match_indices(".route(") {
            // The call's arguments, up to its closing parenthesis.
            let args = &text[at + ".route(".len()..];
            let mut depth = 1;
            let end = args
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or_else(|| panic!("unclosed .route( in {}", file.display()));
            let args = &args[..end];
            let path = args
                .split('"')
                .nth(1)
                .unwrap_or_else(|| panic!("a route without a literal path in {}", file.display()));
            let methods: Vec<&str> = METHODS
                .iter()
                .copied()
                .filter(|m| {
                    args.match_indices(&format!("{m}("))
                        .any(|(i, _)| i == 0 || !args.as_bytes()[i - 1].is_ascii_alphanumeric())
                })
                .collect();
            if !path.starts_with("/v1/") {
                continue;
            }
            assert!(
                !methods.is_empty(),
                "no method for {path} in {}",
                file.display()
            );
            for m in methods {
                routes.insert((path.to_owned(), m.to_owned()));
            }
        }
    }
    routes
}

fn routes_in_spec(spec: &serde_json::Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(m).is_some() {
                routes.insert((path.clone(), m.to_owned()));
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_spec_lists_exactly_the_routes_the_code_serves_and_reachd_serves_the_spec() {
    let d = Reachd::start("");
    let anonymous = d.client_as("", "");
    let r = anonymous.get("/v1/openapi.json").await;
    assert_eq!(r.status, 200, "served without credentials: {}", r.text);
    let spec = r.body;
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{spec}"
    );
    for schema in [
        "Error",
        "Meta",
        "Service",
        "Configuration",
        "User",
        "Binding",
    ] {
        assert!(
            spec["components"]["schemas"][schema].is_object(),
            "{schema} is in the spec"
        );
    }

    let code = routes_in_source();
    let documented = routes_in_spec(&spec);
    assert!(code.len() >= 15, "found the routes: {code:?}");
    let missing: Vec<_> = code.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "served but not in docs/openapi.yaml: {missing:?}"
    );
    let extra: Vec<_> = documented.difference(&code).collect();
    assert!(
        extra.is_empty(),
        "in docs/openapi.yaml but not served: {extra:?}"
    );
}

#[tokio::test]
async fn every_operation_of_the_spec_reaches_its_route_with_a_documented_status() {
    let d = Reachd::start("");
    let rest = d.client();
    let spec = rest.get("/v1/openapi.json").await.body;
    let svc = rest.create_service("contract").await;
    create_user(&d, &svc, "alice").await;
    // A second service for the deletes, so the fetches above keep their records.
    let doomed = rest.create_service("doomed").await;
    create_user(&d, &doomed, "bob").await;
    let binding = "BS0123456789abcdef0123456789abcdef";

    let mut ops: Vec<(String, String)> = routes_in_spec(&spec).into_iter().collect();
    // Deletes last, after the reads and writes, and the user's before its service's.
    ops.sort_by_key(|(p, m)| (m == "delete", std::cmp::Reverse(p.len())));
    for (template, method) in ops {
        if template == "/v1/ws" {
            continue; // Not a REST route: its answer to a plain GET is checked below.
        }
        let target = if method == "delete" { &doomed } else { &svc };
        let user = if method == "delete" { "bob" } else { "alice" };
        let path = template
            .replace("{sid}", target)
            .replace("{user}", user)
            .replace("{binding}", binding);
        let form: &[(&str, &str)] = match (template.as_str(), method.as_str()) {
            ("/v1/Services", "post") => &[("FriendlyName", "another")],
            ("/v1/Services/{sid}/Users", "post") => &[("Identity", "carol")],
            _ => &[],
        };
        let r = rest.request(&method.to_uppercase(), &path, form).await;
        let documented = &spec["paths"][&template][&method]["responses"];
        assert!(
            documented.get(r.status.to_string()).is_some(),
            "{method} {path}: {} is not a documented status ({}): {}",
            r.status,
            documented,
            r.text
        );
        assert!(
            r.status < 400 || template.ends_with("{binding}"),
            "{method} {path} with real records: {} {}",
            r.status,
            r.text
        );
    }

    // Each operation was counted under its own route template, not as `unmatched`.
    let metrics = d.metrics().await;
    for (template, method) in routes_in_spec(&spec) {
        if template == "/v1/ws" {
            continue;
        }
        let needle = format!("route=\"{template}\"",);
        let method = method.to_uppercase();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("reach_http_requests_total")
                    && l.contains(&needle)
                    && l.contains(&format!("method=\"{method}\""))),
            "{method} {template} was not counted under its route"
        );
    }

    let r = d.client_as("", "").get("/v1/ws").await;
    assert_eq!(r.status, 400, "a GET that is not an upgrade: {}", r.text);
    assert_eq!(r.body["code"], 20001, "{}", r.text);
}
