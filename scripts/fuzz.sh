#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/, cargo fuzz on the nightly
# toolchain) for SECONDS each (default 15), starting from fuzz/seeds/ and
# the corpus earlier runs left in fuzz/corpus/. A crash fails the run; its
# input is in fuzz/artifacts/<target>/, to become a regression test.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in image_name route runtime_graph popularity; do
  mkdir -p "fuzz/corpus/$target"
  if ! cargo +nightly fuzz run -O "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 > "$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $target found a crash; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  echo "fuzz: $target: $(grep -E '^Done' "$log")"
done
