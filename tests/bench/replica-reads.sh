#!/usr/bin/env bash
# The secondary's readers while it replicates: a pair on loopback (examples/pair-demo.sh,
# async mode), `dd bs=1M count=WRITE_MIB conv=fsync` on the primary's mount, and meanwhile
# a loop on the secondary's mount that `stat`s a new missing name every 3 ms (each a FUSE
# lookup, which takes the filesystem's lock shared) for SECONDS_SAMPLED s. Prints the
# primary's write rate and the lookups' count and latency percentiles. No baseline of its
# own: run it with two binaries interleaved (PAIRFS=...) for an A/B (BENCHMARKS.md).
#
# Usage (as root): PAIRFS=target/release/pairfs tests/bench/replica-reads.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PAIRFS=${PAIRFS:-$REPO/target/release/pairfs}
WORK=${WORK:-/var/tmp/pairfs-bench-replica-reads}
WRITE_MIB=${WRITE_MIB:-1024}
SECONDS_SAMPLED=${SECONDS_SAMPLED:-14}
MNT_A=$WORK/mnt-a MNT_B=$WORK/mnt-b
[[ -x $PAIRFS ]] || { echo "no pairfs binary at $PAIRFS (build it: cargo build --release)" >&2; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK/demo"
head -c "$((WRITE_MIB * 1048576))" /dev/urandom > "$WORK/src"
cd "$REPO"
DEMO=$WORK/demo SIZE=4G PAIRFS=$PAIRFS MNT_A=$MNT_A MNT_B=$MNT_B setsid examples/pair-demo.sh > "$WORK/demo.out" 2>&1 &
demo=$!
cleanup() { kill -TERM -- "-$demo" 2>/dev/null || true; sleep 3; umount -l "$MNT_A" "$MNT_B" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 60); do mountpoint -q "$MNT_A" && mountpoint -q "$MNT_B" && break; sleep 1; done
mountpoint -q "$MNT_B" || { echo "the pair did not mount (see $WORK/demo.out)" >&2; exit 1; }
sleep 5   # the initial copy of an empty volume
python3 - "$MNT_B" "$SECONDS_SAMPLED" > "$WORK/lookups" <<'PY' &
import os, sys, time
m, secs = sys.argv[1], float(sys.argv[2])
lat, i, end = [], 0, time.monotonic() + secs
while time.monotonic() < end:
    i += 1
    t = time.monotonic()
    try:
        os.stat(f"{m}/none-{i}")
    except FileNotFoundError:
        pass
    lat.append((time.monotonic() - t) * 1e3)
    time.sleep(0.003)
lat.sort()
n = len(lat)
print("lookups %d  p50 %.3f  p90 %.3f  p99 %.3f  max %.1f ms  over 5 ms: %d" % (
    n, lat[n // 2], lat[int(n * .9)], lat[int(n * .99)], lat[-1], sum(1 for x in lat if x > 5)))
PY
sampler=$!
sleep 1
t0=$(date +%s.%N)
dd if="$WORK/src" of="$MNT_A/big" bs=1M conv=fsync status=none
t1=$(date +%s.%N)
wait "$sampler"
echo "primary's write $(awk -v m="$WRITE_MIB" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", m / (b - a) }') MiB/s; $(cat "$WORK/lookups")"
