#!/usr/bin/env bash
# Held under load (README "Benchmarks", issue 28): two replicas on one
# storage folder serve the busybox set pkgs/ to 200 pulling clients (50
# cached and 10 new images, every blob checked) past 1,000 idle
# connections, while `nixery gc` drops images twice and replica A is killed
# with -9 and started again; then the storage folder is checked. The load
# generator and the checks are scripts/bench-churn.py (its docstring says
# what each step does). Everything runs on 127.0.0.1 and stops by itself:
# DURATION seconds of load (default 90), at most 150 s more for pulls in
# flight, about 2 minutes of builds before.
# Last line: machine-readable figures and goal_met=yes|no (no failed pull
# but the first pull of each image a collection dropped, no storage problem).
# NIXERY_BIN=… measures another build the same way.
# Usage: scripts/bench-churn.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-90}
scripts/setup.sh > /dev/null
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='
if [[ -z ${NIXERY_BIN:-} ]]; then
  cargo build --release --quiet --bin nixery
  NIXERY_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/nixery
fi

work=$(mktemp -d)
pid=
trap '[[ -z $pid ]] || kill "$pid" 2>/dev/null || true; wait; rm -rf "$work"' EXIT
# The python process starts and stops the replicas and collections itself.
python3 scripts/bench-churn.py "$NIXERY_BIN" "$PWD/pkgs" "$work" "$duration" &
pid=$!
status=0
wait "$pid" || status=$?
pid=
if ((status != 0)); then
  for log in "$work"/*.log; do echo "== $log" >&2; tail -20 "$log" >&2; done
fi
exit "$status"
