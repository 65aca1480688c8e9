# Shared by tests/bench/run.sh (single node) and tests/bench/repl.sh (the pair):
# helpers, the python bits and the foundation workloads, so that both measure the same
# thing. Sourced, not run. The workloads read the caller's settings: SEQ_MIB, SMALL_FILES,
# SMALL_DIRS, SMALL_SIZE, TARBALL, TAR_ENTRIES, FSYNC_OPS, FSYNC_SIZE, OVERWRITE_MIB.
# Each wl_* takes the target directory, runs in a subshell with `set -e`, and prints one
# line per metric: "NAME UNIT VALUE".
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

die() { log "FATAL: $*"; exit 1; }

loud() {
    printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
    printf '!!! %s\n' "$@" >&2
    printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
}

now() { date +%s.%N; }

# machine_facts BINARY: the machine, the bench directory and the pairfs build (BINARY is
# the copy that runs; $PAIRFS names the build), as "key<TAB>value" lines on stdout.
machine_facts() {
    local commit
    commit=$(git -C "$(dirname "$PAIRFS")" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ $commit != unknown ]] && ! git -C "$(dirname "$PAIRFS")" diff --quiet HEAD 2>/dev/null; then
        commit="$commit (worktree modified)"
    fi
    printf 'date\t%s\n' "$(date -Iseconds)"
    printf 'host\t%s\n' "$(hostname)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    printf 'nproc\t%s\n' "$(nproc)"
    printf 'ram\t%s\n' "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    printf 'disk\t%s\n' "$(df -h --output=source,fstype,size,avail "$BENCH_DIR" | tail -n 1 | tr -s ' ')"
    printf 'mount_opts\t%s\n' "$(findmnt -no OPTIONS -T "$BENCH_DIR")"
    printf 'bench_dir\t%s\n' "$BENCH_DIR"
    printf 'pairfs\t%s (built %s, sha256 %.12s; repo at git %s)\n' "$PAIRFS" \
        "$(date -r "$PAIRFS" -Iseconds)" "$(sha256sum "$1" | cut -d' ' -f1)" "$commit"
}

# show_facts: prints $FACTS for the reader of the run.
show_facts() {
    echo "== machine and run =="
    awk -F'\t' '{ printf "  %-14s %s\n", $1, $2 }' "$FACTS"
    echo
}

# secs T0 T1: elapsed seconds.  rate N SECS: N per second.
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }

rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.2f", n / s }'; }

# Write back everything and empty the page, dentry and inode caches.  The pairfs
# daemons keep running (and keep their own caches).
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# The "then sync" of the write workloads: see the header.
sync_dir() {
    sync
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.close(fd)' "$1"
}

is_mounted() { awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }

# wait_gone PID SECS: wait for a process to exit; returns 1 on timeout.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# wait_mounted MNT PID LOG SECS: wait for MNT to appear in /proc/mounts while the
# daemon PID stays alive.
wait_mounted() {
    local mnt=$1 pid=$2 logf=$3 limit=${4:-20} deadline
    deadline=$((SECONDS + limit))
    until is_mounted "$mnt"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "daemon for $mnt exited before mounting; its log ($logf):"
            tail -n 20 "$logf" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$mnt not mounted after $limit s; log ($logf):"
            tail -n 20 "$logf" >&2 || true
            return 1
        fi
        sleep 0.05
    done
}

