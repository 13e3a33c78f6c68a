#!/usr/bin/env bash
# Which module of the library uses which: one line per module of src/
# (a file, or a folder with its files), "module -> the modules it uses",
# read from the `crate::` paths in its code outside comments. Then the
# import cycles, if any: a module that uses a module that uses it, directly
# or not. Exits 1 when there is a cycle.
#   scripts/module-graph.sh          the graph, then "cycles: none" or the loops
set -euo pipefail
cd "$(dirname "$0")/../src"

# "user used" pairs, one per line, each pair once.
edges() {
  find . -name '*.rs' ! -path ./main.rs ! -path ./lib.rs | sort | while read -r file; do
    module=${file#./}
    module=${module%%/*}
    module=${module%.rs}
    sed -e 's://.*$::' "$file" | grep -o 'crate::[a-z_0-9]*' | sed "s/^crate::/$module /" || true
  done | awk '$1 != $2' | sort -u
}

pairs=$(edges)
for module in $(find . -maxdepth 1 \( -name '*.rs' -o -type d \) ! -name . ! -name main.rs ! -name lib.rs -printf '%f\n' | sed 's/\.rs$//' | sort); do
  used=$(awk -v m="$module" '$1 == m { printf "%s ", $2 }' <<<"$pairs")
  echo "$module -> ${used% }"
done

loops=$(tsort <<<"$pairs" 2>&1 >/dev/null | sed -n 's/^tsort: //p' | grep -v 'input contains a loop' || true)
if [ -z "$loops" ]; then
  echo "cycles: none"
else
  echo "cycles: the modules of each loop, in order:"
  tsort <<<"$pairs" 2>&1 >/dev/null | sed 's/^tsort: /  /'
  exit 1
fi
