#!/usr/bin/env bash
# Measures the time from a manifest request to its response for one image
# (default shell/hello) in three states, and prints each stage's share from
# the registry's log:
#   nix-cold  the package set's derivations were never built (a copy of pkgs/
#             with a fresh nonce in every derivation), storage empty
#   cold      packages already in the Nix store, storage empty
#   warm      the same request again (manifest cache), mean of 50
# and how much of the cold build the SBOMs and the signed provenance took
# (goal: under 3 %, for shell/git). Last line: all of it, machine-readable.
# Usage: scripts/bench-pull.sh [image]
#        scripts/bench-pull.sh --big [MB]
# --big: a cold image of about MB (default 300) megabytes of this machine's
# own /usr/bin files, in four packages (bins-a to bins-d) that a generated
# package set copies from the host (no sandbox here), realised beforehand;
# prints the stage split (Nix, packing, storage commits) of three cold runs
# for gzip and zstd, and of one more run profiled with perf, where perf can
# sample the registry: how its CPU time divides between compression, hashing
# and the rest. The registry is CPU-bound then (the utilisation is printed),
# so hashing's share of the CPU is its share of the packing time. Last line:
# the medians' shares of the cold time, per compression.
set -euo pipefail
cd "$(dirname "$0")/.."
big=
if [[ ${1:-} == --big ]]; then big=${2:-300}; fi
image=${1:-shell/hello}
scripts/setup.sh bench > /dev/null
cargo build --release --quiet
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

# start NAME PKGS: starts a registry with empty storage, signing with a key
# made here (so the documents' cost includes the provenance's signature);
# sets $address.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/signing.pem" 2> /dev/null
start() {
  : > "$work/$1.log"
  PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$2 STORAGE_PATH=$work/$1-storage \
    NIXERY_SIGNING_KEY=$work/signing.pem NIXERY_SIGNING_IDENTITY=registry.example.com NO_COLOR=1 target/release/nixery serve > "$work/$1.log" 2>&1 &
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
    | grep -oE '(eval|realise|nix|plan|packing|storage|manifest|total)_ms=[0-9]+|attest_us=[0-9]+|layers=[0-9]+|store_paths=[0-9]+' | tr '\n' ' '
}

# attest_share NAME: the SBOMs' and provenance's share of the cold build.
attest_share() {
  sed 's/\x1b\[[0-9;]*m//g' "$work/$1.log" | grep 'built image' | tail -1 \
    | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
           END { printf "attest_ms=%.2f total_ms=%d attest_share=%.4f\n", v["attest_us"] / 1000, v["total_ms"], v["attest_us"] / 1000 / v["total_ms"] }'
}

# cold_run COMPRESSION RUN [profile]: one cold request to a new registry
# with empty storage, its stage line printed; with `profile`, also the CPU
# utilisation and (where perf can sample) how the CPU time divides, leaving
# the hashing percentage in $hashing.
cold_run() {
  local log=$work/big-$1-$2.log server cpu_start cpu_end wall_start wall_end perf_pid=
  NIXERY_COMPRESSION=$1 PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$work/big \
    STORAGE_PATH=$work/big-storage NO_COLOR=1 target/release/nixery serve > "$log" 2>&1 &
  server=$!
  pids+=("$server")
  until address=$(sed -n 's|^nixery is serving on http://||p' "$log") && [[ -n $address ]]; do sleep 0.05; done
  if [[ ${3:-} == profile ]] && command -v perf > /dev/null; then
    perf record -F 999 -p "$server" -o "$work/perf.data" > /dev/null 2>&1 &
    perf_pid=$!
    sleep 0.5
  fi
  read -r cpu_start < <(awk '{ print $14 + $15 }' "/proc/$server/stat")
  wall_start=$(date +%s%N)
  t=$(curl -fs -o /dev/null -w '%{time_total}' -H "Accept: application/vnd.oci.image.manifest.v1+json" \
    "http://$address/v2/$image/manifests/latest")
  read -r cpu_end < <(awk '{ print $14 + $15 }' "/proc/$server/stat")
  wall_end=$(date +%s%N)
  printf 'cold %-5s %-7s %8.1f ms   %s\n' "$1" "${3:-run $2}" "$(ms "$t")" "$(stages "big-$1-$2")"
  if [[ ${3:-} == profile ]]; then
    awk -v c=$((cpu_end - cpu_start)) -v hz="$(getconf CLK_TCK)" -v w=$((wall_end - wall_start)) -v n="$(nproc)" \
      'BEGIN { printf "  cpu: %.0f %% of %d cores busy\n", 100 * c / hz / (w / 1e9) / n, n }'
    hashing=
    if [[ -n $perf_pid ]]; then
      kill -INT "$perf_pid" 2> /dev/null || true
      wait "$perf_pid" 2> /dev/null || true
    fi
    if [[ -s $work/perf.data ]]; then
      read -r compressing hashing other < <(perf report -i "$work/perf.data" --no-children --sort symbol -g none 2> /dev/null \
        | awk '$1 ~ /%$/ { p = $1 + 0
                 if ($0 ~ /sha2::|sha256/) h += p
                 else if ($0 ~ /deflate|crc32|ZSTD|HUF_|FSE_|zstd/) z += p
                 else o += p }
               END { printf "%.1f %.1f %.1f\n", z, h, o }')
      echo "  cpu split: compression $compressing %, hashing $hashing %, other $other %"
      rm -f "$work/perf.data"
    else
      echo "  cpu split: perf cannot sample here"
    fi
  fi
  kill "$server"
  wait "$server" 2> /dev/null || true
  rm -rf "$work/big-storage"
}

