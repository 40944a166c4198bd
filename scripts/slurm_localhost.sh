#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost (Debian's slurmctld + slurmd + munge), for tests.
#   scripts/slurm_localhost.sh start DIR   -> writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   scripts/slurm_localhost.sh stop DIR
# Use it with `export SLURM_CONF=DIR/slurm.conf`. Needs root (CI and dev machines run as root) and
# the packages slurm-wlm and munge (`make slurm-deps` installs them).
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?state directory}")
mkdir -p "$dir"
export SLURM_CONF="$dir/slurm.conf"

stop() {
  for f in slurmd slurmctld munged; do
    if [[ -f "$dir/$f.pid" ]]; then kill "$(cat "$dir/$f.pid")" 2>/dev/null || true; fi
  done
  sleep 1
  for f in slurmd slurmctld munged; do
    if [[ -f "$dir/$f.pid" ]]; then kill -9 "$(cat "$dir/$f.pid")" 2>/dev/null || true; rm -f "$dir/$f.pid"; fi
  done
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
[[ $cmd == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
for b in slurmctld slurmd munged sbatch; do
  command -v "$b" >/dev/null || { echo "error: $b not found: install Debian's slurm-wlm and munge (make slurm-deps)" >&2; exit 3; }
done
[[ $(id -u) == 0 ]] || { echo "error: starting slurmd needs root" >&2; exit 3; }

host=$(hostname -s)
# free ports, so several clusters (parallel test runs) never collide
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port=${SLURM_TEST_CTLD_PORT:-$(free_port)}
slurmd_port=${SLURM_TEST_SLURMD_PORT:-$(free_port)}
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
# munge: a private key and socket so several test clusters never collide
if [[ ! -f "$dir/munge/munge.key" ]]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
  chmod 600 "$dir/munge/munge.key"
fi
cat > "$SLURM_CONF" <<CONF
ClusterName=tokenprune
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
stop
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm up: SLURM_CONF=$SLURM_CONF"; exit 0
  fi
  sleep 1
done
echo "error: slurm did not come up; logs:" >&2
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
