//! Turns the REST contract, `docs/openapi.yaml`, into the JSON that `GET /v1/openapi.json`
//! serves (`OUT_DIR/openapi.json`, embedded with `include_str!`). A spec that is not valid
//! YAML fails the build, so the served document is always the committed one.

use std::path::Path;

fn main() {
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
