#!/usr/bin/env bash
# One lent-GPU call that re-checks and re-measures what changed: the GPU tests, selection overhead of the
# given vision-side methods, the in-LLM overhead, and efficiency rows merged into the committed CSV.
# Each step is time-boxed so that a slow one cannot starve the rest; results go under $OUT.
#
#   bash benchmarks/gpu_refresh.sh "<selection methods>" "<in-LLM methods>" "<efficiency methods>"
#
# Environment: FAMILIES=1 first measures the LLaVA-NeXT / Qwen2.5-VL prefill CSVs (tiny smoke, then real shapes);
# TESTS="tests/a.py tests/b.py" limits the GPU tests to those files (default: every GPU test); SEL_REPEATS sets
# the selection timing repeats; *_TIMEOUT bound each step.
set -uo pipefail
out=${OUT:?set OUT}
eval "$(bash scripts/gpu_env.sh .whl 2>/dev/null)"
export PYTHONPATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
sel=${1:-}; inllm=${2:-}; eff=${3:-}
# efficiency rows merge only into the CSV of the same kind of card (h100, h200, ...)
tag=$(python3 -m bench.measure.gpu_csv)  # h100, h200, ...: the one tag rule (bench/measure/gpu_csv.py)
if [ "${FAMILIES:-0}" = 1 ]; then
  timeout ${TINY_TIMEOUT:-60} python3 benchmarks/family_efficiency.py --tiny --out "$out/families_tiny" > "$out/families_tiny.log" 2>&1; echo "families tiny rc=$?"
  timeout ${FAM_TIMEOUT:-240} python3 benchmarks/family_efficiency.py ${FAM_METHODS:+--methods $FAM_METHODS} --out "$out/families" > "$out/families.log" 2>&1; echo "families rc=$?"
  tail -2 "$out/families.log"
fi
[ -n "$sel" ] && { timeout ${SEL_TIMEOUT:-100} python3 benchmarks/bench_selection.py --methods "$sel" --batches 1,16 --kept 192,128,64 --repeats ${SEL_REPEATS:-30} --out "$out/selection.csv" > "$out/selection.log" 2>&1; echo "selection rc=$?"; }
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -m gpu -q -p no:cacheprovider -rfE ${TESTS:-tests} > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" | tee -a "$out/gpu_tests.log"
tail -3 "$out/gpu_tests.log"
[ -n "$inllm" ] && { timeout 100 python3 benchmarks/bench_inllm_overhead.py --methods "$inllm" --batches 1,16 --out "$out/inllm.csv" > "$out/inllm.log" 2>&1; echo "inllm rc=$?"; }
[ -n "$eff" ] && { timeout ${EFF_TIMEOUT:-240} python3 benchmarks/efficiency_leaderboard.py --methods $eff --merge results/efficiency/llava15_7b_${tag}.csv --csv "$out/llava15_7b_${tag}.csv" --plot "$out/llava15_7b_${tag}.png" --results-dir /tmp/effres > "$out/efficiency.log" 2>&1; echo "efficiency rc=$?"; grep -c "^\[eff\] " "$out/efficiency.log"; }
exit 0
