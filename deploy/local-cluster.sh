#!/usr/bin/env bash
# A Veil cluster on this machine: an S3 stand-in, three veil-server replicas sharing it as their
# key store, and the HAProxy front of deploy/haproxy.cfg (key-id consistent hashing, gRPC
# health checks) on 127.0.0.1:50051.
#
#   deploy/local-cluster.sh up       start everything, wait until the front routes to 3 replicas
#   deploy/local-cluster.sh status   each replica's health, the front's view of them
#   deploy/local-cluster.sh down     SIGTERM all (the replicas drain for --drain-ms, 10 s)
#
# Then, as a client:  veil infer --server http://127.0.0.1:50051 --model digits_mlp ...
#
# Needs: haproxy (apt-get install haproxy), curl, python3 (for the S3 stand-in), and the
# binaries (cargo build --release). Environment:
#   VEIL_BIN        directory holding veil-server and veil (default: target/release)
#   VEIL_MODELS     directory of compiled *.veil models (default: digits_mlp, compiled from
#                   models/zoo/digits_mlp into the state directory with `veil compile`)
#   VEIL_KEY_STORE  the replicas' --key-store (default: s3://veil-keys/local); set it empty to
#                   run without an object store (each replica then keeps only the keys uploaded
#                   to it: routing by key id still works, failover loses the keys)
#   AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION: an S3 endpoint of
#                   your own; when AWS_ENDPOINT_URL is unset, a local S3 stand-in (moto's server,
#                   from PyPI, in .venv/local-s3) runs on 127.0.0.1:9000 and the bucket is made.
# State, logs and process ids: target/local-cluster/ (removed by `down`, except the logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/target/local-cluster
BIN=${VEIL_BIN:-$ROOT/target/release}
KEY_STORE=${VEIL_KEY_STORE-s3://veil-keys/local}
REPLICAS=(1 2 3)        # ports 50061-50063 and metrics 9461-9463: as listed in deploy/haproxy.cfg
S3_PORT=9000
MOTO_VERSION=5.2.6

log() { echo "local-cluster: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for_line() { # FILE PATTERN PIDFILE SECONDS
  local i
  for ((i = 0; i < $4 * 10; i++)); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    alive "$3" || { log "process of $3 exited; last lines of $1:"; tail -5 "$1" >&2; return 1; }
    sleep 0.1
  done
  log "timed out waiting for '$2' in $1"; return 1
}

start_s3() {
  local venv=$ROOT/.venv/local-s3
  if [ ! -x "$venv/bin/moto_server" ]; then
    log "installing moto[server]==$MOTO_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  fi
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" > "$STATE/s3.log" 2>&1 &
  echo $! > "$STATE/s3.pid"
  local i
  for ((i = 0; i < 100; i++)); do
    curl -sf -o /dev/null "http://127.0.0.1:$S3_PORT/" && break
    alive "$STATE/s3.pid" || { log "the S3 stand-in exited:"; tail -5 "$STATE/s3.log" >&2; return 1; }
    sleep 0.2
  done
  local bucket=${KEY_STORE#s3://}; bucket=${bucket%%/*}
  curl -sf -o /dev/null -X PUT "http://127.0.0.1:$S3_PORT/$bucket"
  log "S3 stand-in on http://127.0.0.1:$S3_PORT, bucket $bucket"
  export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=local \
    AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
  # Read by S3 clients that refuse a plain-http endpoint by default (the object_store crate).
  export AWS_ALLOW_HTTP=true
}

up() {
  command -v haproxy >/dev/null || { log "haproxy is not installed (apt-get install haproxy)"; exit 1; }
  if [ ! -x "$BIN/veil-server" ] || [ ! -x "$BIN/veil" ]; then
    log "no veil-server / veil in $BIN (cargo build --release, or set VEIL_BIN)"; exit 1
  fi
  for p in "$STATE"/*.pid; do
    if alive "$p"; then log "already running ($p); deploy/local-cluster.sh down first"; exit 1; fi
  done
  mkdir -p "$STATE"
  rm -f "$STATE"/*.pid

  local models=${VEIL_MODELS:-}
  if [ -z "$models" ]; then
    models=$STATE/models
    if [ ! -f "$models/digits_mlp.veil" ]; then
      mkdir -p "$models"
      "$BIN/veil" compile models/zoo/digits_mlp/model.onnx \
        --calibration models/zoo/digits_mlp/train.csv -o "$models/digits_mlp.veil" >&2
    fi
  fi

  if [[ $KEY_STORE == s3://* ]] && [ -z "${AWS_ENDPOINT_URL:-}" ]; then start_s3; fi

  local i
  for i in "${REPLICAS[@]}"; do
    mkdir -p "$STATE/data$i"
    # Loopback only, so no tenants file is needed (open mode). --drain-ms matches the front's
    # health checks (down within ~6 s, see deploy/haproxy.cfg).
    # >>> veil-server args
    "$BIN/veil-server" --models "$models" --data-dir "$STATE/data$i" \
      --listen "127.0.0.1:5006$i" --metrics-listen "127.0.0.1:946$i" \
      --key-cache 4 --drain-ms 10000 --shutdown-grace 30 \
      ${KEY_STORE:+--key-store "$KEY_STORE"} \
      > "$STATE/veil$i.log" 2>&1 &
    # <<< veil-server args
    echo $! > "$STATE/veil$i.pid"
  done
  for i in "${REPLICAS[@]}"; do
    wait_for_line "$STATE/veil$i.log" "veil-server listening on" "$STATE/veil$i.pid" 60 || { down; exit 1; }
    log "replica $i on 127.0.0.1:5006$i (metrics http://127.0.0.1:946$i/metrics)"
  done

  haproxy -f deploy/haproxy.cfg > "$STATE/haproxy.log" 2>&1 &
  echo $! > "$STATE/haproxy.pid"
  # Up once the front's checks (rise 2, every 2 s) have passed for all three replicas.
  local up_count=0 t
  for ((t = 0; t < 100; t++)); do
    up_count=$(curl -sf "http://127.0.0.1:8404/stats;csv" 2>/dev/null | grep -c '^veil_replicas,veil[0-9],.*,UP,' || true)
    [ "$up_count" = 3 ] && break
    alive "$STATE/haproxy.pid" || { log "haproxy exited:"; tail -5 "$STATE/haproxy.log" >&2; down; exit 1; }
    sleep 0.2
  done
  [ "$up_count" = 3 ] || { log "the front sees $up_count of 3 replicas up"; down; exit 1; }
  log "front on http://127.0.0.1:50051 (stats http://127.0.0.1:8404/stats), 3 replicas up"
  log "key store: ${KEY_STORE:-none (each replica keeps its own keys)}"
}

status() {
  local i
  for i in "${REPLICAS[@]}"; do
    printf 'replica %s 127.0.0.1:5006%s  ' "$i" "$i"
    "$BIN/veil" health --server "http://127.0.0.1:5006$i" 2>&1 | tail -1 || true
  done
  printf 'front   127.0.0.1:50051  '
  "$BIN/veil" health --server http://127.0.0.1:50051 2>&1 | tail -1 || true
  curl -sf "http://127.0.0.1:8404/stats;csv" 2>/dev/null \
    | awk -F, '$1 == "veil_replicas" && $2 != "BACKEND" { print "front sees " $2 ": " $18 " (" $37 ")" }' || true
}

down() {
  local p pids=()
  # Replicas first (they drain for 10 s while the front takes them out), then the front and S3.
  for p in "$STATE"/veil*.pid "$STATE/haproxy.pid" "$STATE/s3.pid"; do
    [ -f "$p" ] || continue
    if alive "$p"; then kill -TERM "$(cat "$p")" && pids+=("$(cat "$p")"); fi
  done
  local t
  for ((t = 0; t < 450; t++)); do
    local left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  rm -f "$STATE"/*.pid
  rm -rf "$STATE"/data*
  log "stopped (logs in $STATE)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
