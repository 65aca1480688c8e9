#!/usr/bin/env bash
# The main job (README): a two-host failover demo. Builds pairfs, makes two hosts out of
# this machine — host A is this network namespace, host B a new one, joined by a veth
# pair whose rate `tc` limits so that a backlog builds — starts a node and a mount on
# each, and then:
#
#   1. writes a real tree on A (the primary) with ordinary tools and lets it replicate;
#   2. cuts the link, writes more on A (the backlog), brings the link back slow;
#   3. `pairfs takeover` on B: B serves every file at once (checksums against A) while
#      A's backlog still drains to it; B writes more (cp, mv, rm) meanwhile;
#   4. waits for the drain, the merge and the stream-back, checks both nodes with
#      `pairfs verify`, then fails back with `pairfs takeover` on A and checks again;
#
# and with VARIANT=force, instead of 3–4: kills A with SIGKILL while its backlog is still
# on the way, runs `pairfs takeover --force` on B and shows the loss report, B writing,
# A coming back fenced (read-only, its tail kept, the divergence reported), then
# `pairfs rejoin` on A and the resync of only the changed blocks. Everything
# is torn down at the end (KEEP=1 leaves the nodes running until Ctrl-C). Needs root.
#
#   VARIANT=planned|force  DEMO=/var/tmp/pairfs-failover  RATE=50mbit  BACKLOG_MIB=128
#   HOSTS=pfdemo (names of the namespace and links)  SUBNET=77 (10.SUBNET.0.0/24)
#   PAIRFS=path/to/pairfs (default: build it)  examples/failover-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-planned}
DEMO=${DEMO:-/var/tmp/pairfs-failover}
RATE=${RATE:-50mbit}
BACKLOG_MIB=${BACKLOG_MIB:-128}
KEEP=${KEEP:-0}
HOSTS=${HOSTS:-pfdemo}
SUBNET=${SUBNET:-77}
NS=$HOSTS-b
IF_A=$HOSTS-a0
IF_B=$HOSTS-b0
IP_A=10.$SUBNET.0.1
IP_B=10.$SUBNET.0.2
case $VARIANT in planned | force) ;; *) echo "VARIANT must be planned or force" >&2; exit 2 ;; esac

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf '\033[31mfailover-demo: %s\033[0m\n' "$*" >&2; exit 1; }

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -n "${PAIRFS:-}" ]; then
  P=$PAIRFS
else
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release -p pairfs-cli --quiet
  P=${CARGO_TARGET_DIR:-$PWD/target}/release/pairfs
fi

A=$DEMO/a
B=$DEMO/b
MA=$DEMO/mnt-a
MB=$DEMO/mnt-b
pa=
pb=

