#!/usr/bin/env bash
# The GPU-host benchmarks, one command each, every one writing its JSON under perf/results/.
# Run from the repository root in an environment with the project installed (or, on the lent GPU
# host: bash .gpu-bundle/install.sh && source /tmp/gpu-env.sh). Pass names to run a subset:
#   bash perf/gpu_suite.sh unet_serving slo_bench quality_aware
set -euo pipefail
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
TAG=${TAG:-h100}
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(unet_serving slo_bench quality_aware)
for name in "${which[@]}"; do
  case "$name" in
    unet_serving)   # issue 3: server vs in-process UNet step at b2/8/16; 50-step 512x512 end to end
      $PY -m perf.unet_serving --preset sd15 --device "$DEVICE" --size 512 --rows 2,8,16 --steps 50 \
        --out "perf/results/unet_serving_${TAG}.json" ;;
    slo_bench)      # issue 5: orchestrator vs both baselines, Poisson sweep + MAF-shaped trace, report
      $PY -m perf.slo_bench --serve sd15 --device "$DEVICE" --sizes 512 --mix sd15-interactive --slo-ms 5000 \
        --rates 1,2,4,6 --traces maf:3:120 --requests 20 --out-dir perf/results ;;
    quality_aware)  # issue 6: auto steps + cascade vs fixed 50 steps, escalation fixed at 30%, simulator error
      $PY -m perf.quality_aware --preset sd15 --light sd15-small --device "$DEVICE" --size 512 --steps 50 \
        --slo-ms 3000 --rates 1,2,4,6 --duration 30 --escalate 0.3 --out "perf/results/quality_aware_${TAG}.json" ;;
    *) echo "unknown benchmark '$name'; choose: unet_serving slo_bench quality_aware" >&2; exit 2 ;;
  esac
done
