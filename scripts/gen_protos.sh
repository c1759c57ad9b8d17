#!/usr/bin/env bash
# Regenerates the Python code for every contract under protos/ into the `imagemesh` package,
# with mypy-protobuf stubs for messages and services. The generated files are committed and
# never edited by hand; `make check-protos` fails when they drift from the protos.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
mapfile -t PROTOS < <(cd protos && find imagemesh -name '*.proto' | sort)
"$PYTHON" -m grpc_tools.protoc -I protos \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --plugin=protoc-gen-mypy="$(dirname "$PYTHON")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PYTHON")/protoc-gen-mypy_grpc" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  "${PROTOS[@]}"
# Each generated folder is a regular package so that mypy and setuptools find it.
for dir in $(cd protos && find imagemesh -name '*.proto' -printf '%h\n' | sort -u); do
  d=$dir
  while [ "$d" != "imagemesh" ] && [ "$d" != "." ]; do
    [ -f "$OUT/$d/__init__.py" ] || : > "$OUT/$d/__init__.py"
    d=$(dirname "$d")
  done
done
