#!/usr/bin/env bash
# Static checks of the deployment files, with no network and no container engine:
#   1. compose/compose.yaml against the Compose Specification schema that check-jsonschema
#      vendors (its --builtin-schema vendor.compose-spec);
#   2. every manifest in k8s/ against the Kubernetes OpenAPI schemas that kubernetes-validate
#      ships, strictly (an unknown or misspelt field fails), for the oldest Kubernetes we
#      support and the newest it knows;
#   3. k8s/kustomization.yaml lists exactly the manifests in k8s/.
# Both tools are pinned Python packages (pyproject's dev extras); IMAGEMESH_PYTHON names the
# Python they are installed for (default: the repo's .venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# DEPLOY_DIR lets tests point the checks at a deliberately broken copy.
DEPLOY="${DEPLOY_DIR:-$REPO/deploy}"
PY="${IMAGEMESH_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
# 1.30: the oldest minor still in upstream or vendor support that has everything used here
# (native gRPC probes, policy/v1 PDBs, Pod Security labels).
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"

for tool in check-jsonschema kubernetes-validate; do
  [[ -x "$BIN/$tool" ]] || { echo "deploy/check.sh: $BIN/$tool missing (pip install -e '.[dev]')" >&2; exit 2; }
done

echo "== compose: Compose Specification schema"
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec "$DEPLOY/compose/compose.yaml"

manifests=()
while IFS= read -r f; do manifests+=("$f"); done < <(find "$DEPLOY/k8s" -name '*.yaml' ! -name kustomization.yaml | sort)

for version in $K8S_VERSIONS; do
  echo "== k8s: ${#manifests[@]} manifests against Kubernetes $version (strict)"
  "$BIN/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
done

echo "== k8s: kustomization.yaml lists every manifest"
"$PY" - "$DEPLOY/k8s" <<'PY'
import sys
from pathlib import Path

import yaml

folder = Path(sys.argv[1])
listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
present = {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
if listed != present:
    sys.exit(f"kustomization.yaml resources {sorted(listed)} != files {sorted(present)}")
PY
echo "deploy checks passed"
