#!/usr/bin/env bash
# Measures the time from a manifest request to its response for one image
# (default shell/hello) in three states, and prints each stage's share from
# the registry's log:
#   nix-cold  the package set's derivations were never built (a copy of pkgs/
#             with a fresh nonce in every derivation), storage empty
#   cold      packages already in the Nix store, storage empty
#   warm      the same request again (manifest cache), mean of 50
# Usage: scripts/bench-pull.sh [image]
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-shell/hello}
cargo build --release --quiet
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

# start NAME PKGS: starts a registry with empty storage; sets $address.
start() {
  : > "$work/$1.log"
  PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$2 STORAGE_PATH=$work/$1-storage \
    NO_COLOR=1 target/release/nixery serve > "$work/$1.log" 2>&1 &
  pids+=($!)
  until address=$(sed -n 's|^nixery is serving on http://||p' "$work/$1.log") && [[ -n $address ]]; do sleep 0.05; done
}

# request: seconds from request to the last byte of the manifest.
request() {
  curl -fs -o /dev/null -w '%{time_total}' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' "http://$address/v2/$image/manifests/latest"
}

ms() { awk -v s="$1" 'BEGIN { print s * 1000 }'; }

stages() {
  sed 's/\x1b\[[0-9;]*m//g' "$work/$1.log" | grep -E 'nix finished|built image' \
    | grep -oE '(eval|build|query|nix|plan|packing|manifest|total)_ms=[0-9]+|layers=[0-9]+|store_paths=[0-9]+' | tr '\n' ' '
}

mkdir -p "$work/pkgs"
sed "s|inherit system;|inherit system; benchNonce = \"$(date +%s%N)\";|" pkgs/default.nix > "$work/pkgs/default.nix"
start nix-cold "$work/pkgs"
t=$(request)
printf 'nix-cold  %7.1f ms   %s\n' "$(ms "$t")" "$(stages nix-cold)"

nix-build --no-out-link pkgs > /dev/null 2>&1 || true
start cold "$PWD/pkgs"
t=$(request)
printf 'cold      %7.1f ms   %s\n' "$(ms "$t")" "$(stages cold)"

times=$(for _ in $(seq 50); do request; echo; done)
printf 'warm      %7.1f ms   (mean of 50; manifest cache, no Nix)\n' "$(echo "$times" | awk '{ s += $1 } END { print s * 1000 / NR }')"
