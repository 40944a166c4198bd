#!/usr/bin/env bash
# The one lent-GPU script: steps that re-check and re-measure on the card that came, each time-boxed and every script
# writing its CSV after each row (a call cut short keeps what it measured). Choose the steps with STEPS (default: the
# first six, in this order; split them over two calls when one call's 600 s cannot hold them). Step logs go to
# /tmp/gpu_rows_*.log (the lent machine returns at most 8 files from $OUT; each step prints its return code). Under $OUT:
#   tests        gpu_tests.log                         the GPU equivalence tests (kernels == references, CUDA batch 8 == 1)
#   selection    selection.csv                         SEL_METHODS' selection (default: every vision-side method) at
#                                                      SEL_BATCHES (1) and SEL_KEPT (64) kept (regression check against
#                                                      results/selection_overhead.csv), then FlowCut / CDPruner at 192 / 128
#   inllm        inllm.csv                             in-LLM overhead of INLLM_METHODS (default: all) at INLLM_BATCHES (1)
#   qwen         fam/qwen25vl_7b_<gpu>.csv             Qwen2.5-VL: the unpruned model and the ports, merged with
#                                                      results/efficiency/ (same card only)
#   llava15      llava15_7b_<gpu>.csv                  LLaVA-1.5-7B efficiency rows of EFF_METHODS (default: VisionZip and the
#                                                      wave-2 methods, b1), then batch-16 rows of the in-LLM methods missing them
#   next         fam/llava_next_7b_<gpu>.csv           LLaVA-NeXT: the unpruned model and the per-tile ports (--budget tile)
#   tiny         fam_tiny/                             (not in the default) the family script's tiny-config smoke run
#
#   STEPS="tests selection inllm qwen" bash benchmarks/gpu_family_rows.sh
#   STEPS="selection inllm" SEL_METHODS="divprune,vispruner" SEL_BATCHES=1,16 SEL_KEPT=192,128,64 bash benchmarks/gpu_family_rows.sh
set -uo pipefail
out=${OUT:?set OUT}
eval "$(bash scripts/gpu_env.sh .whl 2>/dev/null)"
export PYTHONPATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
tag=$(python3 -m bench.measure.gpu_csv)  # h100, h200, ...: the one tag rule (bench/measure/gpu_csv.py)
steps=" ${STEPS:-tests selection inllm qwen llava15 next} "
step() { [[ "$steps" == *" $1 "* ]]; }
if step tiny; then
  timeout ${TINY_TIMEOUT:-60} python3 benchmarks/family_efficiency.py --tiny --out "$out/fam_tiny" > "/tmp/gpu_rows_fam_tiny.log" 2>&1
  echo "families tiny rc=$?"
fi
if step tests; then
  timeout ${TEST_TIMEOUT:-170} python3 -m pytest -m gpu -q -p no:cacheprovider -rfE ${TESTS:-tests/test_vision_methods.py \
    tests/test_wave2_methods.py tests/test_select_kernels.py tests/test_fused_kernels.py tests/test_transprune_kernels.py \
    tests/test_llava_next.py tests/test_flowcut_next.py tests/test_batching.py} > "$out/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" | tee -a "$out/gpu_tests.log"; tail -3 "$out/gpu_tests.log"
