#!/usr/bin/env bash
# scripts/local_slurm.sh start|stop|status - a single-node SLURM cluster on localhost.
#
# Lets you try the cluster path (`python run.py -m hardware=slurm_local ...`) on one machine, and
# is what .ci/run starts before the tests. Debian/Ubuntu, run as root, no systemd needed.
#
#   start   installs what is missing (apt-get: slurmctld slurmd slurm-client munge slurmdbd
#           mariadb-server), writes the configuration, starts munged (unless one already runs),
#           a private MariaDB + slurmdbd (accounting: `sacct` works and jobs that die are noticed),
#           slurmctld and slurmd; waits until the node is idle and a test job ran. Idempotent.
#   stop    cancels the cluster's jobs and stops exactly the daemons `start` started, by the PIDs
#           it recorded (a munged that was already running stays up).
#   status  the daemons and their PIDs, and `sinfo`; exit status 0 when the cluster answers.
#
# Everything it writes lives under the state directory (spool, logs, database, PID files), except
# /etc/slurm/slurm.conf + slurmdbd.conf (where the SLURM commands look) and munge's key. It will not
# overwrite a slurm.conf it did not write (a real cluster's).
#
# Settings (environment):
#   FIRSTSIGHT_SLURM_STATE      state directory                         (default /tmp/firstsight-slurm)
#   FIRSTSIGHT_SLURM_CPUS       CPUs the node advertises; may exceed the real count, so more
#                               one-CPU jobs run at once                   (default: nproc)
#   FIRSTSIGHT_SLURM_PARTITION  partition name (conf/hardware/slurm_local.yaml uses it) (default local)
#   FIRSTSIGHT_SLURM_DB_PORT    TCP port of the private MariaDB           (default 3307)
#   FIRSTSIGHT_SLURM_WAIT_S     seconds to wait for each daemon / the node (default 60)
#
# Logs: $STATE/log/{slurmctld,slurmd,slurmdbd,mariadbd}.log. Jobs' own logs: see the sweep's
# .submitit/ folder.
set -euo pipefail

