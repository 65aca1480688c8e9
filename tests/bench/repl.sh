#!/usr/bin/env bash
# pairfs replication benchmark (a replicated pair on one machine, over loopback QUIC).
#
# Measures, in ONE run, with REPS repetitions per measurement (medians reported):
#
#   1. the foundation workloads of tests/bench/run.sh (lib.sh, shared) on a GlusterFS
#      replica-2 volume (both bricks on this host, same disk, FUSE client), on the
#      primary of a sync pair and of an async pair, and on a standalone node; goals:
#      sync/gluster >= 2x on each, and on seqwrite sync/async >= 0.8 (both nodes share
#      this machine's cores, so pair/standalone measures the machine: shown, no goal);
#   2. CPU: each node's CPU seconds per GiB around seqwrite (the daemons' own user +
#      system time from the write's start until the replica has it all: primary and
#      secondary separately; for gluster the client + first brick, and the second
#      brick), and the machine's busy time per GiB (steal excluded: the run's facts
#      say how much of the CPU the hypervisor gave to other guests); and, around
#      smallfiles, untar and fsync on a pair, each daemon's CPU microseconds and
#      context switches per journal entry (one entry per operation: what bounds
#      sync mode's operation rate, whatever the machine's speed);
#   3. lag: replication lag while writing LAG_MIB (3 GiB) with a plain dd at the
#      mount's full speed on an async pair whose max_lag is LAG_MAX_LAG (1s: writers
#      wait while the peer is further behind), sampling `pairfs status --json` of the
#      primary every LAG_INTERVAL (100 ms); median and max of lag_seconds and
#      lag_bytes over the steady state (from LAG_SKIP = 2 s after dd's start to its
#      end), and the time from dd's end until the pair has drained;
#   4. catchup: async pair in sync; SIGSTOP the secondary's daemon (link loss),
#      write CATCHUP_MIB (1 GiB) + fsync on the primary, SIGCONT, time until the
#      secondary's replica_received_seq reaches the primary's durable_seq and the pair
#      is back in state "pair"; throughput = backlog bytes / time, compared with
#      `pairfs bench-quic` run in the same rep (goal >= 0.7x);
#   5. wire: bytes on the wire (delta of the primary's wire_bytes_sent, and of the
#      secondary's wire_bytes_received as a cross-check) / bytes written by the
#      workload, measured around every write workload on a pair (goal <= 1.1 for
#      seqwrite and smallfiles).
#
# Targets (TARGETS; default all):
#   standalone  `pairfs mount --data` of a fresh volume, no peer
#   async       primary of a fresh pair, [replication] mode = "async"
#   sync        primary of a fresh pair, [replication] mode = "sync"
#   gluster     a fresh replica-2 GlusterFS volume mounted with mount -t glusterfs
#   async-base, sync-base
#               as async and sync, with the PAIRFS_BASE build (an A/B of two builds in
#               one run, interleaved within every rep; not in the default TARGETS)
#
# Workloads (WORKLOADS, space-separated; default all):
#   seqwrite    dd 1 GiB from /dev/zero, conv=fsync (+ CPU per GiB)     MiB/s      all targets
#   seqread     dd that file back to /dev/null with cold caches         MiB/s      all targets
#   smallfiles  create 10,000 x 4 KiB files in 100 dirs, then sync      files/s    all targets
#   untar       extract a real source tree (tar of TAR_SRC), then sync  entries/s  all targets
#   stat        lstat every entry of that tree with cold caches         entries/s  all targets
#   fsync       2,000 x (append 4 KiB + fsync) on one file              ops/s      all targets
#   lag         part 3 above                                                       async pair
#   catchup     part 4 above (runs `pairfs bench-quic` in every rep)               async pair
#
# "then sync" means: sync(1), then fsync() of the target's root directory (FUSE
# does not forward sync(2)/syncfs(2) to the daemon; see README §Durability).
#
# Every rep starts from fresh nodes (`pairfs init --force` of both data dirs, a
# new gluster volume).  On a pair, the workload starts only once the secondary
# has finished its initial copy and mounted, and the primary says state "pair"
# with nothing outstanding.  After every workload on a pair the script waits
# until the secondary has applied everything (a replica that makes no progress
# for STALL_TIMEOUT seconds counts as stuck), then checks that the secondary's
# read-only mount shows the same content as the primary's (cmp of the files,
# diff -r and a metadata listing of the trees).  Both nodes are then unmounted
# and checked with `pairfs fsck`; daemon exit codes, ERROR/panic lines and
# unexpected connection losses in the logs are reported as problems.  A workload
# that fails or hangs (WL_TIMEOUT) is recorded as FAIL and the run goes on; the
# exit status is then 1.
#
# Usage (as root):
#   tests/bench/repl.sh
#   REPS=1 WORKLOADS="seqwrite catchup" TARGETS="standalone async" tests/bench/repl.sh
#
# Results: tables on stdout, and in OUT: results-<stamp>.tsv (every measurement),
# summary-<stamp>.txt (the tables), results-<stamp>.json, problems-<stamp>.txt,
# and the logs of every daemon, status samples and failures under logs-<stamp>/.

set -euo pipefail

# ---------------------------------------------------------------- settings --

PAIRFS=${PAIRFS:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/pairfs}  # the pairfs binary
PAIRFS_BASE=${PAIRFS_BASE:-}                         # the *-base targets' pairfs binary
BENCH_DIR=${BENCH_DIR:-/var/tmp/pairfs-repl-bench}   # work dir, on the disk under test
OUT=${OUT:-/tmp/pairfs-repl-bench}                   # results dir
REPS=${REPS:-3}                                      # repetitions per workload and target
FOUNDATION_WORKLOADS="seqwrite seqread smallfiles untar stat fsync"
ALL_WORKLOADS="$FOUNDATION_WORKLOADS lag catchup"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
DEFAULT_TARGETS="standalone async sync gluster"
ALL_TARGETS="$DEFAULT_TARGETS async-base sync-base"
TARGETS=${TARGETS:-$DEFAULT_TARGETS}                     # for the foundation workloads
WL_TIMEOUT=${WL_TIMEOUT:-1800}                       # seconds before a workload counts as hung
KEEP=${KEEP:-0}                                      # 1: keep BENCH_DIR's contents at exit

PAIRFS_SIZE=${PAIRFS_SIZE:-8G}                       # volume of every node
PAIRFS_JOURNAL=${PAIRFS_JOURNAL:-2G}                 # journal of every node (1 GiB backlogs must fit)
JOURNAL_LIMIT=${JOURNAL_LIMIT:-}                     # [replication] journal_limit (empty: the default,
                                                     # half the journal)
CONGESTION=${CONGESTION:-}                           # [replication] congestion (empty: the default)
QUEUE_TARGET=${QUEUE_TARGET:-}                       # [replication] queue_target (empty: the default)
PAIRFS_INIT_ARGS=${PAIRFS_INIT_ARGS:-}               # e.g. "--block-size 16384"
PAIRFS_MOUNT_ARGS=${PAIRFS_MOUNT_ARGS:-}             # e.g. "--threads 8 --noatime" (both nodes)
PORT_A=${PORT_A:-17301}                              # QUIC ports of the pair on 127.0.0.1
PORT_B=${PORT_B:-17302}
COPY_TIMEOUT=${COPY_TIMEOUT:-120}                    # initial copy + secondary mount + first "pair"
STALL_TIMEOUT=${STALL_TIMEOUT:-30}                   # replica without progress this long: stuck
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-900}                  # cap on any wait for the replica

SEQ_MIB=${SEQ_MIB:-1024}                             # seqwrite/seqread file size
SMALL_FILES=${SMALL_FILES:-10000}
SMALL_DIRS=${SMALL_DIRS:-100}
SMALL_SIZE=${SMALL_SIZE:-4096}
TAR_SRC=${TAR_SRC:-/usr/include}                     # tree the untar/stat tarball is made of
FSYNC_OPS=${FSYNC_OPS:-2000}
FSYNC_SIZE=${FSYNC_SIZE:-4096}
LAG_MIB=${LAG_MIB:-3072}                             # lag: size of the sustained write
LAG_INTERVAL=${LAG_INTERVAL:-0.1}                    # lag: status sampling interval (s)
LAG_SKIP=${LAG_SKIP:-2}                              # lag: seconds skipped before the steady state
LAG_MAX_LAG=${LAG_MAX_LAG:-1s}                       # lag: [replication] max_lag of that pair
                                                     # (the other pairs keep the node default)
