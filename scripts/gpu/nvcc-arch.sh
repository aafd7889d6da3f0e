#!/usr/bin/env bash
# nvcc shim for tfhe-cuda-backend's CMake build on a machine without a GPU.
#
# With no GPU visible at build time the backend's CMakeLists falls back to sm_70 and
# -DCUDA_ARCH=700. CUDA 13 cannot target sm_70, and CUDA_ARCH=700 would also compile out
# the Hopper-only bootstrap kernels. This shim rewrites those arguments to the wanted
# architecture (VEIL_CUDA_SM, default 90 = H100/H200) and keeps SASS only (no PTX, so the
# driver never JIT-compiles), then runs the real nvcc (VEIL_NVCC).
set -euo pipefail
sm="${VEIL_CUDA_SM:-90}"
real="${VEIL_NVCC:?set VEIL_NVCC to the real nvcc}"
args=()
for a in "$@"; do
  case "$a" in
    *compute_70*|*sm_70*|*CUDA_ARCH=700*)
      a="${a//compute_70/compute_${sm}}"
      a="${a//sm_70/sm_${sm}}"
      a="${a//CUDA_ARCH=700/CUDA_ARCH=${sm}0}"
      a="${a//code=\[compute_${sm},sm_${sm}\]/code=sm_${sm}}"
      ;;
  esac
  args+=("$a")
done
exec "$real" "${args[@]}"
