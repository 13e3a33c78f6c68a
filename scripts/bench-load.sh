#!/usr/bin/env bash
# Load benchmark (README "Benchmarks"): nixery against the CNCF distribution
# registry (Debian docker-registry) on this machine, in the same run, serving
# the same image (shell/hello, built by nixery and copied into the other
# registry with skopeo). wrk runs for DURATION seconds (default 10) per case
# at 32 connections: a cached manifest by tag, a cached manifest by digest,
# and the largest layer. Then 200 connections download blobs at once, and
# 200 skopeo pulls run at once, while nixery's peak memory (VmHWM) is read.
# Non-2xx answers, socket errors or a failed pull fail the run. Last line:
# machine-readable ratios and figures.
# Usage: scripts/bench-load.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
scripts/setup.sh bench > /dev/null
cargo build --release --quiet
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RUST_LOG=warn NIXERY_MANIFEST_FORMAT=docker PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$PWD/pkgs STORAGE_PATH=$work/nixery \
  NO_COLOR=1 target/release/nixery serve > "$work/nixery.log" 2>&1 &
nixery_pid=$!
pids+=("$nixery_pid")
until nixery=$(sed -n 's|^nixery is serving on http://||p' "$work/nixery.log") && [[ -n $nixery ]]; do sleep 0.05; done

port=$(free_port)
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
  secret: bench
YAML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
pids+=($!)
distribution=127.0.0.1:$port
until curl -fs "http://$distribution/v2/" > /dev/null; do sleep 0.1; done

accept='Accept: application/vnd.docker.distribution.manifest.v2+json'
skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
  docker://$nixery/shell/hello docker://$distribution/shell/hello:latest
manifest=$(curl -fs -H "$accept" "http://$nixery/v2/shell/hello/manifests/latest")
digest=$(curl -fsI -H "$accept" "http://$nixery/v2/shell/hello/manifests/latest" | tr -d '\r' | sed -n 's/^docker-content-digest: //Ip')
layer=$(echo "$manifest" | python3 -c 'import json,sys; print(max(json.load(sys.stdin)["layers"], key=lambda l: l["size"])["digest"])')
size=$(echo "$manifest" | python3 -c 'import json,sys; print(max(l["size"] for l in json.load(sys.stdin)["layers"]))')
for registry in "$nixery" "$distribution"; do
  [[ $(curl -fs -H "$accept" "http://$registry/v2/shell/hello/manifests/latest" | sha256sum | cut -d' ' -f1) == "${digest#sha256:}" ]]
done

# run NAME URL [wrk args]: prints req/s and p99 (ms); fails on errors.
run() {
  local out
  out=$(wrk -t2 -c"${CONNECTIONS:-32}" -d"${duration}s" --latency "${@:3}" "$2")
  if grep -qE 'Non-2xx|Socket errors' <<< "$out"; then echo "$out" >&2; echo "bench-load: errors in $1" >&2; exit 1; fi
  local rps p99
  rps=$(awk '/Requests\/sec/ { print $2 }' <<< "$out")
  p99=$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms/, "", v) } else if (v ~ /s$/) { sub(/s/, "", v); v *= 1000 } print v }' <<< "$out")
  echo "$rps $p99"
}

declare -A result
printf '%-28s %14s %10s %14s %10s %8s\n' case "nixery req/s" "p99 ms" "distrib req/s" "p99 ms" ratio
for case in tag digest blob; do
  for who in nixery distribution; do
    host=${!who}
    case $case in
      tag) read -r rps p99 < <(run "$who $case" "http://$host/v2/shell/hello/manifests/latest" -H "$accept") ;;
      digest) read -r rps p99 < <(run "$who $case" "http://$host/v2/shell/hello/manifests/$digest" -H "$accept") ;;
      blob) read -r rps p99 < <(run "$who $case" "http://$host/v2/shell/hello/blobs/$layer") ;;
    esac
    result[$who-$case]="$rps $p99"
  done
  read -r n_rps n_p99 <<< "${result[nixery-$case]}"
  read -r d_rps d_p99 <<< "${result[distribution-$case]}"
  ratio=$(awk -v a="$n_rps" -v b="$d_rps" 'BEGIN { printf "%.2f", a / b }')
  result[ratio-$case]=$ratio
  printf '%-28s %14s %10s %14s %10s %8s\n' "$case ($( [[ $case == blob ]] && echo "$size B" || echo manifest))" "$n_rps" "$n_p99" "$d_rps" "$d_p99" "$ratio"
done

before=$(awk '/VmHWM/ { print $2 }' "/proc/$nixery_pid/status")
CONNECTIONS=200 run "nixery 200 blob downloads" "http://$nixery/v2/shell/hello/blobs/$layer" > "$work/many"
read -r many_rps many_p99 < "$work/many"
peak=$(awk '/VmHWM/ { print $2 }' "/proc/$nixery_pid/status")
echo "200 connections downloading a $size-byte layer: $many_rps req/s, p99 $many_p99 ms; nixery peak RSS $((before / 1024)) MiB before, $((peak / 1024)) MiB after"
# 200 full pulls at once (skopeo, manifest and every blob), each checked by
# skopeo against its digests.
mkdir -p "$work/pulls"
started=$(date +%s%N)
for i in $(seq 200); do
  skopeo copy -q --src-tls-verify=false "docker://$nixery/shell/hello" "dir:$work/pulls/$i" > "$work/pulls/$i.log" 2>&1 &
done
failed=0
for job in $(jobs -p); do [[ " ${pids[*]} " == *" $job "* ]] && continue; wait "$job" || failed=$((failed + 1)); done
seconds=$(awk -v s="$started" -v e="$(date +%s%N)" 'BEGIN { printf "%.1f", (e - s) / 1e9 }')
pulled_peak=$(awk '/VmHWM/ { print $2 }' "/proc/$nixery_pid/status")
echo "200 concurrent skopeo pulls of shell/hello: $failed failed, $seconds s in all; nixery peak RSS $((pulled_peak / 1024)) MiB"
if ((failed > 0)); then echo "bench-load: $failed pulls failed" >&2; exit 1; fi
read -r tag_rps tag_p99 <<< "${result[nixery-tag]}"
echo "manifest_vs_distribution=${result[ratio-tag]} digest_vs_distribution=${result[ratio-digest]} blob_vs_distribution=${result[ratio-blob]} nixery_manifest_rps=$tag_rps nixery_manifest_p99_ms=$tag_p99 rss_200_mib=$((peak / 1024)) rss_200_pulls_mib=$((pulled_peak / 1024)) failed_pulls=$failed"
