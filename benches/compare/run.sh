#!/usr/bin/env bash
# Veil vs Concrete ML 1.9 on the same float model and machine, in one run.
#
#   bash benches/compare/run.sh            # 10 encrypted test images per side
#   N=3 bash benches/compare/run.sh        # fewer (quicker, noisier)
#   bash benches/compare/run.sh --help     # compare.py's options (extra args are passed on)
#   bash benches/compare/run.sh --trees    # the XGBoost comparison instead (compare_trees.py:
#                                          # 20 trees x depth 3 on breast cancer; writes
#                                          # results_trees.json and results_trees.md)
#
# 1. creates benches/compare/.venv (Python 3.11) with the pinned requirements.txt
#    (concrete-ml 1.9.0; torch's CUDA wheels left out, see requirements.txt) unless it
#    is already there with the same requirements;
# 2. makes torch importable without those CUDA wheels (cuda_stubs.py);
# 3. builds Veil (cargo build --release at the repository root: veil, and veil-server
#    when the workspace has it, for the client-server figures);
# 4. runs compare.py: trains the model, runs Veil and Concrete ML, and writes
#    benches/compare/results.json and benches/compare/results.md, then prints the table.
#
# Environment: N (encrypted images per side, default 10), PYTHON (interpreter for the
# venv, default python3.11 or python3), SKIP_BUILD=1 (use an existing
# target/release/veil), VEIL (another veil binary; implies SKIP_BUILD=1).
set -euo pipefail

SCRIPT=compare.py
WHAT="encrypted images"
if [ "${1:-}" = "--trees" ]; then
    shift
    SCRIPT=compare_trees.py
    WHAT="encrypted rows"
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
N="${N:-10}"
log() { echo "[run.sh $(date +%H:%M:%S)] $*" >&2; }

# ------------------------------------------------------------------ virtual environment
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$pyver" in
    3.11) ;;
    *) echo "run.sh: requirements.txt is pinned for Python 3.11; $PYTHON is $pyver (set PYTHON=...)" >&2; exit 1 ;;
esac

stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "creating $VENV with $PYTHON $pyver (concrete-ml 1.9.0; about 1.3 GB to download, 3 GB installed)..."
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    t0=$(date +%s)
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$HERE/requirements.txt"
    log "installed in $(( $(date +%s) - t0 ))s; $(du -sh "$VENV" | cut -f1) on disk"
    # Only torch's CUDA wheels (left out on purpose) may be reported missing.
    if problems="$("$VENV/bin/python" -m pip check --disable-pip-version-check 2>&1)"; then :; fi
    other="$(printf '%s\n' "$problems" | grep -v -E 'requires (nvidia-|triton)' | grep -v -E '^No broken requirements' || true)"
    if [ -n "$other" ]; then
        echo "run.sh: pip check found unexpected problems:" >&2
        printf '%s\n' "$other" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
else
    log "reusing $VENV"
fi

# torch 2.3.1 from PyPI is a CUDA build; give it stand-in CUDA libraries (idempotent).
"$VENV/bin/python" "$HERE/cuda_stubs.py"
"$VENV/bin/python" -c 'import torch, concrete.ml; assert not torch.cuda.is_available()' \
    || { echo "run.sh: torch / concrete.ml do not import in $VENV" >&2; exit 1; }

# ------------------------------------------------------------------ Veil
if [ -n "${VEIL:-}" ]; then
    SKIP_BUILD=1
else
    VEIL="$REPO/target/release/veil"
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building Veil (cargo build --release)..."
    (cd "$REPO" && cargo build --release)
fi
[ -x "$VEIL" ] || { echo "run.sh: $VEIL not found" >&2; exit 1; }

# ------------------------------------------------------------------ compare
cmd="bash benches/compare/run.sh"
[ "$SCRIPT" = compare_trees.py ] && cmd="$cmd --trees"
[ "${SKIP_BUILD:-0}" = 1 ] && [ "$VEIL" = "$REPO/target/release/veil" ] && cmd="SKIP_BUILD=1 $cmd"
[ "$VEIL" != "$REPO/target/release/veil" ] && cmd="VEIL=$VEIL $cmd"
[ "$N" != 10 ] && cmd="N=$N $cmd"
[ $# -gt 0 ] && cmd="$cmd $*"
log "running $SCRIPT (N=$N $WHAT per side)..."
cd "$REPO"
exec "$VENV/bin/python" "$HERE/$SCRIPT" --n-fhe "$N" --veil "$VEIL" --command "$cmd" "$@"
