#!/usr/bin/env bash
# Bring up (or stop, or inspect) a one-node SLURM cluster on 127.0.0.1 for masking_bench's `slurm` tests.
#
#   bash scripts/slurm-local-up.sh [up|down|status]        default: up; every action is idempotent
#                                                          (status exits 3 when a needed daemon is stopped)
#
# What `up` does, in order (each step is skipped when already in the wanted state):
#   1. apt: munge, slurmctld, slurmd, slurm-client, plus slurmdbd and mariadb-server for accounting
#      (Debian 12: Slurm 22.05). `sacct` must work: submitit learns job states from it.
#   2. writes /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf; node CPUs and memory come from
#      `slurmd -C`. When a file changes, the running slurm daemons are restarted.
#   3. starts munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd by hand (package scripts may not:
#      /usr/sbin/policy-rc.d exits 101 on these machines, and PID 1 is not systemd),
#   4. checks: node idle, `srun hostname`, `sacct` answers.
# `down` cancels queued jobs and stops the five daemons (each by the PID in its pidfile only).
#
# Environment:
#   SLURM_LOCAL_ACCOUNTING=0   no MariaDB/slurmdbd (lighter, but `sacct` fails and submitit cannot see
#                              cancelled jobs end; the masking_bench slurm tests need the default 1)
#   SLURM_LOCAL_NODENAME=NAME  node name (default: the short hostname if it resolves to 127.x, else localhost)
#
# Settings chosen for fast tests (measured on Debian 12, 2 cores, see docs/slurm.md):
#   AuthInfo=cred_expire=10            a requeued job may start again after ~11 s (default ~121 s)
#   batch_sched_delay=0                new batch jobs start at once (default: up to 3 s later)
#   sched_interval=2                   a requeued job starts as soon as its BeginTime passes
#   KillWait=5                         scancel / scontrol requeue kill a job after 5 s, not 30 s
#   CR_Core                            memory is not a scheduled resource: jobs share the node
#   proctrack/linuxproc, task/none     no cgroup features needed
# Loopback only: jobs run as the submitting user (root in CI) and the database password is a throwaway.
set -Eeuo pipefail

action=${1:-up}
want_acct=${SLURM_LOCAL_ACCOUNTING:-1}
slurm_conf=/etc/slurm/slurm.conf
dbd_conf=/etc/slurm/slurmdbd.conf
db_pass=masking-bench-local   # throwaway, the database only listens on localhost
t_begin=$(date +%s.%N)

say()  { echo "slurm-local-up: $*"; }
fail() { echo "slurm-local-up: ERROR: $*" >&2; exit 1; }
trap 'fail "line $LINENO: \`$BASH_COMMAND\` failed"' ERR
elapsed() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1fs", t1 - t0 }'; }

# alive PIDFILE COMM: the pidfile names a live process whose command name is COMM
alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# poll SECONDS PIDFILE COMM CMD...: wait until CMD succeeds; give up early if the daemon died
poll() {
  local secs=$1 pidfile=$2 comm=$3 tries=0
  shift 3
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 20 ] && [ "$pidfile" != - ] && ! alive "$pidfile" "$comm"; then return 2; fi
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# halt PIDFILE COMM: SIGTERM exactly that process, SIGKILL it after 20 s, then drop the pidfile
# (slurmctld and slurmdbd leave theirs behind, and a stale /run/slurmctld.pid breaks `apt-get remove`)
halt() {
  local pidfile=$1 comm=$2 pid
  if ! alive "$pidfile" "$comm"; then
    rm -f "$pidfile"
    [ "$action" != down ] || say "$comm: not running"
    return 0
  fi
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$comm (pid $pid) still alive after 20 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidfile"
  say "$comm: stopped (pid $pid)"
}

daemons="munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid slurmdbd:/run/slurmdbd.pid slurmctld:/run/slurmctld.pid slurmd:/run/slurmd.pid"

[ "$(id -u)" = 0 ] || fail "run me as root (apt-get, /etc/slurm and the daemons need it)"