STATE=${FIRSTSIGHT_SLURM_STATE:-/tmp/firstsight-slurm}
NCPUS=${FIRSTSIGHT_SLURM_CPUS:-$(nproc)}
PARTITION=${FIRSTSIGHT_SLURM_PARTITION:-local}
DB_PORT=${FIRSTSIGHT_SLURM_DB_PORT:-3307}
WAIT_S=${FIRSTSIGHT_SLURM_WAIT_S:-60}
CLUSTER=firstsight
MARKER="# written by firstsight scripts/local_slurm.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_PASS=firstsight-slurm
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log()  { echo "[local_slurm $(date +%T)] $*" >&2; }
die()  { log "error: $*"; exit 1; }
pidfile() { echo "$STATE/pids/$1.pid"; }
# alive <name>: the PID recorded for <name> runs a process of that name (guards against PID reuse)
alive() {
  local f pid; f=$(pidfile "$1"); [ -s "$f" ] || return 1; pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ]
}
wait_for() {  # wait_for <seconds> <cmd...>
  local t=$1; shift
  for _ in $(seq 1 $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_state() { sinfo -h -N -o %t 2>/dev/null | head -1; }
node_up() { case "$(node_state)" in idle|mix|alloc) return 0;; esac; return 1; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
db() { mariadb --socket="$STATE/mysql-run/mysqld.sock" -u root "$@"; }
# until <pid> <seconds> <cmd...>: wait for <cmd> to succeed while process <pid> lives
until_up() {
  local pid=$1 t=$2; shift 2
  for _ in $(seq 1 $((t * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
show_log() { [ -f "$1" ] && tail -20 "$1" >&2; return 0; }

install_packages() {
  local missing="" p added_policy=0
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null || die "missing packages:$missing, and no apt-get to install them"
  log "installing:$missing"
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep apt from starting the system's own services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1
  fi
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

write_slurm_conf() {
  local mem node new
  node=$(hostname -s)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p'); mem=$((mem - mem / 20))
  new=$(cat <<EOF
$MARKER (state: $STATE)
ClusterName=$CLUSTER
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
# start jobs in ~1 s instead of ~3 s
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it every job gets the whole node's memory and jobs run one at a time
DefMemPerCPU=1024
# a request the partition cannot satisfy fails at sbatch instead of pending forever
EnforcePartLimits=ALL
# the node may advertise more CPUs than it has (FIRSTSIGHT_SLURM_CPUS)
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
# accounting: sacct, and submitit notices jobs that die without a result instead of waiting forever
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$NCPUS Sockets=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
)
  if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARKER"; then
    die "$CONF exists and was not written by this script (a real cluster's?); not overwriting it"
  fi
  mkdir -p /etc/slurm
  if [ "$(cat "$CONF" 2>/dev/null)" != "$new" ]; then
    printf '%s\n' "$new" > "$CONF"
    local d
    for d in slurmd slurmctld; do  # daemons we started run the old configuration: restart them
      if alive "$d"; then log "configuration changed: restarting $d"; stop_one "$d"; fi
    done
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  if (munge -n | unmunge) >/dev/null 2>&1; then return 0; fi  # ours from an earlier start, or the system's
  runuser -u munge -- /usr/sbin/munged   # daemonizes, writes /run/munge/munged.pid
  wait_for "$WAIT_S" bash -c 'munge -n | unmunge' || { show_log /var/log/munge/munged.log; die "munged did not start"; }
  cp /run/munge/munged.pid "$(pidfile munged)"
}

start_mariadb() {
  alive mariadbd && return 0
  install -d -o mysql -g mysql "$STATE/mysql" "$STATE/mysql-run"
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || { show_log "$STATE/log/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
    --socket="$STATE/mysql-run/mysqld.sock" --pid-file="$STATE/mysql-run/mysqld.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --innodb-lock-wait-timeout=900 \
    >"$STATE/log/mariadbd.log" 2>&1 </dev/null &
  echo $! > "$(pidfile mariadbd)"
  until_up "$!" "$WAIT_S" db -e "SELECT 1" || { show_log "$STATE/log/mariadbd.log"; die "mariadbd did not start"; }
  db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
         CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  cat > "$DBD_CONF" <<EOF
$MARKER (state: $STATE)
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm "$DBD_CONF"; chmod 600 "$DBD_CONF"
  if ! alive slurmdbd; then
    rm -f "$STATE/run/slurmdbd.pid"
    /usr/sbin/slurmdbd   # daemonizes, writes its PidFile
    wait_for "$WAIT_S" port_open 6819 || { show_log "$STATE/log/slurmdbd.log"; die "slurmdbd did not start"; }
    wait_for 5 test -s "$STATE/run/slurmdbd.pid"
    cp "$STATE/run/slurmdbd.pid" "$(pidfile slurmdbd)"
  fi
  sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
}

start_slurm_daemon() {  # start_slurm_daemon slurmctld|slurmd
  local d=$1
  alive "$d" && return 0
  rm -f "$STATE/run/$d.pid"
  "/usr/sbin/$d"   # daemonizes, writes its PidFile
  wait_for "$WAIT_S" test -s "$STATE/run/$d.pid" || { show_log "$STATE/log/$d.log"; die "$d did not start"; }
  cp "$STATE/run/$d.pid" "$(pidfile "$d")"
  if [ "$d" = slurmctld ]; then
    wait_for "$WAIT_S" scontrol ping || { show_log "$STATE/log/slurmctld.log"; die "slurmctld does not answer"; }
  fi
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
  local t0; t0=$(date +%s%N)
  install_packages
  install -d -m 755 "$STATE" "$STATE/pids" "$STATE/spool"
  install -d -o slurm -g slurm -m 755 "$STATE/log" "$STATE/run" "$STATE/spool/slurmctld"
  install -d -m 755 "$STATE/spool/slurmd"
  write_slurm_conf
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm_daemon slurmctld
  start_slurm_daemon slurmd
  local node; node=$(hostname -s)
  for _ in $(seq 1 $((WAIT_S * 10))); do
    node_up && break
    case "$(node_state)" in
      down*|drain*|drng*|fail*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
  done
  node_up || { sinfo -R >&2; show_log "$STATE/log/slurmctld.log"; show_log "$STATE/log/slurmd.log"; die "node not idle after ${WAIT_S}s"; }
  srun -t 1 true || die "a test job (srun true) failed"
  log "cluster '$CLUSTER' up in $(ms_since "$t0") ms: partition $PARTITION, $NCPUS CPUs, state $STATE"
  sinfo
}

stop_all() {  # stop_all <name>...: TERM the PIDs recorded for these names together, then KILL stragglers
  local name pid f pids=""
  for name in "$@"; do
    f=$(pidfile "$name")
    if alive "$name"; then pid=$(cat "$f"); kill -TERM "$pid"; pids="$pids $name:$pid"; fi
    rm -f "$f"
  done
  for entry in $pids; do
    name=${entry%%:*}; pid=${entry##*:}
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid"; fi
    log "stopped $name (pid $pid)"
  done
}
stop_one() { stop_all "$1"; }

cmd_stop() {
  if alive slurmctld; then  # cancel remaining jobs, so no job step outlives slurmd
    local ids; ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  stop_all slurmd slurmctld
  stop_all slurmdbd
  stop_all mariadbd munged
  return 0
}

cmd_status() {
  local d up=0
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    if alive "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"), started by this script)"
    else echo "$d: not started by this script"; fi
  done
  if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then sinfo; node_up && up=1; fi
  [ "$up" = 1 ] && { echo "cluster: up (state $STATE)"; return 0; }
  echo "cluster: not up"; return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status  (see the comment at the top of this file)" >&2; exit 2 ;;
esac
