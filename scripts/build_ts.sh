#!/usr/bin/env bash
# Prepares the TypeScript client in clients/ts.
#
#   scripts/build_ts.sh install   npm ci from the committed package-lock.json, skipped when
#                                 node_modules already holds exactly that lock
#   scripts/build_ts.sh build     install, then compile src/ and gen/ with tsc into dist/
#
# node_modules/ and dist/ are git-ignored; a fresh machine needs only Node 20+ and the npm
# registry. A lock serialises concurrent callers (make protos and a test session, say), which
# would otherwise run npm ci into the same folder at once.
set -euo pipefail
cd "$(dirname "$0")/../clients/ts"

command -v npm >/dev/null || { echo "build_ts.sh: Node.js 20+ and npm are needed" >&2; exit 1; }
# In the checkout (git-ignored), not in /tmp: another user's lock file there would refuse us.
exec 9>.build.lock
flock 9

install() {
  # The stamp records which lock file the installed tree came from: a changed lock reinstalls.
  local want have=""
  want=$(sha256sum package-lock.json | cut -d' ' -f1)
  [ -f node_modules/.imagemesh-lock ] && have=$(cat node_modules/.imagemesh-lock)
  if [ "$want" != "$have" ]; then
    # No dependency needs an install script (protobufjs's only checks its own version), so
    # none runs: nothing from the registry executes at install time.
    npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2
    echo "$want" > node_modules/.imagemesh-lock
  fi
}

case "${1:-build}" in
  install) install ;;
  build)
    install
    # Compiled over the previous output (no `rm -rf dist`): a test session may be running it.
    node_modules/.bin/tsc -p .
    ;;
  *) echo "usage: build_ts.sh install|build" >&2; exit 2 ;;
esac
