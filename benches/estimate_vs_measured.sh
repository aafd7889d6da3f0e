#!/usr/bin/env bash
# Predicted (veil estimate) against measured (veil eval --mode fhe) latency per sample for
# every shipped model, in one run on this machine. Prints a markdown table.
#   bash benches/estimate_vs_measured.sh [N]     (N samples per model, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}
cargo build --release -q
V=target/release/veil
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
$V estimate --calibrate models/zoo/digits_mlp/model.onnx --calibration models/zoo/digits_mlp/train.csv --json > "$W/machine.json"
python3 - "$W/machine.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["machine"]
print(f"machine: {m['cpu']}, {m['threads']} threads; single KS+PBS {m['pbs_single_ms']:.1f} ms, "
      f"{m['pbs_per_second']:.0f} KS+PBS per second on all threads, evaluation key {m['eval_key_bytes']} bytes")
PY
echo
echo "| model | PBS per sample | predicted ms | measured ms (median of $N) | measured / predicted | PBS efficiency | encrypted accuracy on $N | agreement with simulation |"
echo "|---|---|---|---|---|---|---|---|"
for m in digits_mlp digits_cnn wine_mlp breast_cancer_logreg iris_logreg; do
  $V compile models/zoo/$m/model.onnx --calibration models/zoo/$m/train.csv -o "$W/$m.veil" > /dev/null
  $V estimate "$W/$m.veil" --json > "$W/$m.est.json"
  $V eval "$W/$m.veil" --data models/zoo/$m/test.csv --mode fhe --limit "$N" --json 2> /dev/null > "$W/$m.eval.json"
  python3 - "$m" "$W/$m.est.json" "$W/$m.eval.json" <<'PY'
import json, sys
name, est, ev = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
c, mach = est["cost"], est["machine"]
pred, meas = c["predicted_latency_ms"], ev["latency_ms_median"]
pbs = c["pbs_per_sample"]
# PBS efficiency: PBS count x single-PBS time / threads, over wall time.
eff = pbs * mach["pbs_single_ms"] / mach["threads"] / meas if meas > 0 else 0
print(f"| {name} | {pbs} | {pred:.1f} | {meas:.1f} | {meas / pred:.2f} | {eff:.2f} | {ev['accuracy']:.2f} | {ev['agreement']:.2f} |")
PY
done
