#!/usr/bin/env bash
# Packing benchmark (README "Benchmarks"): nixery's layer writer against
# pigz, gzip, zstd and sha256sum on the same ~300 MB of this machine's own
# binaries, in one run. Arguments go to benches/pack.rs (--mb N, DIR ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench > /dev/null
cargo bench --quiet --bench pack -- "$@"
