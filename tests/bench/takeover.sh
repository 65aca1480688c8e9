#!/usr/bin/env bash
# pairfs takeover benchmark (issue 10; docs/PROTOCOL.md §7, README §Takeover).
#
# Two hosts on one machine, as in tests/takeover.rs: node a (the primary) on this host,
# node b (the secondary) in a network namespace of its own (`nsenter --net`, its mount
# visible here), joined by a veth pair.  For every case the pair is built afresh (new
# netns, `pairfs init` of both nodes, the secondary's initial copy), the link is cut
# (`ip link set IF down`), a backlog of BACKLOG MiB is written on a's mount and fsync'ed,
# the link comes back limited to RATE (`tc qdisc ... tbf` on a's side: a -> b, the
# direction of the drain and of the fetched blocks), and once the pair streams again (a's
# replica_received_seq passes what it was before the cut) b takes over.
#
# Measures, in ONE run, with REPS repetitions (medians reported):
#
#   1. ready: from starting `pairfs takeover --json` on b to the first successful
#      4 KiB write + fsync of a new file on b's mount (a python helper times both; a
#      write refused before the node is writable is tried again every ms), for every
#      backlog of BACKLOGS (MiB); also pairfs's own figure (the `seconds` of its JSON),
#      the command's wall time, the backlog it reported, and the fetches from the old
#      primary status counts right after the probe (fetches_by_ready: the first write's
#      metadata blocks may still be on the old primary).  Goals: median <= 100 ms
#      for every backlog, and ready(largest) / ready(smallest) <= 1.5.
#   2. read4k (largest backlog only): right after the takeover, while status says
#      `draining`, READ_SAMPLES reads of one 4 KiB block each (O_DIRECT: the kernel's
#      cache is bypassed; caches dropped before the set) at random offsets of rand.bin, a
#      file written last in the backlog (so still on the old primary); offsets are at
#      least 1 MiB apart (one per 2 MiB slot, in the slot's first MiB: the volume reads
#      ahead 256 blocks per fetch, so every read is a fetch of its own).  Median and p90 in
#      ms (goal: median <= 1 ms), with the fetches status counted meanwhile and their mean
#      latency as status computes it (remote_read_mean_ms over just those fetches:
#      read4k_status_mean; over every fetch so far: remote_read_mean_all).
#   3. read (largest backlog): peer.bin (PEER_MIB, written just before rand.bin) read
#      with dd bs=1M while it is all on the old primary (cold caches; the blocks status
#      says were fetched meanwhile / the file's blocks are shown as read_peer_fetched:
#      >= 1 means the whole file came from the peer, > 1 that blocks were fetched more
#      than once or read ahead past its end), then the same file on b once the takeover
#      has completed (cold caches): MiB/s each and peer/local.
#   4. write (largest backlog): WRITES files, each a dd of WRITE_MIB (from a
#      pre-generated random file in the page cache) with conv=fsync, on b during the
#      drain (the writes go to the local-unreflected area), and again, to other files,
#      once the merge has completed (the normal write path): MiB/s of each write (one
#      figure each: a single 64 MiB write varies 2x with the machine's state) and
#      drain/after of the medians (goal >= 0.8).  What predicts
#      two hosts: b's daemon CPU seconds per GiB written in each (during the drain less the
#      drain's own CPU rate, measured over DRAIN_CPU_WINDOW s just before), a's, and the
#      machine's busy fraction meanwhile (write_*_cpu_b, write_*_cpu_a, write_*_busy).
#   5. failback mid-drain (MEASURE_BACKLOG; FAILBACK=0 skips it): REPS more cases, each a
#      fresh pair and backlog taken over by b as in part 1; b writes FAILBACK_MIB; then,
#      with b's status still `draining`, `pairfs takeover` on a, timed to the first 4 KiB
#      write + fsync on a's mount (fb_failback_ready), b checked `frozen, …` right after;
#      then the chain to its end (a primary, b its secondary: fb_settle) and b's file
#      checked on a.  No goal in the issue: reported.
#
# Also, with a backlog: both nodes' status every SAMPLE_INTERVAL from ready to the end of
# the role change (logs-*/...samples.jsonl), giving the drain's time (ready -> b no longer
# "draining"), its rate (backlog at ready / that time) and the bytes a sent meanwhile
# (drain_wire: the link's use, fetches included); and tc's counters of the link.
#
# Each measurement checks the takeover phase before and after it: a figure taken while
# the drain was no longer running is recorded as FAIL (with why), not as a figure.  Also
# recorded: the time from the takeover to the end of the role change (b primary, a its
# secondary, in sync: "settle"), and the backlog write's speed on a.  After every case
# the files of the backlog and the writes are checked on b (md5 against the source), the
# logs for ERROR/panic, and both nodes with `pairfs fsck`.
#
# Usage (as root; debug-sized example below):
#   tests/bench/takeover.sh
#   REPS=1 BACKLOGS="0 32" RATE=20mbit PEER_MIB=8 READ_SAMPLES=5 WRITE_MIB=16 \
#       VOLUME_SIZE=512M JOURNAL_SIZE=256M JOURNAL_LIMIT=128M LU_SIZE=64M tests/bench/takeover.sh
#
# Results: tables on stdout, and in OUT: results-<stamp>.tsv (every figure),
# summary-<stamp>.txt, and the logs of every node and command under logs-<stamp>/.

set -euo pipefail

# ---------------------------------------------------------------- settings --

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PAIRFS=${PAIRFS:-$REPO/target/release/pairfs}   # the pairfs binary (built if missing)
BENCH_DIR=${BENCH_DIR:-/var/tmp/pairfs-bench-takeover}  # work dir, on the disk under test
OUT=${OUT:-/tmp/pairfs-bench-takeover}          # results and logs
REPS=${REPS:-3}                                 # repetitions of every case
BACKLOGS=${BACKLOGS:-"0 64 512"}                # MiB written on a while the link is down
MEASURE_BACKLOG=${MEASURE_BACKLOG:-}            # the backlog of parts 2-5 (default: the largest)
FAILBACK=${FAILBACK:-1}                         # part 5 (1) or not (0)
FAILBACK_MIB=${FAILBACK_MIB:-4}                 # written on b before the failback
RATE=${RATE:-200mbit}                           # tc tbf rate of the link once it is back
TBF_BURST=${TBF_BURST:-256kb}                   # tbf burst and latency (the queue: as the tests)
TBF_LATENCY=${TBF_LATENCY:-200ms}
MODE=${MODE:-async}                             # [replication] mode of both nodes
CONGESTION=${CONGESTION:-queue-bound}           # [replication] congestion of both nodes (queue-bound, cubic, bbr)
QUEUE_TARGET=${QUEUE_TARGET:-}                   # [replication] queue_target (empty: the default)
WRITE_MIB=${WRITE_MIB:-64}                      # part 4: each file written during and after the drain
WRITES=${WRITES:-3}                             # part 4: files written in each phase (each a figure)
DRAIN_CPU_WINDOW=${DRAIN_CPU_WINDOW:-1}          # part 4: seconds of b's CPU measured for the drain alone
PEER_MIB=${PEER_MIB:-64}                        # part 3: file read from the old primary
READ_SAMPLES=${READ_SAMPLES:-50}                # part 2: 4 KiB reads (rand.bin: 2 MiB per sample)
SEED=${SEED:-10}                                # part 2: offsets (per rep: SEED + rep)
VOLUME_SIZE=${VOLUME_SIZE:-3G}                  # pairfs init --size (both nodes)
JOURNAL_SIZE=${JOURNAL_SIZE:-1536M}             # --journal-size: the largest backlog must fit
JOURNAL_LIMIT=${JOURNAL_LIMIT:-768M}            # [replication] journal_limit (<= half the journal)
LU_SIZE=${LU_SIZE:-256M}                        # --lu-size: WRITES x WRITE_MIB and the probes must fit
PORT_A=${PORT_A:-17431}                         # QUIC ports (a on the host side, b in the netns)
PORT_B=${PORT_B:-17432}
COPY_TIMEOUT=${COPY_TIMEOUT:-180}               # initial copy, mounts, first "in sync"
STREAM_TIMEOUT=${STREAM_TIMEOUT:-60}            # link back -> the pair streams again
SETTLE_TIMEOUT=${SETTLE_TIMEOUT:-900}           # takeover -> role change complete
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-1}           # status of both nodes during the drain (s)
FSCK=${FSCK:-1}                                 # 1: pairfs fsck of both nodes after every case
KEEP=${KEEP:-0}                                 # 1: keep BENCH_DIR at exit
PERF_DIR=${PERF_DIR:-}                          # part 4: perf record of b's daemon (on- and off-CPU) around each write, into this dir
export RUST_LOG=${RUST_LOG:-info}               # the daemons' logs

