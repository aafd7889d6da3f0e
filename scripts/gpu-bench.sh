#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one run, for a machine with an NVIDIA H100/H200
# and its driver but no Rust toolchain or CUDA toolkit. Uses binaries made by
# `scripts/build-gpu.sh --bench-bundle` (veil, veil-server, the bench_serve example and the
# GPU test binary, in VEIL_BIN, default .gpu/bin) and writes JSON and logs to OUT.
#
#   scripts/gpu-bench.sh            # OUT defaults to target/gpu-bench
#   QUICK=1 scripts/gpu-bench.sh    # fewer images per step
#
# Steps that fail are recorded in OUT/status.txt and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${VEIL_BIN:-.gpu/bin}
OUT=${OUT:-target/gpu-bench}
# Every result goes to RES; OUT gets RES as one archive after each step (so a run cut short
# still returns what it measured), plus status.txt.
RES=$OUT/results
mkdir -p "$RES"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64
VEIL="$BIN/veil"
WORK=$(mktemp -d)
: > "$RES/status.txt"

step() { # step NAME TIMEOUT_S OUTFILE -- command...
  local name=$1 limit=$2 file=$3; shift 4
  local t0=$EPOCHREALTIME
  timeout "$limit" "$@" > "$RES/$file" 2> "$WORK/$name.stderr"
  local rc=$?
  { echo "== $name"; tail -n 40 "$WORK/$name.stderr"; } >> "$RES/stderr.txt"
  awk -v n="$name" -v rc="$rc" -v a="$t0" -v b="$EPOCHREALTIME" \
    'BEGIN { printf "%s rc=%d %.1fs\n", n, rc, b - a }' | tee -a "$RES/status.txt"
  tar czf "$OUT/gpu-bench.tgz" -C "$RES" . && cp "$RES/status.txt" "$OUT/status.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv; nproc; uname -a; } > "$RES/machine.txt" 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$RES/gpu_samples.csv" 2>/dev/null &
SAMPLER=$!

# The GPU tests, with a missing device an error rather than a skip.
# (They read the zoo through the path they were built at: run them from a checkout there.)
if [ -x "$BIN/gpu-tests" ]; then
  step gpu_tests 240 gpu_tests.txt -- env VEIL_REQUIRE_GPU=1 "$BIN/gpu-tests" --test-threads 1
fi

# Keyswitch + bootstrap throughput by batch size, and GPU reads against the CPU's.
step pbs_gpu 120 pbs_gpu.json -- "$VEIL" bench-pbs --backend gpu \
  --batches 1,16,256,4096,16384,32768 --seconds 1 --reads 4096 --json

# The models, compiled here from the shipped ONNX files. The CIFAR-size CNN takes minutes
# on one core: it compiles in the background while the digits steps run.
( timeout 400 "$VEIL" compile models/zoo/cifar_vgg/model.onnx --calibration models/zoo/cifar_vgg/train.csv \
    -o "$WORK/cifar_vgg.veil" --json > "$RES/compile_cifar_vgg.json" 2> "$WORK/cifar_compile.stderr" ) &
CIFAR_COMPILE=$!
for m in digits_mlp digits_cnn; do
  step "compile_$m" 60 "compile_$m.json" -- "$VEIL" compile "models/zoo/$m/model.onnx" \
    --calibration "models/zoo/$m/train.csv" -o "$WORK/$m.veil" --json
done
# A larger set for throughput: the test images, 8 times over.
for m in digits_mlp digits_cnn; do
  { head -1 "models/zoo/$m/test.csv"; for i in 1 2 3 4 5 6 7 8; do tail -n +2 "models/zoo/$m/test.csv"; done; } > "$WORK/${m}_x8.csv"
done

# Latency: one image per evaluation, every test image (agreement with simulation on all 360).
step mlp_b1 120 mlp_b1.json -- "$VEIL" eval "$WORK/digits_mlp.veil" --data models/zoo/digits_mlp/test.csv \
  --mode fhe --backend gpu --batch 1 --json
step cnn_b1 120 cnn_b1.json -- "$VEIL" eval "$WORK/digits_cnn.veil" --data models/zoo/digits_cnn/test.csv \
  --mode fhe --backend gpu --batch 1 --json
# Throughput: the test set 8 times over as one batch.
for m in digits_mlp digits_cnn; do
  short=${m#digits_}
  step "${short}_b2880" 180 "${short}_b2880.json" -- "$VEIL" eval "$WORK/$m.veil" --data "$WORK/${m}_x8.csv" \
    --mode fhe --backend gpu --batch 2880 --json
done
# The server over gRPC: 8 clients with their own keys, batches of 128, 2 requests in flight
# each; then 8 clients sending one image at a time.
step serve_mlp 240 serve_mlp.json -- "$BIN/bench_serve" --server "$BIN/veil-server" --backend gpu \
  --model "$WORK/digits_mlp.veil" --data models/zoo/digits_mlp/test.csv \
  --clients 8 --requests 8 --samples 128 --in-flight 2
step serve_mlp_single 120 serve_mlp_single.json -- "$BIN/bench_serve" --server "$BIN/veil-server" --backend gpu \
  --model "$WORK/digits_mlp.veil" --data models/zoo/digits_mlp/test.csv \
  --clients 8 --requests 24 --samples 1 --in-flight 1
# The CIFAR-size CNN: one image at a time, then a batch.
wait "$CIFAR_COMPILE"; echo "compile_cifar_vgg rc=$?" | tee -a "$RES/status.txt"
if [ -f "$WORK/cifar_vgg.veil" ]; then
  step cifar_b1 180 cifar_b1.json -- "$VEIL" eval "$WORK/cifar_vgg.veil" --data models/zoo/cifar_vgg/test.csv \
    --mode fhe --backend gpu --batch 1 --limit 3 --json
  step cifar_b16 240 cifar_b16.json -- "$VEIL" eval "$WORK/cifar_vgg.veil" --data models/zoo/cifar_vgg/test.csv \
    --mode fhe --backend gpu --batch 16 --limit 16 --json
fi

# The same MLP on this machine's CPUs, for the ratio.
step mlp_cpu 120 mlp_cpu.json -- "$VEIL" eval "$WORK/digits_mlp.veil" --data models/zoo/digits_mlp/test.csv \
  --mode fhe --backend cpu --batch 96 --limit 96 --json

kill "$SAMPLER" 2>/dev/null
rm -rf "$WORK"
echo "done: $OUT" | tee -a "$RES/status.txt"
tar czf "$OUT/gpu-bench.tgz" -C "$RES" . && cp "$RES/status.txt" "$OUT/status.txt"