CATCHUP_MIB=${CATCHUP_MIB:-1024}                     # catchup: written while the secondary is stopped
QUIC_SECONDS=${QUIC_SECONDS:-5}                      # catchup: `pairfs bench-quic --seconds`

GLUSTER_HOST=${GLUSTER_HOST:-$(hostname -I 2>/dev/null | awk '{ print $1 }')}  # not a loopback address
GLUSTER_VOL=${GLUSTER_VOL:-pairfsbench}

STAMP=$(date +%Y%m%d-%H%M%S)
RAW=$OUT/results-$STAMP.tsv
FACTS=$OUT/facts-$STAMP.tsv
SUMMARY=$OUT/summary-$STAMP.txt
JSON=$OUT/results-$STAMP.json
PROBLEMS=$OUT/problems-$STAMP.txt
LOGS=$OUT/logs-$STAMP

# Paths inside BENCH_DIR.
BIN_MAIN=$BENCH_DIR/pairfs            # a copy of PAIRFS: the run is immune to rebuilds meanwhile
BIN_BASE=$BENCH_DIR/pairfs-base       # a copy of PAIRFS_BASE
BIN=$BIN_MAIN                         # the binary of the target being measured
TARBALL=$BENCH_DIR/src.tar
DATA_A=$BENCH_DIR/a                   # the primary (and the standalone node)
DATA_B=$BENCH_DIR/b                   # the secondary
CFG_A=$BENCH_DIR/a.toml
CFG_B=$BENCH_DIR/b.toml
MNT_A=$BENCH_DIR/mnt-a
MNT_B=$BENCH_DIR/mnt-b
GL_BRICKS=$BENCH_DIR/gluster
GL_MNT=$BENCH_DIR/mnt-gluster

# State of what this script started (empty when none is running).
PA_PID=                               # primary / standalone daemon
PB_PID=                               # secondary daemon
PAIR_MODE=                            # async | sync | standalone
MAX_LAG=                              # [replication] max_lag of the next pair (empty: default)
GL_MOUNTED=0
GL_VOL_CREATED=0
GLUSTERD_PID=                         # set only if this script started glusterd
GLUSTER_OK=0
GLUSTER_WHY=
WL_PID=
FAILURES=0

# ----------------------------------------------------------------- helpers --

# Helpers, python bits and the foundation workloads (shared with the other script).
# shellcheck source=tests/bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# problem CONTEXT LINE...: report loudly and keep for the end of the run.
problem() {
    local ctx=$1
    shift
    loud "$ctx: $1" "${@:2}"
    {
        printf '* %s: %s\n' "$ctx" "$1"
        local l
        for l in "${@:2}"; do printf '      %s\n' "$l"; done
    } >>"$PROBLEMS"
}

fsync_file() {
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.close(fd)' "$1"
}

# stop_daemon MNT PID: fusermount3 -u (or SIGTERM when it is not mounted yet),
# wait for the daemon to exit, escalate (SIGTERM, SIGKILL, lazy unmount) if it
# does not.  Leaves the daemon's exit status in UNMOUNT_RC.  (Not to be called
# in a $(...): only this shell can `wait` for its children.)
stop_daemon() {
    local mnt=$1 pid=$2 i
    UNMOUNT_RC=0
    [[ -n $pid ]] || return 0
    kill -CONT "$pid" 2>/dev/null || true
    if is_mounted "$mnt"; then
        for i in 1 2 3 4 5; do
            is_mounted "$mnt" || break
            fusermount3 -u "$mnt" 2>/dev/null && break
            sleep 1
        done
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
    if ! wait_gone "$pid" 60; then
        log "daemon $pid ($mnt) still running 60 s after unmount: SIGTERM"
        UNMOUNT_HUNG=1
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" 30; then
            log "daemon $pid ($mnt) ignores SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || UNMOUNT_RC=$?
    if is_mounted "$mnt"; then
        log "$mnt still mounted after its daemon exited: lazy unmount"
        fusermount3 -uz "$mnt" || true
    fi
}

# status CFG: one JSON line of `pairfs status --json` ("{}" if it fails).
status() { timeout 5 "$BIN" status --config "$1" --json 2>/dev/null || echo '{}'; }
# jf JSON FIELD: a field of a JSON object ("" if absent or null).
jf() { jq -r --arg k "$2" 'if .[$k] == null then "" else .[$k] | tostring end' <<<"$1" 2>/dev/null || true; }

# ------------------------------------------------------------ python bits --

# wait_replica PAIRFS CFG_A CFG_B T0 MIN_SEQ STALL CAP TRACE: poll both nodes
# every 50 ms until the primary is in state "pair", connected, and both the
# secondary's replica_received_seq (what it has applied) and the primary's view of it
# reach MIN_SEQ (MIN_SEQ 0:
# the primary's current durable_seq, with nothing committed but not durable and
# no lag).  Prints the seconds since T0.  Exits 1 when the replica made no
# progress (received seq, copy) for STALL seconds or CAP seconds have passed
# since T0, printing the last statuses on stderr.  Every poll goes to TRACE.
PY_WAIT_REPLICA='
import json, os, subprocess, sys, time
pairfs, cfg_a, cfg_b, t0, min_seq, stall, cap, trace = sys.argv[1:9]
t0, min_seq, stall, cap = float(t0), int(min_seq), float(stall), float(cap)
def status(cfg):
    try:
        r = subprocess.run([pairfs, "status", "--config", cfg, "--json"],
                           capture_output=True, text=True, timeout=3)
        return json.loads(r.stdout)
    except Exception:
        return None
trace = open(trace, "a")
ppid = os.getppid()
best, last_progress, sa, sb = None, time.time(), None, None
while os.getppid() == ppid:          # (ends with the script)
    now = time.time()
    sa, sb = status(cfg_a), status(cfg_b)
    trace.write(json.dumps({"t": now, "a": sa, "b": sb}) + "\n")
    if sa and sb:
        target = min_seq if min_seq > 0 else sa["durable_seq"]
        done = (sa["state"] == "pair" and sa["connected"] and sb["state"] == "pair"
                and sb["replica_received_seq"] >= target and sa["replica_received_seq"] >= target
                and (min_seq > 0 or (sa["committed_seq"] == sa["durable_seq"] and sa["lag_entries"] == 0)))
        if done:
            print("%.6f" % (time.time() - t0))
            sys.exit(0)
        # progress: the highest received seq / copy position seen so far grows
        # (the view of the primary drops to 0 while it is disconnected)
        key = (sb["replica_received_seq"], sa.get("copy_sent") or 0, sb.get("copy_sent") or 0)
        if best is None or any(k > b for k, b in zip(key, best)):
            best = key if best is None else tuple(max(k, b) for k, b in zip(key, best))
            last_progress = now
    if now - last_progress > stall or now - t0 > cap:
        why = "no progress for %.0f s" % (now - last_progress) if now - last_progress > stall else "still not done after %.0f s" % (now - t0)
        print("replica stuck: %s (target seq %s)" % (why, min_seq if min_seq > 0 else "durable"), file=sys.stderr)
        print("primary:   %s" % json.dumps(sa), file=sys.stderr)
        print("secondary: %s" % json.dumps(sb), file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
'

# wait_replica T0 MIN_SEQ CAP TRACE: PY_WAIT_REPLICA on this run's pair, in the
# background so that a signal to the script is handled at once.  Sets WAIT_T to
# the seconds since T0; returns 1 if the replica got stuck (why: TRACE.err).
wait_replica() {
    local rc=0
    python3 -c "$PY_WAIT_REPLICA" "$BIN" "$CFG_A" "$CFG_B" "$1" "$2" "$STALL_TIMEOUT" "$3" "$4" >"$4.out" 2>"$4.err" &
    WAITER_PID=$!
    wait "$WAITER_PID" || rc=$?
    WAITER_PID=
    WAIT_T=$(cat "$4.out")
    return "$rc"
}

# sampler PAIRFS CFG INTERVAL OUT: `pairfs status --json` every INTERVAL s into
# OUT (JSON lines {"t": wall time, "s": status}) until SIGTERM.
PY_SAMPLER='
import json, os, signal, subprocess, sys, time
pairfs, cfg, interval, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
ppid = os.getppid()
with open(out, "w") as f:
    nxt = time.time()
    while not stop and os.getppid() == ppid:
        t = time.time()
        try:
            r = subprocess.run([pairfs, "status", "--config", cfg, "--json"], capture_output=True, text=True, timeout=3)
            s = json.loads(r.stdout)
        except Exception:
            s = None
        f.write(json.dumps({"t": t, "t_end": time.time(), "s": s}) + "\n")
        f.flush()
        nxt += interval
        time.sleep(max(0.0, nxt - time.time()))
'

# lag_stats SAMPLES T_START T_END SKIP: steady-state lag figures, as metric lines.
PY_LAG_STATS='
import json, statistics, sys
path, t0, t1, skip = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(l) for l in open(path) if l.strip()]
steady = [r["s"] for r in rows if r["s"] and t0 + skip <= r["t"] <= t1]
allrun = [r["s"] for r in rows if r["s"] and t0 <= r["t"] <= t1]
if not steady:
    sys.exit("no status sample in the steady state (dd lasted %.1f s)" % (t1 - t0))
