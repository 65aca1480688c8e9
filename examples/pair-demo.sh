#!/usr/bin/env bash
# The main job (README): a replicated pair on one machine. Builds pairfs, creates node "a"
# (primary, read-write mount at /tmp/pairfs-a) and node "b" (secondary, read-only mount at
# /tmp/pairfs-b) replicating over QUIC on loopback, then shows the pair's status every
# second. Ctrl-C stops both nodes cleanly; if a node stops on its own, the script prints
# the end of its log and exits 1.
#   DEMO=/var/tmp/pairfs-demo SIZE=2G MODE=async MNT_A=/tmp/pairfs-a MNT_B=/tmp/pairfs-b \
#   PAIRFS=path/to/pairfs (default: build it) examples/pair-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-/var/tmp/pairfs-demo}
SIZE=${SIZE:-2G}
MODE=${MODE:-async}
MNT_A=${MNT_A:-/tmp/pairfs-a}
MNT_B=${MNT_B:-/tmp/pairfs-b}
command -v fusermount3 >/dev/null || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
if [ -n "${PAIRFS:-}" ]; then
  P=$PAIRFS
else
  cargo build --release -p pairfs-cli --quiet
  P=${CARGO_TARGET_DIR:-$PWD/target}/release/pairfs
fi
mkdir -p "$DEMO" "$MNT_A" "$MNT_B"
[ -e "$DEMO/a/volume" ] || "$P" init --data "$DEMO/a" --size "$SIZE" --name a
[ -e "$DEMO/b/volume" ] || "$P" init --data "$DEMO/b" --size "$SIZE" --name b --secondary
fa=$("$P" id --data "$DEMO/a")
fb=$("$P" id --data "$DEMO/b")
for n in a b; do
  sed -e "s#/var/tmp/pairfs-demo#$DEMO#" -e "s/^mode = \"async\"/mode = \"$MODE\"/" examples/node-$n.toml > "$DEMO/node-$n.toml"
done
sed -i "s/^fingerprint = .*/fingerprint = \"$fb\"/" "$DEMO/node-a.toml"
sed -i "s/^fingerprint = .*/fingerprint = \"$fa\"/" "$DEMO/node-b.toml"
"$P" mount --config "$DEMO/node-a.toml" "$MNT_A" 2> "$DEMO/a.log" & pa=$!
"$P" mount --config "$DEMO/node-b.toml" "$MNT_B" 2> "$DEMO/b.log" & pb=$!
stop() { kill -TERM $pa $pb 2>/dev/null; wait $pa $pb 2>/dev/null; echo "pairfs: both nodes stopped"; }
stopping=0
trap 'stopping=1; stop; exit 0' INT TERM
trap '[ $stopping = 1 ] || stop' EXIT
echo "pairfs: node a (primary) at $MNT_A, node b (secondary, read-only) at $MNT_B"
echo "        logs in $DEMO/a.log and $DEMO/b.log; write into $MNT_A and watch it appear in $MNT_B"
sleep 2
while kill -0 $pa 2>/dev/null && kill -0 $pb 2>/dev/null; do
  clear 2>/dev/null || true
  "$P" status --config "$DEMO/node-a.toml" || true
  echo
  "$P" status --config "$DEMO/node-b.toml" || true
  sleep 1
done
for n in a b; do
  pid=$pa
  [ $n = b ] && pid=$pb
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "pairfs: node $n stopped; the end of $DEMO/$n.log:" >&2
    tail -n 5 "$DEMO/$n.log" >&2
  fi
done
exit 1