STAMP=$(date +%Y%m%d-%H%M%S)
RAW=$OUT/results-$STAMP.tsv
FACTS=$OUT/facts-$STAMP.tsv
SUMMARY=$OUT/summary-$STAMP.txt
LOGS=$OUT/logs-$STAMP

BIN=$BENCH_DIR/pairfs                           # a copy of PAIRFS: immune to rebuilds meanwhile
SRC=$BENCH_DIR/src.bin                          # random data, the source of every file written
DATA_A=$BENCH_DIR/a
DATA_B=$BENCH_DIR/b
CFG_A=$BENCH_DIR/a.toml
CFG_B=$BENCH_DIR/b.toml
MNT_A=$BENCH_DIR/mnt-a
MNT_B=$BENCH_DIR/mnt-b

# The second host (names unique to this run; interface names <= 15 characters).
NET_ID=$(($$ % 250 + 1))
NETNS=pfsbench-tk-$$
HOST_IF=pfbtka$$
NS_IF=pfbtkb$$
HOST_IP=10.214.$NET_ID.1
NS_IP=10.214.$NET_ID.2

# State of what this script started (empty: none).
PA_PID=
PB_PID=
NET_UP=0
HELPER_PID=
CPU_MARK=                                       # cpu_mark's last reading
DRAIN_CPU_RATE=                                 # b's CPU (cores) for the drain alone
FAILURES=0
CTX=setup
LOGP=$LOGS/setup

# shellcheck source=tests/bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----------------------------------------------------------------- helpers --

# status CFG: one JSON line of `pairfs status --json` ("{}" if it fails: a node may be
# restarting its connection, or not answer for a moment).
status() { timeout 5 "$BIN" status --json --config "$1" 2>/dev/null || echo '{}'; }
# jg JSON FILTER: a jq filter on a status ("" for null or on error).
jg() { jq -r "($2) // \"\" | tostring" <<<"$1" 2>/dev/null || true; }

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"; }     # BACKLOG REP METRIC VALUE UNIT
fail() {                                                       # BACKLOG REP METRIC WHY
    record "$1" "$2" "$3" FAIL "$4"
    FAILURES=$((FAILURES + 1))
    loud "$CTX: $3: $4"
    printf '%s\t%s\n' "$CTX" "$3: $4" >>"$LOGS/failures.tsv"
}
fig() { record "$@"; log "    $3 = $4 $5"; }                   # BACKLOG REP METRIC VALUE UNIT

# fsync_path PATH...: fsync of each that exists.
fsync_path() {
    python3 -c 'import os, sys
for p in sys.argv[1:]:
    if os.path.exists(p):
        fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)' "$@"
}

mib_s() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", m / (b - a) }'; }

# wait_until SECS WHAT CMD...: run CMD every 50 ms until it succeeds; 1 on timeout.
wait_until() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$(awk -v t="$(now)" -v l="$limit" 'BEGIN { printf "%.3f", t + l }')
    until "$@"; do
        if awk -v t="$(now)" -v d="$deadline" 'BEGIN { exit !(t > d) }'; then
            log "    timeout ($limit s) waiting for: $what"
            return 1
        fi
        sleep 0.05
    done
}

# stop_daemon MNT PID: fusermount3 -u (SIGTERM when not mounted), wait, escalate.  Sets
# STOP_RC to the daemon's exit status (not to be called in a $(...)).
stop_daemon() {
    local mnt=$1 pid=$2 i
    STOP_RC=0
    [[ -n $pid ]] || return 0
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
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" 20; then
            log "daemon $pid ($mnt) ignores SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        STOP_RC=timeout
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    [[ $STOP_RC == timeout ]] || STOP_RC=$rc
    if is_mounted "$mnt"; then fusermount3 -u -z "$mnt" 2>/dev/null || true; fi
}

net_setup() {
    net_teardown
    ip netns add "$NETNS" &&
        ip link add "$HOST_IF" type veth peer name "$NS_IF" &&
        ip link set "$NS_IF" netns "$NETNS" &&
        ip addr add "$HOST_IP/24" dev "$HOST_IF" &&
        ip link set "$HOST_IF" up &&
        ip netns exec "$NETNS" ip addr add "$NS_IP/24" dev "$NS_IF" &&
        ip netns exec "$NETNS" ip link set "$NS_IF" up &&
        ip netns exec "$NETNS" ip link set lo up || return 1
    NET_UP=1
}

net_teardown() {
    ip link del "$HOST_IF" 2>/dev/null || true
    ip netns del "$NETNS" 2>/dev/null || true
    NET_UP=0
}

# write_config NAME PEER DATA LISTEN PEER_ADDRESS ROLE PEER_FINGERPRINT FILE
# (as tests/takeover.rs: a saturated link drops and delays packets, so the idle timeout
# is longer than the default; writers never wait for the peer: the backlog builds up)
write_config() {
    cat >"$8" <<EOF
# written by tests/bench/takeover.sh
name = "$1"
data = "$3"
listen = "$4"
role = "$6"

[peer]
name = "$2"
address = "$5"
fingerprint = "$7"

[replication]
mode = "$MODE"
max_lag = "off"
journal_limit = "$JOURNAL_LIMIT"
congestion = "$CONGESTION"
${QUEUE_TARGET:+queue_target = '$QUEUE_TARGET'}

[timeouts]
keepalive = "500ms"
idle = "5s"

[takeover]
fetch_timeout = "60s"
EOF
}

in_sync() {   # the secondary applied everything the primary has, the pair streams
    local sa sb
    sa=$(status "$CFG_A")
    sb=$(status "$CFG_B")
    [[ $(jg "$sa" .state) == pair && $(jg "$sa" .connected) == true && $(jg "$sb" .state) == pair ]] || return 1
    (($(jg "$sb" '.replica_received_seq // 0') >= $(jg "$sa" '.durable_seq // 1') && $(jg "$sa" '.durable_seq // 0') > 0))
}

streaming_again() {   # a's peer acknowledged an entry of the backlog: a live connection
    local sa sb
    sa=$(status "$CFG_A")
    sb=$(status "$CFG_B")
    [[ $(jg "$sa" .state) == pair && $(jg "$sb" .state) == pair ]] || return 1
    (($(jg "$sa" '.replica_received_seq // 0') > SEQ_BEFORE_CUT))
}