ls = [s["lag_seconds"] for s in steady]
lb = [s["lag_bytes"] for s in steady]
print("lag_s_median s %.3f" % statistics.median(ls))
print("lag_s_max s %.3f" % max(ls))
print("lag_MiB_median MiB %.1f" % (statistics.median(lb) / 1048576))
print("lag_MiB_max MiB %.1f" % (max(lb) / 1048576))
print("samples_steady n %d" % len(steady))
print("not_pair_samples n %d" % sum(1 for s in allrun if s["state"] != "pair" or not s["connected"]))
'

# tree_listing ROOT: type, mode, owner, size, links, mtime (ns) and target of
# every entry, sorted (to compare the primary's and the replica's metadata).
tree_listing() { (cd "$1" && find . -mindepth 1 -printf '%P\t%y\t%m\t%U:%G\t%s\t%n\t%T@\t%l\n' | LC_ALL=C sort); }

# ------------------------------------------------------------- standalone --

# setup_standalone: fresh volume mounted with --data (no peer).
setup_standalone() {
    mkdir -p "$MNT_A" || return 1
    LOG_A=$LOGP.log
    rm -rf "$DATA_A" # (`init --force` refuses to replace an existing identity.key)
    # shellcheck disable=SC2086 # word splitting of the *_ARGS is intended
    "$BIN" init --data "$DATA_A" --size "$PAIRFS_SIZE" --journal-size "$PAIRFS_JOURNAL" \
        $PAIRFS_INIT_ARGS --force >>"$LOG_A" 2>&1 || { log "pairfs init failed (see $LOG_A)"; return 1; }
    # shellcheck disable=SC2086
    "$BIN" mount --data "$DATA_A" $PAIRFS_MOUNT_ARGS "$MNT_A" >>"$LOG_A" 2>&1 &
    PA_PID=$!
    PAIR_MODE=standalone
    if ! wait_mounted "$MNT_A" "$PA_PID" "$LOG_A"; then
        teardown_standalone || true
        return 1
    fi
    TARGET_DIR=$MNT_A
}

# check_log CTX LOG: ERROR/panic lines are problems, WARN lines are shown.
check_log() {
    local ctx=$1 f=$2 ok=0
    if grep -Eq ' ERROR |panicked' "$f"; then
        problem "$ctx" "pairfs logged errors (log: $f)" "$(grep -E ' ERROR |panicked' "$f" | head -n 5)"
        ok=1
    fi
    if grep -q ' WARN ' "$f"; then
        log "$ctx: warnings in $f: $(grep ' WARN ' "$f" | head -n 3)"
        printf '%s\twarn\t%s\t%s\n' "$ctx" "$f" "$(grep ' WARN ' "$f" | head -n 1)" >>"$LOGS/warnings.tsv"
    fi
    return "$ok"
}

# fsck_node CTX DATA LOG
fsck_node() {
    if ! "$BIN" fsck --data "$2" >"$3.fsck" 2>&1; then
        problem "$1" "pairfs fsck of $2 is NOT clean (report: $3.fsck)" "$(head -n 20 "$3.fsck")"
        return 1
    fi
}

teardown_standalone() {
    [[ -n $PA_PID ]] || return 0
    local ok=0
    UNMOUNT_HUNG=0
    stop_daemon "$MNT_A" "$PA_PID"
    PA_PID=
    if [[ $UNMOUNT_RC != 0 || $UNMOUNT_HUNG == 1 ]]; then
        problem "$CTX" "standalone pairfs mount exited with status $UNMOUNT_RC (hung at unmount: $UNMOUNT_HUNG; log: $LOG_A)"
        ok=1
    fi
    check_log "$CTX" "$LOG_A" || ok=1
    fsck_node "$CTX" "$DATA_A" "$LOG_A" || ok=1
    return "$ok"
}

# ------------------------------------------------------------------- pair --

# write_config NAME PEER DATA LISTEN PEER_PORT ROLE PEER_FINGERPRINT MODE FILE
write_config() {
    cat >"$9" <<EOF
# written by tests/bench/repl.sh
name = "$1"
data = "$3"
listen = "127.0.0.1:$4"
role = "$6"

[peer]
name = "$2"
address = "127.0.0.1:$5"
fingerprint = "$7"

[replication]
mode = "$8"
EOF
    if [[ -n $JOURNAL_LIMIT ]]; then printf 'journal_limit = "%s"\n' "$JOURNAL_LIMIT" >>"$9"; fi
    if [[ -n $MAX_LAG ]]; then printf 'max_lag = "%s"\n' "$MAX_LAG" >>"$9"; fi
    if [[ -n $CONGESTION ]]; then printf 'congestion = "%s"\n' "$CONGESTION" >>"$9"; fi
    if [[ -n $QUEUE_TARGET ]]; then printf 'queue_target = "%s"\n' "$QUEUE_TARGET" >>"$9"; fi
}

# setup_pair MODE: two fresh nodes (a primary with an empty filesystem, b a blank
# secondary), both mounted; returns once the secondary has copied, mounted and
# the pair is in sync.
setup_pair() {
    local mode=$1 fa fb t0 t
    PAIR_MODE=$mode
    LOG_A=$LOGP.a.log
    LOG_B=$LOGP.b.log
    mkdir -p "$MNT_A" "$MNT_B" || return 1
    # Fresh nodes: a new identity each (`init --force` refuses to replace identity.key).
    rm -rf "$DATA_A" "$DATA_B"
    # shellcheck disable=SC2086
    "$BIN" init --data "$DATA_A" --size "$PAIRFS_SIZE" --journal-size "$PAIRFS_JOURNAL" --name a \
        $PAIRFS_INIT_ARGS --force >>"$LOG_A" 2>&1 || { log "pairfs init a failed (see $LOG_A)"; return 1; }
    # shellcheck disable=SC2086
    "$BIN" init --data "$DATA_B" --size "$PAIRFS_SIZE" --journal-size "$PAIRFS_JOURNAL" --name b --secondary \
        $PAIRFS_INIT_ARGS --force >>"$LOG_B" 2>&1 || { log "pairfs init b failed (see $LOG_B)"; return 1; }
    fa=$("$BIN" id --data "$DATA_A") && fb=$("$BIN" id --data "$DATA_B") || return 1
    write_config a b "$DATA_A" "$PORT_A" "$PORT_B" primary "$fb" "$mode" "$CFG_A"
    write_config b a "$DATA_B" "$PORT_B" "$PORT_A" secondary "$fa" "$mode" "$CFG_B"
    cp "$CFG_A" "$LOGP.a.toml"
    cp "$CFG_B" "$LOGP.b.toml"
    t0=$(now)
    # shellcheck disable=SC2086
    "$BIN" mount --config "$CFG_A" $PAIRFS_MOUNT_ARGS "$MNT_A" >>"$LOG_A" 2>&1 &
    PA_PID=$!
    # shellcheck disable=SC2086
    "$BIN" mount --config "$CFG_B" $PAIRFS_MOUNT_ARGS "$MNT_B" >>"$LOG_B" 2>&1 &
    PB_PID=$!
    if ! wait_mounted "$MNT_A" "$PA_PID" "$LOG_A" 20; then
        problem "$CTX" "primary did not mount (log: $LOG_A)" "$(tail -n 5 "$LOG_A")"
        teardown_pair >/dev/null || true
        return 1
    fi
    if ! wait_mounted "$MNT_B" "$PB_PID" "$LOG_B" "$COPY_TIMEOUT"; then
        problem "$CTX" "secondary not mounted $COPY_TIMEOUT s after start (initial copy?) (log: $LOG_B)" \
            "primary: $(status "$CFG_A")" "secondary: $(status "$CFG_B")" "$(tail -n 5 "$LOG_B")"
        teardown_pair >/dev/null || true
        return 1
    fi
    if ! wait_replica "$t0" 0 "$COPY_TIMEOUT" "$LOGP.wait-setup.jsonl"; then
        problem "$CTX" "fresh pair never reached state pair with nothing outstanding" "$(cat "$LOGP.wait-setup.jsonl.err")"
        teardown_pair >/dev/null || true
        return 1
    fi
    log "    pair ($mode) in sync $WAIT_T s after start"
    TARGET_DIR=$MNT_A
    REPLICA_DIR=$MNT_B
}

