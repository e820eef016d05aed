#!/usr/bin/env bash
# `make gpu-check` on a CUDA GPU machine without a package registry: the wheels carried in bench/wheels/ (fastai,
# fastcore, kornia, lightly, the original self_supervised, ...) into $GPU_SITE, this checkout on PYTHONPATH, then
# bench/gpu_check.py (every part within its cap, 8 minutes in all; results under $OUT, else gpu_check_out/).
# Arguments go to bench/gpu_check.py; with --dry-run nothing is installed (CPU, tiny sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/gpu_site}
if [[ " $* " != *" --dry-run "* ]]; then
    t=$(date +%s)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --upgrade \
        --target "$SITE" bench/wheels/*.whl
    echo "installed $(ls bench/wheels/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t )) s"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1   # the library from this checkout (no editable install needed)
exec timeout --kill-after=10 500 "$PY" bench/gpu_check.py "$@"
