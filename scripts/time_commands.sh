#!/usr/bin/env bash
# Time the README's commands on a fresh clone of this checkout's HEAD: make install, make demo, make check,
# make test, one after the other; one line "<target> rc=<exit code> <seconds> s" per target in $TIMES
# (default /tmp/fresh_times.txt), each target's output in /tmp/fresh_<target>.log.
#
#   bash scripts/time_commands.sh            # the numbers in the README's table came from this sequence
set -u
src=$(git rev-parse --show-toplevel)
dir=$(mktemp -d)/fresh
times=${TIMES:-/tmp/fresh_times.txt}
git clone -q "$src" "$dir" && cd "$dir" || exit 1
: > "$times"
for target in install demo check test; do
  s=$(date +%s)
  make "$target" > "/tmp/fresh_$target.log" 2>&1
  echo "$target rc=$? $(( $(date +%s) - s )) s" | tee -a "$times"
done