# conn_count: how many connections the primary has had (from its log).
conn_count() { grep -c 'connected to the peer' "$LOG_A" 2>/dev/null || true; }

# teardown_pair: stop both nodes (primary first), then fsck both and check logs.
teardown_pair() {
    [[ -n $PA_PID || -n $PB_PID ]] || return 0
    local ok=0 rc_a rc_b hung_a hung_b
    [[ -n $PB_PID ]] && kill -CONT "$PB_PID" 2>/dev/null || true
    UNMOUNT_HUNG=0
    stop_daemon "$MNT_A" "$PA_PID"
    rc_a=$UNMOUNT_RC hung_a=$UNMOUNT_HUNG
    PA_PID=
    UNMOUNT_HUNG=0
    stop_daemon "$MNT_B" "$PB_PID"
    rc_b=$UNMOUNT_RC hung_b=$UNMOUNT_HUNG
    PB_PID=
    if [[ $rc_a != 0 || $hung_a == 1 ]]; then
        problem "$CTX" "primary exited with status $rc_a (hung at unmount: $hung_a; log: $LOG_A)" "$(tail -n 3 "$LOG_A")"
        ok=1
    fi
    if [[ $rc_b != 0 || $hung_b == 1 ]]; then
        problem "$CTX" "secondary exited with status $rc_b (hung at unmount: $hung_b; log: $LOG_B)" "$(tail -n 3 "$LOG_B")"
        ok=1
    fi
    check_log "$CTX" "$LOG_A" || ok=1
    check_log "$CTX" "$LOG_B" || ok=1
    fsck_node "$CTX" "$DATA_A" "$LOG_A" || ok=1
    fsck_node "$CTX" "$DATA_B" "$LOG_B" || ok=1
    return "$ok"
}

# pair_losses CTX EXPECTED: report connection losses beyond EXPECTED, with the
# distinct reasons the transport logged.
pair_losses() {
    local ctx=$1 expected=$2 n
    n=$(grep -c 'connection to the peer lost' "$LOG_A" 2>/dev/null || true)
    if ((n > expected)); then
        problem "$ctx" "the primary lost its peer $n time(s) (expected $expected) (log: $LOG_A); distinct reasons:" \
            "$(grep -o 'closing connection code=[0-9]* reason=.*' "$LOG_A" | sort | uniq -c | sort -rn | head -n 5)"
    fi
}

# verify_replica CTX WL: the secondary's mount shows what the primary's shows.
verify_replica() {
    local ctx=$1 wl=$2 a=$MNT_A b=$MNT_B ok=0 f
    case $wl in
        seqwrite | seqread | lag | catchup)
            f=seq.bin
            cmp "$a/$f" "$b/$f" >"$LOGP.verify" 2>&1 || ok=1 ;;
        fsync)
            cmp "$a/fsync.bin" "$b/fsync.bin" >"$LOGP.verify" 2>&1 || ok=1 ;;
        *)
            diff -r --no-dereference "$a" "$b" >"$LOGP.verify" 2>&1 || ok=1 ;;
    esac
    if [[ $ok == 0 ]]; then
        tree_listing "$a" >"$LOGP.list-a"
        tree_listing "$b" >"$LOGP.list-b"
        diff "$LOGP.list-a" "$LOGP.list-b" >>"$LOGP.verify" 2>&1 || ok=2
    fi
    case $ok in
        0) log "    replica content identical" ;;
        1) problem "$ctx" "the secondary's mount differs from the primary's (content) ($LOGP.verify)" "$(head -n 8 "$LOGP.verify")" ;;
        2) problem "$ctx" "the secondary's mount differs from the primary's (metadata) ($LOGP.verify)" "$(head -n 8 "$LOGP.verify")" ;;
    esac
    return $((ok != 0))
}

# bytes_written WL: file bytes a workload writes (for the wire ratio).
bytes_written() {
    case $1 in
        seqwrite | seqread) echo $((SEQ_MIB * 1048576)) ;;
        smallfiles) echo $((SMALL_FILES * SMALL_SIZE)) ;;
        untar | stat) echo "$TAR_BYTES" ;;
        fsync) echo $((FSYNC_OPS * FSYNC_SIZE)) ;;
        *) echo 0 ;;
    esac
}

# -------------------------------------------------------------------- cpu --

# gl_pid PATTERN: the pid of the gluster process whose command line holds PATTERN.
gl_pid() {
    local pid
    for pid in $(pgrep glusterfs); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1"; then echo "$pid"; fi
    done
}

# node_pids KIND NODE: the processes of node 1 (where the writer runs: the standalone
# node, the primary, or gluster's FUSE client and first brick) or node 2 (the secondary,
# gluster's second brick).
node_pids() {
    case $1/$2 in
        standalone/1 | pair/1) echo "$PA_PID" ;;
        pair/2) echo "$PB_PID" ;;
        gluster/1) gl_pid " $GL_MNT"; gl_pid "brick-name $GL_BRICKS/b1 " ;;
        gluster/2) gl_pid "brick-name $GL_BRICKS/b2 " ;;
    esac
}

# cpu_snapshot KIND: "node1 node2 machine" CPU seconds so far (node2 "-" without one).
cpu_snapshot() {
    local n2=-
    [[ $1 == standalone ]] || n2=$(cpu_seconds $(node_pids "$1" 2))
    echo "$(cpu_seconds $(node_pids "$1" 1)) $n2 $(busy_seconds)"
}

# ctx_switches PID: context switches (voluntary and not) of all the process's threads.
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'; }

# entry_snapshot: "cpu1 cpu2 ctx1 ctx2" of a pair's two daemons so far.
entry_snapshot() {
    echo "$(cpu_seconds "$PA_PID") $(cpu_seconds "$PB_PID") $(ctx_switches "$PA_PID") $(ctx_switches "$PB_PID")"
}

# record_entry_cost BEFORE AFTER ENTRIES: each daemon's CPU microseconds and context
# switches per journal entry (what one operation costs a sync pair, whatever the
# machine's speed: the predictors of two real hosts for the one-entry-per-operation
# workloads).
record_entry_cost() {
    local b a names=(us_per_entry_node1 us_per_entry_node2 ctx_per_entry_node1 ctx_per_entry_node2) i v scale
    read -ra b <<<"$1"
    read -ra a <<<"$2"
    ((${3:-0} > 0)) || return 0
    for i in 0 1 2 3; do
        scale=1; ((i < 2)) && scale=1000000
        v=$(awk -v x="${b[i]}" -v y="${a[i]}" -v n="$3" -v k="$scale" 'BEGIN { printf "%.2f", (y - x) * k / n }')
        record "$wl" "$target" "$rep" "${names[i]}" "$v" "$( ((i < 2)) && echo us || echo n)"
    done
    log "    per entry ($3 entries): $(awk -v x="${b[0]}" -v y="${a[0]}" -v n="$3" 'BEGIN { printf "%.0f", (y - x) * 1e6 / n }') us on the primary"
}

