#!/usr/bin/env bash
# Veil end-to-end demo on one machine: builds the release binaries, compiles the shipped
# digits model, starts veil-server on a free loopback port, generates a client key pair,
# runs encrypted inference on a few digits samples (predictions beside labels, with
# timings) and stops the server. Usage: scripts/demo.sh [N_SAMPLES, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT="${1:-5}"
BIN=target/release
echo "== building (release; the first build takes ~15 min on 2 cores, mostly tfhe)"
cargo build --release -p veil-server -p veil-cli

WORK="$(mktemp -d "${TMPDIR:-/tmp}/veil-demo.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    echo "== server stopped"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== compiling models/zoo/digits_mlp (Alice, the model owner)"
mkdir -p "$WORK/models"
"$BIN/veil" compile models/zoo/digits_mlp/model.onnx \
  --calibration models/zoo/digits_mlp/train.csv -o "$WORK/models/digits_mlp.veil"

echo "== starting veil-server on 127.0.0.1 (free port)"
"$BIN/veil-server" --models "$WORK/models" --data-dir "$WORK/data" --listen 127.0.0.1:0 \
  >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  grep -q "listening on" "$WORK/server.out" 2>/dev/null && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "veil-server exited:" >&2; cat "$WORK/server.log" >&2; exit 1
  fi
  sleep 0.1
done
ADDR="$(sed -n 's/^veil-server listening on //p' "$WORK/server.out")"
[[ -n "$ADDR" ]] || { echo "veil-server did not start in 60 s" >&2; cat "$WORK/server.log" >&2; exit 1; }
URL="http://$ADDR"
echo "   serving at $URL"

echo "== veil models (Bob, the client)"
"$BIN/veil" models --server "$URL"

echo "== veil keygen: Bob's keys stay on his machine; only eval.key is uploaded"
"$BIN/veil" keygen -o "$WORK/keys"

echo "== veil infer: encrypt, infer on the server, decrypt ($LIMIT samples)"
"$BIN/veil" infer --server "$URL" --model digits_mlp --keys "$WORK/keys" \
  --data models/zoo/digits_mlp/test.csv --limit "$LIMIT"

echo "== server log (excerpt)"
grep -E "ready|key upload|infer" "$WORK/server.log" | sed 's/^/   /' | tail -n 8
