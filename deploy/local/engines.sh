#!/usr/bin/env bash
# Real engines on one machine, without containers: MinIO, SeaweedFS, Elasticsearch, Spark.
#
#   deploy/local/engines.sh up|down|status|clean
#
# Environment (all optional):
#   ENGINES                    subset to act on, default "minio seaweed es spark"
#   IMAGEMESH_CACHE            binaries, data, logs, pids; default ${XDG_CACHE_HOME:-~/.cache}/imagemesh
#   IMAGEMESH_S3_ACCESS_KEY    S3 access key for MinIO and SeaweedFS, default "imagemesh"
#   IMAGEMESH_S3_SECRET_KEY    S3 secret key, default "imagemesh-secret"
#   IMAGEMESH_PYTHON           Python whose pyspark provides Spark, default <repo>/.venv/bin/python
#   ENGINES_TIMEOUT            seconds `up` waits for all engines to be healthy, default 300
#   ENGINES_ES_NODES           1 (single-node) or 3 (a real cluster on 9200-9202), default 1
#   ENGINES_ES_HEAP            Elasticsearch heap per node, default 1g (512m per node when 3)
#   ENGINES_SPARK_WORKERS      Spark workers, default 2
#   ENGINES_SPARK_WORKER_CORES cores per worker, default 1
#   ENGINES_SPARK_WORKER_MEMORY memory per worker, default 2g
#
# `status` exits 3 when any selected engine is not healthy (0 when all are).
# `up` installs what is missing (cached after the first time), starts what is not healthy, and
# leaves healthy engines alone. `down` stops only processes that `up` started, found through the
# pid files it wrote; data stays until `clean`. Everything listens on 127.0.0.1 only.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_ENGINES="minio seaweed es spark"
ENGINES="${ENGINES:-$ALL_ENGINES}"
ENGINES_TIMEOUT="${ENGINES_TIMEOUT:-300}"
ENGINE_ROOT="$IMAGEMESH_CACHE/engines"

S3_ACCESS_KEY="${IMAGEMESH_S3_ACCESS_KEY:-imagemesh}"
S3_SECRET_KEY="${IMAGEMESH_S3_SECRET_KEY:-imagemesh-secret}"

ES_NODES="${ENGINES_ES_NODES:-1}"
[[ "$ES_NODES" == 1 || "$ES_NODES" == 3 ]] || die "ENGINES_ES_NODES must be 1 or 3, got '$ES_NODES'"
if [[ "$ES_NODES" == 1 ]]; then ES_HEAP="${ENGINES_ES_HEAP:-1g}"; else ES_HEAP="${ENGINES_ES_HEAP:-512m}"; fi
ES_HOME="$IMAGEMESH_CACHE/opt/elasticsearch-$ES_VERSION"
# Elasticsearch refuses to run as root; when we are root it runs as this dedicated user.
ES_USER="${ENGINES_ES_USER:-imagemesh-es}"

SPARK_WORKERS="${ENGINES_SPARK_WORKERS:-2}"
SPARK_WORKER_CORES="${ENGINES_SPARK_WORKER_CORES:-1}"
SPARK_WORKER_MEMORY="${ENGINES_SPARK_WORKER_MEMORY:-2g}"

# Ports, fixed so that tests and docs can name them. SeaweedFS's volume server is moved off its
# default 8080, which Spark's master UI uses.
MINIO_PORT=9000 MINIO_CONSOLE_PORT=9001
SEAWEED_S3_PORT=8333 SEAWEED_MASTER_PORT=9333 SEAWEED_VOLUME_PORT=8380 SEAWEED_FILER_PORT=8888
ES_HTTP_PORT=9200 ES_TRANSPORT_PORT=9300
SPARK_MASTER_PORT=7077 SPARK_UI_PORT=8080 SPARK_WORKER_UI_PORT=8081

# ---------------------------------------------------------------------------------------------
# Processes. A pid file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so that a pid the
# kernel has since reused for something else is never taken for ours and never killed.

# The command name in /proc/PID/stat is in parentheses and may hold spaces: count the fields
# after its closing parenthesis (starttime is the 20th of those).
proc_starttime() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  awk '{print $20}' <<<"${stat##*) }"
}