case "$action" in
  status)   # exit 0 when every daemon the cluster needs runs, 3 otherwise
    stopped=0
    for d in $daemons; do
      if alive "${d#*:}" "${d%%:*}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
      else
        echo "${d%%:*}: stopped"
        case "${d%%:*}" in mariadbd|slurmdbd) [ "$want_acct" = 1 ] && stopped=1 ;; *) stopped=1 ;; esac
      fi
    done
    if command -v sinfo >/dev/null && alive /run/slurmctld.pid slurmctld; then sinfo; fi
    [ "$stopped" = 0 ] || exit 3
    exit 0 ;;
  down)
    if command -v squeue >/dev/null && alive /run/slurmctld.pid slurmctld; then
      queued=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
      if [ -n "${queued// /}" ]; then say "cancelling jobs: $queued"; scancel $queued || true; sleep 2; fi
    fi
    for d in $(echo "$daemons" | tr ' ' '\n' | tac); do halt "${d#*:}" "${d%%:*}"; done
    say "down in $(elapsed "$t_begin")"
    exit 0 ;;
  up) ;;
  *) fail "unknown action '$action': use up, down or status" ;;
esac

# ------------------------------------------------------------------------------------ 1. packages
step=$(date +%s.%N)
packages="munge slurmctld slurmd slurm-client"
[ "$want_acct" = 1 ] && packages="$packages slurmdbd mariadb-server"
absent=""
for p in $packages; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || absent="$absent $p"
done
if [ -n "$absent" ]; then
  say "installing:$absent"
  aptlog=/var/log/slurm-local-up-apt.log
  export DEBIAN_FRONTEND=noninteractive
  # empty package lists (fresh image): update first; otherwise only when the install fails
  if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then apt-get update -q >"$aptlog" 2>&1 || true; fi
  # shellcheck disable=SC2086
  if ! apt-get install -y -q --no-install-recommends $absent >>"$aptlog" 2>&1; then
    say "install failed, refreshing the package lists and retrying"
    apt-get update -q >>"$aptlog" 2>&1 || fail "apt-get update failed, see $aptlog"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $absent >>"$aptlog" 2>&1 \
      || fail "apt-get install$absent failed, see $aptlog"
  fi
fi
say "packages ready: $(slurmctld -V) ($(elapsed "$step"))"

# ------------------------------------------------------------------------------------ 2. configuration
step=$(date +%s.%N)
node=${SLURM_LOCAL_NODENAME:-}
if [ -z "$node" ]; then
  node=$(hostname -s)
  getent ahostsv4 "$node" 2>/dev/null | awk '$1 ~ /^127\./ {found=1} END {exit !found}' || node=localhost
