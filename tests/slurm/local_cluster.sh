#!/usr/bin/env bash
# local_cluster.sh — a real single-machine SLURM cluster for the tests in tests/slurm.
#
#   bash tests/slurm/local_cluster.sh install [PKG..]  # apt-get the Debian packages (+ PKG..) if missing
#   bash tests/slurm/local_cluster.sh start  DIR     # configure + start daemons under DIR, wait until idle
#   bash tests/slurm/local_cluster.sh stop   DIR     # stop the daemons recorded in DIR/pids (by PID only)
#   bash tests/slurm/local_cluster.sh status DIR
#
# Everything the cluster writes (slurm.conf, state, spool, logs, pid files, munge key + socket, the MariaDB
# data dir) lives under DIR. Nothing in /etc is touched except one /etc/hosts line of this cluster (marked with
# DIR, removed again by `stop`) that maps the node names, and the short hostname when it does not resolve, to
# 127.0.0.1. All daemons listen on 127.0.0.1 only (free ports are
# picked at start) or on unix sockets inside DIR. After `start`, DIR/env holds `export SLURM_CONF=...`; the
# SLURM client commands (sbatch, sacct, scontrol, srun) need that variable.
#
# Two emulated nodes (node1, node2: two slurmd processes, Debian builds slurm with --enable-multiple-slurmd),
# accounting through slurmdbd + MariaDB because submitit reads job states with sacct.
#
# Root and Debian 12 (apt) are required; there is no systemd, so daemons are started detached with setsid.
# Knobs: SLURM_LOCAL_NODES (2), SLURM_LOCAL_CPUS ($(nproc)), SLURM_LOCAL_PARTITION (debug),
#        SLURM_LOCAL_TIMEOUT (120 s per wait).
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

ACTION=${1:-}
DIR=${2:-}
NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-120}
CLUSTER=cbsatest
HOSTS_MARK="# timm_cbsa-tests-slurm"
HOST=$(hostname -s)
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
EXTRA_PACKAGES=()

log() { printf '[local_cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

wait_for() {  # wait_for DESC CMD...   polls every 0.25 s for up to $TIMEOUT s
    local desc=$1; shift; local t=0
    until "$@" >/dev/null 2>&1; do
        t=$((t + 1)); [ $t -le $((TIMEOUT * 4)) ] || die "timeout waiting for $desc"
        sleep 0.25
    done
}

# ------------------------------------------------------------------------------------------------ install
do_install() {
    [ "$(id -u)" = 0 ] || die "must run as root to install packages"
    command -v apt-get >/dev/null || die "apt-get not found (needs Debian/Ubuntu)"
    local missing=() p
    for p in "${PACKAGES[@]}" "${EXTRA_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then log "packages already installed"; return; fi
    log "installing: ${missing[*]}"
    # Keep maintainer scripts from starting services (no systemd; we start our own daemons). Any existing
    # policy-rc.d is restored byte for byte afterwards.
    local prc=/usr/sbin/policy-rc.d backup="" rc=0 alog
    alog=$(mktemp /tmp/local_cluster-apt.XXXXXX.log)
    if [ -e $prc ]; then backup=$(mktemp); cp -p $prc "$backup"; fi
    printf '#!/bin/sh\nexit 101\n' > $prc; chmod 755 $prc
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq &&
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}"
    } > "$alog" 2>&1 || rc=$?
    if [ -n "$backup" ]; then cp -p "$backup" $prc; rm -f "$backup"; else rm -f $prc; fi
    [ $rc -eq 0 ] || { tail -20 "$alog" >&2; die "apt-get install failed (log: $alog)"; }
    log "installed"
}