teardown() {
  for pid in $pa $pb; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $pa $pb; do wait "$pid" 2>/dev/null || true; done
  for m in "$MA" "$MB"; do mountpoint -q "$m" 2>/dev/null && fusermount3 -u -z "$m"; done
  ip link del "$IF_A" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  if [ -e "$DEMO/a.log" ]; then
    mkdir -p "$DEMO.logs" && cp "$DEMO"/*.log "$DEMO.logs/" && echo "logs kept in $DEMO.logs/"
  fi
  rm -rf "$DEMO"
}
teardown
rm -rf "$DEMO.logs"
trap 'teardown' EXIT
trap 'exit 130' INT TERM

# -- two hosts
ip netns add "$NS"
ip link add "$IF_A" type veth peer name "$IF_B"
ip link set "$IF_B" netns "$NS"
ip addr add "$IP_A/24" dev "$IF_A" && ip link set "$IF_A" up
ip netns exec "$NS" ip addr add "$IP_B/24" dev "$IF_B"
ip netns exec "$NS" ip link set "$IF_B" up
ip netns exec "$NS" ip link set lo up
on_b() { nsenter --net=/var/run/netns/"$NS" "$@"; }

# -- two nodes
mkdir -p "$MA" "$MB"
"$P" init --data "$A" --size 2G --journal-size 768M --lu-size 256M --name a >/dev/null
"$P" init --data "$B" --size 2G --journal-size 768M --lu-size 256M --name b --secondary >/dev/null
config() { # NAME ROLE LISTEN PEER PEER_ADDRESS PEER_DATA
  cat <<EOF
name = "$1"
data = "$DEMO/$1"
listen = "$3:7301"
role = "$2"
[peer]
name = "$4"
address = "$5:7301"
fingerprint = "$("$P" id --data "$6")"
[replication]
mode = "async"
max_lag = "off"
journal_limit = "384M"
[timeouts]
keepalive = "500ms"
idle = "5s"
[takeover]
fetch_timeout = "10s"
EOF
}
config a primary "$IP_A" b "$IP_B" "$B" > "$DEMO/a.toml"
config b secondary "$IP_B" a "$IP_A" "$A" > "$DEMO/b.toml"
start_a() { RUST_LOG=info "$P" mount --config "$DEMO/a.toml" "$MA" 2>> "$DEMO/a.log" & pa=$!; }
start_b() { RUST_LOG=info on_b "$P" mount --config "$DEMO/b.toml" "$MB" 2>> "$DEMO/b.log" & pb=$!; }

# json FILE KEY: the first value of KEY in a node's `status --json` (top-level keys here).
field() { "$P" status --json --config "$DEMO/$1.toml" 2>/dev/null | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }
wait_until() { # SECONDS WHAT COMMAND...
  local limit=$1 what=$2 t=0
  shift 2
  until "$@"; do
    t=$((t + 1))
    [ $t -le $((limit * 10)) ] || die "$what did not happen within ${limit}s (logs: $DEMO/a.log, $DEMO/b.log)"
    sleep 0.1
  done
}
mounted() { mountpoint -q "$1"; }
caught_up() { # the primary $1's peer has everything durable
  [ "$(field "$1" state)" = pair ] && [ "$(field "$1" replica_received_seq)" -ge "$(field "$1" durable_seq)" ] 2>/dev/null
}
settled() { # $1 primary, $2 secondary, no role change under way, caught up
  [ "$(field "$1" role)" = primary ] && [ "$(field "$2" role)" = secondary ] \
    && [ -z "$(field "$1" phase)" ] && [ -z "$(field "$2" phase)" ] && caught_up "$1"
}
streams_again() { [ "$(field a replica_received_seq)" -gt "$before" ] 2>/dev/null; }
fenced() { [ "$(field a role)" = secondary ] && field a refused | grep -q diverged; }
sums() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r md5sum); }
same() { # LIST_A LIST_B MESSAGE: the two checksum lists are equal, or the demo fails
  if cmp -s "$1" "$2"; then echo "$3"; else diff "$1" "$2" | head >&2; die "checksums differ: $3"; fi
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
show() { echo; "$P" status --config "$DEMO/$1.toml" | sed "s/^/  [$1] /"; }

say "host A (this namespace, $IP_A) and host B (namespace $NS, $IP_B), joined by a veth pair"
start_a
start_b
wait_until 60 "node a's mount" mounted "$MA"
wait_until 60 "node b's first copy and mount" mounted "$MB"
echo "node a: primary, mounted read-write at $MA; node b: secondary, read-only at $MB"

say "1. a real tree on A, replicated"
tar -C /usr -cf - include | tar -C "$MA" -xf -
cp -a "$MA/include/linux" "$MA/linux-copy"
head -c 32M /dev/urandom > "$MA/photo.raw"
sync -f "$MA"
wait_until 120 "replication of the tree" caught_up a
echo "$(find "$MA" -type f | wc -l) files, $(du -sh "$MA" | cut -f1); the replica has them all"

say "2. the link goes down; A writes on (its backlog), then the link comes back at $RATE"
ip link set "$IF_A" down
head -c "${BACKLOG_MIB}M" /dev/urandom > "$MA/video.raw"
mv "$MA/linux-copy" "$MA/linux-moved" && rm -rf "$MA/include/sound"
dd if=/dev/urandom of="$MA/photo.raw" bs=64k count=32 seek=100 conv=notrunc status=none
sync -f "$MA"
sums "$MA" > "$DEMO/sums-a"
tc qdisc add dev "$IF_A" root tbf rate "$RATE" burst 128kb latency 200ms
ip link set "$IF_A" up
before=$(field a replica_received_seq)
wait_until 60 "the stream's restart" streams_again
show a

if [ "$VARIANT" = force ]; then
  say "3. A dies (SIGKILL) with part of its backlog still on the way"
  kill -KILL "$pa" && wait "$pa" 2>/dev/null || true
  pa=
  fusermount3 -u -z "$MA"
  # B still sees the connection until its idle timeout: --force waits for that.
  say "4. pairfs takeover --force on B: it continues from what it holds and says what it lacks"
  on_b "$P" takeover --force --config "$DEMO/b.toml"
  echo "echo written on B after the forced takeover" > "$MB/after-force.txt" && sync -f "$MB"
  show b
  say "5. A comes back: it meets the new primary, steps down and keeps its own tail read-only"
  start_a
  wait_until 60 "node a's mount" mounted "$MA"
  wait_until 60 "node a's fencing" fenced
  show a
  if (echo x > "$MA/should-fail") 2>/dev/null; then die "the fenced old primary accepted a write"; fi
  echo "A refuses writes; its files as it last had them (its tail included) stay readable at $MA"
  sums "$MA" > "$DEMO/sums-a-back"
  same "$DEMO/sums-a-back" "$DEMO/sums-a" "A's files are exactly what it acknowledged before it died"
  say "6. pairfs rejoin on A (stopped): its tail is set aside, then only the changed blocks resync"
  kill -TERM "$pa" && wait "$pa" 2>/dev/null || true
  pa=
  "$P" rejoin --config "$DEMO/a.toml"
  sent=$(field b wire_bytes_sent)
  start_a
  wait_until 300 "A's resync" settled b a
  # (A mounts only once it holds a consistent copy again: after its status settles.)
  wait_until 60 "node a's mount after the resync" mounted "$MA"
  echo "resynced: $(( ($(field b wire_bytes_sent) - sent) / 1048576 )) MiB on the wire"
  "$P" verify --config "$DEMO/b.toml"
  sums "$MA" > "$DEMO/sums-a"
  sums "$MB" > "$DEMO/sums-b"
  same "$DEMO/sums-a" "$DEMO/sums-b" "every file's checksum is the same on both mounts"
  say "done: B is the primary of a new generation, A its secondary again (A's tail was set aside in $A/preserved/)"
else
  say "3. pairfs takeover on B, with A's backlog still draining"
  on_b "$P" takeover --config "$DEMO/b.toml"
  show b
  t0=$(date +%s%N)
  sums "$MB" > "$DEMO/sums-b"
  same "$DEMO/sums-b" "$DEMO/sums-a" \
    "all $(wc -l < "$DEMO/sums-a") files on B are identical to what A acknowledged (read in $(ms_since "$t0") ms; the takeover is now: $(field b phase || true))"
  say "   B writes with ordinary tools while the drain goes on"
  cp -a "$MB/include/linux" "$MB/linux-from-b"
  mv "$MB/linux-moved" "$MB/linux-moved-on-b" && rm -f "$MB/photo.raw"
  echo "written on B during the drain" > "$MB/during.txt"
  sync -f "$MB"
  show b
  say "4. the drain, the merge and the stream-back complete (A becomes B's secondary)"
  tc qdisc del dev "$IF_A" root
  wait_until 600 "the role change" settled b a
  "$P" verify --config "$DEMO/b.toml"
  sums "$MB" > "$DEMO/sums-b"
  sums "$MA" > "$DEMO/sums-a"
  same "$DEMO/sums-a" "$DEMO/sums-b" "every file's checksum is the same on both mounts"
  say "5. failback: pairfs takeover on A"
  "$P" takeover --config "$DEMO/a.toml"
  sums "$MA" > "$DEMO/sums-a"
  same "$DEMO/sums-a" "$DEMO/sums-b" "A serves every file as B had it"
  echo "written on A after the failback" > "$MA/after-failback.txt" && sync -f "$MA"
  wait_until 300 "the failback" settled a b
  "$P" verify --config "$DEMO/a.toml"
  sums "$MA" > "$DEMO/sums-a"
  sums "$MB" > "$DEMO/sums-b"
  same "$DEMO/sums-a" "$DEMO/sums-b" "every file's checksum is the same on both mounts"
  say "done: A is the primary again, B its secondary; nothing acknowledged was lost"
fi

if [ "$KEEP" = 1 ]; then
  echo "KEEP=1: the nodes run on ($MA, $MB); Ctrl-C tears everything down"
  wait
fi
