#!/usr/bin/env bash
# A single-node SLURM cluster with accounting on this machine, for tests and for trying the
# launchers without a real cluster. Runs as root, needs no systemd and no cgroups, keeps every
# file (configs, keys, databases, spools, logs, pid files) under one folder, and is idempotent:
# running it again starts only what is not running.
#
#   eval "$(bash slurm/local/up.sh)"      # or: bash slurm/local/up.sh; source $SLURM_LOCAL_DIR/env.sh
#   ... sbatch / python -m launch.submit ... --executor slurm
#   bash slurm/local/down.sh
#
# stdout carries only the `export` lines to source; progress goes to stderr.
#
# Settings (environment):
#   SLURM_LOCAL_DIR   state folder (default /tmp/dipddpm-slurm)
#   SLURM_LOCAL_PORT  first of four TCP ports on 127.0.0.1: slurmctld, slurmd, slurmdbd,
#                     mariadb (default 6817 -> 6817..6820)
#   SLURM_LOCAL_CPUS  CPUs the node declares (default: the larger of 4 and the real count)
#
# Why the node may declare more CPUs than the machine has: test and smoke-test tasks mostly
# sleep and write small files, so a 4-point grid should run as one wave even on a 2-core
# machine. `SlurmdParameters=config_overrides` makes slurmd accept the declared count instead of
# draining the node for having fewer cores than configured. Real work should not rely on it.
set -euo pipefail

D="$(realpath -m "${SLURM_LOCAL_DIR:-/tmp/dipddpm-slurm}")"
PORT="${SLURM_LOCAL_PORT:-6817}"
CLUSTER=dipddpm
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
NODE=localhost
SOCK="$D/munge/munge.socket"
CONF="$D/etc/slurm.conf"
export SLURM_CONF="$CONF"

log() { echo "[slurm-local] $*" >&2; }
die() { echo "[slurm-local] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (daemons and munge run as root here)"

alive() {  # alive PIDFILE COMM: the pid file names a running COMM (not a reused pid)
    [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what did not come up within ${limit}s (logs in $D/log)"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ----------------------------------------------------------------------------- packages
install_packages() {
    local bins=(slurmctld slurmd slurmdbd sbatch sacct munged mungekey mariadbd mariadb-install-db)
    local missing=0 b
    for b in "${bins[@]}"; do command -v "$b" >/dev/null || missing=1; done
    [ $missing = 0 ] && return 0
    log "installing slurm, munge, mariadb"
    local pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
    export DEBIAN_FRONTEND=noninteractive
    # the package lists are usually fresh enough; only refresh them when an install fails
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$D/log/apt.log" 2>&1; then
        apt-get update >>"$D/log/apt.log" 2>&1
        apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$D/log/apt.log" 2>&1 ||
            die "apt-get install failed, see $D/log/apt.log"
    fi
}

# ----------------------------------------------------------------------------- configs
write_configs() {
    local cpus real_cpus mem
    real_cpus=$(nproc)
    cpus="${SLURM_LOCAL_CPUS:-$((real_cpus > 4 ? real_cpus : 4))}"
    # RealMemory from slurmd itself, so submitit's --mem requests fit the node
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    [ -n "$mem" ] || mem=1024
    cat >"$CONF.tmp" <<EOF
# written by slurm/local/up.sh: one node, no cgroups, accounting through slurmdbd
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
# short waits keep cancellation and requeue quick in tests
KillWait=5
MessageTimeout=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# with a private munge socket, slurmctld finds it for slurmdbd traffic through this key
AccountingStoragePass=$SOCK
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    cat >"$D/etc/slurmdbd.conf.tmp" <<EOF
# written by slurm/local/up.sh
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$D/etc/slurmdbd.conf.tmp"  # slurmdbd refuses a readable file holding a password
    mv "$D/etc/slurmdbd.conf.tmp" "$D/etc/slurmdbd.conf"
}

# ----------------------------------------------------------------------------- daemons
start_munge() {
    alive "$D/munge/munged.pid" munged && return 0
    [ -s "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key"
    chmod 600 "$D/munge/munge.key"
    rm -f "$SOCK" "$SOCK.lock"
    # --force: the state folder may sit under a world-writable /tmp, which munged distrusts
    munged --force --key-file="$D/munge/munge.key" --socket="$SOCK" \
        --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" \
        --seed-file="$D/munge/munged.seed"
    wait_for 10 munged bash -c "munge -S '$SOCK' -n | unmunge -S '$SOCK'"
}

start_mariadb() {
    local sql="$D/mysql/mysqld.sock"
    if ! alive "$D/mysql/mysqld.pid" mariadbd; then
        if [ ! -d "$D/mysql/data/mysql" ]; then
            mariadb-install-db --no-defaults --user=root --datadir="$D/mysql/data" \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $D/log"
        fi
        setsid mariadbd --no-defaults --user=root --datadir="$D/mysql/data" --socket="$sql" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$D/mysql/mysqld.pid" \
            --log-error="$D/log/mariadb.log" --innodb-buffer-pool-size=64M \
            --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
        wait_for 60 mariadb mariadb-admin --no-defaults --socket="$sql" ping
    fi
    mariadb --no-defaults --socket="$sql" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
    if ! alive "$D/run/slurmdbd.pid" slurmdbd; then
        slurmdbd  # finds slurmdbd.conf beside $SLURM_CONF
    fi
    wait_for 60 slurmdbd port_open "$DBD_PORT"
    if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    alive "$D/run/slurmctld.pid" slurmctld || slurmctld
    wait_for 30 slurmctld scontrol ping
}

start_slurmd() {
    alive "$D/run/slurmd.pid" slurmd || slurmd -N "$NODE"
    node_ready() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
    wait_for 30 "the node" node_ready
}

# ----------------------------------------------------------------------------- main
mkdir -p "$D"/{etc,log,run,state,spool,munge,mysql}
chmod 700 "$D/munge"
t0=$(date +%s.%N)
install_packages
write_configs
start_munge
start_mariadb
start_slurmdbd
start_slurmctld
start_slurmd
# a node drained by an earlier unclean stop comes back
if sinfo -h -n "$NODE" -o %T | grep -Eq 'drain|down'; then
    scontrol update NodeName="$NODE" State=RESUME
fi
printf 'export SLURM_CONF=%q\nexport SLURM_LOCAL_DIR=%q\n' "$CONF" "$D" >"$D/env.sh"
log "up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}")s: $(sinfo -h -o '%P %D %C %T' | head -1)"
cat "$D/env.sh"
