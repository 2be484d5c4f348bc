#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd, as root.
#   slurm_cluster.sh start STATE_DIR   # writes /etc/slurm/slurm.conf, starts the daemons, waits for the node
#   slurm_cluster.sh stop STATE_DIR    # stops them and puts back the machine's own slurm.conf (or none)
# The config goes to /etc/slurm/slurm.conf because job steps (srun inside sbatch jobs) look for
# it there, not at $SLURM_CONF. Without cgroups here, processes are tracked by linuxproc and
# tasks are not confined (task/none); there is no accounting daemon, so job states come from
# squeue (the plugin's --slurm-status-command squeue).
# The config must not outlive the cluster: with a slurm.conf naming a dead controller, every
# `scontrol` call (the SLURM executor plugin runs one whenever Snakemake starts) waits 9 s.
set -euo pipefail
action=$1
state=$(realpath -m "$2")
node=$(hostname -s)
# (nproc honours OMP_NUM_THREADS, which a Dask LocalCluster started earlier in the calling
# process sets to 1: the node got one CPU, and every 2-thread job pended for good)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    # one munged only: a second one on the same socket rejects the other's credentials
    pkill -x munged || true
    for _ in $(seq 20); do pgrep -x munged >/dev/null || break; sleep 0.2; done
}

restore_config() {
    if [ -e "$state/slurm.conf.before" ]; then
        mv "$state/slurm.conf.before" /etc/slurm/slurm.conf
    elif grep -qs '^ClusterName=featscope-test$' /etc/slurm/slurm.conf; then
        rm -f /etc/slurm/slurm.conf
    fi
}

if [ "$action" = stop ]; then
    stop
    restore_config
    exit 0
fi

stop
mkdir -p "$state"
if [ -e /etc/slurm/slurm.conf ] && ! grep -qs '^ClusterName=featscope-test$' /etc/slurm/slurm.conf; then
    cp -p /etc/slurm/slurm.conf "$state/slurm.conf.before"
fi
mkdir -p "$state"/{ctld,spool,log,munge} /etc/slurm /run/munge
chown munge:munge /run/munge "$state/munge"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
munged --force --pid-file="$state/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/seed"
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=featscope-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld
slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        exit 0
    fi
    sleep 1
done
echo "the SLURM node did not become idle; see $state/log" >&2
exit 1
