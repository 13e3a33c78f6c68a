#!/usr/bin/env bash
# Layering benchmark (README "Benchmarks"): replays request sequences against
# the stable, nixery and size-cohort strategies and the per-path limit with
# benches/layers.rs, then cross-checks the public sequence with the shared
# evaluator, which runs `nixery layers` as an external command.
#
#   scripts/bench-layers.sh          the public sequence, its stale-data variant
#                                    and the mixes in bench/layering/
#
# The mixes' graphs are made from this machine's Debian package index
# (`apt-get update` first); without it only the public sequence runs.
set -euo pipefail
cd "$(dirname "$0")/.."

data=../shared/data/debian-bookworm
tools=../shared/tools
pop=$data/popularity-direct.json
# The Debian corpus's stand-ins for the always-added cacert and iana-etc.
base=ca-certificates,netbase
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --release --quiet
bench() { # graphs order popularity
  cargo bench --quiet --bench layers -- --graphs "$1" --order "$2" --popularity "$3" --base "$base" --clients 20
  echo
}

bench "$data/graphs" "$data/sequence-public.txt" "$pop"

echo "# Stale popularity: every version in the data changed, so only package names match"
python3 - "$pop" > "$work/stale.json" <<'EOF'
import json, re, sys
counts = json.load(open(sys.argv[1]))
# Nix's name/version split: the name ends at the first '-' not followed by a letter.
print(json.dumps({re.split(r"-(?![A-Za-z])", k, maxsplit=1)[0] + "-0stale": v for k, v in counts.items()}))
EOF
bench "$data/graphs" "$data/sequence-public.txt" "$work/stale.json"

if compgen -G "/var/lib/apt/lists/*_Packages*" > /dev/null; then
  for mix in bench/layering/mix-*.txt; do
    name=$(basename "$mix" .txt)
    grep -v '^#' "$mix" | sort -u | xargs python3 "$tools/debian_closures.py" batch -d "$work/$name" > /dev/null
    bench "$work/$name" "$mix" "$pop"
  done
else
  echo "# Skipping bench/layering/: no Debian package index here (run apt-get update)"
fi

echo "# Cross-check: ../shared/tools/layering_eval.py running nixery layers, 1 and 20 clients"
for clients in 1 20; do
  python3 "$tools/layering_eval.py" --graphs "$data/graphs" --order "$data/sequence-public.txt" \
    --popularity "$pop" --clients "$clients" -j 2 --check-determinism \
    --cli "target/release/nixery layers {graph} --popularity {pop} --budget {budget} --base $base" \
    --cli "target/release/nixery layers {graph} --popularity {pop} --budget {budget} --strategy nixery" \
    --cli "target/release/nixery layers {graph} --popularity {pop} --budget {budget} --strategy size-cohort" |
    grep -E '^\|'
  echo
done
