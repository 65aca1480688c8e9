#!/usr/bin/env bash
# pairfs benchmark.
#
# Runs each workload three ways, on the same disk, with REPS repetitions each:
#   pairfs  - a pairfs mount (fresh `pairfs init --force` volume per rep)
#   native  - a plain directory on the disk holding BENCH_DIR (the physical limit)
#   bindfs  - a `bindfs -o big_writes` mount of such a directory (plain FUSE
#             passthrough: the cost of FUSE itself, without pairfs)
#   base    - optional (TARGETS must name it): the same as pairfs with another
#             build, PAIRFS_BASE (an A/B of two versions in one run)
# and prints medians plus the ratios pairfs/native, pairfs/bindfs and pairfs/base.
#
# Workloads (WORKLOADS, space-separated; default all):
#   seqwrite    dd 1 GiB from /dev/zero, conv=fsync                     MiB/s
#   seqread     dd that file back to /dev/null with cold caches         MiB/s
#   smallfiles  create 10,000 x 4 KiB files in 100 dirs, then sync      files/s
#   untar       extract a real source tree (tar of TAR_SRC), then sync  entries/s
#   stat        lstat every entry of that tree with cold caches         entries/s
#   fsync       2,000 x (append 4 KiB + fsync) on one file              ops/s
#   overwrite   overwrite a 512 MiB file in place (notrunc), then fsync  MiB/s
#   rss         pairfs only: daemon RSS with 100,000 files, 16 GiB vol  MiB
#
# "then sync" means: sync(1), then fsync() of the target's root directory.
# FUSE does not forward sync(2)/syncfs(2) to the daemon (the kernel sends
# FUSE_SYNCFS to virtiofs only), so without the directory fsync pairfs
# could still hold the metadata in an uncommitted transaction.
#
# Every rep starts from a fresh state, with `sync` and dropped caches, and
# the targets are interleaved inside each rep so that drift in the disk's
# speed hits all of them alike.  pairfs is checked with `pairfs fsck` after
# every rep.  A workload that fails or hangs (WL_TIMEOUT) is recorded as
# FAIL and the run goes on; the exit status is then 1.
#
# Usage (as root):
#   tests/bench/run.sh
#   REPS=1 WORKLOADS="fsync stat" tests/bench/run.sh
#
# Results: a table on stdout, and in OUT: results-<stamp>.tsv (every
# measurement), summary-<stamp>.tsv, results-<stamp>.json, and the logs of
# every pairfs/bindfs daemon and of every failure under logs-<stamp>/.

set -euo pipefail

# ---------------------------------------------------------------- settings --

PAIRFS=${PAIRFS:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/pairfs}  # the pairfs binary
BENCH_DIR=${BENCH_DIR:-/var/tmp/pairfs-bench}        # work dir, on the disk under test
OUT=${OUT:-/tmp/pairfs-bench}                        # results dir
REPS=${REPS:-3}                                      # repetitions per workload and target
ALL_WORKLOADS="seqwrite seqread smallfiles untar stat fsync overwrite rss"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
TARGETS=${TARGETS:-"pairfs native bindfs"}           # which ways to run (subset allowed; + "base")
PAIRFS_BASE=${PAIRFS_BASE:-}                         # the "base" target's pairfs binary
WL_TIMEOUT=${WL_TIMEOUT:-1800}                       # seconds before a workload counts as hung
KEEP=${KEEP:-0}                                      # 1: keep BENCH_DIR's contents at exit

PAIRFS_SIZE=${PAIRFS_SIZE:-8G}                       # volume for every workload but rss
PAIRFS_JOURNAL=${PAIRFS_JOURNAL:-1G}
PAIRFS_INIT_ARGS=${PAIRFS_INIT_ARGS:-}               # e.g. "--block-size 16384"
PAIRFS_MOUNT_ARGS=${PAIRFS_MOUNT_ARGS:-}             # e.g. "--threads 8 --noatime"
BINDFS_OPTS=${BINDFS_OPTS:-big_writes}

