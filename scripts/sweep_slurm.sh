#!/usr/bin/env bash
# Submit a sweep preset to Slurm, then show its status and rebuild the leaderboard.
#   scripts/sweep_slurm.sh paper_table [extra overrides...]
#   scripts/sweep_slurm.sh synth_curve slurm.partition=cpu
# Partition/account/GPUs/time come from conf/local/default.yaml (gitignored), e.g.
#   slurm: {partition: gpu, account: myproj, gpus_per_node: 1, timeout_min: 240, mem_gb: 64,
#           setup: ["source /path/to/tokenprune-bench/.venv/bin/activate"]}
# Re-running the same command resubmits only what is missing: finished runs are skipped by run id.
set -uo pipefail
preset=${1:?usage: scripts/sweep_slurm.sh PRESET [overrides...]  (presets: $(ls "$(dirname "$0")/../conf/sweep" | sed 's/.yaml//' | tr '\n' ' '))}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -m bench run -m "+sweep=$preset" hydra/launcher=slurm "$@"
rc=$?
$PY -m bench status "+sweep=$preset" "$@"
$PY -m bench aggregate
exit $rc
