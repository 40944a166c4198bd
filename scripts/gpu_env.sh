#!/usr/bin/env bash
# Install a folder of wheels (carried to the offline GPU machine) into a target directory and print
# the PYTHONPATH to use. Wheels in WHEEL_DIR/*.whl are always installed; wheels in
# WHEEL_DIR/ifmissing/*.whl only when the machine has no distribution of that name (so a package the
# machine already has is never shadowed by another version).
#
#   bash scripts/gpu_env.sh .whl_tp && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_throughput.py --out $OUT/throughput_h100.csv
#
# Usage: scripts/gpu_env.sh WHEEL_DIR [TARGET=/tmp/site]   (PYTHON=python3 by default)
set -euo pipefail
dir=${1:?usage: scripts/gpu_env.sh WHEEL_DIR [TARGET]}
target=${2:-/tmp/site}
py=${PYTHON:-python3}
shopt -s nullglob
wheels=("$dir"/*.whl)
for w in "$dir"/ifmissing/*.whl; do
  name=$(basename "$w" | cut -d- -f1)
  if PYTHONPATH= "$py" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null; then
    echo "gpu_env: $name already installed, not shadowed" >&2
  else
    wheels+=("$w")
  fi
done
[ ${#wheels[@]} -gt 0 ] || { echo "gpu_env: no wheels in $dir" >&2; exit 1; }
mkdir -p "$target"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${wheels[@]}"
echo "gpu_env: installed ${#wheels[@]} wheels into $target: $(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')" >&2
echo "export PYTHONPATH=$target:$PWD"
