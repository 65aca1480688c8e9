#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, builds, runs them all.
#
# Needs root (FUSE mounts with allow_other), /dev/fuse, and network access to the Debian
# and crates.io registries on a fresh machine. Environment knobs:
#   PAIRFS_KILL9_ROUNDS (default 20), PAIRFS_FSX_OPS (default 100000), PROPTEST_CASES.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v rsync >/dev/null || need_apt+=(rsync)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v nsenter >/dev/null || need_apt+=(util-linux)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v python3 >/dev/null || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v fsx >/dev/null; then
  echo "== installing fsx"
  cargo install fsx --version 0.3.2 --locked --quiet
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== build"
cargo build --release -p pairfs-cli --quiet
export PAIRFS_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/pairfs"

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
echo "== all tests passed"
