#!/usr/bin/env bash
# Builds Veil with the `gpu` cargo feature into target/gpu/release/, on a machine with no
# GPU and no system CUDA. Installs what it needs itself:
#   - CMake (>= 3.24, from Debian's packages) for tfhe-cuda-backend's build script;
#   - CUDA 13.0's compiler and runtime from PyPI wheels, into .gpu/cuda-venv (ignored).
# cudart is linked statically, so the binaries need only the NVIDIA driver at run time.
# The code is SASS for one architecture (VEIL_CUDA_SM, default 90: H100/H200).
#
# Usage: scripts/build-gpu.sh [cargo build args...]   (default: the server and the CLI)
#        scripts/build-gpu.sh --bench-bundle            (what scripts/gpu-bench.sh runs, stripped,
#                                                        in .gpu/bin: veil, veil-server,
#                                                        bench_serve, gpu-tests)
#        VEIL_GPU_CHECK=1 scripts/build-gpu.sh          (cargo clippy only, no binaries: what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.gpu
SM=${VEIL_CUDA_SM:-90}

if ! command -v cmake >/dev/null || ! cmake --version | awk 'NR==1{split($3,v,".");exit !(v[1]>3||(v[1]==3&&v[2]>=24))}'; then
  echo "build-gpu: installing cmake" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq cmake pkg-config >/dev/null
fi

VENV=$TOOLS/cuda-venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "build-gpu: installing CUDA 13.0 compiler and runtime wheels into $VENV" >&2
  python3 -m venv "$VENV"
  # Pin all five: nvcc's own dependencies are unpinned and would pull a newer CUDA.
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
fi
CUDA=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CUDA/bin/nvcc" ] || { echo "build-gpu: no nvcc under $CUDA" >&2; exit 1; }
# nvcc.profile looks for its libraries in lib64; the wheels install them in lib.
[ -e "$CUDA/lib64" ] || ln -s lib "$CUDA/lib64"

# Only the static cudart is on the link path, so `-lcudart` links it statically.
mkdir -p "$TOOLS/cuda-static" "$TOOLS/pkgconfig"
ln -sf "$CUDA/lib/libcudart_static.a" "$TOOLS/cuda-static/libcudart.a"
printf 'Name: cuda\nDescription: CUDA runtime (static)\nVersion: 13.0\nLibs: -L%s\nCflags: -I%s/include\n' \
  "$TOOLS/cuda-static" "$CUDA" > "$TOOLS/pkgconfig/cuda.pc"

export CUDACXX=$ROOT/scripts/gpu/nvcc-arch.sh VEIL_NVCC=$CUDA/bin/nvcc VEIL_CUDA_SM=$SM
export PKG_CONFIG_PATH=$TOOLS/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export CARGO_TARGET_DIR=$ROOT/target/gpu

if [ "${1:-}" = --bench-bundle ]; then
  cargo build --release -p veil-server -p veil-cli --features veil-server/gpu,veil-cli/gpu
  # bench_serve is a client: it needs no CUDA, and it is built where the CPU build lives
  # (target/release), which CI's test run also fills.
  (unset CARGO_TARGET_DIR; cargo build --release -p veil-tests --example bench_serve)
  tests=$(cargo test --release -p veil-tests --features gpu --test gpu --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
  mkdir -p "$TOOLS/bin"
  for f in veil veil-server; do
    strip -o "$TOOLS/bin/$f" "$CARGO_TARGET_DIR/release/$f"
  done
  strip -o "$TOOLS/bin/bench_serve" "$ROOT/target/release/examples/bench_serve"
  strip -o "$TOOLS/bin/gpu-tests" "$tests"
  ls -l "$TOOLS/bin" >&2
elif [ "${VEIL_GPU_CHECK:-0}" = 1 ]; then
  cargo clippy --release --workspace --all-targets --features veil-runtime/gpu,veil-server/gpu,veil-client/gpu,veil-cli/gpu,veil-tests/gpu "$@"
else
  if [ $# -eq 0 ]; then set -- -p veil-server -p veil-cli --features veil-server/gpu,veil-cli/gpu; fi
  cargo build --release "$@"
  echo "build-gpu: binaries in $CARGO_TARGET_DIR/release/" >&2
fi