# record_cpu BEFORE AFTER BYTES: CPU seconds per GiB written, of each node and of the
# whole machine, from two cpu_snapshot lines (uses run_one's wl, target, rep).
record_cpu() {
    local b a names=(cpu_node1 cpu_node2 cpu_machine) i v shown=
    read -ra b <<<"$1"
    read -ra a <<<"$2"
    for i in 0 1 2; do
        [[ ${b[i]} == - ]] && continue
        v=$(awk -v x="${b[i]}" -v y="${a[i]}" -v n="$3" 'BEGIN { printf "%.3f", (y - x) / (n / 1073741824) }')
        record "$wl" "$target" "$rep" "${names[i]}" "$v" s/GiB
        shown="$shown ${names[i]}=$v"
    done
    log "    CPU s/GiB:$shown"
}

# ---------------------------------------------------------------- gluster --

# gluster_init: install and start glusterd once per run; on failure GLUSTER_WHY
# says why (with the commands and their output) and the gluster target is skipped.
gluster_init() {
    local glog=$LOGS/gluster-setup.log
    : >"$glog"
    gl_try() {
        printf '$ %s\n' "$*" >>"$glog"
        "$@" >>"$glog" 2>&1
    }
    if ! command -v gluster >/dev/null || ! command -v glusterd >/dev/null; then
        log "installing glusterfs-server"
        gl_try apt-get update -qq || true
        if ! gl_try apt-get install -y -qq glusterfs-server; then
            GLUSTER_WHY="apt-get install -y glusterfs-server failed: $(tail -n 3 "$glog")"
            return 1
        fi
    fi
    [[ -n $GLUSTER_HOST ]] || { GLUSTER_WHY="no non-loopback address for the bricks (hostname -I is empty)"; return 1; }
    if ! pgrep -x glusterd >/dev/null; then
        if [[ $(ps -p 1 -o comm=) == systemd ]] && gl_try systemctl start glusterd; then
            :
        else
            gl_try glusterd --log-level INFO || { GLUSTER_WHY="glusterd failed to start: $(tail -n 3 "$glog")"; return 1; }
            sleep 2
            GLUSTERD_PID=$(pgrep -xo glusterd || true)
            [[ -n $GLUSTERD_PID ]] || { GLUSTER_WHY="glusterd exited right after start (see /var/log/glusterfs/glusterd.log)"; return 1; }
        fi
    fi
    local i
    for i in $(seq 1 20); do
        gl_try gluster --mode=script peer status && break
        sleep 0.5
    done
    gl_try gluster --mode=script volume info "$GLUSTER_VOL" && gl_try gluster --mode=script volume stop "$GLUSTER_VOL" force || true
    gl_try gluster --mode=script volume delete "$GLUSTER_VOL" || true
    GLUSTER_OK=1
}

setup_gluster() {
    local glog=$LOGP.log
    [[ $GLUSTER_OK == 1 ]] || { echo "gluster unavailable: $GLUSTER_WHY" >>"$glog"; return 1; }
    rm -rf "$GL_BRICKS" && mkdir -p "$GL_BRICKS/b1" "$GL_BRICKS/b2" "$GL_MNT" || return 1
    {
        echo "\$ gluster volume create $GLUSTER_VOL replica 2 $GLUSTER_HOST:$GL_BRICKS/b1 $GLUSTER_HOST:$GL_BRICKS/b2 force"
        gluster --mode=script volume create "$GLUSTER_VOL" replica 2 \
            "$GLUSTER_HOST:$GL_BRICKS/b1" "$GLUSTER_HOST:$GL_BRICKS/b2" force
    } >>"$glog" 2>&1 || { log "gluster volume create failed (see $glog)"; return 1; }
    GL_VOL_CREATED=1
    { echo "\$ gluster volume start $GLUSTER_VOL"; gluster --mode=script volume start "$GLUSTER_VOL"; } >>"$glog" 2>&1 \
        || { log "gluster volume start failed (see $glog)"; teardown_gluster || true; return 1; }
    { echo "\$ mount -t glusterfs $GLUSTER_HOST:/$GLUSTER_VOL $GL_MNT"; mount -t glusterfs "$GLUSTER_HOST:/$GLUSTER_VOL" "$GL_MNT"; } >>"$glog" 2>&1 \
        || { log "gluster mount failed (see $glog)"; teardown_gluster || true; return 1; }
    GL_MOUNTED=1
    is_mounted "$GL_MNT" || { log "gluster mount did not appear"; teardown_gluster || true; return 1; }
    TARGET_DIR=$GL_MNT
}

teardown_gluster() {
    local glog=${LOGP:-$LOGS/gluster}.log ok=0 i
    if [[ $GL_MOUNTED == 1 ]]; then
        for i in 1 2 3 4 5; do
            is_mounted "$GL_MNT" || break
            umount "$GL_MNT" >>"$glog" 2>&1 && break
            sleep 1
        done
        is_mounted "$GL_MNT" && { umount -l "$GL_MNT" >>"$glog" 2>&1 || true; ok=1; }
        GL_MOUNTED=0
    fi
    if [[ $GL_VOL_CREATED == 1 ]]; then
        gluster --mode=script volume stop "$GLUSTER_VOL" force >>"$glog" 2>&1 || ok=1
        gluster --mode=script volume delete "$GLUSTER_VOL" >>"$glog" 2>&1 || ok=1
        GL_VOL_CREATED=0
    fi
    rm -rf "$GL_BRICKS"
    return "$ok"
}

# At exit: stop whatever is still running, unmount, and clean BENCH_DIR.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $WL_PID ]]; then
        pkill -TERM -P "$WL_PID" 2>/dev/null || true
        kill -TERM "$WL_PID" 2>/dev/null || true
        wait "$WL_PID" 2>/dev/null || true
    fi
    if [[ -n ${WAITER_PID:-} ]]; then kill -TERM "$WAITER_PID" 2>/dev/null || true; fi
    if [[ -n $PB_PID ]]; then kill -CONT "$PB_PID" 2>/dev/null || true; fi
    if [[ -n $PA_PID ]]; then stop_daemon "$MNT_A" "$PA_PID" || true; fi
    if [[ -n $PB_PID ]]; then stop_daemon "$MNT_B" "$PB_PID" || true; fi
    LOGP=$LOGS/cleanup teardown_gluster || true
    if [[ -n $GLUSTERD_PID ]]; then
        kill -TERM "$GLUSTERD_PID" 2>/dev/null || true
        wait_gone "$GLUSTERD_PID" 20 || true
    fi
    if [[ $KEEP != 1 && -d $BENCH_DIR ]]; then
        if ! is_mounted "$MNT_A" && ! is_mounted "$MNT_B"; then
            rm -rf "$DATA_A" "$DATA_B" "$MNT_A" "$MNT_B" "$CFG_A" "$CFG_B"
        fi
        is_mounted "$GL_MNT" || rm -rf "$GL_MNT" "$GL_BRICKS"
        rm -f "$TARBALL" "$BIN"
        rmdir "$BENCH_DIR" 2>/dev/null || true
    fi
    exit "$rc"
}

# --------------------------------------------------------------- workloads --
# Each wl_* takes the target directory, runs in a subshell with `set -e`, and
# prints one line per metric: "NAME UNIT VALUE".  The foundation ones are
# in lib.sh, shared with run.sh.

# lag (async pair): a sustained plain dd of LAG_MIB while sampling the primary.
wl_lag() {
    local dir=$1 t0 t1 sampler t
    python3 -c "$PY_SAMPLER" "$BIN" "$CFG_A" "$LAG_INTERVAL" "$LOGP.samples.jsonl" &
    sampler=$!
    sleep 0.5
    t0=$(now)
    dd if=/dev/zero of="$dir/seq.bin" bs=1M count="$LAG_MIB" status=none
    t1=$(now)
    echo "dd_write MiB/s $(rate "$LAG_MIB" "$(secs "$t0" "$t1")")"
    # The drain: from dd's end until the replica has applied all that is durable
    # and nothing committed is outstanding (the dd's last writes are committed
    # within the commit interval).
    if wait_replica "$t1" 0 "$DRAIN_TIMEOUT" "$LOGP.wait-drain.jsonl"; then
        echo "drain_after_dd s $WAIT_T"
    else
        echo "drain_after_dd s STUCK"
        cat "$LOGP.wait-drain.jsonl.err" >&2
    fi
    kill -TERM "$sampler" 2>/dev/null || true
    wait "$sampler" || true
    python3 -c "$PY_LAG_STATS" "$LOGP.samples.jsonl" "$t0" "$t1" "$LAG_SKIP"
}

