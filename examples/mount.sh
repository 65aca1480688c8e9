#!/usr/bin/env bash
# The main job (README): build pairfs, create a volume and mount it in the foreground.
# Ctrl-C (or `fusermount3 -u MOUNTPOINT`) unmounts cleanly.
#   DATA=/var/tmp/pairfs-data MNT=/tmp/pairfs SIZE=4G examples/mount.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/var/tmp/pairfs-data}
MNT=${MNT:-/tmp/pairfs}
SIZE=${SIZE:-4G}
command -v fusermount3 >/dev/null || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
cargo build --release -p pairfs-cli --quiet
P=target/release/pairfs
[ -e "$DATA/volume" ] || "$P" init --data "$DATA" --size "$SIZE"
mkdir -p "$MNT"
echo "pairfs: mounting $DATA at $MNT (Ctrl-C to unmount)"
exec "$P" mount --data "$DATA" "$MNT"
