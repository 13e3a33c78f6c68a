#!/usr/bin/env bash
# A cold image on real content (README "Benchmarks"): the time from a GET of
# a manifest by tag to its last byte, on empty registry storage, for a large
# closure of the Debian package set (default shell/gcc/python3/nodejs/perl,
# at least 300 MB of narSize), with its Nix outputs realised beforehand, so
# it times nixery's own work: evaluation, planning, packing every layer
# (gzip, libdeflate level 6 by default, the compression of OCI and Docker
# layers alike), storing. The reference, in the same run on the same files:
# `tar -c` of the closure's store paths `| pigz -p 2 -6 > /dev/null`, the
# same bytes at the same gzip level on this machine's cores. 3 rounds of
# each, alternating; medians. Also prints each cold run's stages from the
# registry's log (Nix's share is evaluation and a no-op realise: the outputs
# exist) and the compressed bytes of both. Last line: `cold: key=value ...`.
#
#   scripts/bench-cold.sh [image]        about 3 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
image=${1:-shell/gcc/python3/nodejs/perl}
rounds=3
scripts/setup.sh bench > /dev/null
cargo build --release --quiet
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='

work=$(mktemp -d)
registry=
trap '[[ -n $registry ]] && kill "$registry" 2>/dev/null; rm -rf "$work"' EXIT

# start NAME: a registry with empty storage $work/NAME; sets $address.
start() {
  : > "$work/$1.log"
  NIX_TIMEOUT=1800 PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$root/pkgs-debian \
    NIXERY_STORAGE_BACKEND=filesystem STORAGE_PATH=$work/$1 NO_COLOR=1 \
    target/release/nixery serve > "$work/$1.log" 2>&1 &
  registry=$!
  until address=$(sed -n 's|^nixery is serving on http://||p' "$work/$1.log") && [[ -n $address ]]; do
    kill -0 "$registry" || { cat "$work/$1.log"; exit 1; }
    sleep 0.05
  done
}

stop() {
  kill "$registry"
  while kill -0 "$registry" 2>/dev/null; do sleep 0.05; done
  registry=
}

# manifest: GET of the manifest by tag into $work/manifest.json; prints seconds.
manifest() {
  curl -fsS -o "$work/manifest.json" -w '%{time_total}' \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$address/v2/$image/manifests/latest"
}

stages() {
  grep -E 'nix finished|built image' "$work/$1.log" \
    | grep -oE '(eval|realise|nix|plan|packing|storage|manifest|total)_ms=[0-9]+|layers=[0-9]+|store_paths=[0-9]+' | tr '\n' ' '
}

ms() { awk -v s="$1" 'BEGIN { printf "%.0f", s * 1000 }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Realise the outputs (Nix builds what it lacks) and read the closure the
# registry packs from the layers it built: the store paths in its blobs.
start realise
t=$(manifest)
echo "realising run (Nix builds what it lacks): $(ms "$t") ms   $(stages realise)"
python3 - "$work/manifest.json" "$work/realise" > "$work/paths" <<'EOF'
import json, re, sys, tarfile
manifest, storage = sys.argv[1:3]
store = re.compile(r"^(?:\./)?/?nix/store/([^/]+)")
paths = set()
for layer in json.load(open(manifest))["layers"]:
    with tarfile.open(f"{storage}/blobs/sha256/{layer['digest'].split(':')[1]}", "r:gz") as t:
        paths.update(m.group(1) for m in map(store.match, t.getnames()) if m)
print("\n".join(sorted("/nix/store/" + p for p in paths)))
EOF
stop
mapfile -t paths < "$work/paths"
closure=$(nix path-info --json "${paths[@]}" | python3 -c '
import json, sys
info = json.load(sys.stdin)
print(sum(e["narSize"] for e in (info.values() if isinstance(info, dict) else info)))')
# The same store paths, relative to / for tar.
rel=("${paths[@]#/}")
tar_bytes=$(tar -cf - -C / "${rel[@]}" | wc -c)
pigz_bytes=$(tar -cf - -C / "${rel[@]}" | pigz -p 2 -6 | wc -c)
echo "closure: ${#paths[@]} store paths, narSize $closure bytes ($((closure / 1000000)) MB), tar $tar_bytes bytes"
((closure >= 300000000)) || echo "WARNING: the closure is under 300 MB of narSize"

nixery_ms=() pigz_ms=()
for round in $(seq "$rounds"); do
  start "cold-$round"
  t=$(ms "$(manifest)")
  stop
  nixery_ms+=("$t")
  echo "round $round  nixery cold $t ms   $(stages "cold-$round")"
  s=$(date +%s%N)
  tar -cf - -C / "${rel[@]}" | pigz -p 2 -6 > /dev/null
  t=$((($(date +%s%N) - s) / 1000000))
  pigz_ms+=("$t")
  echo "round $round  tar | pigz -p 2 -6  $t ms"
done
blob_bytes=$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(sum(l["size"] for l in m["layers"]))' "$work/manifest.json")
layers=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["layers"]))' "$work/manifest.json")

n=$(median "${nixery_ms[@]}")
p=$(median "${pigz_ms[@]}")
ratio=$(awk -v n="$n" -v p="$p" 'BEGIN { printf "%.2f", n / p }')
size_ratio=$(awk -v a="$blob_bytes" -v b="$pigz_bytes" 'BEGIN { printf "%.3f", a / b }')
echo
echo "| $image | median of $rounds | MB/s of tar |"
echo "|---|---:|---:|"
awk -v n="$n" -v p="$p" -v b="$tar_bytes" 'BEGIN {
  printf "| nixery, request to manifest (cold storage, outputs realised) | %d ms | %.0f |\n", n, b / n / 1000
  printf "| tar \\| pigz -p 2 -6 > /dev/null | %d ms | %.0f |\n", p, b / p / 1000 }'
echo "nixery / pigz: $ratio; compressed bytes: nixery $blob_bytes in $layers layers, pigz $pigz_bytes (nixery / pigz $size_ratio)"
echo "cold: image=$image closure_bytes=$closure tar_bytes=$tar_bytes nixery_ms=$n pigz_ms=$p ratio=$ratio nixery_blob_bytes=$blob_bytes pigz_bytes=$pigz_bytes"