# catchup (async pair): link loss by SIGSTOP of the secondary, backlog, resume.
wl_catchup() {
    local dir=$1 q s t0 t1 t target lagb lage st
    q=$("$BIN" bench-quic --seconds "$QUIC_SECONDS" 2>>"$LOGP.quic.log" | tee -a "$LOGP.quic.log" |
        sed -n 's/^quic loopback: \([0-9.]*\) MiB\/s.*/\1/p')
    [[ -n $q ]] || { echo "pairfs bench-quic printed no figure (see $LOGP.quic.log)" >&2; return 1; }
    echo "quic_loopback MiB/s $q"
    kill -STOP "$PB_PID"
    t0=$(now)
    for ((t = 0; t < 150; t++)); do
        [[ $(jf "$(status "$CFG_A")" connected) == false ]] && break
        sleep 0.1
    done
    t1=$(now)
    echo "peer_loss_detected s $(secs "$t0" "$t1")"
    t0=$(now)
    dd if=/dev/zero of="$dir/seq.bin" bs=1M count="$CATCHUP_MIB" conv=fsync status=none
    t1=$(now)
    echo "write_peer_away MiB/s $(rate "$CATCHUP_MIB" "$(secs "$t0" "$t1")")"
    s=$(status "$CFG_A")
    echo "$s" >"$LOGP.before-resume.json"
    target=$(jf "$s" durable_seq)
    lagb=$(jf "$s" lag_bytes)
    lage=$(jf "$s" lag_entries)
    st=$(jf "$s" state)
    echo "backlog MiB $(awk -v b="$lagb" 'BEGIN { printf "%.1f", b / 1048576 }')"
    echo "backlog_entries n $lage"
    [[ $st == suspended ]] || echo "primary in state '$st' (not suspended) before SIGCONT: $s" >&2
    t0=$(now)
    kill -CONT "$PB_PID"
    if wait_replica "$t0" "$target" "$DRAIN_TIMEOUT" "$LOGP.wait-catchup.jsonl"; then
        t=$WAIT_T
        echo "catchup_time s $t"
        echo "catchup MiB/s $(awk -v b="$lagb" -v t="$t" 'BEGIN { printf "%.2f", b / 1048576 / t }')"
        echo "catchup_vs_quic ratio $(awk -v b="$lagb" -v t="$t" -v q="$q" 'BEGIN { printf "%.3f", b / 1048576 / t / q }')"
    else
        echo "catchup_time s STUCK"
        cat "$LOGP.wait-catchup.jsonl.err" >&2
    fi
}

# ------------------------------------------------------------------ driver --

record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"; }

# run_one WORKLOAD TARGET REP: set up, run (with a watchdog), check the replica,
# tear down, record.
run_one() {
    local wl=$1 target=$2 rep=$3 res rc=0 deadline metric unit value kind s0a s0b s1a s1b c0 c1 t written cpu0= ent0 ent1
    LOGP=$LOGS/$wl-$target-$rep
    CTX="$wl/$target rep $rep"
    res=$LOGP.out
    log "$wl / $target / rep $rep"

    MAX_LAG=
    [[ $wl == lag ]] && MAX_LAG=$LAG_MAX_LAG
    BIN=$BIN_MAIN
    [[ $target == *-base ]] && BIN=$BIN_BASE
    case $target in
        standalone) kind=standalone ;;
        async | sync | async-base | sync-base) kind=pair ;;
        gluster) kind=gluster ;;
    esac
    local ok=0
    case $kind in
        standalone) setup_standalone || ok=1 ;;
        pair) setup_pair "${target%-base}" || ok=1 ;;
        gluster) setup_gluster || ok=1 ;;
    esac
    if [[ $ok != 0 ]]; then
        if [[ $kind == gluster && $GLUSTER_OK != 1 ]]; then
            record "$wl" "$target" "$rep" FAIL - "gluster unavailable"
        else
            problem "$CTX" "setup failed (logs: $LOGP.*)"
            record "$wl" "$target" "$rep" FAIL - setup
            FAILURES=$((FAILURES + 1))
        fi
        return 0
    fi

    if [[ $kind == pair ]]; then
        s0a=$(status "$CFG_A")
        s0b=$(status "$CFG_B")
        c0=$(conn_count)
        ent0=$(entry_snapshot)
    fi

    # CPU per GiB: around the sequential write, until the replica has it too.
    [[ $wl == seqwrite ]] && cpu0=$(cpu_snapshot "$kind")

    # The workload runs in a background subshell with errexit on, so that any
    # failing command ends it; the watchdog kills the daemon if it hangs.
    (set -e; "wl_$wl" "$TARGET_DIR") >"$res" 2>"$res.err" &
    WL_PID=$!
    deadline=$((SECONDS + WL_TIMEOUT))
    while kill -0 "$WL_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$WL_PID" 2>/dev/null; then
        problem "$CTX" "still running after $WL_TIMEOUT s; killing the daemon" "$(tail -n 3 "$res.err")"
        [[ -n $PB_PID ]] && kill -CONT "$PB_PID" 2>/dev/null || true
        if [[ $kind != gluster && -n $PA_PID ]]; then kill -KILL "$PA_PID" 2>/dev/null || true; fi
        if [[ $kind == gluster ]]; then umount -l "$GL_MNT" 2>/dev/null || true; fi
        sleep 2
        pkill -KILL -P "$WL_PID" 2>/dev/null || true
        kill -KILL "$WL_PID" 2>/dev/null || true
        echo "timeout after $WL_TIMEOUT s" >>"$res.err"
    fi
    wait "$WL_PID" || rc=$?
    WL_PID=

    if [[ $rc == 0 && -s $res ]]; then
        while read -r metric unit value; do
            if [[ $value == STUCK ]]; then
                problem "$CTX" "$metric: the replica got stuck (no progress for $STALL_TIMEOUT s) (logs: $LOGP.*)" \
                    "$(tail -n 3 "$res.err")" "primary log: $(grep -o 'closing connection code=[0-9]* reason=.*' "$LOG_A" | sort | uniq -c | sort -rn | head -n 3)"
                record "$wl" "$target" "$rep" FAIL - "$metric stuck"
                FAILURES=$((FAILURES + 1))
                continue
            fi
            record "$wl" "$target" "$rep" "$metric" "$value" "$unit"
            log "    $metric = $value $unit"
        done <"$res"
        if [[ -s $res.err ]]; then log "    stderr: $(head -n 3 "$res.err")"; fi
        if [[ -n $cpu0 && $kind != pair ]]; then record_cpu "$cpu0" "$(cpu_snapshot "$kind")" "$(bytes_written "$wl")"; fi
    else
        problem "$CTX" "workload FAILED (status $rc)" "$(tail -n 5 "$res.err")"
        record "$wl" "$target" "$rep" FAIL - "status-$rc"
        FAILURES=$((FAILURES + 1))
    fi

    # On a pair: wait for the replica, measure the wire, compare the mounts.
    if [[ $kind == pair && $rc == 0 ]] && grep -q ' STUCK$' "$res"; then
        # the workload's own wait found the replica stuck: do not wait again
        record "$wl" "$target" "$rep" FAIL - "replica never caught up"
        { echo "== primary"; ls -la "$MNT_A"; echo "== secondary"; timeout 10 ls -la "$MNT_B"; } >"$LOGP.replica-view" 2>&1 || true
        log "    replica shows: $(timeout 10 find "$MNT_B" -mindepth 1 -maxdepth 1 -printf '%P (%s B) ' 2>&1 | head -c 300)"
        pair_losses "$CTX" "$([[ $wl == catchup ]] && echo 1 || echo 0)"
    elif [[ $kind == pair && $rc == 0 ]]; then
        t0=$(now)
        if wait_replica "$t0" 0 "$DRAIN_TIMEOUT" "$LOGP.wait-final.jsonl"; then
            record "$wl" "$target" "$rep" replica_wait "$WAIT_T" s
            if [[ -n $cpu0 ]]; then record_cpu "$cpu0" "$(cpu_snapshot "$kind")" "$(bytes_written "$wl")"; fi
            ent1=$(entry_snapshot)
            s1a=$(status "$CFG_A")
            case $wl in
                smallfiles | untar | fsync)
                    record_entry_cost "$ent0" "$ent1" $(($(jf "$s1a" committed_seq) - $(jf "$s0a" committed_seq))) ;;
            esac
            s1b=$(status "$CFG_B")
            c1=$(conn_count)
            written=$(bytes_written "$wl")
            if [[ $wl == lag || $wl == catchup ]]; then
                :
            elif [[ $c1 != "$c0" ]]; then
                log "    wire: the connection was re-established during the workload ($c0 -> $c1 connections): per-connection counters reset, no wire figure"
                record "$wl" "$target" "$rep" FAIL - "wire: reconnected"
            elif ((written > 0)); then
                local ws wr
                ws=$(($(jf "$s1a" wire_bytes_sent) - $(jf "$s0a" wire_bytes_sent)))
                wr=$(($(jf "$s1b" wire_bytes_received) - $(jf "$s0b" wire_bytes_received)))
                record "$wl" "$target" "$rep" wire_sent/written "$(awk -v a="$ws" -v b="$written" 'BEGIN { printf "%.4f", a / b }')" ratio
                record "$wl" "$target" "$rep" wire_recv/written "$(awk -v a="$wr" -v b="$written" 'BEGIN { printf "%.4f", a / b }')" ratio
                log "    wire: primary sent $ws B, secondary received $wr B, for $written B written"
            fi
            verify_replica "$CTX" "$wl" || { record "$wl" "$target" "$rep" FAIL - "replica differs"; FAILURES=$((FAILURES + 1)); }
        else
            problem "$CTX" "the replica did not catch up after the workload (logs: $LOGP.*)" "$(cat "$LOGP.wait-final.jsonl.err")" \
                "primary log: $(grep -o 'closing connection code=[0-9]* reason=.*' "$LOG_A" | sort | uniq -c | sort -rn | head -n 3)"
            record "$wl" "$target" "$rep" FAIL - "replica never caught up"
            FAILURES=$((FAILURES + 1))
            # what the replica shows meanwhile (it must be a consistent prefix)
            { echo "== primary"; ls -la "$MNT_A"; echo "== secondary"; timeout 10 ls -la "$MNT_B"; } >"$LOGP.replica-view" 2>&1 || true
            log "    replica shows: $(timeout 10 find "$MNT_B" -mindepth 1 -maxdepth 1 -printf '%P (%s B) ' 2>&1 | head -c 300)"
        fi
        pair_losses "$CTX" "$([[ $wl == catchup ]] && echo 1 || echo 0)"
    fi

    if ! "teardown_$kind"; then
        record "$wl" "$target" "$rep" FAIL - "teardown/fsck"
        FAILURES=$((FAILURES + 1))
    fi
}

