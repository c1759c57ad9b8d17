#!/usr/bin/env bash
# Regenerates the TypeScript client code for every contract under protos/ into clients/ts/gen,
# with the ts-proto plugin pinned in clients/ts/package-lock.json and grpcio-tools' protoc (the
# same protoc as the Python and Go code). The output targets @grpc/grpc-js: plain gRPC over
# HTTP/2, which every imagemesh server speaks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-clients/ts/gen}
bash scripts/build_ts.sh install
mapfile -t PROTOS < <(cd protos && find imagemesh -name '*.proto' | sort)
# Options, each on purpose:
#   outputServices=grpc-js   typed grpc-js clients and service definitions
#   esModuleInterop=true     default imports of CommonJS modules, as tsconfig compiles them
#   oneof=unions-value       a oneof is one field {$case, value}: the compiler rejects setting two
#   forceLong=bigint         int64 sizes and counts keep every bit (number would round past 2^53)
#   useDate=true             Timestamp fields are Date objects
#   env=node                 bytes fields are Node Buffers, no browser shims
rm -rf "${OUT:?}"
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I protos \
  --plugin=protoc-gen-ts_proto="clients/ts/node_modules/.bin/protoc-gen-ts_proto" \
  --ts_proto_out="$OUT" \
  --ts_proto_opt=outputServices=grpc-js,esModuleInterop=true,oneof=unions-value,forceLong=bigint,useDate=true,env=node \
  "${PROTOS[@]}"
