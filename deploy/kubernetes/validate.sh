#!/usr/bin/env bash
# Validates the manifests offline: every resource against the Kubernetes schemas of the oldest
# and newest versions checked (kubernetes-validate from PyPI, strict: unknown fields are
# errors), every file a kustomization names exists and every resource file is named by one,
# a manifest with a typo is refused (so the check itself works), and the drain fits in each
# Deployment's grace: preStop pause + server.drain_grace_ms + the writers' flush below
# terminationGracePeriodSeconds. Run from anywhere; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")"

KUBERNETES_VALIDATE_VERSION=1.37.0
venv="${CARGO_TARGET_DIR:-$PWD/../../target}/kubernetes-validate-venv"
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" pyyaml

mapfile -t resources < <(find . -name '*.yaml' ! -name kustomization.yaml | sort)
for version in 1.29.0 1.37.0; do
  echo "== kubernetes $version: ${#resources[@]} files"
  "$venv/bin/kubernetes-validate" --strict --kubernetes-version "$version" "${resources[@]}"
done

echo "== the check refuses a typo"
bad=$(mktemp --suffix=.yaml)
trap 'rm -f "$bad"' EXIT
sed 's/^  replicas:/  replicaz:/' cluster/deployment.yaml >"$bad"
if "$venv/bin/kubernetes-validate" --strict --quiet "$bad" >/dev/null 2>&1; then
  echo "error: a Deployment with 'replicaz' passed the validation" >&2
  exit 1
fi

echo "== kustomizations and the drain's time"
"$venv/bin/python" - "${resources[@]}" <<'PY'
import os, sys, yaml

resources = {os.path.normpath(p) for p in sys.argv[1:]}
named = set()
for folder in sorted({os.path.dirname(p) for p in resources}):
    with open(os.path.join(folder, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    for name in kustomization["resources"]:
        path = os.path.normpath(os.path.join(folder, name))
        assert os.path.exists(path), f"{folder}/kustomization.yaml names {name}, which is missing"
        named.add(path)
missing = resources - named
assert not missing, f"not in any kustomization.yaml: {sorted(missing)}"

DEFAULT_DRAIN_MS = 10_000
FLUSH_MS = 5_000 + 2_000  # webhooks.timeout_ms + 2 s: the background writers' last flush
for path in sorted(resources):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != "Deployment":
                continue
            pod = doc["spec"]["template"]["spec"]
            grace_s = pod["terminationGracePeriodSeconds"]
            for c in pod["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                drain_ms = int(env.get("REACH_SERVER__DRAIN_GRACE_MS") or DEFAULT_DRAIN_MS)
                pre = c["lifecycle"]["preStop"]["exec"]["command"]
                assert pre[0] == "sleep", pre
                needed_ms = int(pre[1]) * 1000 + drain_ms + FLUSH_MS
                assert grace_s * 1000 > needed_ms, (
                    f"{path}: terminationGracePeriodSeconds {grace_s} s is not above "
                    f"preStop {pre[1]} s + drain {drain_ms} ms + flush {FLUSH_MS} ms")
                for probe, endpoint in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                    got = c[probe]["httpGet"]
                    assert (got["path"], got["port"]) == (endpoint, "admin"), (path, probe, got)
                print(f"{path}: grace {grace_s} s > {needed_ms / 1000:g} s (preStop, drain, flush); probes on the admin port")
print(f"{len(resources)} resource files, each in a kustomization")
PY
echo "== manifests valid"
