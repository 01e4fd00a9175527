#!/usr/bin/env bash
# The GPU-host acceptance suite in one command (perf/gpu_suite.py says what it runs and writes). On a bare
# GPU host (Python and CUDA torch, no registry) it first installs the offline bundle that
# perf/gpu_bundle.sh built (.gpu-bundle/, carried with the tree), unless the project is importable already.
#   bash perf/gpu_suite.sh                          GPU host: everything, within 8 minutes with the install
#   DEVICE=cpu OUT=/tmp/dry bash perf/gpu_suite.sh  the tiny CPU dry run of the same steps (CI runs it)
# Environment: DEVICE (cuda), PYTHON (.venv/bin/python where it exists, else python3), OUT (perf/results),
# BUDGET_S (480 on a GPU, install included), STEPS (a subset: "unet_serving slo_bench"), BUNDLE (.gpu-bundle).
set -euo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-.gpu-bundle}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import triffusion.export.build" >/dev/null 2>&1; then
  if [ ! -x "$BUNDLE/install.sh" ]; then
    echo "error: the project is not importable by $PYTHON and there is no $BUNDLE/install.sh; build the bundle" \
         "where a package registry is reachable: bash perf/gpu_bundle.sh" >&2
    exit 2
  fi
  PYTHON="$PYTHON" bash "$BUNDLE/install.sh"
fi
[ -d "$BUNDLE/bin" ] && PATH="$PWD/$BUNDLE/bin:$PATH"
export PATH
args=(--device "$DEVICE" --started "$started")
[ -n "${OUT:-}" ] && args+=(--out-dir "$OUT")
[ -n "${BUDGET_S:-}" ] && args+=(--budget-s "$BUDGET_S")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
exec "$PYTHON" -m perf.gpu_suite "${args[@]}"
