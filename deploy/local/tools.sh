#!/usr/bin/env bash
# Pinned gRPC command-line tools, built once with `go install` into IMAGEMESH_CACHE/bin.
#
#   deploy/local/tools.sh install [NAME...]   build what is missing; print "NAME PATH" lines
#   deploy/local/tools.sh path NAME           build it if missing; print only its path
#
# NAME is a versions.env name (BUF GRPCURL GHZ HEALTH_PROBE, also MINIO SEAWEED) or the binary's
# own name (buf grpcurl ghz grpc-health-probe minio weed). Progress goes to stderr, so
# `$(deploy/local/tools.sh path buf)` is safe in a Makefile.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GRPC_TOOLS="BUF GRPCURL GHZ HEALTH_PROBE PROTOC_GEN_GO PROTOC_GEN_GO_GRPC"

canonical_name() {
  case "$1" in
    buf | BUF) echo BUF ;;
    grpcurl | GRPCURL) echo GRPCURL ;;
    ghz | GHZ) echo GHZ ;;
    grpc-health-probe | grpc_health_probe | health-probe | HEALTH_PROBE) echo HEALTH_PROBE ;;
    minio | MINIO) echo MINIO ;;
    weed | seaweed | SEAWEED) echo SEAWEED ;;
    protoc-gen-go | PROTOC_GEN_GO) echo PROTOC_GEN_GO ;;
    protoc-gen-go-grpc | PROTOC_GEN_GO_GRPC) echo PROTOC_GEN_GO_GRPC ;;
    *) die "unknown tool '$1' (known: buf grpcurl ghz grpc-health-probe minio weed)" ;;
  esac
}

case "${1:-}" in
  install)
    shift
    names=("$@")
    ((${#names[@]} > 0)) || read -r -a names <<<"$GRPC_TOOLS"
    for n in "${names[@]}"; do
      name="$(canonical_name "$n")"
      printf '%-12s %s\n' "$name" "$(go_tool_install "$name")"
    done
    ;;
  path)
    [[ $# -eq 2 ]] || die "usage: $0 path NAME"
    go_tool_install "$(canonical_name "$2")"
    ;;
  *)
    echo "usage: $0 install [NAME...] | path NAME" >&2
    exit 2
    ;;
esac
