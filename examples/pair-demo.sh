#!/usr/bin/env bash
# The main job (README): a replicated pair on one machine. Builds pairfs, creates node "a"
# (primary, read-write mount at /tmp/pairfs-a) and node "b" (secondary, read-only mount at
# /tmp/pairfs-b) replicating over QUIC on loopback, then shows the pair's status every
# second. Ctrl-C stops both nodes cleanly.
#   DEMO=/var/tmp/pairfs-demo SIZE=2G MODE=async examples/pair-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-/var/tmp/pairfs-demo}
SIZE=${SIZE:-2G}
MODE=${MODE:-async}
command -v fusermount3 >/dev/null || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
cargo build --release -p pairfs-cli --quiet
P=$PWD/target/release/pairfs
mkdir -p "$DEMO" /tmp/pairfs-a /tmp/pairfs-b
[ -e "$DEMO/a/volume" ] || "$P" init --data "$DEMO/a" --size "$SIZE" --name a
[ -e "$DEMO/b/volume" ] || "$P" init --data "$DEMO/b" --size "$SIZE" --name b --secondary
fa=$("$P" id --data "$DEMO/a")
fb=$("$P" id --data "$DEMO/b")
for n in a b; do
  sed -e "s#/var/tmp/pairfs-demo#$DEMO#" -e "s/^mode = \"async\"/mode = \"$MODE\"/" examples/node-$n.toml > "$DEMO/node-$n.toml"
done
sed -i "s/^fingerprint = .*/fingerprint = \"$fb\"/" "$DEMO/node-a.toml"
sed -i "s/^fingerprint = .*/fingerprint = \"$fa\"/" "$DEMO/node-b.toml"
"$P" mount --config "$DEMO/node-a.toml" /tmp/pairfs-a 2> "$DEMO/a.log" & pa=$!
"$P" mount --config "$DEMO/node-b.toml" /tmp/pairfs-b 2> "$DEMO/b.log" & pb=$!
trap 'kill -TERM $pa $pb 2>/dev/null; wait $pa $pb 2>/dev/null; echo "pairfs: both nodes stopped"' EXIT INT TERM
echo "pairfs: node a (primary) at /tmp/pairfs-a, node b (secondary, read-only) at /tmp/pairfs-b"
echo "        logs in $DEMO/a.log and $DEMO/b.log; write into /tmp/pairfs-a and watch it appear in /tmp/pairfs-b"
sleep 2
while kill -0 $pa 2>/dev/null && kill -0 $pb 2>/dev/null; do
  clear 2>/dev/null || true
  "$P" status --config "$DEMO/node-a.toml" || true
  echo
  "$P" status --config "$DEMO/node-b.toml" || true
  sleep 1
done