fi
# PREV=<dir>: an earlier checkout of the code (e.g. `git archive <commit> bench methods kernels benchmarks conf | tar -x -C
# <dir>`, carried as an ignored path): its selection and in-LLM overhead are timed in the same call, before this
# tree's, so that a regression check compares like with like on whatever card came
prev=${PREV:-}
sel_args=(${SEL_METHODS:+--methods "$SEL_METHODS"} --batches "${SEL_BATCHES:-1}" --kept "${SEL_KEPT:-64}" --repeats "${SEL_REPEATS:-20}")
inllm_args=(${INLLM_METHODS:+--methods "$INLLM_METHODS"} --batches "${INLLM_BATCHES:-1}")
if step selection; then
  [ -n "$prev" ] && { PYTHONPATH=/tmp/site:$PWD/$prev timeout ${SEL_TIMEOUT:-90} python3 $prev/benchmarks/bench_selection.py "${sel_args[@]}" \
    --out "$out/selection_prev.csv" > "/tmp/gpu_rows_selection_prev.log" 2>&1; echo "selection (prev) rc=$?"; }
  timeout ${SEL_TIMEOUT:-90} python3 benchmarks/bench_selection.py "${sel_args[@]}" --out "$out/selection.csv" > "/tmp/gpu_rows_selection.log" 2>&1
  echo "selection rc=$?"
  if [ -z "${SEL_METHODS:-}" ]; then
    timeout ${SEL2_TIMEOUT:-45} python3 benchmarks/bench_selection.py --methods "flowcut,cdpruner,cdpruner[kernel+dpp]" --batches 1 \
      --kept 192,128 --repeats 20 --out "$out/selection_wave2.csv" > "/tmp/gpu_rows_selection_wave2.log" 2>&1; echo "selection wave-2 rc=$?"
  fi
fi
if step inllm; then
  [ -n "$prev" ] && { PYTHONPATH=/tmp/site:$PWD/$prev timeout ${INLLM_TIMEOUT:-70} python3 $prev/benchmarks/bench_inllm_overhead.py \
    "${inllm_args[@]}" --out "$out/inllm_prev.csv" > "/tmp/gpu_rows_inllm_prev.log" 2>&1; echo "inllm (prev) rc=$?"; }
  timeout ${INLLM_TIMEOUT:-70} python3 benchmarks/bench_inllm_overhead.py "${inllm_args[@]}" --out "$out/inllm.csv" > "/tmp/gpu_rows_inllm.log" 2>&1
  echo "inllm rc=$?"
fi
if step qwen; then
  timeout ${QWEN_TIMEOUT:-130} python3 benchmarks/family_efficiency.py --models qwen25vl_7b --methods none holov vscan fastv dart flowcut visionzip \
    --merge-dir results/efficiency --out "$out/fam" > "/tmp/gpu_rows_fam_qwen.log" 2>&1; echo "qwen rc=$?"
fi
if step llava15; then
  timeout ${EFF_TIMEOUT:-150} python3 benchmarks/efficiency_leaderboard.py --methods ${EFF_METHODS:-visionzip gprune holov flowcut cdpruner} \
    --batches 1 --modes eager graph --merge "results/efficiency/llava15_7b_${tag}.csv" --csv "$out/llava15_7b_${tag}.csv" \
    --plot "$out/llava15_7b_${tag}.png" --results-dir /tmp/effres > "/tmp/gpu_rows_efficiency.log" 2>&1; echo "efficiency rc=$?"
  base="results/efficiency/llava15_7b_${tag}.csv"; [ -s "$out/llava15_7b_${tag}.csv" ] && base="$out/llava15_7b_${tag}.csv"
  timeout ${B16_TIMEOUT:-100} python3 benchmarks/efficiency_leaderboard.py --methods dart transprune vscan sparsevlm --batches 16 \
    --modes eager graph --merge "$base" --csv "$out/llava15_7b_${tag}_b16.csv" --plot "$out/llava15_7b_${tag}_b16.png" \
    --results-dir /tmp/effres16 > "/tmp/gpu_rows_efficiency_b16.log" 2>&1; echo "efficiency b16 rc=$?"
fi
if step next; then
  timeout ${NEXT_TIMEOUT:-130} python3 benchmarks/family_efficiency.py --models llava_next_7b --budget tile \
    --methods none visionzip vispruner fastervlm hiprune vscan flowcut --merge-dir results/efficiency --out "$out/fam" > "/tmp/gpu_rows_fam_next.log" 2>&1
  echo "next rc=$?"
fi
tail -n 3 /tmp/gpu_rows_*.log 2>/dev/null | tail -n 60
exit 0
