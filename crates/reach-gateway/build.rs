//! Turns the REST contract, `docs/openapi.yaml`, into the JSON that `GET /v1/openapi.json`
//! serves (`OUT_DIR/openapi.json`, embedded with `include_str!`). A spec that is not valid
//! YAML fails the build, so the served document is always the committed one.
//!
//! Also names the commit the binary is built from (`REACH_COMMIT`, for
//! `reach_build_info{commit}` and `/debug/status`): the variable `REACH_COMMIT` when set (a
//! container build without `.git`), else `git rev-parse`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn commit() -> String {
    if let Ok(commit) = std::env::var("REACH_COMMIT")
        && !commit.trim().is_empty()
    {
        return commit.trim().to_owned();
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() {
    println!("cargo::rerun-if-env-changed=REACH_COMMIT");
    let git = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.git");
    for watched in ["HEAD", "refs/heads", "packed-refs"] {
        let path = git.join(watched);
        if path.exists() {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
    println!("cargo::rustc-env=REACH_COMMIT={}", commit());
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.yaml");
    println!("cargo::rerun-if-changed={}", spec.display());
    let text = std::fs::read_to_string(&spec)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", spec.display()));
    let value: serde_json::Value = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", spec.display()));
    let json = serde_json::to_string(&value).expect("JSON values serialise");
    let out =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("openapi.json");
    std::fs::write(&out, json).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}
