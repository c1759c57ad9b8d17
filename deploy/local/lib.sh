# shellcheck shell=bash
# Shared helpers for deploy/local/engines.sh and deploy/local/tools.sh.
# Sourced, never run: it sets no shell options of its own so that callers keep theirs.
#
# Layout under IMAGEMESH_CACHE (outside the repo, so a fresh clone in another folder, as CI
# uses, finds everything already built):
#   bin/<NAME>-<version>/   Go binaries from `go install module@version`
#   opt/                    unpacked distributions (Elasticsearch)
#   engines/<engine>/       each engine's data, config, logs and pid files
#   locks/  logs/           install locks and install logs

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"
# shellcheck source=deploy/local/versions.env
source "$LOCAL_DIR/versions.env"

IMAGEMESH_CACHE="${IMAGEMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagemesh}"
export IMAGEMESH_CACHE

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The executable each versions.env NAME installs; `go install` names it after the module's last
# path element, which for grpc-health-probe is the module itself.
go_binary_name() {
  case "$1" in
    MINIO) echo minio ;;
    SEAWEED) echo weed ;;
    BUF) echo buf ;;
    GRPCURL) echo grpcurl ;;
    GHZ) echo ghz ;;
    HEALTH_PROBE) echo grpc-health-probe ;;
    PROTOC_GEN_GO) echo protoc-gen-go ;;
    PROTOC_GEN_GO_GRPC) echo protoc-gen-go-grpc ;;
    *) die "unknown Go tool NAME '$1' (expected one of MINIO SEAWEED BUF GRPCURL GHZ HEALTH_PROBE PROTOC_GEN_GO PROTOC_GEN_GO_GRPC)" ;;
  esac
}

go_tool_path() {
  local name="$1" module_var="${1}_MODULE" version_var="${1}_VERSION"
  [[ -n "${!module_var:-}" && -n "${!version_var:-}" ]] || die "versions.env lacks ${module_var}/${version_var}"
  echo "$IMAGEMESH_CACHE/bin/${name}-${!version_var}/$(go_binary_name "$name")"
}

# Is a build of module@version ($1) running, started by anyone (e.g. a warm-up job)? Reads
# /proc directly because pgrep (procps) is not on every fresh machine.
_go_build_running() {
  local cmdline
  for cmdline in /proc/[0-9]*/cmdline; do
    [[ -r "$cmdline" ]] || continue
    case "$(tr '\0' ' ' <"$cmdline" 2>/dev/null)" in
      "go install $1"* | "go mod download -json $1"*) return 0 ;;
    esac
  done
  return 1
}

# Installs a Debian package when the command it provides is missing (a fresh machine may lack
# curl or setfacl); needs root, as CI and the dev machines here are.
ensure_command() {
  local command="$1" package="$2"
  command -v "$command" >/dev/null && return 0
  [[ $EUID -eq 0 ]] || die "$command is missing: install the Debian package $package"
  log "installing $package (for $command)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >&2
}

# Installs one pinned Go tool unless its binary is already cached, and prints its path on stdout.
# Concurrent callers serialise on a per-tool lock; a `go install` of the same module@version
# started by anything else (e.g. a warm-up job) is waited for rather than duplicated, because
# two builds of MinIO at once on a small machine take twice as long and gain nothing.
go_tool_install() {
  local name="$1" module_var="${1}_MODULE" version_var="${1}_VERSION" bin dir spec lock_fd
  bin="$(go_tool_path "$name")"
  # go_tool_path dies in a subshell on an unknown name; never go on with a half path, since
  # the build below replaces the binary's folder wholesale.
  [[ -n "$bin" && "$bin" != */ && "$(basename "$(dirname "$bin")")" == "${name}-"* ]] ||
    die "cannot resolve the cached path of Go tool $name"
  dir="$(dirname "$bin")"
  spec="${!module_var}@${!version_var}"
  if [[ ! -x "$bin" ]]; then
    command -v go >/dev/null || die "go is not installed: needed to build $spec"
    mkdir -p "$IMAGEMESH_CACHE/locks" "$IMAGEMESH_CACHE/logs"
    exec {lock_fd}>"$IMAGEMESH_CACHE/locks/go-$name.lock"
    flock "$lock_fd"
    while _go_build_running "$spec"; do
      log "waiting for a running build of $spec to finish"
      sleep 5
    done
    if [[ ! -x "$bin" ]]; then
      local started=$SECONDS tmp="$dir.tmp.$$"
      log "building $spec (log: $IMAGEMESH_CACHE/logs/go-$name.log)"
      rm -rf "$tmp"
      # Build into a private folder and rename it into place, so an interrupted build never
      # leaves a half-written binary that a later run would take as cached.
      if ! _go_build "$name" "$tmp" >"$IMAGEMESH_CACHE/logs/go-$name.log" 2>&1; then
        tail -n 30 "$IMAGEMESH_CACHE/logs/go-$name.log" >&2
        rm -rf "$tmp"
        die "go install $spec failed"
      fi
      rm -rf "$dir"
      mv "$tmp" "$dir"
      log "built $spec in $((SECONDS - started))s"
    fi
    exec {lock_fd}>&-
  fi
  echo "$bin"
}

# Builds NAME into folder $2. Normally `go install module@version`; a module whose go.mod has
# replace directives (which go install refuses) names a ${NAME}_PACKAGE to build from inside the
# downloaded module instead, where its go.mod, replaces and go.sum all apply.
_go_build() {
  local name="$1" out="$2" module_var="${1}_MODULE" version_var="${1}_VERSION" package_var="${1}_PACKAGE"
  local spec="${!module_var}@${!version_var}"
  if [[ -z "${!package_var:-}" ]]; then
    GOBIN="$out" go install "$spec"
    return
  fi
  local moddir
  moddir="$(go mod download -json "$spec" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')" || return 1
  # set -e does not apply inside a function called from `if !`, hence the explicit returns.
  mkdir -p "$out" || return 1
  (cd "$moddir" && go build -o "$out/$(go_binary_name "$name")" "${!package_var}")
}

# The Java 17 the engines run on: an explicit IMAGEMESH_JAVA17_HOME, Debian's package path, or
# the `java` on PATH when it is a 17.
java17_home() {
  local candidate
  for candidate in "${IMAGEMESH_JAVA17_HOME:-}" /usr/lib/jvm/java-17-openjdk-amd64 /usr/lib/jvm/java-17-openjdk-arm64 /usr/lib/jvm/java-17-openjdk; do
    if [[ -n "$candidate" && -x "$candidate/bin/java" ]]; then echo "$candidate"; return; fi
  done
  if command -v java >/dev/null && java -version 2>&1 | grep -q 'version "17'; then
    dirname "$(dirname "$(readlink -f "$(command -v java)")")"
    return
  fi
  die "no Java 17 found: set IMAGEMESH_JAVA17_HOME"
}

# Exits 0 when an HTTP GET of $1 answers 2xx within a couple of seconds.
http_ok() { curl -fsS -o /dev/null --max-time 3 "$@" 2>/dev/null; }