settled() {   # the role change is complete: b primary, a its secondary, in sync
    local sa sb
    sa=$(status "$CFG_A")
    sb=$(status "$CFG_B")
    [[ $(jg "$sb" .role) == primary && $(jg "$sa" .role) == secondary ]] || return 1
    [[ $(jg "$sb" .takeover) == "" && $(jg "$sa" .takeover) == "" ]] || return 1
    [[ $(jg "$sb" .state) == pair && $(jg "$sa" .state) == pair && $(jg "$sb" .connected) == true ]] || return 1
    (($(jg "$sa" '.replica_received_seq // 0') >= $(jg "$sb" '.durable_seq // 1')))
}

phase_b() { jg "$(status "$CFG_B")" '.takeover.phase'; }

# setup_pair: fresh nodes (a primary with an empty filesystem, b a blank secondary in
# the netns), both mounted, in sync.
setup_pair() {
    local fa fb t0
    LOG_A=$LOGP.a.log
    LOG_B=$LOGP.b.log
    net_setup || { log "network namespace setup failed"; return 1; }
    rm -rf "$DATA_A" "$DATA_B"
    mkdir -p "$MNT_A" "$MNT_B"
    "$BIN" init --data "$DATA_A" --size "$VOLUME_SIZE" --journal-size "$JOURNAL_SIZE" --lu-size "$LU_SIZE" \
        --name a >>"$LOG_A" 2>&1 || { log "pairfs init a failed ($LOG_A)"; return 1; }
    "$BIN" init --data "$DATA_B" --size "$VOLUME_SIZE" --journal-size "$JOURNAL_SIZE" --lu-size "$LU_SIZE" \
        --name b --secondary >>"$LOG_B" 2>&1 || { log "pairfs init b failed ($LOG_B)"; return 1; }
    fa=$("$BIN" id --data "$DATA_A") && fb=$("$BIN" id --data "$DATA_B") || return 1
    write_config a b "$DATA_A" "$HOST_IP:$PORT_A" "$NS_IP:$PORT_B" primary "$fb" "$CFG_A"
    write_config b a "$DATA_B" "$NS_IP:$PORT_B" "$HOST_IP:$PORT_A" secondary "$fa" "$CFG_B"
    cp "$CFG_A" "$LOGP.a.toml"
    cp "$CFG_B" "$LOGP.b.toml"
    t0=$(now)
    "$BIN" mount --config "$CFG_A" "$MNT_A" >>"$LOG_A" 2>&1 &
    PA_PID=$!
    nsenter --net="/var/run/netns/$NETNS" "$BIN" mount --config "$CFG_B" "$MNT_B" >>"$LOG_B" 2>&1 &
    PB_PID=$!
    wait_mounted "$MNT_A" "$PA_PID" "$LOG_A" 30 || return 1
    # the secondary mounts once its initial copy is done
    wait_mounted "$MNT_B" "$PB_PID" "$LOG_B" "$COPY_TIMEOUT" || return 1
    echo start >"$MNT_A/start" && sync_dir "$MNT_A" || return 1
    wait_until "$COPY_TIMEOUT" "the fresh pair in sync" in_sync || return 1
    log "    pair in sync $(secs "$t0" "$(now)") s after start"
}

# check_log LOG: ERROR/panic lines are failures; WARN lines are shown.
check_log() {
    local f=$1
    if grep -Eq ' ERROR |panicked' "$f"; then
        log "    errors in $f:"
        grep -E ' ERROR |panicked' "$f" | head -n 5 >&2
        return 1
    fi
    if grep -q ' WARN ' "$f"; then
        log "    warnings in $f ($(grep -c ' WARN ' "$f")): $(grep ' WARN ' "$f" | head -n 2 | cut -c1-300)"
    fi
    return 0
}

# teardown_pair BACKLOG REP: stop both daemons (b first: the primary after a completed
# takeover), check their exit, logs and fsck; delete the nodes and the netns.
teardown_pair() {
    local bl=$1 rep=$2 rc_a rc_b
    stop_sampler
    stop_daemon "$MNT_B" "$PB_PID"
    rc_b=$STOP_RC
    PB_PID=
    stop_daemon "$MNT_A" "$PA_PID"
    rc_a=$STOP_RC
    PA_PID=
    net_teardown
    [[ $rc_a == 0 ]] || fail "$bl" "$rep" teardown "node a exited with status $rc_a (log $LOG_A)"
    [[ $rc_b == 0 ]] || fail "$bl" "$rep" teardown "node b exited with status $rc_b (log $LOG_B)"
    [[ -f ${LOG_A:-/nonexistent} ]] && { check_log "$LOG_A" || fail "$bl" "$rep" logs "ERROR/panic in $LOG_A"; }
    [[ -f ${LOG_B:-/nonexistent} ]] && { check_log "$LOG_B" || fail "$bl" "$rep" logs "ERROR/panic in $LOG_B"; }
    if [[ $FSCK == 1 ]]; then
        local n d
        for n in a b; do
            d=$BENCH_DIR/$n
            [[ -d $d ]] || continue
            "$BIN" fsck --data "$d" >"$LOGP.$n.fsck" 2>&1 ||
                fail "$bl" "$rep" fsck "pairfs fsck of node $n is NOT clean ($LOGP.$n.fsck): $(head -n 3 "$LOGP.$n.fsck" | tr '\n' ' ')"
        done
    fi
    rm -rf "$DATA_A" "$DATA_B"
}

# ------------------------------------------------------------ python bits --

# ready PAIRFS CFG PROBE TIMEOUT: runs `pairfs takeover --json`, then writes PROBE (4 KiB,
# new file) and fsyncs it, again every ms until it succeeds.  Prints one JSON line:
# ready_ms (start of the command -> the probe's fsync returned), cmd_ms (the command's
# wall time), attempts, the command's JSON (or its error).
PY_READY='
import json, os, subprocess, sys, time
pairfs, cfg, probe, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
buf = os.urandom(4096)
t0 = time.perf_counter()
r = subprocess.run([pairfs, "takeover", "--json", "--config", cfg], capture_output=True, text=True)
t_cmd = time.perf_counter()
try:
    rep = json.loads(r.stdout)
except Exception:
    rep = None
if r.returncode != 0 or not rep or not rep.get("ok"):
    print(json.dumps({"error": "takeover failed (status %d): %s %s" % (r.returncode, r.stdout.strip(), r.stderr.strip())}))
    sys.exit(1)