SEQ_MIB=${SEQ_MIB:-1024}                             # seqwrite/seqread file size
SMALL_FILES=${SMALL_FILES:-10000}
SMALL_DIRS=${SMALL_DIRS:-100}
SMALL_SIZE=${SMALL_SIZE:-4096}
TAR_SRC=${TAR_SRC:-/usr/include}                     # tree the untar/stat tarball is made of
FSYNC_OPS=${FSYNC_OPS:-2000}
FSYNC_SIZE=${FSYNC_SIZE:-4096}
OVERWRITE_MIB=${OVERWRITE_MIB:-512}
RSS_SIZE=${RSS_SIZE:-16G}                            # rss workload: volume size,
RSS_DIRS=${RSS_DIRS:-1000}                           # directories,
RSS_FILES=${RSS_FILES:-100000}                       # files in all,
RSS_FILE_SIZE=${RSS_FILE_SIZE:-100}                  # bytes per file

STAMP=$(date +%Y%m%d-%H%M%S)
RAW=$OUT/results-$STAMP.tsv
FACTS=$OUT/facts-$STAMP.tsv
SUMMARY=$OUT/summary-$STAMP.tsv
JSON=$OUT/results-$STAMP.json
LOGS=$OUT/logs-$STAMP

# Paths inside BENCH_DIR.
TARBALL=$BENCH_DIR/src.tar
PAIRFS_DATA=$BENCH_DIR/pairfs-data
PAIRFS_MNT=$BENCH_DIR/mnt-pairfs
NATIVE_DIR=$BENCH_DIR/native
BINDFS_SRC=$BENCH_DIR/bindfs-src
BINDFS_MNT=$BENCH_DIR/mnt-bindfs

# State of the daemons this script started (empty when none is running).
PAIRFS_PID=
BINDFS_PID=
WL_PID=
FAILURES=0

# ----------------------------------------------------------------- helpers --