pid_alive() { # pidfile -> exit 0 when the process it names is still the one we started
  local pid start
  [[ -f "$1" ]] || return 1
  read -r pid start <"$1" || return 1
  [[ -n "$pid" && -d "/proc/$pid" && "$(proc_starttime "$pid")" == "$start" ]]
}

# Starts "$@" in its own session (so its pid is also its process group, and `down` can stop the
# whole tree: Elasticsearch and Spark fork child JVMs), detached from our terminal, appending to
# a log, and records it in a pid file.
launch() {
  local pidfile="$1" logfile="$2"
  shift 2
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  printf '\n==== %s: %s\n' "$(date -Is)" "$*" >>"$logfile"
  # The engine must not inherit the lock that `up` holds (see take_lock): it would keep the lock
  # for as long as it runs, and every later up/down would wait for it.
  if [[ -n "${engines_lock:-}" ]]; then
    setsid "$@" </dev/null >>"$logfile" 2>&1 {engines_lock}>&- &
  else
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
  fi
  local pid=$!
  echo "$pid $(proc_starttime "$pid")" >"$pidfile"
}

# Stops the processes named by the given pid files: TERM to each process group at once, then up
# to 30 s for all of them (Elasticsearch flushes its shards), then KILL for any still there.
stop_pidfiles() {
  local pidfile pid start i alive
  for pidfile in "$@"; do
    if pid_alive "$pidfile"; then
      read -r pid start <"$pidfile"
      kill -TERM -- "-$pid" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < 60; i++)); do
    alive=0
    for pidfile in "$@"; do pid_alive "$pidfile" && alive=1; done
    ((alive)) || break
    sleep 0.5
  done
  for pidfile in "$@"; do
    if pid_alive "$pidfile"; then
      read -r pid start <"$pidfile"
      log "pid $pid ($(basename "$pidfile" .pid)) did not stop in 30s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

# Every pid file under a folder, one per line, whatever topology wrote it (e.g. a 3-node ES).
pidfiles_under() { find "$1" -name '*.pid' -path '*/run/*' 2>/dev/null | sort; }
engine_pidfiles() { pidfiles_under "$ENGINE_ROOT/$1"; }

# ---------------------------------------------------------------------------------------------
# MinIO: one server process on four drive folders, so objects are erasure coded 2+2.

minio_dir() { echo "$ENGINE_ROOT/minio"; }
minio_install() { go_tool_install MINIO >/dev/null; }
minio_healthy() {
  http_ok "http://127.0.0.1:$MINIO_PORT/minio/health/live" &&
    http_ok "http://127.0.0.1:$MINIO_PORT/minio/health/cluster"
}
minio_start() {
  local dir bin
  dir="$(minio_dir)"
  bin="$(go_tool_path MINIO)"
  pid_alive "$dir/run/minio.pid" && return 0
  mkdir -p "$dir"/data/d{1..4}
  # MINIO_CI_CD: MinIO refuses drives that share the root filesystem unless told this is a test
  # deployment. The {1...4} is MinIO's own expansion syntax, hence quoted.
  # Credentials go through the environment, not `env` arguments, so the log's command line
  # (written by launch) does not show the secret.
  (
    export MINIO_ROOT_USER="$S3_ACCESS_KEY" MINIO_ROOT_PASSWORD="$S3_SECRET_KEY"
    launch "$dir/run/minio.pid" "$dir/logs/minio.log" env MINIO_CI_CD=1 MINIO_UPDATE=off \
      "$bin" server --quiet --anonymous \
      --address "127.0.0.1:$MINIO_PORT" --console-address "127.0.0.1:$MINIO_CONSOLE_PORT" \
      "$dir/data/d{1...4}"
  )
}
minio_endpoints() {
  echo "s3 http://127.0.0.1:$MINIO_PORT (console http://127.0.0.1:$MINIO_CONSOLE_PORT, drives $(minio_dir)/data/d1..d4)"
}
minio_logs() { echo "$(minio_dir)/logs/minio.log"; }

# ---------------------------------------------------------------------------------------------
# SeaweedFS: master, volume, filer and S3 gateway in one `weed server` process.

