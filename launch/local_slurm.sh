#!/usr/bin/env bash
# A real single-node SLURM on this Debian machine (as root, no systemd): munge, a private MariaDB,
# slurmdbd (so sacct works), slurmctld and slurmd, for the launcher's tests and for trying the launcher.
#
#   launch/local_slurm.sh start    install what is missing, configure, start (idempotent: running = no-op)
#   launch/local_slurm.sh stop     cancel its jobs, stop the daemons it started (pid files), nothing else
#   launch/local_slurm.sh status   which of its daemons run, and sinfo
#
# Partitions: `low` (default; PriorityTier 1, its jobs are requeued when preempted, GraceTime 30 s for the
# trainer's stop-and-save) and `high` (PriorityTier 10): a job in `high` preempts one in `low`. The node
# advertises 4 CPUs whatever the machine has, so 4-task jobs run on 2 cores. Every start is a fresh cluster
# (job state and accounting wiped); state lives in $PIXELFLOW_SLURM_DIR (default /var/tmp/pixelflow-slurm).
# Exit status 3: SLURM cannot be installed or started here (the log says why).
set -euo pipefail
STATE="${PIXELFLOW_SLURM_DIR:-/var/tmp/pixelflow-slurm}"
RUN="$STATE/run"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by pixelflow launch/local_slurm.sh"
HOST="$(hostname)"
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"  # stop order

die() { echo "local_slurm: $*" >&2; exit 3; }

running() {  # running NAME: its pid file names a live process of that name
  local pidfile="$RUN/$1.pid" pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local seconds="$1" what="$2"
  shift 2
  for _ in $(seq $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up within ${seconds}s (logs in $STATE/log)"
}

install() {
  local missing=""
  for tool in munged slurmctld slurmd slurmdbd sbatch sacct mariadbd mariadb-install-db; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  [ -z "$missing" ] && return 0
  [ "$(id -u)" = 0 ] || die "needs root to install:$missing"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get to install:$missing"
  echo "local_slurm: installing munge, slurm and mariadb (missing:$missing)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q munge slurmctld slurmd slurm-client slurmdbd mariadb-server; } \
    >"/tmp/pixelflow-slurm-install.log" 2>&1 || die "apt-get install failed (see /tmp/pixelflow-slurm-install.log)"
}

configure() {
  for file in "$CONF" "$DBD_CONF"; do
    if [ -f "$file" ] && ! grep -q "^$MARK" "$file"; then
      die "$file exists and was not written by this script: not touching a real cluster's config"
    fi
  done
  local layout memory
  layout="$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=.*//' -e 's/CPUs=[0-9]*/CPUs=4/' \
    -e 's/CoresPerSocket=[0-9]*/CoresPerSocket=4/' -e 's/ThreadsPerCore=[0-9]*/ThreadsPerCore=1/' \
    -e 's/SocketsPerBoard=[0-9]*/SocketsPerBoard=1/' -e 's/Boards=[0-9]*/Boards=1/')"
  memory="$(slurmd -C | head -1 | sed -e 's/.*RealMemory=\([0-9]*\).*/\1/')"
  mkdir -p /etc/slurm
  cat >"$CONF" <<EOF
$MARK
ClusterName=pixelflow
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST NodeAddr=127.0.0.1 $layout RealMemory=$((memory * 9 / 10)) State=UNKNOWN
PartitionName=low Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  cat >"$DBD_CONF" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBD_CONF"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  touch "$RUN/munged.pid" && chown munge "$RUN/munged.pid"
  runuser -u munge -- /usr/sbin/munged --force --pid-file="$RUN/munged.pid"
  wait_for 10 munged munge -n
}

start_mariadb() {
  mariadb-install-db --no-defaults --user=root --datadir="$STATE/db" --auth-root-authentication-method=socket \
    >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
  setsid mariadbd --no-defaults --user=root --datadir="$STATE/db" --port=3307 --bind-address=127.0.0.1 \
    --socket="$RUN/mysqld.sock" --pid-file="$RUN/mariadbd.pid" --log-error="$STATE/log/mariadb.log" \
    </dev/null >/dev/null 2>&1 &
  wait_for 30 mariadb mariadb --no-defaults --socket="$RUN/mysqld.sock" -e "SELECT 1"
  mariadb --no-defaults --socket="$RUN/mysqld.sock" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
  if running slurmctld && running slurmd && running slurmdbd; then
    echo "local_slurm: already running"
    return 0
  fi
  install
  stop_daemons  # whatever half of ours is left from an interrupted start
  rm -rf "$STATE/spool" "$STATE/db"
  mkdir -p "$RUN" "$STATE/log" "$STATE/spool/ctld" "$STATE/spool/d"
  configure
  running munged || start_munge
  start_mariadb
  slurmdbd || die "slurmdbd failed to start (see $STATE/log/slurmdbd.log)"
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster pixelflow >/dev/null 2>&1 || true
  slurmctld -c || die "slurmctld failed to start (see $STATE/log/slurmctld.log)"
  wait_for 30 slurmctld scontrol ping
  slurmd || die "slurmd failed to start (see $STATE/log/slurmd.log)"
  wait_for 60 "an idle node" bash -c "sinfo -h -o %T | grep -qx idle"
  echo "local_slurm: running (partitions low, high; state in $STATE)"
}

stop_daemons() {
  local name pid
  for name in $DAEMONS; do
    if running "$name"; then
      pid="$(cat "$RUN/$name.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
      [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/$name.pid"
  done
}

stop() {
  if running slurmctld; then
    scancel --full --quiet "--clusters=pixelflow" --state=PENDING,RUNNING,SUSPENDED,REQUEUED 2>/dev/null || true
    scancel --full --quiet 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -t all -o %i 2>/dev/null | head -1)" ] && break; sleep 0.2; done
  fi
  stop_daemons
  echo "local_slurm: stopped"
}

status() {
  local name state=0
  for name in $DAEMONS; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; state=1; fi
  done
  running slurmctld && sinfo
  return $state
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