# Helpers, python bits and the foundation workloads (shared with the other script).
# shellcheck source=tests/bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# unmount_daemon MNT PID: fusermount3 -u, wait for the daemon to exit, and
# escalate (retry, SIGTERM, SIGKILL, lazy unmount) if it does not.  Leaves
# the daemon's exit status in UNMOUNT_RC.  (Not to be called in a $(...):
# only this shell can `wait` for its children.)
unmount_daemon() {
    local mnt=$1 pid=$2 i
    UNMOUNT_RC=0
    for i in 1 2 3 4 5; do
        is_mounted "$mnt" || break
        fusermount3 -u "$mnt" 2>/dev/null && break
        sleep 1
    done
    if ! wait_gone "$pid" 60; then
        log "daemon $pid ($mnt) still running 60 s after unmount: SIGTERM"
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

# -------------------------------------------------------- setup / teardown --
# Every setup_* leaves the directory to benchmark in TARGET_DIR.

# setup_pairfs [SIZE]: fresh volume, mounted in the background, logging to LOGF.
# The binary is PFS_BIN (default PAIRFS).
setup_pairfs() {
    local bin=${PFS_BIN:-$PAIRFS}
    local size=${1:-$PAIRFS_SIZE}
    mkdir -p "$PAIRFS_MNT" || return 1
    # A fresh data dir: `init --force` replaces the volume but refuses to replace a node's
    # identity.key.
    rm -rf "$PAIRFS_DATA"
    # shellcheck disable=SC2086 # word splitting of the *_ARGS is intended
    "$bin" init --data "$PAIRFS_DATA" --size "$size" --journal-size "$PAIRFS_JOURNAL" \
        $PAIRFS_INIT_ARGS --force >>"$LOGF" 2>&1 || { log "pairfs init failed (see $LOGF)"; return 1; }
    # shellcheck disable=SC2086
    "$bin" mount --data "$PAIRFS_DATA" $PAIRFS_MOUNT_ARGS "$PAIRFS_MNT" >>"$LOGF" 2>&1 &
    PAIRFS_PID=$!
    if ! wait_mounted "$PAIRFS_MNT" "$PAIRFS_PID" "$LOGF"; then
        teardown_pairfs >/dev/null || true
        return 1
    fi
    TARGET_DIR=$PAIRFS_MNT
}

# teardown_pairfs: unmount, then `pairfs fsck`.  Fails (loudly) if the daemon
# exited non-zero, logged an error or panic, or fsck is not clean.
teardown_pairfs() {
    [[ -n $PAIRFS_PID ]] || return 0
    local ok=0
    unmount_daemon "$PAIRFS_MNT" "$PAIRFS_PID"
    PAIRFS_PID=
    if [[ $UNMOUNT_RC != 0 ]]; then
        loud "pairfs mount exited with status $UNMOUNT_RC (log: $LOGF)"
        ok=1
    fi
    if grep -Eq ' ERROR |panicked' "$LOGF"; then
        loud "pairfs logged errors (log: $LOGF):" "$(grep -E ' ERROR |panicked' "$LOGF" | head -n 5)"
        ok=1
    elif grep -q ' WARN ' "$LOGF"; then
        log "pairfs logged warnings (log: $LOGF): $(grep ' WARN ' "$LOGF" | head -n 3)"
    fi
    if ! "${PFS_BIN:-$PAIRFS}" fsck --data "$PAIRFS_DATA" >>"$LOGF.fsck" 2>&1; then
        loud "pairfs fsck is NOT clean (report: $LOGF.fsck):" "$(head -n 20 "$LOGF.fsck")"
        ok=1
    fi
    return "$ok"
}

# The "base" target: pairfs with the PAIRFS_BASE build.
setup_base() { PFS_BIN=$PAIRFS_BASE setup_pairfs "$@"; }

teardown_base() { PFS_BIN=$PAIRFS_BASE teardown_pairfs; }

setup_native() {
    rm -rf "$NATIVE_DIR" && mkdir -p "$NATIVE_DIR" || return 1
    TARGET_DIR=$NATIVE_DIR
}

teardown_native() { rm -rf "$NATIVE_DIR"; }

setup_bindfs() {
    rm -rf "$BINDFS_SRC" && mkdir -p "$BINDFS_SRC" "$BINDFS_MNT" || return 1
    # -f keeps bindfs in the foreground so that we know its pid.
    bindfs -f -o "$BINDFS_OPTS" "$BINDFS_SRC" "$BINDFS_MNT" >>"$LOGF" 2>&1 &
    BINDFS_PID=$!
    if ! wait_mounted "$BINDFS_MNT" "$BINDFS_PID" "$LOGF"; then
        teardown_bindfs || true
        return 1
    fi
    TARGET_DIR=$BINDFS_MNT
}

teardown_bindfs() {
    [[ -n $BINDFS_PID ]] || return 0
    unmount_daemon "$BINDFS_MNT" "$BINDFS_PID"
    BINDFS_PID=
    rm -rf "$BINDFS_SRC"
    [[ $UNMOUNT_RC == 0 ]] || { log "bindfs exited with status $UNMOUNT_RC (log: $LOGF)"; return 1; }
}

# At exit: stop whatever is still running, unmount, and clean BENCH_DIR.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $WL_PID ]]; then
        # the workload subshell and what it runs (dd, tar, python)
        pkill -TERM -P "$WL_PID" 2>/dev/null || true
        kill -TERM "$WL_PID" 2>/dev/null || true
        wait "$WL_PID" 2>/dev/null || true
    fi
    if [[ -n $PAIRFS_PID ]]; then unmount_daemon "$PAIRFS_MNT" "$PAIRFS_PID" || true; fi
    if [[ -n $BINDFS_PID ]]; then unmount_daemon "$BINDFS_MNT" "$BINDFS_PID" || true; fi
    if [[ $KEEP != 1 && -d $BENCH_DIR ]]; then
        is_mounted "$PAIRFS_MNT" || rm -rf "$PAIRFS_MNT" "$PAIRFS_DATA"
        is_mounted "$BINDFS_MNT" || rm -rf "$BINDFS_MNT" "$BINDFS_SRC"
        rm -rf "$NATIVE_DIR" "$TARBALL"
        rmdir "$BENCH_DIR" 2>/dev/null || true
    fi
    exit "$rc"
}