fi
hw=$(slurmd -C | head -n 1)
cpus=$(grep -o ' CPUs=[0-9]*' <<<"$hw" | cut -d= -f2 || true)
realmem=$(grep -o ' RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2 || true)
[ -n "$cpus" ] && [ -n "$realmem" ] || fail "cannot read CPUs/RealMemory from 'slurmd -C': $hw"

install -d -m 0755 /etc/slurm /var/spool/slurmd
install -d -m 0755 -o slurm -g slurm /var/spool/slurmctld /var/log/slurm

if [ "$want_acct" = 1 ]; then
  accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  accounting="AccountingStorageType=accounting_storage/none"
fi

changed=0
# put_if_changed MODE OWNER FILE: install stdin as FILE when its content differs
put_if_changed() {
  local mode=$1 owner=$2 dest=$3 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if cmp -s "$tmp" "$dest"; then rm -f "$tmp"; return 0; fi
  install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$dest"
  rm -f "$tmp"
  changed=1
  say "wrote $dest"
}

put_if_changed 0644 root:root "$slurm_conf" <<EOF
# Written by masking_bench scripts/slurm-local-up.sh: one node on loopback, tuned for fast requeue.
ClusterName=localcluster
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CryptoType=crypto/munge
# credential lifetime; also how long a requeued job is held before it may start again (+1 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
${accounting}
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${realmem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

if [ "$want_acct" = 1 ]; then
  put_if_changed 0600 slurm:slurm "$dbd_conf" <<EOF
# Written by masking_bench scripts/slurm-local-up.sh
AuthType=auth/munge
DbdHost=${node}
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=${db_pass}
StorageLoc=slurm_acct_db
EOF
fi
say "configuration: node $node, $cpus CPUs, $realmem MB ($(elapsed "$step"))"
if [ "$changed" = 1 ]; then   # daemons started with an older configuration must re-read it
  halt /run/slurmd.pid slurmd
  halt /run/slurmctld.pid slurmctld
  halt /run/slurmdbd.pid slurmdbd
fi

# ------------------------------------------------------------------------------------ 3. munge
step=$(date +%s.%N)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0600 /etc/munge/munge.key
fi
if ! alive /run/munge/munged.pid munged; then
  install -d -m 0755 -o munge -g munge /run/munge
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start, see /var/log/munge/munged.log"
fi
poll 10 /run/munge/munged.pid munged sh -c 'munge -n | unmunge' || fail "munge cannot encode/decode a credential"
say "munged running ($(elapsed "$step"))"

# ------------------------------------------------------------------------------------ 4. accounting
if [ "$want_acct" = 1 ]; then
  step=$(date +%s.%N)
  if ! alive /run/mysqld/mysqld.pid mariadbd; then
    install -d -m 0755 -o mysql -g mysql /run/mysqld
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      </dev/null >>/var/log/slurm/mariadbd.console.log 2>&1 &
  fi
  poll 30 /run/mysqld/mysqld.pid mariadbd mariadb-admin ping \
    || fail "mariadbd is not answering: $(tail -n 3 /var/log/slurm/mariadbd.console.log)"
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${db_pass}';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${db_pass}';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
              FLUSH PRIVILEGES;" || fail "cannot create the accounting database in mariadb"
  alive /run/slurmdbd.pid slurmdbd || /usr/sbin/slurmdbd \
    || fail "slurmdbd did not start: $(tail -n 5 /var/log/slurm/slurmdbd.log)"
  poll 30 /run/slurmdbd.pid slurmdbd bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' \
    || fail "slurmdbd is not listening on 6819: $(tail -n 3 /var/log/slurm/slurmdbd.log)"
  say "mariadbd + slurmdbd running ($(elapsed "$step"))"
fi

# ------------------------------------------------------------------------------------ 5. slurmctld, slurmd
step=$(date +%s.%N)
alive /run/slurmctld.pid slurmctld || /usr/sbin/slurmctld \
  || fail "slurmctld did not start: $(tail -n 5 /var/log/slurm/slurmctld.log)"
poll 30 /run/slurmctld.pid slurmctld sh -c 'scontrol ping | grep -q "is UP"' \
  || fail "slurmctld is not answering: $(tail -n 3 /var/log/slurm/slurmctld.log)"
if ! alive /run/slurmd.pid slurmd; then
  /usr/sbin/slurmd -N "$node" || fail "slurmd did not start: $(tail -n 5 /var/log/slurm/slurmd.log)"
fi
node_usable() { sinfo -h -n "$node" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
if ! poll 30 - - node_usable; then
  # a node left DOWN/DRAINED by an earlier crash comes back with RESUME
  scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
  poll 10 - - node_usable || fail "node $node unusable: $(scontrol show node "$node" | grep -E 'State=|Reason=' | xargs)"
fi
say "slurmctld + slurmd running, node $node $(sinfo -h -n "$node" -o %T) ($(elapsed "$step"))"

# ------------------------------------------------------------------------------------ 6. checks
step=$(date +%s.%N)
out=$(timeout 60 srun -N 1 -n 1 -t 1 hostname 2>&1) || fail "srun hostname failed: $out"
if [ "$want_acct" = 1 ]; then
  poll 30 - - sh -c 'sacct -n -X -S now-1days -o JobID | grep -q .' || fail "sacct lists no job: $(sacct 2>&1 | tail -n 2)"
fi
say "srun and sacct answer ($(elapsed "$step"))"
say "cluster up in $(elapsed "$t_begin"): $(sinfo -h -o '%P %a %D %T %N')"
