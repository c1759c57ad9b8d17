#!/usr/bin/env bash
# Runs a command with the real engines up: starts those that are down (installing them on
# first use, outside any test's timeout), runs the command, then stops only what it started.
set -uo pipefail
cd "$(dirname "$0")/.."
ENGINES_SH=deploy/local/engines.sh
was_up=0
if "$ENGINES_SH" status >/dev/null 2>&1; then
  was_up=1
fi
cleanup() {
  if [ "$was_up" -eq 0 ] && [ "${IMAGEMESH_KEEP_ENGINES:-0}" != "1" ]; then
    "$ENGINES_SH" down || true
  fi
}
trap cleanup EXIT
"$ENGINES_SH" up || { echo "with_engines: the engines did not start" >&2; exit 1; }
"$@"
