#!/usr/bin/env bash
# Runs a command with the real engines up: starts those that are down (installing them on
# first use, outside any test's timeout), runs the command, then stops only the engines it
# started — engines that were already running (someone else's) are left alone.
set -uo pipefail
cd "$(dirname "$0")/.."
ENGINES_SH=deploy/local/engines.sh
ALL_ENGINES=${ENGINES:-minio seaweed es spark}
started=()
for engine in $ALL_ENGINES; do
  if ! ENGINES=$engine "$ENGINES_SH" status >/dev/null 2>&1; then
    started+=("$engine")
  fi
done
cleanup() {
  if ((${#started[@]} > 0)) && [ "${IMAGEMESH_KEEP_ENGINES:-0}" != "1" ]; then
    ENGINES="${started[*]}" "$ENGINES_SH" down || true
  fi
}
trap cleanup EXIT
if ((${#started[@]} > 0)); then
  echo "with_engines: starting ${started[*]}"
  ENGINES="${started[*]}" "$ENGINES_SH" up || { echo "with_engines: the engines did not start" >&2; exit 1; }
fi
"$@"