attempts, last = 0, None
while True:
    attempts += 1
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if os.write(fd, buf) != len(buf):
                raise OSError("short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        break
    except OSError as e:
        last = str(e)
        if time.perf_counter() - t0 > limit:
            print(json.dumps({"error": "no successful write %.0f s after the takeover: %s" % (limit, last), "takeover": rep}))
            sys.exit(1)
        time.sleep(0.001)
t1 = time.perf_counter()
print(json.dumps({"ready_ms": (t1 - t0) * 1e3, "cmd_ms": (t_cmd - t0) * 1e3, "attempts": attempts,
                  "first_error": last, "takeover": rep}))
'

# randread FILE SAMPLES SEED: SAMPLES reads of 4 KiB with O_DIRECT at offsets one per
# 2 MiB slot (in its first MiB, block-aligned), the slots in a random order.  Prints the
# latencies in ms, one per line, in the order read.
PY_RANDREAD='
import mmap, os, random, sys, time
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = os.stat(path).st_size
slots = size // (2 << 20)
if slots < n:
    sys.exit("%s: %d bytes hold only %d slots of 2 MiB for %d samples" % (path, size, slots, n))
rnd = random.Random(seed)
offsets = [s * (2 << 20) + rnd.randrange(256) * 4096 for s in rnd.sample(range(slots), n)]
buf = mmap.mmap(-1, 4096)   # page-aligned, as O_DIRECT wants
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
for off in offsets:
    a = time.perf_counter()
    got = os.preadv(fd, [buf], off)
    b = time.perf_counter()
    if got != 4096:
        sys.exit("short read at %d: %d bytes" % (off, got))
    print("%.4f" % ((b - a) * 1e3))
os.close(fd)
'

# sampler PAIRFS CFG_A CFG_B INTERVAL OUT: both nodes' `pairfs status --json` every
# INTERVAL s into OUT (JSON lines {"t": wall time, "a": ..., "b": ...}) until SIGTERM.
PY_SAMPLER='
import json, os, signal, subprocess, sys, time
pairfs, cfg_a, cfg_b, interval, out = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
ppid = os.getppid()
def status(cfg):
    try:
        r = subprocess.run([pairfs, "status", "--json", "--config", cfg], capture_output=True, text=True, timeout=3)
        return json.loads(r.stdout)
    except Exception:
        return None
with open(out, "w") as f:
    nxt = time.time()
    while not stop and os.getppid() == ppid:
        t = time.time()
        f.write(json.dumps({"t": t, "a": status(cfg_a), "b": status(cfg_b)}) + "\n")
        f.flush()
        nxt += interval
        time.sleep(max(0.0, nxt - time.time()))
'

# drain_stats SAMPLES T0 BACKLOG_BYTES: from the samples, the drain's end (the first
# sample where b is no longer "draining") and its rates, as "METRIC UNIT VALUE" lines.
PY_DRAIN_STATS='
import json, sys
path, t0, backlog = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in open(path) if l.strip()]
end = None
for r in rows:
    b = r["b"]
    if b is not None and (b.get("takeover") or {}).get("phase") != "draining":
        end = r
        break
if end is None:
    sys.exit("no sample after the drain")
d = end["t"] - t0
print("drain s %.2f" % d)
if backlog > 0 and d > 0:
    print("drain_rate MiB/s %.2f" % (backlog / 1048576 / d))
# the bytes a sent on its connection meanwhile (the connection of the takeover: while
# its counter only grows)
first = next((r for r in rows if r["a"]), None)
if first:
    w0, last = first["a"]["wire_bytes_sent"], None
    for r in rows:
        if r["t"] > end["t"]:
            break
        if r["a"] and r["a"]["wire_bytes_sent"] >= w0:
            last = r
    if last and last["t"] > first["t"]:
        print("drain_wire MiB/s %.2f" % ((last["a"]["wire_bytes_sent"] - w0) / 1048576 / (last["t"] - first["t"])))
'

# ------------------------------------------------------------------- a case --

# The backlog's files for BACKLOG MiB: filler.bin, then (largest backlog) peer.bin and
# rand.bin, written last so that they drain last; each a slice of SRC.
write_backlog() {
    local bl=$1 filler=$1
    # the marker is an entry of its own (fsync seals it), the first of the backlog: once
    # the peer acknowledges it, the pair streams again on a live connection
    echo "backlog $bl rep $REP" >"$MNT_A/marker" && fsync_path "$MNT_A/marker" || return 1
    if [[ $bl == "$MEASURE_BACKLOG" ]]; then filler=$((bl - PEER_MIB - RAND_MIB)); fi
    if ((filler > 0)); then
        dd if="$SRC" of="$MNT_A/filler.bin" bs=1M count="$filler" status=none || return 1
    fi
    if [[ $bl == "$MEASURE_BACKLOG" ]]; then
        dd if="$SRC" of="$MNT_A/peer.bin" bs=1M skip="$filler" count="$PEER_MIB" status=none || return 1
        dd if="$SRC" of="$MNT_A/rand.bin" bs=1M skip=$((filler + PEER_MIB)) count="$RAND_MIB" status=none || return 1
    fi
    fsync_path "$MNT_A/filler.bin" "$MNT_A/peer.bin" "$MNT_A/rand.bin" || return 1
    sync_dir "$MNT_A"
}

# md5 of MIB MiB of SRC from SKIP MiB on
src_md5() { dd if="$SRC" bs=1M skip="$2" count="$1" status=none | md5sum | cut -d' ' -f1; }

# A fresh pair, a backlog of $1 MiB written on a with the link cut, the link back limited,
# then `pairfs takeover` on b timed to its first write (part 1, figures prefixed with $3).
# Leaves the probe's JSON in READY_JSON and the time the takeover started in READY_T0;
# false (the case recorded as failed and torn down) if something did not come up.
takeover_with_backlog() {
    local bl=$1 rep=$2 prefix=$3 t0 t1 sa r cut_t
    CTX="backlog $bl MiB, rep $rep${prefix:+, $prefix}"
    LOGP=$LOGS/$prefix${prefix:+-}b$bl-r$rep
    REP=$rep
    log "== $CTX"
    if ! setup_pair; then
        fail "$bl" "$rep" setup "the pair did not come up in sync (logs $LOGP.*)"
        teardown_pair "$bl" "$rep"
        return 1
    fi

    # The backlog: written while the link is down.
    SEQ_BEFORE_CUT=$(jg "$(status "$CFG_A")" '.replica_received_seq // 0')
    ip link set "$HOST_IF" down
    cut_t=$(now)
    t0=$(now)
    if ! write_backlog "$bl"; then
        fail "$bl" "$rep" backlog "writing the backlog on a failed"
        ip link set "$HOST_IF" up || true
        teardown_pair "$bl" "$rep"
        return 1
    fi
    t1=$(now)
    ((bl > 0)) && fig "$bl" "$rep" "${prefix}backlog_write" "$(mib_s "$bl" "$t0" "$t1")" MiB/s
    sa=$(status "$CFG_A")
    echo "$sa" >"$LOGP.a-before-link-up.json"
    log "    backlog written in $(secs "$t0" "$t1") s; a: state $(jg "$sa" .state), backlog mode $(jg "$sa" .backlog), lag $(jg "$sa" .lag_bytes) B, journal $(jg "$sa" .journal_used)/$(jg "$sa" .journal_capacity)"
    tc qdisc add dev "$HOST_IF" root tbf rate "$RATE" burst "$TBF_BURST" latency "$TBF_LATENCY"
    ip link set "$HOST_IF" up
    log "    link down for $(secs "$cut_t" "$(now)") s; back, limited to $RATE"
    if ! wait_until "$STREAM_TIMEOUT" "the pair streaming again" streaming_again; then
        fail "$bl" "$rep" ready "the pair did not stream again after the link came back: a $(status "$CFG_A")"
        teardown_pair "$bl" "$rep"
        return 1
    fi
    sa=$(status "$CFG_A")
    echo "$sa" >"$LOGP.a-before-takeover.json"
    fig "$bl" "$rep" "${prefix}lag_before_takeover" "$(awk -v b="$(jg "$sa" '.lag_bytes // 0')" 'BEGIN { printf "%.1f", b / 1048576 }')" MiB

    # 1. ready
    t0=$(now)
    if ! r=$(python3 -c "$PY_READY" "$BIN" "$CFG_B" "$MNT_B/probe" 60); then
        fail "$bl" "$rep" ready "$(jg "$r" .error)"
        teardown_pair "$bl" "$rep"
        return 1
    fi
    echo "$r" >"$LOGP.takeover.json"
    fig "$bl" "$rep" "${prefix}ready" "$(jg "$r" '.ready_ms * 1000 | round / 1000')" ms
    fig "$bl" "$rep" "${prefix}pairfs_seconds" "$(jg "$r" '.takeover.seconds * 1e6 | round / 1000')" ms
    fig "$bl" "$rep" "${prefix}takeover_cmd" "$(jg "$r" '.cmd_ms * 1000 | round / 1000')" ms
    fig "$bl" "$rep" "${prefix}backlog_at_takeover" "$(jg "$r" '.takeover.backlog_bytes / 1048576 * 10 | round / 10')" MiB
    READY_JSON=$r
    READY_T0=$t0
}