# mkfiles ROOT NDIRS NFILES SIZE: NFILES files of SIZE bytes spread over NDIRS
# new directories, each written with open/write/close.
PY_MKFILES='
import os, sys
root, ndirs, nfiles, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = os.urandom(size)
per, extra = divmod(nfiles, ndirs)
for d in range(ndirs):
    p = os.path.join(root, "d%04d" % d)
    os.mkdir(p)
    for f in range(per + (d < extra)):
        fd = os.open(os.path.join(p, "f%06d" % f), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
'

# lstat_tree ROOT: lstat every entry below ROOT; prints the count.
PY_LSTAT_TREE='
import os, sys
n = 0
for dirpath, dirnames, filenames in os.walk(sys.argv[1]):
    for name in dirnames + filenames:
        os.lstat(os.path.join(dirpath, name))
        n += 1
print(n)
'

# fsync_loop FILE N SIZE: N x (append SIZE bytes, fsync); prints the metrics.
PY_FSYNC_LOOP='
import os, sys, time
path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = os.urandom(size)
lat = []
t0 = time.perf_counter()
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for _ in range(n):
    a = time.perf_counter()
    if os.write(fd, buf) != size:
        sys.exit("short write")
    os.fsync(fd)
    lat.append(time.perf_counter() - a)
os.close(fd)
t = time.perf_counter() - t0
lat.sort()
print("fsync ops/s %.2f" % (n / t))
print("fsync_p50 ms %.3f" % (lat[len(lat) // 2] * 1e3))
print("fsync_p99 ms %.3f" % (lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3))
'

wl_seqwrite() {
    local dir=$1 t0 t1
    drop_caches
    t0=$(now)
    dd if=/dev/zero of="$dir/seq.bin" bs=1M count="$SEQ_MIB" conv=fsync status=none
    t1=$(now)
    echo "write MiB/s $(rate "$SEQ_MIB" "$(secs "$t0" "$t1")")"
}

wl_seqread() {
    local dir=$1 t0 t1 size
    dd if=/dev/zero of="$dir/seq.bin" bs=1M count="$SEQ_MIB" conv=fsync status=none
    drop_caches
    t0=$(now)
    dd if="$dir/seq.bin" of=/dev/null bs=1M status=none
    t1=$(now)
    size=$(stat -c %s "$dir/seq.bin")
    [[ $size == $((SEQ_MIB * 1048576)) ]] || { echo "seq.bin has $size bytes" >&2; return 1; }
    echo "read MiB/s $(rate "$SEQ_MIB" "$(secs "$t0" "$t1")")"
}

wl_smallfiles() {
    local dir=$1 t0 t1 n
    drop_caches
    t0=$(now)
    python3 -c "$PY_MKFILES" "$dir" "$SMALL_DIRS" "$SMALL_FILES" "$SMALL_SIZE"
    sync_dir "$dir"
    t1=$(now)
    n=$(find "$dir" -type f | wc -l)
    [[ $n == "$SMALL_FILES" ]] || { echo "found $n files, expected $SMALL_FILES" >&2; return 1; }
    echo "create files/s $(rate "$SMALL_FILES" "$(secs "$t0" "$t1")")"
}

wl_untar() {
    local dir=$1 t0 t1 n
    drop_caches
    cat "$TARBALL" >/dev/null # the source stays in the page cache: measure the writes only
    t0=$(now)
    tar xf "$TARBALL" -C "$dir"
    sync_dir "$dir"
    t1=$(now)
    n=$(find "$dir" -mindepth 1 | wc -l)
    [[ $n == "$TAR_ENTRIES" ]] || { echo "found $n entries, expected $TAR_ENTRIES" >&2; return 1; }
    echo "extract entries/s $(rate "$TAR_ENTRIES" "$(secs "$t0" "$t1")")"
}

wl_stat() {
    local dir=$1 t0 t1 n
    tar xf "$TARBALL" -C "$dir"
    sync_dir "$dir"
    drop_caches
    t0=$(now)
    n=$(python3 -c "$PY_LSTAT_TREE" "$dir")
    t1=$(now)
    [[ $n == "$TAR_ENTRIES" ]] || { echo "walked $n entries, expected $TAR_ENTRIES" >&2; return 1; }
    echo "lstat entries/s $(rate "$n" "$(secs "$t0" "$t1")")"
}

wl_fsync() {
    local dir=$1
    drop_caches
    python3 -c "$PY_FSYNC_LOOP" "$dir/fsync.bin" "$FSYNC_OPS" "$FSYNC_SIZE"
}

# cpu_seconds PID...: user + system CPU seconds the processes have used so far (their
# own threads; /proc/PID/stat fields 14 and 15, read after the command name, which may
# hold spaces).  A PID that is gone counts 0.
cpu_seconds() {
    local pid ticks=0 stat f
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        read -ra f <<<"${stat##*) }" # f[0] is field 3 (the state)
        ticks=$((ticks + f[11] + f[12]))
    done
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

# busy_seconds: CPU seconds the whole machine has spent not idle (/proc/stat), less the
# time the hypervisor gave its CPUs to others (steal: not ours, and not idle either).
busy_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" { print ($2 + $3 + $4 + $7 + $8) / hz; exit }' /proc/stat
}

# steal_seconds: CPU seconds the hypervisor has taken from this machine (/proc/stat).
steal_seconds() { awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" { print $9 / hz; exit }' /proc/stat; }

# overwrite: a file of OVERWRITE_MIB written and fsync'ed, then overwritten in place
# (conv=notrunc) and fsync'ed again: the cost of overwriting blocks in use.
wl_overwrite() {
    local dir=$1 t0 t1
    dd if=/dev/zero of="$dir/over.bin" bs=1M count="$OVERWRITE_MIB" conv=fsync status=none
    drop_caches
    t0=$(now)
    dd if=/dev/zero of="$dir/over.bin" bs=1M count="$OVERWRITE_MIB" conv=notrunc,fsync status=none
    t1=$(now)
    echo "overwrite MiB/s $(rate "$OVERWRITE_MIB" "$(secs "$t0" "$t1")")"
}