# --------------------------------------------------------------- workloads --
# Each wl_* takes the target directory, runs in a subshell with `set -e`, and
# prints one line per metric: "NAME UNIT VALUE". The foundation ones are in lib.sh.

# rss (pairfs only, on a RSS_SIZE volume): the daemon's memory after creating
# RSS_FILES files and lstat-ing them all with cold kernel caches.  Also
# reports how fast the creation and the walk went.
wl_rss() {
    local dir=$1 t0 t1 t2 t3 n
    [[ -n $PAIRFS_PID ]] || { echo "rss needs a pairfs daemon" >&2; return 1; }
    rss_of() { awk -v k="$1:" '$1 == k { printf "%.1f", $2 / 1024 }' "/proc/$PAIRFS_PID/status"; }
    echo "rss_mounted MiB $(rss_of VmRSS)"
    t0=$(now)
    python3 -c "$PY_MKFILES" "$dir" "$RSS_DIRS" "$RSS_FILES" "$RSS_FILE_SIZE"
    sync_dir "$dir"
    t1=$(now)
    echo "rss_created MiB $(rss_of VmRSS)"
    drop_caches
    t2=$(now)
    n=$(python3 -c "$PY_LSTAT_TREE" "$dir")
    t3=$(now)
    [[ $n == $((RSS_FILES + RSS_DIRS)) ]] || { echo "walked $n entries, expected $((RSS_FILES + RSS_DIRS))" >&2; return 1; }
    echo "rss_after_stat MiB $(rss_of VmRSS)"
    echo "rss_peak(VmHWM) MiB $(rss_of VmHWM)"
    echo "create files/s $(rate "$RSS_FILES" "$(secs "$t0" "$t1")")"
    echo "lstat entries/s $(rate "$n" "$(secs "$t2" "$t3")")"
}

# ------------------------------------------------------------------ driver --

# targets_for WORKLOAD: the targets that workload runs on.
targets_for() {
    if [[ $1 == rss ]]; then
        local t
        for t in pairfs base; do
            if [[ " $TARGETS " == *" $t "* ]]; then echo "$t"; fi
        done
    else
        echo "$TARGETS"
    fi
}

record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"; }

