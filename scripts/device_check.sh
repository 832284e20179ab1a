#!/usr/bin/env bash
# The GPU run in one command (issue 20): the CUDA-only tests and the engine/op benchmarks at the
# "bench" shapes, every figure a JSON line, bounded to DEVICE_CHECK_SECONDS (480) in all.
#
#   make device-deps                       # on a machine that can install (once)
#   bash scripts/device_check.sh           # on the GPU machine, .device-deps/pyXY carried along
#
# Each check runs under `timeout` with its own cap, cut to what is left of the budget; after it a
# line {"check": name, "rc": ..., "seconds": ..., "limit_s": ...} says how it went (rc 124: cut off).
# The checks run most telling first, so a short budget still gives the decode figures.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ver=$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
export PYTHONPATH="worker_image:operator:.device-deps/py${ver}${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${DEVICE_CHECK_SECONDS:-480}
WORK=${DEVICE_CHECK_WORK:-/dev/shm/dsworker-device-check}
mkdir -p "$WORK"
start=$(date +%s)
failed=0

check() {  # check NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - start)))
    ((cap > left)) && cap=$left
    if ((cap < 15)); then
        printf '{"check": "%s", "skipped": "budget of %ss spent"}\n' "$name" "$BUDGET"
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@"
    rc=$?
    ((rc != 0)) && failed=1
    printf '{"check": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' \
        "$name" "$rc" "$(($(date +%s) - t0))" "$cap"
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" --timeout 300)
ENGINE=("$PY" benchmarks/engine.py --work-dir "$WORK")

check environment 20 "$PY" -c '
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"bench": "environment", "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "triton": __import__("importlib").util.find_spec("triton") is not None}))
raise SystemExit(0 if cuda else 3)'
# Captured decode steps (world 1, MTP drafts, fixed exchanges) against their eager twins.
check graph-tests 100 "${PYTEST[@]}" -k "cuda or captured" \
    tests/worker/model/test_decode_graphs.py tests/worker/model/test_decode_graphs_world.py \
    tests/worker/model/test_decode_graphs_world_mtp.py tests/worker/engine/test_mtp_decode.py
# The issue's table: loader, prefill, decode with graphs, beside transformers; one step profiled.
check engine 200 "${ENGINE[@]}" --repeat 2 --profile
# Issue 17's goal: FP8 weights held 8-bit (at most 55% of the BF16 bytes) decode at batch 1 at
# least as fast as BF16; both run here, the "memory" line gives the ratio.
check engine-fp8 90 "${ENGINE[@]}" --format fp8 --batch 1 --repeat 1 --new-tokens 64 \
    --skip load prefill hf
# The eager fallback's decode figures (what a world without graphs runs).
check engine-eager 50 "${ENGINE[@]}" --model "$WORK/hf-bench-bf16" --no-graphs --repeat 1 \
    --new-tokens 32 --skip load prefill hf
check fused-ops 40 "$PY" benchmarks/fused_ops.py --device cuda
check quant-ops 40 "$PY" benchmarks/quant_ops.py --device cuda
check ops-per-step 45 "$PY" benchmarks/ops_per_step.py --preset bench --batch 1 16
# Every fused op's Triton kernel against its torch reference, compiled this time.
check op-tests 120 "${PYTEST[@]}" tests/worker/ops
printf '{"check": "all", "failed": %s, "seconds": %d, "budget_s": %d}\n' \
    "$([ $failed = 0 ] && echo false || echo true)" "$(($(date +%s) - start))" "$BUDGET"
exit $failed