# ------------------------------------------------------------------------------------------------ pids
record() { echo "$2 $3" > "$DIR/pids/$1.pid"; }  # name pid binary
ours_alive() {
    local f="$DIR/pids/$1.pid" pid bin
    [ -f "$f" ] || return 1
    read -r pid bin < "$f"
    [ -d "/proc/$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$bin"
}
signal_one() {
    local f="$DIR/pids/$1.pid" pid bin
    [ -f "$f" ] || return 0
    read -r pid bin < "$f"
    ours_alive "$1" && kill -TERM "$pid" 2>/dev/null || true
}
reap_one() {
    local name=$1 f="$DIR/pids/$1.pid" pid bin t=0
    [ -f "$f" ] || return 0
    read -r pid bin < "$f"
    while ours_alive "$name" && [ $t -lt 60 ]; do sleep 0.25; t=$((t + 1)); done
    if ours_alive "$name"; then log "$name ($pid) did not exit, SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$f"
}

free_port() {
    python3 - <<'EOF' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

node_names() { seq -f 'node%g' 1 "$NODES"; }

# ------------------------------------------------------------------------------------------------ config
write_conf() {
    local phys_mb mem port node_lines="" n i=0
    phys_mb=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
    mem=${SLURM_LOCAL_MEM_MB:-$(( phys_mb * 8 / 10 / NODES ))}
    for n in $(node_names); do
        port=$(free_port)
        node_lines+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$mem State=UNKNOWN"$'\n'
    done
    CTLD_PORT=$(free_port); DBD_PORT=$(free_port); DB_PORT=$(free_port)
    FIRST_JOB_ID=$((1000 + RANDOM % 18000))
    echo "$DB_PORT" > "$DIR/db_port"
    cat > "$DIR/etc/slurm.conf" <<EOF
# generated by tests/slurm/local_cluster.sh (timm_cbsa tests) — single-machine test cluster
ClusterName=$CLUSTER
# job ids (and so the MASTER_PORT submitit derives from them) differ between test sessions
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged socket; requeued jobs may restart only after cred_expire seconds (default 120)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
# bind to NodeAddr / SlurmctldHost address (127.0.0.1) instead of INADDR_ANY
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd this names the munge socket used on the slurmctld <-> slurmdbd connection
AccountingStoragePass=$DIR/munge/munge.socket
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobRequeue=1
# reject jobs that can never run in their partition at submission time (like most production clusters)
EnforcePartLimits=ALL
${node_lines%$'\n'}
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$DIR/etc/slurm.conf"
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
CommunicationParameters=NoInAddrAny
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmlocal
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable slurmdbd.conf
    printf 'export SLURM_CONF=%q\n' "$DIR/etc/slurm.conf" > "$DIR/env"
}

ensure_hostnames() {  # slurmctld only runs when the short hostname (SlurmctldHost) resolves; jobs rendezvous at the
    # first node's name (MASTER_ADDR, from submitit's TorchDistributedEnvironment), as on a real cluster where node
    # names resolve. One line per cluster, so that a concurrent test cluster's `stop` leaves this one's alone.
    local names
    names=$(node_names | tr '\n' ' ')
    getent hosts "$HOST" >/dev/null || names="$HOST $names"
    echo "127.0.0.1 $names$HOSTS_MARK:$DIR:" >> /etc/hosts
    log "added $names to /etc/hosts"
}

# ------------------------------------------------------------------------------------------------ daemons
start_munge() {
    local m=$DIR/munge
    mkdir -p "$m"
    dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none
    chown -R munge:munge "$m"; chmod 755 "$m"; chmod 400 "$m/munge.key"
    # munged daemonizes itself and writes its pid file
    runuser -u munge -- /usr/sbin/munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" < /dev/null
    wait_for "munged pid file" test -s "$m/munged.pid"
    record munged "$(cat "$m/munged.pid")" /usr/sbin/munged
    wait_for "munge round trip" bash -c "munge -n --socket='$m/munge.socket' | unmunge --socket='$m/munge.socket'"
    log "munged pid $(cat "$m/munged.pid")"
}

start_mariadb() {
    local db=$DIR/mysql port
    port=$(cat "$DIR/db_port")
    mkdir -p "$db/data" "$db/run"; chown -R mysql:mysql "$db"
    mariadb-install-db --user=mysql --datadir="$db/data" --auth-root-authentication-method=socket \
        --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 || { tail "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$db/data" --socket="$db/run/mysqld.sock" \
        --pid-file="$db/run/mysqld.pid" --bind-address=127.0.0.1 --port="$port" --skip-name-resolve \
        --innodb-buffer-pool-size=64M --log-error="$DIR/log/mariadbd.err" \
        > "$DIR/log/mariadbd.out" 2>&1 < /dev/null &
    record mariadbd $! /usr/sbin/mariadbd   # setsid execs in place: $! is mariadbd (pid file confirms below)
    wait_for mariadb mariadb-admin --no-defaults --socket="$db/run/mysqld.sock" ping
    wait_for "mariadbd pid file" test -s "$db/run/mysqld.pid"
    record mariadbd "$(cat "$db/run/mysqld.pid")" /usr/sbin/mariadbd
    mariadb --no-defaults --socket="$db/run/mysqld.sock" -uroot -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmlocal';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    log "mariadbd pid $(cat "$db/run/mysqld.pid") on 127.0.0.1:$port"
}

start_slurm_daemon() {  # name pidfile binary args...  (foreground -D, detached with setsid)
    local name=$1 pidfile=$2 bin=$3; shift 3
    SLURM_CONF="$DIR/etc/slurm.conf" setsid "$bin" -D "$@" > "$DIR/log/$name.out" 2>&1 < /dev/null &
    record "$name" $! "$bin"
    wait_for "$name pid file" test -s "$pidfile"
    record "$name" "$(cat "$pidfile")" "$bin"
    log "$name pid $(cat "$pidfile")"
}

all_nodes_idle() {
    local got
    got=$(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | awk '$2=="idle"' | wc -l)
    [ "$got" -ge "$NODES" ]
}

on_start_exit() {  # a failed start stops whatever it already started (by recorded PID)
    local rc=$?
    if [ $rc -ne 0 ]; then
        [ -s "$DIR/munge/munged.pid" ] && ! [ -f "$DIR/pids/munged.pid" ] &&
            record munged "$(cat "$DIR/munge/munged.pid")" /usr/sbin/munged
        log "start failed (rc $rc): stopping what was started"
        do_stop || true
    fi
}

do_start() {
    [ -n "$DIR" ] || die "usage: $0 start DIR"
    [ "$(id -u)" = 0 ] || die "must run as root"
    for b in munged slurmctld slurmd slurmdbd mariadbd sbatch sacct; do
        command -v $b >/dev/null || [ -x /usr/sbin/$b ] || die "$b not installed (run: $0 install)"
    done
    local t0=$SECONDS n
    mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
    chmod 755 "$DIR"
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/log" "$DIR/run" "$DIR/pids"
    for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
    trap on_start_exit EXIT
    write_conf
    export SLURM_CONF="$DIR/etc/slurm.conf"
    ensure_hostnames
    start_munge
    start_mariadb
    start_slurm_daemon slurmdbd "$DIR/run/slurmdbd.pid" /usr/sbin/slurmdbd
    wait_for "slurmdbd port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
    start_slurm_daemon slurmctld "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld -i
    wait_for slurmctld scontrol ping
    for n in $(node_names); do start_slurm_daemon "slurmd-$n" "$DIR/run/slurmd-$n.pid" /usr/sbin/slurmd -N "$n"; done
    wait_for "$NODES idle node(s)" all_nodes_idle
    wait_for "cluster registered in slurmdbd" bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER"
    sinfo -N >&2
    trap - EXIT
    log "cluster ready in $((SECONDS - t0))s (SLURM_CONF=$SLURM_CONF)"
}

cluster_jobs() { SLURM_CONF="$DIR/etc/slurm.conf" squeue -h -o %i 2>/dev/null; }

stray_job_pids() {  # job processes of THIS cluster: slurmstepd and tasks carry our SLURM_CONF + a job id
    local p env
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        env=$( { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null ) || continue
        grep -qx "SLURM_CONF=$DIR/etc/slurm.conf" <<< "$env" || continue
        if grep -q '^SLURM_JOB_ID=' <<< "$env" || { tr '\0' ' ' < "/proc/$p/cmdline"; } 2>/dev/null | grep -q '^slurmstepd'; then
            echo "$p"
        fi
    done
}

do_stop() {
    [ -n "$DIR" ] && [ -d "$DIR/pids" ] || { log "nothing to stop"; return 0; }
    local f jobs t=0 strays
    DIR=$(cd "$DIR" && pwd)
    # cancel what is still queued/running, so that no slurmstepd outlives its slurmd
    if ours_alive slurmctld; then
        jobs=$(cluster_jobs | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            SLURM_CONF="$DIR/etc/slurm.conf" scancel $jobs 2>/dev/null || true
            while [ -n "$(cluster_jobs)" ] && [ $t -lt 80 ]; do sleep 0.25; t=$((t + 1)); done
        fi
    fi
    for f in "$DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && signal_one "$(basename "$f" .pid)"; done
    signal_one slurmctld
    for f in "$DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && reap_one "$(basename "$f" .pid)"; done
    reap_one slurmctld
    strays=$(stray_job_pids | tr '\n' ' ')
    if [ -n "${strays// /}" ]; then log "killing leftover job processes of this cluster: $strays"; kill -KILL $strays 2>/dev/null || true; fi
    signal_one slurmdbd; reap_one slurmdbd
    signal_one mariadbd; reap_one mariadbd
    signal_one munged; reap_one munged
    if grep -qF "$HOSTS_MARK:$DIR:" /etc/hosts; then
        local tmp; tmp=$(mktemp); grep -vF "$HOSTS_MARK:$DIR:" /etc/hosts > "$tmp" || true; cat "$tmp" > /etc/hosts
        rm -f "$tmp"
    fi
    log "stopped"
}

do_status() {
    local f name pid bin
    for f in "$DIR"/pids/*.pid; do
        [ -e "$f" ] || continue
        name=$(basename "$f" .pid); read -r pid bin < "$f"
        if ours_alive "$name"; then echo "$name $pid running"; else echo "$name $pid dead"; fi
    done
    SLURM_CONF="$DIR/etc/slurm.conf" sinfo -N 2>/dev/null || true
}

case "$ACTION" in
    install) shift; EXTRA_PACKAGES=("$@"); do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) die "usage: $0 install | start DIR | stop DIR | status DIR" ;;
esac