# run_one WORKLOAD TARGET REP: set up, run (with a watchdog), tear down, record.
run_one() {
    local wl=$1 target=$2 rep=$3 res rc=0 deadline metric unit value
    LOGF=$LOGS/$wl-$target-$rep.log
    res=$LOGS/$wl-$target-$rep.out
    : >"$LOGF"
    log "$wl / $target / rep $rep"

    local size=$PAIRFS_SIZE
    [[ $wl == rss ]] && size=$RSS_SIZE
    if ! "setup_$target" "$size"; then
        loud "$wl/$target rep $rep: setup failed (log: $LOGF)"
        record "$wl" "$target" "$rep" FAIL - setup
        FAILURES=$((FAILURES + 1))
        return 0
    fi

    # The workload runs in a background subshell with errexit on, so that any
    # failing command ends it; the watchdog kills the FUSE daemon if it hangs
    # (which makes the pending requests fail instead of blocking forever).
    (set -e; "wl_$wl" "$TARGET_DIR") >"$res" 2>"$res.err" &
    WL_PID=$!
    deadline=$((SECONDS + WL_TIMEOUT))
    while kill -0 "$WL_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$WL_PID" 2>/dev/null; then
        loud "$wl/$target rep $rep: still running after $WL_TIMEOUT s; killing the daemon"
        if [[ ($target == pairfs || $target == base) && -n $PAIRFS_PID ]]; then kill -KILL "$PAIRFS_PID" 2>/dev/null || true; fi
        if [[ $target == bindfs && -n $BINDFS_PID ]]; then kill -KILL "$BINDFS_PID" 2>/dev/null || true; fi
        sleep 2
        pkill -KILL -P "$WL_PID" 2>/dev/null || true
        kill -KILL "$WL_PID" 2>/dev/null || true
        echo "timeout after $WL_TIMEOUT s" >>"$res.err"
    fi
    wait "$WL_PID" || rc=$?
    WL_PID=

    if [[ $rc == 0 && -s $res ]]; then
        while read -r metric unit value; do
            record "$wl" "$target" "$rep" "$metric" "$value" "$unit"
            log "    $metric = $value $unit"
        done <"$res"
    else
        loud "$wl/$target rep $rep FAILED (status $rc):" "$(tail -n 5 "$res.err")"
        record "$wl" "$target" "$rep" FAIL - "status-$rc"
        FAILURES=$((FAILURES + 1))
    fi

    if ! "teardown_$target"; then
        record "$wl" "$target" "$rep" FAIL - teardown/fsck
        FAILURES=$((FAILURES + 1))
    fi
}

print_facts() {
    {
        machine_facts "$PAIRFS"
        if [[ " $TARGETS " == *" base "* ]]; then
            printf 'pairfs_base\t%s (built %s, sha256 %.12s)\n' "$PAIRFS_BASE" \
                "$(date -r "$PAIRFS_BASE" -Iseconds)" "$(sha256sum "$PAIRFS_BASE" | cut -d' ' -f1)"
        fi
        printf 'pairfs_volume\t%s (rss: %s), journal %s, init args: %s, mount args: %s\n' \
            "$PAIRFS_SIZE" "$RSS_SIZE" "$PAIRFS_JOURNAL" "${PAIRFS_INIT_ARGS:-(none)}" "${PAIRFS_MOUNT_ARGS:-(none)}"
        printf 'bindfs\t%s, -o %s\n' "$(bindfs --version 2>&1 | head -n 1)" "$BINDFS_OPTS"
        printf 'reps\t%s\n' "$REPS"
        printf 'workloads\t%s\n' "$WORKLOADS"
        printf 'tarball\t%s: %s entries (%s regular files), %s MiB\n' "$TAR_SRC" "$TAR_ENTRIES" \
            "$TAR_FILES" "$(($(stat -c %s "$TARBALL") / 1048576))"
    } >"$FACTS"
    show_facts
}

# summarize: medians, ratios, the table, summary TSV and JSON.
summarize() {
    python3 - "$RAW" "$FACTS" "$SUMMARY" "$JSON" "$WORKLOADS" <<'EOF'
import json, statistics, sys
raw, facts_path, summary_path, json_path, order = sys.argv[1:6]
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
keys.sort(key=lambda k: order.index(k[0]) if k[0] in order else 99)

targets = ["pairfs", "native", "bindfs", "base"]
summary = []
for k in keys:
    entry = {"workload": k[0], "metric": k[1], "unit": units[k]}
    for t in targets:
        v = data[k].get(t)
        entry[t] = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v),
                    "values": v} if v else None
    for t in ("native", "bindfs", "base"):
        p, o = entry["pairfs"], entry[t]
        entry["pairfs/" + t] = p["median"] / o["median"] if p and o and o["median"] else None
    summary.append(entry)

def num(x):
    return "%.3f" % x if abs(x) < 10 else "%.1f" % x if abs(x) < 1000 else "%.0f" % x
def med(e, t):
    return num(e[t]["median"]) if e[t] else "-"
def ratio(e, t):
    r = e["pairfs/" + t]
    return "%.2f" % r if r is not None else "-"

