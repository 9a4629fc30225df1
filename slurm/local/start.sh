#!/usr/bin/env bash
# Start a one-node Slurm on this machine, for the tests of the recipes in slurm/ (and for trying
# them by hand). Everything it writes lives in DIR: slurm.conf, munge key and socket, state,
# spool, logs, pid files. Nothing under /etc is changed, so it never disturbs a real Slurm.
#
#   slurm/local/start.sh DIR         # prints `export SLURM_CONF=DIR/slurm.conf`
#   export SLURM_CONF=DIR/slurm.conf
#   sbatch --wait slurm/pretrain.sbatch ...
#   slurm/local/stop.sh DIR
#
# Needs root and Debian's slurm-wlm + munge (`make slurm-deps`). The settings are the ones known
# to work in an unprivileged container without systemd or cgroups: slurmctld and slurmd in the
# foreground (-D) under this script's control; processes tracked through /proc
# (proctrack/linuxproc) and no task binding (task/none), both of which need no cgroup mounts;
# config_overrides, so the node may declare more CPUs than the machine has and 2 tasks (two
# "nodes" of a multi-node job) fit on a 2-core box; EnforcePartLimits=ALL, so a job that asks
# for more than the partition has is refused at submission instead of pending forever.
set -euo pipefail

DIR=${1:?usage: start.sh DIR}
CPUS=${SLURM_LOCAL_CPUS:-8}
mkdir -p "$DIR"/{state,spool,log}
DIR=$(cd "$DIR" && pwd)
HOST=$(hostname -s)

die() { echo "slurm/local/start.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (slurmd must start jobs as any user)"
for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || die "$tool not found; install slurm-wlm and munge (make slurm-deps)"
done
if [ -e "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    die "a local Slurm already runs from $DIR (stop it with slurm/local/stop.sh $DIR)"
fi

# Two free TCP ports, so two local clusters (or a real slurmd on the default ports) never collide.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
[ "$CTLD_PORT" != "$SLURMD_PORT" ] || SLURMD_PORT=$(free_port)

# munge: its own key and socket in DIR. --force lets it run as root with a key owned by root.
[ -s "$DIR/munge.key" ] || dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
chmod 600 "$DIR/munge.key"
munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munged.seed"

cat > "$DIR/slurm.conf" <<CONF
ClusterName=xtalgen-local
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid.slurm
SlurmdPidFile=$DIR/slurmd.pid.slurm
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# Requeued jobs may start again at once (the default holds them back for a while).
JobRequeue=1
SchedulerParameters=bf_interval=1,sched_interval=1
MessageTimeout=30
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=$HOST CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$DIR/slurm.conf"

# -D keeps each daemon in the foreground; this script backgrounds it and records its pid.
slurmctld -D -i -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
echo $! > "$DIR/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >>"$DIR/log/slurmd.out" 2>&1 &
echo $! > "$DIR/slurmd.pid"

# Up when the node is idle: the controller answers and the node has registered.
for _ in $(seq 1 120); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
    case "$state" in idle*) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
    for daemon in slurmctld slurmd; do
        kill -0 "$(cat "$DIR/$daemon.pid")" 2>/dev/null || {
            tail -n 20 "$DIR/log/$daemon.log" "$DIR/log/$daemon.out" >&2 2>/dev/null || true
            die "$daemon exited at start-up (logs in $DIR/log)"
        }
    done
    sleep 0.5
done
die "the node did not become idle within 60 s (state: ${state:-no answer}; logs in $DIR/log)"