run_case() {
    local bl=$1 rep=$2 t0 s r
    takeover_with_backlog "$bl" "$rep" "" || return
    r=$READY_JSON
    t0=$READY_T0
    if ((bl > 0)); then
        python3 -c "$PY_SAMPLER" "$BIN" "$CFG_A" "$CFG_B" "$SAMPLE_INTERVAL" "$LOGP.samples.jsonl" &
        HELPER_PID=$!
    fi
    s=$(status "$CFG_B")
    log "    probe: $(jg "$r" .attempts) attempt(s) (first error: $(jg "$r" .first_error)); backlog $(jg "$r" .takeover.backlog_entries) entries, $(jg "$r" .takeover.backlog_blocks) blocks; b now: phase '$(jg "$s" .takeover.phase)'"
    ((bl > 0)) && fig "$bl" "$rep" fetches_by_ready "$(jg "$s" '.takeover.remote_reads // 0')" n

    if [[ $bl == "$MEASURE_BACKLOG" ]]; then
        measure_during_drain "$bl" "$rep"
    fi

    # The end of the role change.
    if ! wait_until "$SETTLE_TIMEOUT" "the takeover to complete" settled; then
        fail "$bl" "$rep" settle "the role change did not complete in $SETTLE_TIMEOUT s: a $(status "$CFG_A") b $(status "$CFG_B")"
        teardown_pair "$bl" "$rep"
        return
    fi
    fig "$bl" "$rep" settle "$(secs "$t0" "$(now)" | awk '{ printf "%.2f", $1 }')" s
    stop_sampler
    if ((bl > 0)); then
        local line
        if line=$(python3 -c "$PY_DRAIN_STATS" "$LOGP.samples.jsonl" "$t0" "$(jg "$r" '.takeover.backlog_bytes // 0')" 2>&1); then
            while read -r metric unit value; do fig "$bl" "$rep" "$metric" "$value" "$unit"; done <<<"$line"
        else
            log "    no drain figures: $line"
        fi
        log "    link a->b: $(tc -s qdisc show dev "$HOST_IF" 2>/dev/null | tr -s ' \n' ' ' | cut -c1-220)"
    fi

    if [[ $bl == "$MEASURE_BACKLOG" ]]; then
        measure_after "$bl" "$rep"
        verify_files "$bl" "$rep"
    fi
    teardown_pair "$bl" "$rep"
}

# 5. Failback while the drain runs (PROTOCOL.md §7.6): a fresh pair and backlog, the
# takeover on b as in part 1, b writes FAILBACK_MIB (so that a drains some of b's entries
# back), then — b's status still `draining` — `pairfs takeover` on a, timed to the first
# write + fsync on a's mount (fb_failback_ready), b's phase checked `frozen, …` right
# after; then the chain to its end (a primary, b its secondary: fb_settle) and b's file
# checked on a's mount.
run_failback_case() {
    local bl=$1 rep=$2 t0 r ph
    takeover_with_backlog "$bl" "$rep" fb_ || return
    if ! dd if="$SRC" of="$MNT_B/fb-b.bin" bs=1M count="$FAILBACK_MIB" conv=fsync status=none 2>"$LOGP.fbwrite.err"; then
        fail "$bl" "$rep" fb_failback_ready "writing on b failed: $(tail -n 2 "$LOGP.fbwrite.err" | tr '\n' ' ')"
        teardown_pair "$bl" "$rep"
        return
    fi
    ph=$(phase_b)
    if [[ $ph != draining ]]; then
        fail "$bl" "$rep" fb_failback_ready "b's phase was '$ph' before the failback, not draining (a larger backlog or a slower RATE)"
        teardown_pair "$bl" "$rep"
        return
    fi
    t0=$(now)
    if ! r=$(python3 -c "$PY_READY" "$BIN" "$CFG_A" "$MNT_A/probe-back" 60); then
        fail "$bl" "$rep" fb_failback_ready "$(jg "$r" .error)"
        teardown_pair "$bl" "$rep"
        return
    fi
    echo "$r" >"$LOGP.failback.json"
    ph=$(phase_b)
    if [[ $ph != frozen* ]]; then
        fail "$bl" "$rep" fb_failback_ready "b's phase right after the failback was '$ph', not frozen"
    else
        fig "$bl" "$rep" fb_failback_ready "$(jg "$r" '.ready_ms * 1000 | round / 1000')" ms
        fig "$bl" "$rep" fb_failback_pairfs_seconds "$(jg "$r" '.takeover.seconds * 1e6 | round / 1000')" ms
        fig "$bl" "$rep" fb_failback_backlog "$(jg "$r" '.takeover.backlog_bytes / 1048576 * 10 | round / 10')" MiB
    fi
    if ! wait_until "$SETTLE_TIMEOUT" "the failback to complete" settled_back; then
        fail "$bl" "$rep" fb_settle "the failback did not complete in $SETTLE_TIMEOUT s: a $(status "$CFG_A") b $(status "$CFG_B")"
        teardown_pair "$bl" "$rep"
        return
    fi
    fig "$bl" "$rep" fb_settle "$(secs "$t0" "$(now)" | awk '{ printf "%.2f", $1 }')" s
    if [[ $(src_md5 "$FAILBACK_MIB" 0) != $(md5sum "$MNT_A/fb-b.bin" | cut -d' ' -f1) ]]; then
        fail "$bl" "$rep" fb_verify "fb-b.bin, written on b during the drain, differs on a after the failback"
    else
        log "    b's file equals its source on a"
    fi
    teardown_pair "$bl" "$rep"
}

settled_back() {   # the failback is complete: a primary, b its secondary, in sync
    local sa sb
    sa=$(status "$CFG_A")
    sb=$(status "$CFG_B")
    [[ $(jg "$sa" .role) == primary && $(jg "$sb" .role) == secondary ]] || return 1
    [[ $(jg "$sa" .takeover) == "" && $(jg "$sb" .takeover) == "" ]] || return 1
    [[ $(jg "$sa" .state) == pair && $(jg "$sb" .state) == pair && $(jg "$sa" .connected) == true ]] || return 1
    (($(jg "$sb" '.replica_received_seq // 0') >= $(jg "$sa" '.durable_seq // 1')))
}

stop_sampler() {
    if [[ -n $HELPER_PID ]]; then
        kill -TERM "$HELPER_PID" 2>/dev/null || true
        wait "$HELPER_PID" 2>/dev/null || true
        HELPER_PID=
    fi
}

