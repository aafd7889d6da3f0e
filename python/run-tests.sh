#!/usr/bin/env bash
# The Python client's tests: builds veil-server and veil (cargo, release) and the wheel
# (maturin, into the same target dir: tfhe is not rebuilt), installs the wheel into a fresh
# venv with pinned test tools from PyPI, and runs pytest against real servers on loopback.
# Usage: python/run-tests.sh [--example] [pytest args...]
#   --example  also runs python/examples/quickstart.py (installs scikit-learn and skl2onnx)
# Keeps the venv in $VEIL_PY_VENV when set (reused, not fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXAMPLE=0
if [[ "${1:-}" == "--example" ]]; then EXAMPLE=1; shift; fi

# --workspace, not -p veil-server -p veil-cli: features are then resolved as by
# `cargo test --release --workspace` (CI's previous step) and as python/Cargo.toml's shim
# dependencies make maturin resolve them, so that one build of tfhe serves all three.
echo "== cargo build --release --workspace --bins"
cargo build --release --workspace --bins
BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/veil-py.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
VENV="${VEIL_PY_VENV:-$WORK/venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== venv in $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    maturin==1.16.0 numpy==2.2.6 pytest==8.4.2 grpcio==1.85.1 grpcio-tools==1.85.1
fi

echo "== maturin build --release (python/)"
t0=$SECONDS
"$VENV/bin/maturin" build --release -m python/Cargo.toml -o "$WORK/wheels"
echo "   wheel built in $((SECONDS - t0)) s: $(ls "$WORK"/wheels/*.whl | xargs -n1 basename)" \
  "($(du -k "$WORK"/wheels/*.whl | cut -f1) KiB)"
"$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps \
  "$WORK"/wheels/*.whl

echo "== pytest python/tests"
VEIL_BIN_DIR="$BIN_DIR" "$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests "$@"

if [[ "$EXAMPLE" == 1 ]]; then
  echo "== python/examples/quickstart.py"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    scikit-learn==1.7.2 skl2onnx==1.20.0 onnx==1.20.1
  VEIL_BIN_DIR="$BIN_DIR" "$VENV/bin/python" python/examples/quickstart.py
fi