print_facts() {
    {
        machine_facts "$BIN"
        if [[ -n $PAIRFS_BASE ]]; then
            printf 'pairfs_base\t%s (built %s, sha256 %.12s)\n' "$PAIRFS_BASE" \
                "$(date -r "$PAIRFS_BASE" -Iseconds)" "$(sha256sum "$PAIRFS_BASE" | cut -d' ' -f1)"
        fi
        printf 'pairfs_nodes\tvolume %s, journal %s, journal_limit %s, congestion %s %s, init args: %s, mount args: %s, ports %s/%s\n' \
            "$PAIRFS_SIZE" "$PAIRFS_JOURNAL" "$JOURNAL_LIMIT" "${CONGESTION:-(default)}" "${QUEUE_TARGET:-(default target)}" "${PAIRFS_INIT_ARGS:-(none)}" "${PAIRFS_MOUNT_ARGS:-(none)}" "$PORT_A" "$PORT_B"
        if [[ $GLUSTER_OK == 1 ]]; then
            printf 'gluster\t%s; replica 2, bricks %s:%s/b{1,2}, FUSE client\n' \
                "$(gluster --version 2>/dev/null | head -n 1)" "$GLUSTER_HOST" "$GL_BRICKS"
        elif [[ " $TARGETS " == *" gluster "* ]]; then
            printf 'gluster\tUNAVAILABLE: %s\n' "$GLUSTER_WHY"
        fi
        printf 'reps\t%s\n' "$REPS"
        printf 'workloads\t%s\n' "$WORKLOADS"
        printf 'targets\t%s\n' "$TARGETS"
        printf 'tarball\t%s: %s entries (%s regular files, %s bytes of file data), %s MiB\n' "$TAR_SRC" "$TAR_ENTRIES" \
            "$TAR_FILES" "$TAR_BYTES" "$(($(stat -c %s "$TARBALL") / 1048576))"
        printf 'other_load\t%s\n' "$(uptime | sed 's/.*load average/load average/')"
    } >"$FACTS"
    show_facts
}