seaweed_dir() { echo "$ENGINE_ROOT/seaweed"; }
seaweed_install() { go_tool_install SEAWEED >/dev/null; }
seaweed_healthy() {
  # The S3 gateway answers its health path only once it is connected to the filer.
  http_ok "http://127.0.0.1:$SEAWEED_S3_PORT/healthz" &&
    http_ok "http://127.0.0.1:$SEAWEED_MASTER_PORT/cluster/healthz"
}
seaweed_start() {
  local dir bin
  dir="$(seaweed_dir)"
  bin="$(go_tool_path SEAWEED)"
  pid_alive "$dir/run/weed.pid" && return 0
  mkdir -p "$dir/data" "$dir/config"
  # Written on every start so that changed credentials take effect; 0600 because it holds them.
  (
    umask 077
    cat >"$dir/config/s3.json" <<EOF
{
  "identities": [
    {
      "name": "imagemesh",
      "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
  )
  # Small volumes (-master.volumeSizeLimitMB) because every bucket is a collection with its own
  # volumes, and tests create many buckets; -volume.max=0 sizes the count from free disk.
  launch "$dir/run/weed.pid" "$dir/logs/weed.log" \
    "$bin" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" \
    -master.port="$SEAWEED_MASTER_PORT" -master.volumeSizeLimitMB=64 \
    -volume.port="$SEAWEED_VOLUME_PORT" -volume.max=0 \
    -filer -filer.port="$SEAWEED_FILER_PORT" \
    -s3 -s3.port="$SEAWEED_S3_PORT" -s3.config="$dir/config/s3.json" \
    -s3.port.iceberg=0 -s3.port.lance=0
}
seaweed_endpoints() {
  echo "s3 http://127.0.0.1:$SEAWEED_S3_PORT (master http://127.0.0.1:$SEAWEED_MASTER_PORT, filer http://127.0.0.1:$SEAWEED_FILER_PORT)"
}
seaweed_logs() { echo "$(seaweed_dir)/logs/weed.log"; }

# ---------------------------------------------------------------------------------------------
# Elasticsearch: the integ-test-zip distribution from Maven Central (server + transport, no
# bundled JDK, no x-pack features beyond core/security), on Java 17. Each topology keeps its own
# data folder: a node that bootstrapped a 1-node cluster cannot later join a 3-node one.

es_dir() { echo "$ENGINE_ROOT/es/cluster-$ES_NODES"; }
es_node_dir() { echo "$(es_dir)/node-$1"; }

es_zip_download() {
  local coords="org.elasticsearch.distribution.integ-test-zip:elasticsearch:$ES_VERSION:zip"
  local m2zip="$HOME/.m2/repository/org/elasticsearch/distribution/integ-test-zip/elasticsearch/$ES_VERSION/elasticsearch-$ES_VERSION.zip"
  if [[ ! -f "$m2zip" ]]; then
    command -v mvn >/dev/null || die "mvn is not installed: needed to fetch $coords"
    log "downloading $coords from Maven Central"
    mvn -q -B dependency:get -Dartifact="$coords" -Dtransitive=false >&2 || die "mvn could not fetch $coords"
  fi
  echo "$m2zip"
}

es_install() {
  [[ -x "$ES_HOME/bin/elasticsearch" ]] && return 0
  local zip tmp="$ES_HOME.tmp.$$"
  zip="$(es_zip_download)"
  log "unpacking $zip"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Python's zipfile rather than unzip, which a fresh machine may lack; it drops the mode bits,
  # so the launchers are made executable again below.
  python3 -m zipfile -e "$zip" "$tmp"
  chmod -R a+rX "$tmp"
  chmod a+x "$tmp/elasticsearch-$ES_VERSION"/bin/*
  rm -rf "$ES_HOME"
  mv "$tmp/elasticsearch-$ES_VERSION" "$ES_HOME"
  rmdir "$tmp"
}

# When root: make sure the dedicated user exists and can reach the cache, which usually sits
# under /root (mode 0700). Rather than opening /root to everyone, grant that one user the right
# to traverse (not list) each ancestor, with an ACL.
es_prepare_user() {
  [[ $EUID -eq 0 ]] || return 0
  if ! id -u "$ES_USER" >/dev/null 2>&1; then
    log "creating system user $ES_USER to run Elasticsearch (it refuses root)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$ES_USER"
  fi
  local d="$ES_HOME" ancestors=()
  while [[ "$d" != "/" ]]; do
    d="$(dirname "$d")"
    ancestors=("$d" "${ancestors[@]}")
  done
  for d in "${ancestors[@]}"; do
    if ! runuser -u "$ES_USER" -- test -x "$d"; then
      ensure_command setfacl acl
      setfacl -m "u:$ES_USER:x" "$d"
    fi
  done
}

es_config() { # node index -> writes that node's config folder
  local i="$1" node conf
  node="$(es_node_dir "$i")"
  conf="$node/config"
  mkdir -p "$conf" "$node/data" "$node/logs" "$node/tmp" "$node/run"
  cp "$ES_HOME/config/jvm.options" "$ES_HOME/config/log4j2.properties" "$conf/"
  {
    echo "# Written by deploy/local/engines.sh on every start; edits are overwritten."
    echo "cluster.name: imagemesh-local"
    echo "node.name: node-$i"
    echo "path.data: $node/data"
    echo "path.logs: $node/logs"
    echo "network.host: 127.0.0.1"
    echo "http.port: $((ES_HTTP_PORT + i))"
    echo "transport.port: $((ES_TRANSPORT_PORT + i))"
    # The zip carries x-pack security; with no TLS or users set up here it would refuse clients.
    echo "xpack.security.enabled: false"
    # Tests clean up by index pattern (e.g. DELETE test-abc*), which ES blocks by default.
    echo "action.destructive_requires_name: false"
    # A shared CI disk may be fuller than the default 85/90% watermarks allow; shards must still
    # allocate, since nothing else here would free space.
    echo "cluster.routing.allocation.disk.threshold_enabled: false"
    if [[ "$ES_NODES" == 1 ]]; then
      echo "discovery.type: single-node"
    else
      local seeds=() masters=() j
      for ((j = 0; j < ES_NODES; j++)); do
        seeds+=("\"127.0.0.1:$((ES_TRANSPORT_PORT + j))\"")
        masters+=("\"node-$j\"")
      done
      echo "discovery.seed_hosts: [$(IFS=,; echo "${seeds[*]}")]"
      echo "cluster.initial_master_nodes: [$(IFS=,; echo "${masters[*]}")]"
    fi
  } >"$conf/elasticsearch.yml"
}

es_healthy() {
  local body
  body="$(curl -fsS --max-time 5 "http://127.0.0.1:$ES_HTTP_PORT/_cluster/health?wait_for_status=yellow&timeout=2s" 2>/dev/null)" || return 1
  # Also require the expected node count, so a stray single node is not taken for the cluster.
  python3 -c 'import json,sys; h=json.load(sys.stdin); sys.exit(0 if h["number_of_nodes"] >= int(sys.argv[1]) and not h["timed_out"] else 1)' "$ES_NODES" <<<"$body"
}

es_start() {
  local i node java_home
  java_home="$(java17_home)"
  es_prepare_user
  for ((i = 0; i < ES_NODES; i++)); do
    node="$(es_node_dir "$i")"
    pid_alive "$node/run/es.pid" && continue
    es_config "$i"
    local runas=()
    if [[ $EUID -eq 0 ]]; then
      chown -R "$ES_USER:$ES_USER" "$node"
      # setpriv execs (no extra parent process), so the recorded pid is Elasticsearch's own.
      runas=(setpriv --reuid="$ES_USER" --regid="$ES_USER" --init-groups)
    fi
    launch "$node/run/es.pid" "$node/logs/stdout.log" "${runas[@]}" env \
      HOME="$node" ES_JAVA_HOME="$java_home" ES_PATH_CONF="$node/config" ES_TMPDIR="$node/tmp" \
      ES_JAVA_OPTS="-Xms$ES_HEAP -Xmx$ES_HEAP" \
      "$ES_HOME/bin/elasticsearch"
  done
}
es_endpoints() {
  local i urls=()
  for ((i = 0; i < ES_NODES; i++)); do urls+=("http://127.0.0.1:$((ES_HTTP_PORT + i))"); done
  echo "http ${urls[*]} (Elasticsearch $ES_VERSION, $ES_NODES node(s), data $(es_dir))"
}
es_logs() { printf '%s\n' "$(es_node_dir 0)/logs/imagemesh-local.log" "$(es_node_dir 0)/logs/stdout.log"; }

# ---------------------------------------------------------------------------------------------
# Spark standalone: master and workers from the pyspark wheel (it has bin/spark-class, no sbin).

spark_dir() { echo "$ENGINE_ROOT/spark"; }
spark_home() {
  local py="${IMAGEMESH_PYTHON:-$REPO_ROOT/.venv/bin/python}"
  [[ -x "$py" ]] || die "no Python at $py (set IMAGEMESH_PYTHON to one with pyspark installed)"
  "$py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null ||
    die "pyspark is not installed for $py"
}
spark_install() { spark_home >/dev/null; }
spark_healthy() {
  local body
  body="$(curl -fsS --max-time 3 "http://127.0.0.1:$SPARK_UI_PORT/json/" 2>/dev/null)" || return 1
  python3 -c 'import json,sys; m=json.load(sys.stdin); alive=[w for w in m["workers"] if w["state"]=="ALIVE"]; sys.exit(0 if m["status"]=="ALIVE" and len(alive) >= int(sys.argv[1]) else 1)' "$SPARK_WORKERS" <<<"$body"
}
spark_start() {
  local dir home java_home i
  dir="$(spark_dir)"
  home="$(spark_home)"
  java_home="$(java17_home)"
  mkdir -p "$dir/tmp"
  local common=(env JAVA_HOME="$java_home" SPARK_HOME="$home" SPARK_LOCAL_IP=127.0.0.1
    SPARK_LOCAL_DIRS="$dir/tmp" SPARK_LOG_DIR="$dir/logs" SPARK_DAEMON_MEMORY=512m)
  if ! pid_alive "$dir/run/master.pid"; then
    launch "$dir/run/master.pid" "$dir/logs/master.log" "${common[@]}" \
      "$home/bin/spark-class" org.apache.spark.deploy.master.Master \
      --host 127.0.0.1 --port "$SPARK_MASTER_PORT" --webui-port "$SPARK_UI_PORT"
  fi
  for ((i = 1; i <= SPARK_WORKERS; i++)); do
    pid_alive "$dir/run/worker-$i.pid" && continue
    mkdir -p "$dir/worker-$i"
    # Cleanup removes finished applications' folders (jars, logs) after a day, so the disk of a
    # long-lived dev machine does not fill up with test runs.
    launch "$dir/run/worker-$i.pid" "$dir/logs/worker-$i.log" "${common[@]}" \
      SPARK_WORKER_OPTS="-Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.appDataTtl=86400" \
      "$home/bin/spark-class" org.apache.spark.deploy.worker.Worker \
      --host 127.0.0.1 --cores "$SPARK_WORKER_CORES" --memory "$SPARK_WORKER_MEMORY" \
      --webui-port "$((SPARK_WORKER_UI_PORT + i - 1))" --work-dir "$dir/worker-$i" \
      "spark://127.0.0.1:$SPARK_MASTER_PORT"
  done
}
spark_endpoints() {
  echo "spark://127.0.0.1:$SPARK_MASTER_PORT (UI http://127.0.0.1:$SPARK_UI_PORT, $SPARK_WORKERS worker(s) x $SPARK_WORKER_CORES core(s), $SPARK_WORKER_MEMORY)"
}
spark_logs() { printf '%s\n' "$(spark_dir)/logs/master.log" "$(spark_dir)/logs/worker-1.log"; }

# ---------------------------------------------------------------------------------------------
# Commands.

engine_dir_of() { if [[ "$1" == es ]]; then es_dir; else "${1}_dir"; fi; }

check_engines() {
  local e
  for e in $ENGINES; do
    [[ " $ALL_ENGINES " == *" $e "* ]] || die "unknown engine '$e' in ENGINES (known: $ALL_ENGINES)"
  done
}

show_failure() {
  local e="$1" f files
  log "engine '$e' failed to become healthy"
  mapfile -t files < <("${e}_logs")
  for f in "${files[@]}"; do
    [[ -f "$f" ]] || continue
    echo "---- last 40 lines of $f" >&2
    tail -n 40 "$f" >&2
  done
}

# An engine whose every recorded process has exited cannot become healthy: fail at once instead
# of waiting out the timeout.
engine_died() {
  local pidfile pidfiles
  mapfile -t pidfiles < <(pidfiles_under "$(engine_dir_of "$1")")
  ((${#pidfiles[@]} > 0)) || return 1
  for pidfile in "${pidfiles[@]}"; do
    pid_alive "$pidfile" && return 1
  done
  return 0
}

cmd_up() {
  local started_at=$SECONDS e pending=() failed=()
  for e in $ENGINES; do
    if "${e}_healthy"; then
      log "$e: already healthy, left alone"
      continue
    fi
    "${e}_install"
    "${e}_start"
    pending+=("$e")
  done
  local deadline=$((SECONDS + ENGINES_TIMEOUT))
  while ((${#pending[@]} > 0)); do
    local still=()
    for e in "${pending[@]}"; do
      if "${e}_healthy"; then
        log "$e: healthy after $((SECONDS - started_at))s"
      elif engine_died "$e" || ((SECONDS >= deadline)); then
        failed+=("$e")
      else
        still+=("$e")
      fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]} > 0)) && sleep 1
  done
  for e in "${failed[@]+"${failed[@]}"}"; do show_failure "$e"; done
  if ((${#failed[@]} > 0)); then
    die "failed after $((SECONDS - started_at))s (exited, or not healthy within ${ENGINES_TIMEOUT}s): ${failed[*]}"
  fi
  for e in $ENGINES; do printf '%-8s %s\n' "$e" "$("${e}_endpoints")"; done
  echo "engines up in $((SECONDS - started_at))s"
}

cmd_down() {
  local e pidfile started=$SECONDS found all=()
  for e in $ENGINES; do
    mapfile -t found < <(engine_pidfiles "$e")
    for pidfile in "${found[@]+"${found[@]}"}"; do
      if pid_alive "$pidfile"; then log "$e: stopping $(basename "$pidfile" .pid)"; fi
      all+=("$pidfile")
    done
  done
  ((${#all[@]} == 0)) || stop_pidfiles "${all[@]}"
  log "stopped in $((SECONDS - started))s"
}

cmd_status() {
  local e state rc=0 pidfile procs found
  for e in $ENGINES; do
    procs=""
    mapfile -t found < <(engine_pidfiles "$e")
    for pidfile in "${found[@]+"${found[@]}"}"; do
      if pid_alive "$pidfile"; then procs+=" $(basename "$pidfile" .pid):$(cut -d' ' -f1 "$pidfile")"; fi
    done
    if "${e}_healthy"; then state=healthy; else state=down; rc=3; fi
    printf '%-8s %-8s %s  [ours:%s]\n' "$e" "$state" "$("${e}_endpoints")" "${procs:- none}"
  done
  return $rc
}

cmd_clean() {
  cmd_down
  local e
  for e in $ENGINES; do
    log "$e: removing data in $ENGINE_ROOT/$e"
    rm -rf "${ENGINE_ROOT:?}/$e"
  done
}

# One up/down/clean at a time per cache: two test sessions starting the same engine at once
# would both launch it, and the loser's pid file would hide the winner from `down`.
take_lock() {
  mkdir -p "$IMAGEMESH_CACHE/locks"
  exec {engines_lock}>"$IMAGEMESH_CACHE/locks/engines-run.lock"
  if ! flock -n "$engines_lock"; then
    log "another engines.sh up/down/clean is running; waiting for it"
    flock "$engines_lock"
  fi
}

main() {
  check_engines
  # curl answers every health check, and a minimal Debian lacks it.
  ensure_command curl curl
  [[ "${1:-}" == status ]] || take_lock
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    clean) cmd_clean ;;
    *) echo "usage: $0 up|down|status|clean   (ENGINES=\"$ALL_ENGINES\")" >&2; exit 2 ;;
  esac
}

main "$@"