# Parts 2-4 while the drain runs (the files still on the old primary).
measure_during_drain() {
    local bl=$1 rep=$2 s0 s1 ph ph2 n0 n1 m0 m1 b0 b1 t0 t1 lat
    # 2. 4 KiB reads of blocks on the old primary
    drop_caches
    s0=$(status "$CFG_B")
    ph=$(jg "$s0" .takeover.phase)
    if lat=$(python3 -c "$PY_RANDREAD" "$MNT_B/rand.bin" "$READ_SAMPLES" "$((SEED + rep))" 2>"$LOGP.randread.err"); then
        s1=$(status "$CFG_B")
        ph2=$(jg "$s1" .takeover.phase)
        echo "$lat" >"$LOGP.randread.ms"
        n0=$(jg "$s0" '.takeover.remote_reads // 0')
        n1=$(jg "$s1" '.takeover.remote_reads // 0')
        m0=$(jg "$s0" '.takeover.remote_read_mean_ms // 0')
        m1=$(jg "$s1" '.takeover.remote_read_mean_ms // 0')
        if [[ $ph != draining || $ph2 != draining ]]; then
            fail "$bl" "$rep" read4k "phase '$ph' before, '$ph2' after the reads (not draining throughout)"
        else
            fig "$bl" "$rep" read4k_median "$(sort -n <<<"$lat" | awk '{ v[NR] = $1 } END { printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" ms
            fig "$bl" "$rep" read4k_p90 "$(sort -n <<<"$lat" | awk '{ v[NR] = $1 } END { i = int(NR * 0.9 + 0.999999); if (i < 1) i = 1; printf "%.3f", v[i] }')" ms
            fig "$bl" "$rep" read4k_max "$(sort -n <<<"$lat" | tail -n 1)" ms
            fig "$bl" "$rep" read4k_fetches "$((n1 - n0))" n
            if ((n1 > n0)); then
                fig "$bl" "$rep" read4k_status_mean "$(awk -v n0="$n0" -v n1="$n1" -v m0="$m0" -v m1="$m1" 'BEGIN { printf "%.3f", (m1 * n1 - m0 * n0) / (n1 - n0) }')" ms
            fi
            fig "$bl" "$rep" remote_read_mean_all "$(awk -v m="$m1" 'BEGIN { printf "%.3f", m }')" ms
            ((n1 - n0 >= READ_SAMPLES)) || log "    only $((n1 - n0)) fetches for $READ_SAMPLES reads: some were not fetches"
        fi
    else
        fail "$bl" "$rep" read4k "the reads failed: $(tail -n 3 "$LOGP.randread.err" | tr '\n' ' ')"
    fi

    # 3. read of a file all on the old primary
    drop_caches
    s0=$(status "$CFG_B")
    ph=$(jg "$s0" .takeover.phase)
    b0=$(jg "$s0" '.takeover.remote_read_blocks // 0')
    t0=$(now)
    if dd if="$MNT_B/peer.bin" of=/dev/null bs=1M status=none 2>"$LOGP.peerread.err"; then
        t1=$(now)
        s1=$(status "$CFG_B")
        ph2=$(jg "$s1" .takeover.phase)
        b1=$(jg "$s1" '.takeover.remote_read_blocks // 0')
        local frac
        frac=$(awk -v d=$((b1 - b0)) -v n=$((PEER_MIB * 256)) 'BEGIN { printf "%.3f", d / n }')
        if [[ $ph != draining || $ph2 != draining ]]; then
            fail "$bl" "$rep" read_peer "phase '$ph' before, '$ph2' after the read (not draining throughout)"
        else
            fig "$bl" "$rep" read_peer "$(mib_s "$PEER_MIB" "$t0" "$t1")" MiB/s
            fig "$bl" "$rep" read_peer_fetched "$frac" ratio
            awk -v f="$frac" 'BEGIN { exit !(f < 0.99) }' &&
                log "    only $frac of peer.bin was fetched: the rest had drained (the figure is partly local)"
        fi
    else
        fail "$bl" "$rep" read_peer "dd failed: $(tail -n 2 "$LOGP.peerread.err" | tr '\n' ' ')"
    fi

    # 4. write during the drain (to the local-unreflected area); first b's CPU rate for the
    # drain alone, to take out of the writer's share
    local c0 c1 d0 d1 cpu
    c0=$(cpu_seconds "$PB_PID") d0=$(now)
    sleep "$DRAIN_CPU_WINDOW"
    c1=$(cpu_seconds "$PB_PID") d1=$(now)
    DRAIN_CPU_RATE=$(awk -v a="$c0" -v b="$c1" -v t="$(secs "$d0" "$d1")" 'BEGIN { printf "%.4f", (b - a) / t }')
    fig "$bl" "$rep" drain_cpu_b "$DRAIN_CPU_RATE" cores
    local i
    for ((i = 1; i <= WRITES; i++)); do
        write_drain "$bl" "$rep" "$i" || break
    done
    s1=$(status "$CFG_B")
    echo "$s1" >"$LOGP.b-after-drain-measures.json"
    log "    b after the measures: phase '$(jg "$s1" .takeover.phase)', backlog $(jg "$s1" .takeover.backlog_bytes) B, fetches $(jg "$s1" .takeover.remote_reads) ($(jg "$s1" .takeover.remote_read_blocks) blocks, mean $(jg "$s1" .takeover.remote_read_mean_ms) ms), fetch errors $(jg "$s1" .takeover.fetch_errors)"
}

# write_drain BACKLOG REP I: part 4's I-th write during the drain (w-drain-I.bin); fails
# (and stops the part) unless b was draining before it and still in the LU after it.
write_drain() {
    local bl=$1 rep=$2 i=$3 ph ph2 s1 t0 t1 cpu
    perf_start "write_drain-$bl-$rep-$i"
    ph=$(phase_b)
    cpu_mark
    t0=$(now)
    if dd if="$SRC" of="$MNT_B/w-drain-$i.bin" bs=1M count="$WRITE_MIB" conv=fsync status=none 2>"$LOGP.wdrain.err"; then
        t1=$(now)
        perf_stop
        cpu=$(cpu_since "$t0" "$t1" "$DRAIN_CPU_RATE")
        s1=$(status "$CFG_B")
        ph2=$(jg "$s1" .takeover.phase)
        if [[ $ph != draining || ($ph2 != draining && $ph2 != merging) ]]; then
            fail "$bl" "$rep" write_drain "write $i: phase '$ph' before, '$ph2' after it (not in the LU throughout)"
            return 1
        fi
        fig "$bl" "$rep" write_drain "$(mib_s "$WRITE_MIB" "$t0" "$t1")" MiB/s
        cpu_figs "$bl" "$rep" write_drain "$cpu"
        log "    LU after write $i: $(jg "$s1" .takeover.lu_entries) entries, $(jg "$s1" .takeover.lu_used)/$(jg "$s1" .takeover.lu_capacity) B; backlog left $(jg "$s1" .takeover.backlog_bytes) B"
        [[ $ph2 == draining ]] || { log "    the drain ended during write $i (phase '$ph2' after it: it still went to the LU)"; return 1; }
    else
        perf_stop
        fail "$bl" "$rep" write_drain "write $i: dd failed: $(tail -n 2 "$LOGP.wdrain.err" | tr '\n' ' ')"
        return 1
    fi
}

# perf_start NAME / perf_stop (PERF_DIR set): `perf record` of b's daemon — CPU samples
# and every context switch, with call graphs — from before a write to its end, into
# PERF_DIR/NAME.data (`perf report -i …`, `perf script` for the off-CPU stacks).  A
# diagnosis, not a figure: the recording's own cost slows the write it records.
PERF_PID=
perf_start() {
    [[ -n $PERF_DIR ]] || return 0
    mkdir -p "$PERF_DIR"
    perf record -q -o "$PERF_DIR/$1.data" -e cpu-clock -e sched:sched_switch --call-graph dwarf,16384 \
        -p "$PB_PID" >/dev/null 2>&1 &
    PERF_PID=$!
    sleep 0.5
}
perf_stop() {
    [[ -n $PERF_PID ]] || return 0
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=
}

# cpu_mark: b's and a's daemon CPU seconds and the machine's busy seconds so far, for
# cpu_since.
cpu_mark() { CPU_MARK="$(cpu_seconds "$PB_PID") $(cpu_seconds "$PA_PID") $(busy_seconds)"; }

