#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one run, for a machine with an NVIDIA H100/H200
# and its driver but no Rust toolchain or CUDA toolkit. Uses binaries built by
# scripts/build-gpu.sh (copied to VEIL_BIN, default .gpu/bin) and writes JSON to OUT.
#
#   scripts/gpu-bench.sh            # OUT defaults to target/gpu-bench
#
# Steps that fail are recorded in OUT/status.txt and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${VEIL_BIN:-.gpu/bin}
OUT=${OUT:-target/gpu-bench}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64
VEIL="$BIN/veil"
: > "$OUT/status.txt"

step() { # step NAME TIMEOUT_S OUTFILE -- command...
  local name=$1 limit=$2 file=$3; shift 4
  local t0=$EPOCHREALTIME
  timeout "$limit" "$@" > "$OUT/$file" 2> "$OUT/$name.stderr"
  local rc=$?
  awk -v n="$name" -v rc="$rc" -v a="$t0" -v b="$EPOCHREALTIME" \
    'BEGIN { printf "%s rc=%d %.1fs\n", n, rc, b - a }' | tee -a "$OUT/status.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv; nproc; uname -a; } > "$OUT/machine.txt" 2>&1
# GPU memory in use, every 100 ms, for the memory per key.
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/gpu_memory.csv" 2>/dev/null &
SAMPLER=$!

# Keyswitch + bootstrap throughput by batch size, and GPU reads against the CPU's.
step pbs_gpu 240 pbs_gpu.json -- "$VEIL" bench-pbs --backend gpu \
  --batches 1,4,16,64,256,1024,4096,16384,32768 --seconds 1.5 --reads 4096 --json
step pbs_cpu 120 pbs_cpu.json -- "$VEIL" bench-pbs --backend cpu --batches 16,256,1024 --seconds 1 --json

# The digits models, compiled here from the shipped ONNX files.
for m in digits_mlp digits_cnn; do
  step "compile_$m" 60 "compile_$m.json" -- "$VEIL" compile "models/zoo/$m/model.onnx" \
    --calibration "models/zoo/$m/train.csv" -o "$OUT/$m.veil" --json
done
# A larger set for throughput: the 360 test images, 8 times over.
for m in digits_mlp digits_cnn; do
  { head -1 "models/zoo/$m/test.csv"; for i in 1 2 3 4 5 6 7 8; do tail -n +2 "models/zoo/$m/test.csv"; done; } > "$OUT/${m}_x8.csv"
done

# Latency: one image per evaluation, every test image (agreement with simulation on all 360).
step mlp_b1 120 mlp_b1.json -- "$VEIL" eval "$OUT/digits_mlp.veil" --data models/zoo/digits_mlp/test.csv \
  --mode fhe --backend gpu --batch 1 --json
step cnn_b1 120 cnn_b1.json -- "$VEIL" eval "$OUT/digits_cnn.veil" --data models/zoo/digits_cnn/test.csv \
  --mode fhe --backend gpu --batch 1 --json
# Throughput: the test set as one batch, and the test set 8 times over as one batch.
for m in digits_mlp digits_cnn; do
  short=${m#digits_}
  step "${short}_b360" 120 "${short}_b360.json" -- "$VEIL" eval "$OUT/$m.veil" --data "models/zoo/$m/test.csv" \
    --mode fhe --backend gpu --batch 360 --json
  step "${short}_b2880" 180 "${short}_b2880.json" -- "$VEIL" eval "$OUT/$m.veil" --data "$OUT/${m}_x8.csv" \
    --mode fhe --backend gpu --batch 2880 --json
done
# The same MLP on this machine's CPUs, for the ratio.
step mlp_cpu_b360 120 mlp_cpu_b360.json -- "$VEIL" eval "$OUT/digits_mlp.veil" --data models/zoo/digits_mlp/test.csv \
  --mode fhe --backend cpu --batch 360 --json

kill "$SAMPLER" 2>/dev/null
rm -f "$OUT"/*_x8.csv "$OUT"/*.veil
echo "done: $OUT" | tee -a "$OUT/status.txt"
# One archive, for transports that bring back only a few files.
tar czf /tmp/gpu-bench.tgz -C "$OUT" . && mv /tmp/gpu-bench.tgz "$OUT/"
