#!/usr/bin/env bash
# Regenerates the Go client code for every contract under protos/ into clients/go/gen, with the
# pinned protoc-gen-go and protoc-gen-go-grpc (deploy/local/versions.env) and grpcio-tools' protoc.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-clients/go/gen}
MODULE=github.com/imagemesh/imagemesh/clients/go/gen
GEN_GO=$(bash deploy/local/tools.sh path protoc-gen-go)
GEN_GO_GRPC=$(bash deploy/local/tools.sh path protoc-gen-go-grpc)
mapfile -t PROTOS < <(cd protos && find imagemesh -name '*.proto' | sort)
# The protos carry no go_package option (it would tie every language's contract to Go's
# layout), so each file's Go import path is given here: gen/imagemesh/<service>/v1.
maps=()
for proto in "${PROTOS[@]}"; do
  dir=$(dirname "$proto")
  pkg="$(basename "$(dirname "$dir")")v1"
  maps+=("M${proto}=${MODULE}/${dir};${pkg}")
done
go_opts=$(IFS=,; echo "${maps[*]}")
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I protos \
  --plugin=protoc-gen-go="$GEN_GO" --plugin=protoc-gen-go-grpc="$GEN_GO_GRPC" \
  --go_out="$OUT" --go_opt="paths=source_relative,$go_opts" \
  --go-grpc_out="$OUT" --go-grpc_opt="paths=source_relative,$go_opts" \
  "${PROTOS[@]}"