# cpu_since T0 T1 DRAIN_RATE: since cpu_mark, per GiB of the WRITE_MIB written: b's
# daemon CPU seconds less DRAIN_RATE (cores) over the write's time (the drain's own
# share, measured before it), a's, and how busy the machine was (of all its cores, steal
# excluded) — whether the write waited for CPU or for something else.  Prints "b a busy".
cpu_since() {
    local b0 a0 m0
    read -r b0 a0 m0 <<<"$CPU_MARK"
    awk -v b0="$b0" -v b1="$(cpu_seconds "$PB_PID")" -v a0="$a0" -v a1="$(cpu_seconds "$PA_PID")" \
        -v m0="$m0" -v m1="$(busy_seconds)" -v t="$(secs "$1" "$2")" -v r="$3" -v mib="$WRITE_MIB" -v n="$(nproc)" \
        'BEGIN { g = mib / 1024; printf "%.3f %.3f %.3f\n", (b1 - b0 - r * t) / g, (a1 - a0) / g, (m1 - m0) / (t * n) }'
}

# cpu_figs BACKLOG REP NAME "b a busy": records cpu_since's figures as NAME_cpu_b,
# NAME_cpu_a and NAME_busy.
cpu_figs() {
    local b a m
    read -r b a m <<<"$4"
    fig "$1" "$2" "${3}_cpu_b" "$b" s/GiB
    fig "$1" "$2" "${3}_cpu_a" "$a" s/GiB
    fig "$1" "$2" "${3}_busy" "$m" fraction
}

# Parts 3 and 4 once the role change is complete.
measure_after() {
    local bl=$1 rep=$2 t0 t1
    drop_caches
    t0=$(now)
    if dd if="$MNT_B/peer.bin" of=/dev/null bs=1M status=none 2>"$LOGP.localread.err"; then
        t1=$(now)
        fig "$bl" "$rep" read_local "$(mib_s "$PEER_MIB" "$t0" "$t1")" MiB/s
    else
        fail "$bl" "$rep" read_local "dd failed: $(tail -n 2 "$LOGP.localread.err" | tr '\n' ' ')"
    fi
    local i
    for ((i = 1; i <= WRITES; i++)); do
        perf_start "write_after-$bl-$rep-$i"
        t0=$(now)
        cpu_mark
        if dd if="$SRC" of="$MNT_B/w-after-$i.bin" bs=1M count="$WRITE_MIB" conv=fsync status=none 2>"$LOGP.wafter.err"; then
            t1=$(now)
            perf_stop
            cpu_figs "$bl" "$rep" write_after "$(cpu_since "$t0" "$t1" 0)"
            fig "$bl" "$rep" write_after "$(mib_s "$WRITE_MIB" "$t0" "$t1")" MiB/s
        else
            perf_stop
            fail "$bl" "$rep" write_after "write $i: dd failed: $(tail -n 2 "$LOGP.wafter.err" | tr '\n' ' ')"
            break
        fi
    done
}

# The files on b equal their sources.
verify_files() {
    local bl=$1 rep=$2 filler=$(($1 - PEER_MIB - RAND_MIB)) f want got bad=
    local files=("peer.bin $PEER_MIB $filler" "rand.bin $RAND_MIB $((filler + PEER_MIB))") i
    for ((i = 1; i <= WRITES; i++)); do files+=("w-drain-$i.bin $WRITE_MIB 0" "w-after-$i.bin $WRITE_MIB 0"); done
    for f in "${files[@]}"; do
        set -- $f
        [[ -e $MNT_B/$1 ]] || continue
        want=$(src_md5 "$2" "$3")
        got=$(md5sum "$MNT_B/$1" | cut -d' ' -f1)
        [[ $want == "$got" ]] || bad="$bad $1"
    done
    if ((filler > 0)); then
        [[ $(src_md5 "$filler" 0) == $(md5sum "$MNT_B/filler.bin" | cut -d' ' -f1) ]] || bad="$bad filler.bin"
    fi
    if [[ -n $bad ]]; then
        fail "$bl" "$rep" verify "content differs from its source on b:$bad"
    else
        log "    files on b equal their sources"
    fi
}

# ------------------------------------------------------------------ summary --

summarize() {
    python3 - "$RAW" "$FACTS" "$SUMMARY" "$BACKLOGS" "$MEASURE_BACKLOG" <<'EOF'
import statistics, sys
raw, facts_path, summary_path, backlogs, measure = sys.argv[1:6]
backlogs = [int(b) for b in backlogs.split()]
rows = [l.rstrip("\n").split("\t") for l in open(raw) if l.strip()]
facts = dict(l.rstrip("\n").split("\t", 1) for l in open(facts_path) if "\t" in l)
data, units, order, fails = {}, {}, [], []
for bl, rep, metric, value, unit in rows:
    if value == "FAIL":
        fails.append("backlog %s MiB, rep %s, %s: %s" % (bl, rep, metric, unit))
        continue
    try:
        v = float(value)
    except ValueError:
        fails.append("backlog %s MiB, rep %s, %s: no figure (%r)" % (bl, rep, metric, value))
        continue
    k = (int(bl), metric)
    if metric not in order:
        order.append(metric)
    units[metric] = unit
    data.setdefault(k, []).append(v)
def num(x):
    return "%.3f" % x if abs(x) < 10 else "%.1f" % x if abs(x) < 1000 else "%.0f" % x
def med(bl, m):
    v = data.get((int(bl), m))
    return statistics.median(v) if v else None
def cell(bl, m):
    v = data.get((bl, m))
    if not v:
        return "-"
    if len(v) == 1:
        return "%s (1 rep)" % num(v[0])
    return "%s [%s-%s]" % (num(statistics.median(v)), num(min(v)), num(max(v)))
out = []
p = out.append
p("== results: medians of %s reps [min-max], per backlog (MiB on the old primary when the link came back) ==" % facts.get("reps", "?"))
head = ["metric", "unit"] + ["backlog %d" % b for b in backlogs]
table = [head]
for m in order:
    table.append([m, units[m]] + [cell(b, m) for b in backlogs])
w = [max(len(r[i]) for r in table) for i in range(len(head))]
for i, r in enumerate(table):
    p("  " + "  ".join(c.ljust(w[j]) if j < 2 else c.rjust(w[j]) for j, c in enumerate(r)))
    if i == 0:
        p("  " + "  ".join("-" * x for x in w))
goals = []
def goal(name, value, op, bound, note=""):
    if value is None:
        goals.append([name, "-", "%s %s" % (op, bound), "NOT MEASURED", note])
        return
    met = value <= bound if op == "<=" else value >= bound
    goals.append([name, num(value), "%s %s" % (op, bound), "yes" if met else "NO", note])
def ratio(a, b):
    return a / b if a is not None and b else None
for b in backlogs:
    goal("1  ready, backlog %d MiB (ms)" % b, med(b, "ready"), "<=", 100,
         "pairfs's own seconds: %s ms" % (num(med(b, "pairfs_seconds")) if med(b, "pairfs_seconds") is not None else "-"))
lo, hi = min(backlogs), max(backlogs)
goal("1  ready %d / ready %d" % (hi, lo), ratio(med(hi, "ready"), med(lo, "ready")), "<=", 1.5,
     "pairfs's seconds: %s" % (lambda v: num(v) if v is not None else "-")(ratio(med(hi, "pairfs_seconds"), med(lo, "pairfs_seconds"))))
goal("2  4 KiB read from the old primary, median (ms)", med(measure, "read4k_median"), "<=", 1.0,
     "p90 %s ms; status mean over those fetches %s ms" % tuple(
         (lambda v: num(v) if v is not None else "-")(med(measure, m)) for m in ("read4k_p90", "read4k_status_mean")))
goals.append(["3  read peer / local", (lambda v: num(v) if v is not None else "-")(ratio(med(measure, "read_peer"), med(measure, "read_local"))),
              "(no goal)", "-", "peer %s MiB/s, local %s MiB/s" % tuple(
                  (lambda v: num(v) if v is not None else "-")(med(measure, m)) for m in ("read_peer", "read_local"))])
goal("4  write during drain / after merge", ratio(med(measure, "write_drain"), med(measure, "write_after")), ">=", 0.8,
     "drain %s MiB/s, after %s MiB/s; b's CPU %s / %s s/GiB, machine busy %s / %s" % tuple(
         (lambda v: num(v) if v is not None else "-")(med(measure, m)) for m in (
             "write_drain", "write_after", "write_drain_cpu_b", "write_after_cpu_b", "write_drain_busy", "write_after_busy")))
goals.append(["5  failback mid-drain: ready on a (ms)", (lambda v: num(v) if v is not None else "-")(med(measure, "fb_failback_ready")),
              "(no goal)", "-", "pairfs's own %s ms; the chain's end after %s s" % tuple(
                  (lambda v: num(v) if v is not None else "-")(med(measure, m)) for m in ("fb_failback_pairfs_seconds", "fb_settle"))])
p("")
p("== goals (ratios: of the medians) ==")
gh = ["goal", "value", "target", "met?", "note"]
gt = [gh] + goals
gw = [max(len(r[i]) for r in gt) for i in range(len(gh))]
for i, r in enumerate(gt):
    p("  " + "  ".join(c.ljust(gw[j]) for j, c in enumerate(r)))
    if i == 0:
        p("  " + "  ".join("-" * x for x in gw))
if fails:
    p("")
    p("FAILURES:")
    for f in fails:
        p("  " + f)
text = "\n".join(out)
print(text)
open(summary_path, "w").write(text + "\n")
EOF
}

