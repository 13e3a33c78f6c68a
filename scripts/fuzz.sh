#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/, cargo fuzz on the nightly
# toolchain) for SECONDS each (default 15), starting from fuzz/seeds/ and
# the corpus earlier runs left in fuzz/corpus/. The targets are built first:
# a build that fails is reported as such, with its error. A crash fails the
# run; its input is in fuzz/artifacts/<target>/, to become a regression
# test. A target that stops for another reason is reported with its output.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
targets=(image_name route runtime_graph popularity)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

if ! cargo +nightly fuzz build -O > "$log" 2>&1; then
  grep -E -A12 '^(error|warning: .*failed)' "$log" | head -60 || tail -40 "$log"
  echo "fuzz: building the fuzz targets failed (see the error above); nothing was fuzzed" >&2
  exit 1
fi

for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  before=$(ls "fuzz/artifacts/$target" | wc -l)
  if ! cargo +nightly fuzz run -O "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 > "$log" 2>&1; then
    tail -40 "$log"
    if (( $(ls "fuzz/artifacts/$target" | wc -l) > before )); then
      echo "fuzz: $target found a crash; the input is in fuzz/artifacts/$target/" >&2
    else
      echo "fuzz: $target stopped without finding a crash (see its output above)" >&2
    fi
    exit 1
  fi
  echo "fuzz: $target: $(grep -E '^Done' "$log")"
done
