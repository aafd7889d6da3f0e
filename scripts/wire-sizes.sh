#!/usr/bin/env bash
# Response sizes per output mode over gRPC: digits_mlp compiled with --reveal scores and
# --reveal label, served together, 10 test rows each (README, "Wire sizes").
# Usage: scripts/wire-sizes.sh [PORT]   (after cargo build --release --workspace)
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release
PORT=${1:-50651}
T=$(mktemp -d)
trap 'kill $SP 2>/dev/null || true; rm -rf "$T"' EXIT
Z=models/zoo/digits_mlp
mkdir -p "$T/models" "$T/data"
$B/veil compile $Z/model.onnx --calibration $Z/train.csv -o "$T/models/digits_mlp.veil"
$B/veil compile $Z/model.onnx --calibration $Z/train.csv -o "$T/models/digits_label.veil" --reveal label
$B/veil keygen -o "$T/K" > /dev/null
$B/veil-server --models "$T/models" --data-dir "$T/data" --listen 127.0.0.1:$PORT > "$T/server.log" 2>&1 &
SP=$!
for _ in $(seq 60); do $B/veil models --server http://127.0.0.1:$PORT > /dev/null 2>&1 && break; sleep 1; done
$B/veil models --server http://127.0.0.1:$PORT
for m in digits_mlp digits_label; do
  $B/veil infer --server http://127.0.0.1:$PORT --model $m --keys "$T/K" --data $Z/test.csv --limit 10 --json > "$T/$m.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['model'], d['reveal'], 'response bytes/sample', d['response_bytes_per_sample'], 'request', d['request_bytes_per_sample'], 'accuracy', d.get('accuracy'), 'predictions', d['predictions'])" "$T/$m.json"
done