# ------------------------------------------------------------------ driver --

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_sampler
    if [[ -n $PB_PID ]]; then kill -TERM "$PB_PID" 2>/dev/null || true; fi
    if [[ -n $PA_PID ]]; then kill -TERM "$PA_PID" 2>/dev/null || true; fi
    local pid
    for pid in $PB_PID $PA_PID; do
        wait_gone "$pid" 20 || kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    local m
    for m in "$MNT_B" "$MNT_A"; do
        if is_mounted "$m"; then fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; fi
    done
    net_teardown
    if [[ $KEEP != 1 && -d $BENCH_DIR ]] && ! is_mounted "$MNT_A" && ! is_mounted "$MNT_B"; then
        rm -rf "$DATA_A" "$DATA_B" "$MNT_A" "$MNT_B" "$CFG_A" "$CFG_B" "$SRC" "$BIN"
        rmdir "$BENCH_DIR" 2>/dev/null || log "$BENCH_DIR not empty: left as it is"
    fi
    exit "$rc"
}

print_facts() {
    {
        machine_facts "$BIN"
        printf 'nodes\tvolume %s, journal %s, journal_limit %s, lu %s, mode %s, max_lag off, keepalive 500ms, idle 5s, fetch_timeout 60s\n' \
            "$VOLUME_SIZE" "$JOURNAL_SIZE" "$JOURNAL_LIMIT" "$LU_SIZE" "$MODE"
        printf 'link\tveth %s (host, node a %s) <-> netns %s (node b %s); after the cut: tbf rate %s burst %s latency %s on a->b\n' \
            "$HOST_IF" "$HOST_IP" "$NETNS" "$NS_IP" "$RATE" "$TBF_BURST" "$TBF_LATENCY"
        printf 'reps\t%s\n' "$REPS"
        printf 'backlogs\t%s MiB (parts 2-4 with %s MiB: peer.bin %s MiB, rand.bin %s MiB written last)\n' \
            "$BACKLOGS" "$MEASURE_BACKLOG" "$PEER_MIB" "$RAND_MIB"
        printf 'samples\t%s x 4 KiB reads (O_DIRECT), %s writes of %s MiB per phase (dd bs=1M conv=fsync)\n' "$READ_SAMPLES" "$WRITES" "$WRITE_MIB"
        printf 'other_load\t%s\n' "$(uptime | sed 's/.*load average/load average/')"
    } >"$FACTS"
    show_facts
}

main() {
    [[ $EUID == 0 ]] || die "run as root (network namespaces, tc, mounts, drop_caches)"
    local b max=0
    for b in $BACKLOGS; do
        [[ $b =~ ^[0-9]+$ ]] || die "BACKLOGS: '$b' is not a number of MiB"
        ((b > max)) && max=$b
    done
    [[ -n $MEASURE_BACKLOG ]] || MEASURE_BACKLOG=$max
    [[ " $BACKLOGS " == *" $MEASURE_BACKLOG "* ]] || die "MEASURE_BACKLOG $MEASURE_BACKLOG is not one of BACKLOGS"
    RAND_MIB=$((2 * READ_SAMPLES))
    ((MEASURE_BACKLOG >= PEER_MIB + RAND_MIB)) ||
        die "the measured backlog ($MEASURE_BACKLOG MiB) must hold peer.bin ($PEER_MIB MiB) and rand.bin ($RAND_MIB MiB = 2 x READ_SAMPLES)"
    ((MEASURE_BACKLOG > 0)) || die "parts 2-4 need a backlog > 0"
    local cmd k
    cmd=
    for k in REPS BACKLOGS MEASURE_BACKLOG FAILBACK FAILBACK_MIB RATE TBF_BURST TBF_LATENCY MODE CONGESTION QUEUE_TARGET WRITE_MIB WRITES PEER_MIB READ_SAMPLES SEED \
        VOLUME_SIZE JOURNAL_SIZE JOURNAL_LIMIT LU_SIZE BENCH_DIR PAIRFS; do
        cmd="$cmd$k=$(printf '%q' "${!k}") "
    done
    cmd="$cmd$0"
    for k in fusermount3 jq python3 nsenter tc ip; do
        command -v "$k" >/dev/null || die "$k is required (apt-get install -y fuse3 jq python3 util-linux iproute2)"
    done
    if [[ ! -x $PAIRFS ]]; then
        [[ $PAIRFS == "$REPO/target/release/pairfs" ]] || die "no pairfs binary at $PAIRFS"
        log "building $PAIRFS (cargo build --release -p pairfs-cli)"
        (cd "$REPO" && cargo build --release -p pairfs-cli) || die "the build failed"
    fi
    is_mounted "$MNT_A" && die "$MNT_A is mounted (another run?)"
    is_mounted "$MNT_B" && die "$MNT_B is mounted (another run?)"
    mkdir -p "$BENCH_DIR" "$OUT" "$LOGS"
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
    rm -rf "$DATA_A" "$DATA_B" "$MNT_A" "$MNT_B"
    cp "$PAIRFS" "$BIN"
    local srcmib=$max
    ((WRITE_MIB > srcmib)) && srcmib=$WRITE_MIB
    log "generating $srcmib MiB of random data ($SRC)"
    head -c $((srcmib * 1048576)) /dev/urandom >"$SRC"
    : >"$RAW"
    print_facts
    local t0 rep
    t0=$(now)
    for ((rep = 1; rep <= REPS; rep++)); do
        for b in $BACKLOGS; do
            run_case "$b" "$rep"
        done
    done
    if ((FAILBACK)); then
        for ((rep = 1; rep <= REPS; rep++)); do
            run_failback_case "$MEASURE_BACKLOG" "$rep"
        done
    fi
    echo
    summarize
    echo
    echo "command: $cmd"
    echo "took: $(secs "$t0" "$(now)" | awk '{ printf "%.0f", $1 }') s"
    echo "raw: $RAW"
    echo "summary: $SUMMARY"
    echo "logs: $LOGS"
    if ((FAILURES > 0)); then
        loud "$FAILURES failure(s); see above and $LOGS"
        exit 1
    fi
}

main "$@"