head = ["workload", "metric", "unit", "pairfs", "native", "bindfs", "base", "pairfs/native", "pairfs/bindfs", "pairfs/base",
        "pairfs min-max", "base min-max"]
table = [head]
for e in summary:
    p = e["pairfs"]
    b = e["base"]
    table.append([e["workload"], e["metric"], e["unit"], med(e, "pairfs"), med(e, "native"), med(e, "bindfs"),
                  med(e, "base"), ratio(e, "native"), ratio(e, "bindfs"), ratio(e, "base"),
                  "%s-%s" % (num(p["min"]), num(p["max"])) if p else "-",
                  "%s-%s" % (num(b["min"]), num(b["max"])) if b else "-"])
w = [max(len(r[i]) for r in table) for i in range(len(head))]
print("== results: medians of %s reps (rates: higher is better) ==" % facts.get("reps", "?"))
for i, r in enumerate(table):
    print("  " + "  ".join(c.ljust(w[j]) if j < 3 else c.rjust(w[j]) for j, c in enumerate(r)))
    if i == 0:
        print("  " + "  ".join("-" * x for x in w))
if fails:
    print("\nFAILURES:")
    for wl, f in fails.items():
        for x in f:
            print("  %s: %s" % (wl, x))

with open(summary_path, "w") as f:
    f.write("\t".join(head[:10]) + "\n")
    for r in table[1:]:
        f.write("\t".join(r[:10]) + "\n")
with open(json_path, "w") as f:
    json.dump({"facts": facts, "summary": summary, "failures": fails,
               "raw": [dict(zip(["workload", "target", "rep", "metric", "value", "unit"], r)) for r in rows]},
              f, indent=1)
EOF
}

main() {
    [[ $EUID == 0 ]] || die "run as root (mounts, drop_caches)"
    [[ -x $PAIRFS ]] || die "no pairfs binary at $PAIRFS (cargo build --release -p pairfs-cli)"
    local w t
    for w in $WORKLOADS; do
        [[ " $ALL_WORKLOADS " == *" $w "* ]] || die "unknown workload '$w' (known: $ALL_WORKLOADS)"
    done
    for t in $TARGETS; do
        [[ $t == pairfs || $t == native || $t == bindfs || $t == base ]] || die "unknown target '$t'"
        [[ $t != base || -x $PAIRFS_BASE ]] || die "target base needs PAIRFS_BASE, a pairfs binary"
    done
    if ! command -v bindfs >/dev/null || ! command -v fusermount3 >/dev/null; then
        log "installing bindfs and fuse3"
        apt-get update -qq && apt-get install -y -qq bindfs fuse3 >/dev/null
    fi
    command -v python3 >/dev/null || die "python3 is required"
    is_mounted "$PAIRFS_MNT" && die "$PAIRFS_MNT is already mounted (another run?)"
    is_mounted "$BINDFS_MNT" && die "$BINDFS_MNT is already mounted (another run?)"

    mkdir -p "$BENCH_DIR" "$OUT" "$LOGS"
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM

    # The untar/stat source: a tar of a real tree, built once per run.
    tar cf "$TARBALL" -C "$(dirname "$TAR_SRC")" "$(basename "$TAR_SRC")"
    TAR_ENTRIES=$(tar tf "$TARBALL" | grep -c .)
    TAR_FILES=$(tar tvf "$TARBALL" | grep -c '^-')

    print_facts
    : >"$RAW"
    local rep
    for w in $WORKLOADS; do
        for ((rep = 1; rep <= REPS; rep++)); do
            for t in $(targets_for "$w"); do
                run_one "$w" "$t" "$rep"
            done
        done
    done

    echo
    summarize
    echo
    echo "raw: $RAW"
    echo "summary: $SUMMARY"
    echo "json: $JSON"
    echo "logs: $LOGS"
    if ((FAILURES > 0)); then
        loud "$FAILURES failure(s); see above and $LOGS"
        exit 1
    fi
}

main "$@"