# shares COMPRESSION: medians of the unprofiled runs' stages, as shares of the
# cold time: Nix, storage commits (summed over layers, so an upper bound),
# and hashing (its CPU share, as the registry is CPU-bound, of the packing).
shares() {
  for run in 1 2 3; do stages "big-$1-$run"; echo; done | awk -v h="$hashing" -v name="$1" '
    function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    NF { n++; for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1], n] = kv[2] } }
    END {
      for (i = 1; i <= n; i++) { t[i] = v["total_ms", i]; x[i] = v["nix_ms", i]; s[i] = v["storage_ms", i]; p[i] = v["packing_ms", i] }
      total = median(t, n); nix = median(x, n) / total; storage = median(s, n) / total
      line = sprintf("%s_cold_ms=%d %s_nix_share=%.3f %s_storage_share=%.3f", name, total, name, nix, name, storage)
      if (h != "") {
        hash = h / 100 * median(p, n) / total
        line = line sprintf(" %s_hashing_share=%.3f %s_overhead_share=%.3f", name, hash, name, nix + storage + hash)
      }
      print line
    }'
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
  summary=()
  for compression in gzip zstd; do
    for run in 1 2 3; do cold_run "$compression" "$run"; done
    cold_run "$compression" 0 profile
    summary+=("$(shares "$compression")")
  done
  printf '%s\n' "${summary[@]}" | paste -sd ' '
  exit 0
fi

mkdir -p "$work/pkgs"
sed "s|inherit system;|inherit system; benchNonce = \"$(date +%s%N)\";|" pkgs/default.nix > "$work/pkgs/default.nix"
start nix-cold "$work/pkgs"
t_nix_cold=$(request)
printf 'nix-cold  %7.1f ms   %s\n' "$(ms "$t_nix_cold")" "$(stages nix-cold)"

nix-build --no-out-link pkgs > /dev/null 2>&1 || true
start cold "$PWD/pkgs"
t_cold=$(request)
printf 'cold      %7.1f ms   %s\n' "$(ms "$t_cold")" "$(stages cold)"
documents=$(attest_share cold)
printf 'documents (SBOMs, provenance) of the cold build: %s\n' "$documents"

times=$(for _ in $(seq 50); do request; echo; done)
warm=$(echo "$times" | awk '{ s += $1 } END { print s * 1000 / NR }')
printf 'warm      %7.1f ms   (mean of 50; manifest cache, no Nix)\n' "$warm"
# The goal: the documents cost under 3 % of a cold build (of shell/git).
met=$(awk -v d="$documents" 'BEGIN { split(d, f, "attest_share="); print (f[2] + 0 < 0.03) ? "yes" : "no" }')
printf 'pull image=%s nix_cold_ms=%.1f cold_ms=%.1f warm_ms=%.2f %s attest_goal_met=%s\n' \
  "$image" "$(ms "$t_nix_cold")" "$(ms "$t_cold")" "$warm" "$documents" "$met"
