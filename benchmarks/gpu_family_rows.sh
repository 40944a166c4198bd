#!/usr/bin/env bash
# One lent-GPU call that adds the rows the family ports and the wave-2 methods still miss, each step time-boxed
# and every script writing its CSV after each row (a call cut short keeps what it measured). Results under $OUT:
#   fam/qwen25vl_7b_<gpu>.csv, fam/llava_next_7b_<gpu>.csv  merged with results/efficiency/ (same card only)
#   selection.csv                                          FlowCut / CDPruner selection overhead, batch 1
#   llava15_7b_<gpu>.csv                                   LLaVA-1.5-7B efficiency rows merged into the committed CSV
#
#   bash benchmarks/gpu_family_rows.sh
set -uo pipefail
out=${OUT:?set OUT}
eval "$(bash scripts/gpu_env.sh .whl 2>/dev/null)"
export PYTHONPATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
tag=$(python3 -m bench.measure.gpu_csv)  # h100, h200, ...: the one tag rule (bench/measure/gpu_csv.py)
timeout ${QWEN_TIMEOUT:-100} python3 benchmarks/family_efficiency.py --models qwen25vl_7b --methods holov vscan fastv dart flowcut visionzip \
  --merge-dir results/efficiency --out "$out/fam" > "$out/fam_qwen.log" 2>&1; echo "qwen rc=$?"
timeout ${SEL_TIMEOUT:-45} python3 benchmarks/bench_selection.py --methods "flowcut,cdpruner,cdpruner[kernel+dpp]" --batches 1 \
  --kept 192,128,64 --repeats 20 --out "$out/selection.csv" > "$out/selection.log" 2>&1; echo "selection rc=$?"
timeout ${EFF_TIMEOUT:-130} python3 benchmarks/efficiency_leaderboard.py --methods visionzip gprune holov flowcut cdpruner --batches 1 \
  --modes eager graph --merge "results/efficiency/llava15_7b_${tag}.csv" --csv "$out/llava15_7b_${tag}.csv" \
  --plot "$out/llava15_7b_${tag}.png" --results-dir /tmp/effres > "$out/efficiency.log" 2>&1; echo "efficiency rc=$?"
timeout ${NEXT_TIMEOUT:-110} python3 benchmarks/family_efficiency.py --models llava_next_7b --budget tile \
  --methods visionzip vispruner fastervlm hiprune vscan flowcut --merge-dir results/efficiency --out "$out/fam" > "$out/fam_next.log" 2>&1; echo "next rc=$?"
exit 0