# summarize: medians, ratios against the goals, the tables, the JSON.
summarize() {
    python3 - "$RAW" "$FACTS" "$SUMMARY" "$JSON" "$WORKLOADS" "$PROBLEMS" <<'EOF'
import json, os, statistics, sys
raw, facts_path, summary_path, json_path, order, problems_path = sys.argv[1:7]
order = order.split()
rows = [l.rstrip("\n").split("\t") for l in open(raw) if l.strip()]
facts = dict(l.rstrip("\n").split("\t", 1) for l in open(facts_path) if "\t" in l)

data, units, fails, keys = {}, {}, {}, []
for wl, target, rep, metric, value, unit in rows:
    if metric == "FAIL":
        fails.setdefault(wl, []).append("%s rep %s: %s" % (target, rep, unit))
        continue
    k = (wl, metric)
    if k not in units:
        keys.append(k)
        units[k] = unit
    data.setdefault(k, {}).setdefault(target, []).append(float(value))
keys.sort(key=lambda k: (order.index(k[0]) if k[0] in order else 99))

targets = ["standalone", "async", "sync", "gluster"] + [t for t in ("async-base", "sync-base")
                                                     if any(r[1] == t for r in rows)]
def stat(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "values": v} if v else None
summary = []
for k in keys:
    e = {"workload": k[0], "metric": k[1], "unit": units[k]}
    for t in targets:
        e[t] = stat(data[k].get(t))
    summary.append(e)
S = {(e["workload"], e["metric"]): e for e in summary}

def num(x):
    return "%.3f" % x if abs(x) < 10 else "%.1f" % x if abs(x) < 1000 else "%.0f" % x
def cell(e, t):
    s = e[t]
    if not s:
        return "-"
    if s["n"] == 1:
        return "%s (1 rep)" % num(s["median"])
    return "%s [%s-%s]" % (num(s["median"]), num(s["min"]), num(s["max"]))
def med(wl, metric, t):
    e = S.get((wl, metric))
    return e[t]["median"] if e and e[t] else None

out = []
p = out.append
if "steal" in facts:
    p("steal: %s" % facts["steal"])
p("== results: medians of up to %s reps [min-max] (rates: higher is better) ==" % facts.get("reps", "?"))
base = [t for t in ("async", "sync") if t + "-base" in targets]
head = (["workload", "metric", "unit"] + targets + ["sync/gluster", "async/gluster", "async/standalone", "sync/standalone"]
        + ["%s/%s-base" % (t, t) for t in base])
table = [head]
for e in summary:
    def r(a, b):
        x, y = e[a], e[b]
        return "%.2f" % (x["median"] / y["median"]) if x and y and y["median"] else "-"
    ratios = [r("sync", "gluster"), r("async", "gluster"), r("async", "standalone"), r("sync", "standalone")]
    if e["unit"] in ("ratio", "s", "MiB", "n", "us", "s/GiB") or e["metric"].startswith("fsync_p"):
        ratios = ["-"] * 4   # not rates: no throughput ratio
    ratios += [r(t, t + "-base") for t in base]   # the A/B: any metric
    table.append([e["workload"], e["metric"], e["unit"]] + [cell(e, t) for t in targets] + ratios)
w = [max(len(row[i]) for row in table) for i in range(len(head))]
for i, row in enumerate(table):
    p("  " + "  ".join(c.ljust(w[j]) if j < 3 else c.rjust(w[j]) for j, c in enumerate(row)))
    if i == 0:
        p("  " + "  ".join("-" * x for x in w))

# The goals of the brief.
goals = []
def goal(name, value, op, bound, note=""):
    if value is None:
        goals.append([name, "-", "%s %s" % (op, bound), "NOT MEASURED", (note + "; " if note else "") + "no valid figure: see FAILURES"])
        return
    met = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    goals.append([name, "%.3f" % value, "%s %s" % (op, bound), "yes" if met else "NO", note])
def ratio(a, b):
    return a / b if a is not None and b else None
sw = lambda t: med("seqwrite", "write", t)
goal("1  seqwrite sync/async", ratio(sw("sync"), sw("async")), ">=", 0.8,
     "async/standalone %s, sync/standalone %s (the machine, not goals)" % tuple(
         (lambda v: "%.2f" % v if v is not None else "-")(ratio(sw(t), sw("standalone"))) for t in ("async", "sync")))
goal("3  lag_seconds, steady-state median", med("lag", "lag_s_median", "async"), "<", 1.0, "s")
goal("3  lag_seconds, steady-state max", med("lag", "lag_s_max", "async"), "<", 1.0, "s")
goal("3  drain after dd's end", med("lag", "drain_after_dd", "async"), "<", 1.0, "s (no goal set; shown against 1 s)")
goal("4  catch-up / bench-quic", med("catchup", "catchup_vs_quic", "async"), ">=", 0.7,
     "catch-up %s MiB/s, quic %s MiB/s" % tuple(num(x) if x is not None else "-" for x in
                                             (med("catchup", "catchup", "async"), med("catchup", "quic_loopback", "async"))))
for wl in ("seqwrite", "smallfiles"):
    for t in ("async", "sync"):
        goal("5  wire sent/written, %s, %s" % (wl, t), med(wl, "wire_sent/written", t), "<=", 1.1,
             "secondary received/written: %s" % (lambda v: "%.3f" % v if v is not None else "-")(med(wl, "wire_recv/written", t)))
metric_of = {"seqwrite": "write", "seqread": "read", "smallfiles": "create", "untar": "extract", "stat": "lstat", "fsync": "fsync"}
for wl, m in metric_of.items():
    if wl in order:
        goal("1  %s sync/gluster" % wl, ratio(med(wl, m, "sync"), med(wl, m, "gluster")), ">=", 2.0,
             "async/gluster %s" % (lambda v: "%.2f" % v if v is not None else "-")(ratio(med(wl, m, "async"), med(wl, m, "gluster"))))
p("")
p("== CPU seconds per GiB written, seqwrite (node 1: the writer's node: standalone, primary,")
p("   gluster client + brick 1; node 2: secondary, gluster brick 2; machine: all busy time) ==")
for t in targets:
    v = [med("seqwrite", m, t) for m in ("cpu_node1", "cpu_node2", "cpu_machine")]
    if any(x is not None for x in v):
        p("  %-10s  node1 %s  node2 %s  machine %s" % ((t,) + tuple(num(x) if x is not None else "-" for x in v)))
p("")
p("== goals ==")
gh = ["goal", "value", "target", "met?", "note"]
gt = [gh] + goals
gw = [max(len(r[i]) for r in gt) for i in range(len(gh))]
for i, row in enumerate(gt):
    p("  " + "  ".join(c.ljust(gw[j]) for j, c in enumerate(row)))
    if i == 0:
        p("  " + "  ".join("-" * x for x in gw))
if fails:
    p("")
    p("FAILURES (per workload):")
    for wl, f in fails.items():
        for x in f:
            p("  %s: %s" % (wl, x))
if os.path.exists(problems_path) and os.path.getsize(problems_path):
    p("")
    p("PROBLEMS (details in %s):" % problems_path)
    for l in open(problems_path):
        if l.startswith("* "):
            p("  " + l.rstrip())
text = "\n".join(out)
print(text)
open(summary_path, "w").write(text + "\n")
with open(json_path, "w") as f:
    json.dump({"facts": facts, "summary": summary, "goals": goals, "failures": fails,
               "raw": [dict(zip(["workload", "target", "rep", "metric", "value", "unit"], r)) for r in rows]},
              f, indent=1)
EOF
}

main() {
    [[ $EUID == 0 ]] || die "run as root (mounts, drop_caches, SIGSTOP of the daemons)"
    [[ -x $PAIRFS ]] || die "no pairfs binary at $PAIRFS (cargo build --release -p pairfs-cli)"
    local w t
    for w in $WORKLOADS; do
        [[ " $ALL_WORKLOADS " == *" $w "* ]] || die "unknown workload '$w' (known: $ALL_WORKLOADS)"
    done
    for t in $TARGETS; do
        [[ " $ALL_TARGETS " == *" $t "* ]] || die "unknown target '$t' (known: $ALL_TARGETS)"
        [[ $t != *-base || -x $PAIRFS_BASE ]] || die "target $t needs PAIRFS_BASE, a pairfs binary"
    done
    if ! command -v fusermount3 >/dev/null || ! command -v jq >/dev/null; then
        log "installing fuse3 and jq"
        apt-get update -qq && apt-get install -y -qq fuse3 jq >/dev/null
    fi
    command -v python3 >/dev/null || die "python3 is required"
    local m p
    for m in "$MNT_A" "$MNT_B" "$GL_MNT"; do
        is_mounted "$m" && die "$m is already mounted (another run?)"
    done
    for p in "$PORT_A" "$PORT_B"; do
        if ss -Hlun "sport = :$p" 2>/dev/null | grep -q .; then die "UDP port $p is in use (set PORT_A/PORT_B)"; fi
    done

    mkdir -p "$BENCH_DIR" "$OUT" "$LOGS"
    : >"$PROBLEMS"
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
    cp "$PAIRFS" "$BIN_MAIN"
    if [[ -n $PAIRFS_BASE ]]; then cp "$PAIRFS_BASE" "$BIN_BASE"; fi

    tar cf "$TARBALL" -C "$(dirname "$TAR_SRC")" "$(basename "$TAR_SRC")"
    TAR_ENTRIES=$(tar tf "$TARBALL" | grep -c .)
    TAR_FILES=$(tar tvf "$TARBALL" | grep -c '^-')
    TAR_BYTES=$(tar tvf "$TARBALL" | awk '/^-/ { s += $3 } END { print s + 0 }')

    if [[ " $TARGETS " == *" gluster "* ]]; then
        if ! gluster_init; then
            problem "gluster" "GlusterFS cannot be used: $GLUSTER_WHY (log: $LOGS/gluster-setup.log)"
        fi
    fi

    print_facts
    : >"$RAW"
    local rep
    # (Names of their own: the workloads' functions set t0 and friends without `local`.)
    RUN_STEAL0=$(steal_seconds)
    RUN_T0=$(now)
    for w in $WORKLOADS; do
        for ((rep = 1; rep <= REPS; rep++)); do
            case $w in
                lag | catchup) run_one "$w" async "$rep" ;;
                *) for t in $TARGETS; do run_one "$w" "$t" "$rep"; done ;;
            esac
        done
    done

    # A machine whose hypervisor takes its CPUs away measures less than it can do.
    printf 'steal\t%s of the CPU time during the run went to other guests\n' \
        "$(awk -v a="$RUN_STEAL0" -v b="$(steal_seconds)" -v t="$(secs "$RUN_T0" "$(now)")" -v n="$(nproc)" \
            'BEGIN { printf "%.1f %%", 100 * (b - a) / (t * n) }')" >>"$FACTS"
    echo
    summarize
    echo
    echo "raw: $RAW"
    echo "summary: $SUMMARY"
    echo "json: $JSON"
    echo "problems: $PROBLEMS"
    echo "logs: $LOGS"
    if ((FAILURES > 0)); then
        loud "$FAILURES failure(s); see above, $PROBLEMS and $LOGS"
        exit 1
    fi
}

main "$@"
