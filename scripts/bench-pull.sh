#!/usr/bin/env bash
# Measures the time from a manifest request to its response for one image
# (default shell/hello) in three states, and prints each stage's share from
# the registry's log:
#   nix-cold  the package set's derivations were never built (a copy of pkgs/
#             with a fresh nonce in every derivation), storage empty
#   cold      packages already in the Nix store, storage empty
#   warm      the same request again (manifest cache), mean of 50
# Usage: scripts/bench-pull.sh [image]
#        scripts/bench-pull.sh --big [MB]
# --big: a cold image of about MB (default 300) megabytes of this machine's
# own /usr/bin files, in four packages (bins-a to bins-d) that a generated
# package set copies from the host (no sandbox here), realised beforehand;
# prints the stage split (Nix, packing, storage commits) for gzip and zstd.
set -euo pipefail
cd "$(dirname "$0")/.."
big=
if [[ ${1:-} == --big ]]; then big=${2:-300}; fi
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
    | grep -oE '(eval|realise|nix|plan|packing|storage|manifest|total)_ms=[0-9]+|layers=[0-9]+|store_paths=[0-9]+' | tr '\n' ' '
}

if [[ -n $big ]]; then
  # The first regular files of /usr/bin by name, up to $big MB, dealt into four packages.
  mapfile -t files < <(find /usr/bin -maxdepth 1 -type f -printf '%s %p\n' | sort -k2 \
    | awk -v max=$((big * 1000000)) '{ if (total < max) print $2; total += $1 }')
  parts=("" "" "" "")
  for i in "${!files[@]}"; do parts[i % 4]+=" ${files[i]}"; done
  mkdir -p "$work/big"
  {
    echo "{ system ? builtins.currentSystem }:"
    echo "let pkgs = import $PWD/pkgs { inherit system; };"
    echo "  bins = name: files: derivation { inherit name system; builder = \"\${pkgs.busybox}/bin/sh\";"
    echo "    args = [ \"-c\" \"\${pkgs.busybox}/bin/mkdir -p \$out/bin && \${pkgs.busybox}/bin/cp \${files} \$out/bin/\" ]; };"
    echo "in pkgs // {"
    for i in 0 1 2 3; do
      name=bins-$(printf "\\x$(printf %x $((97 + i)))")
      echo "  $name = bins \"$name\" \"${parts[i]}\";"
    done
    echo "}"
  } > "$work/big/default.nix"
  image=bins-a/bins-b/bins-c/bins-d
  for p in bins-a bins-b bins-c bins-d cacert iana-etc; do nix-build --no-out-link "$work/big" -A "$p" > /dev/null 2> "$work/nix-build.log" || { cat "$work/nix-build.log"; exit 1; }; done
  echo "image $image: $(du -scm $(nix-build --no-out-link "$work/big" -A bins-a -A bins-b -A bins-c -A bins-d) | tail -1 | cut -f1) MiB realised"
  for compression in gzip zstd; do
    : > "$work/big-$compression.log"
    NIXERY_COMPRESSION=$compression PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$work/big \
      STORAGE_PATH=$work/big-$compression-storage NO_COLOR=1 target/release/nixery serve > "$work/big-$compression.log" 2>&1 &
    pids+=($!)
    until address=$(sed -n 's|^nixery is serving on http://||p' "$work/big-$compression.log") && [[ -n $address ]]; do sleep 0.05; done
    accept=application/vnd.oci.image.manifest.v1+json
    t=$(curl -fs -o /dev/null -w '%{time_total}' -H "Accept: $accept" "http://$address/v2/$image/manifests/latest")
    printf 'cold %-5s %8.1f ms   %s\n' "$compression" "$(ms "$t")" "$(stages "big-$compression")"
  done
  exit 0
fi

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
