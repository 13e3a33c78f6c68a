#!/usr/bin/env bash
# Serving speed against a static file server (README "Benchmarks"): nixery
# with filesystem storage and nginx (Debian nginx-light, sendfile on, access
# log off, started here on loopback with its own configuration) serving the
# same storage folder, in the same run, on the same cores as wrk (2 threads).
# nginx listens with `reuseport`, so that the kernel spreads connections over
# its two workers as tokio spreads them over its two threads: without it,
# whichever worker wins the accept race takes most of them, and the same
# manifest case measured anywhere from 113k to 167k req/s from run to run.
# The image is `shell/gcc` of the Debian package set, whose gcc layer is
# over 16 MiB; nixery builds it first (Nix realises it once, a minute or so).
#
# Cases, interleaved nixery then nginx, ROUNDS rounds (default 2) of
# DURATION seconds (default 5) each:
#   manifest   cached manifest GET by tag (nginx: the manifest's file), 32 connections
#   head       the same as HEAD, 32 connections (with oha: wrk cannot)
#   blob       GET of the largest layer, 8 connections
#   range      1 MiB ranges of it, a different one each request, 8 connections
#   many       200 connections downloading it at once; nixery's peak RSS
#   bucket     with SeaweedFS installed (scripts/setup.sh bench): a second
#              nixery on an S3 bucket with NIXERY_BLOB_REDIRECT=false (which
#              keeps streamed blobs on local disk), against GETs of the same
#              object straight from SeaweedFS
#   uncached   the same with NIXERY_BLOB_CACHE_MB=0, for comparison (no goal)
# Both servers must serve byte-identical blobs and ranges; a non-2xx answer
# or a socket error fails the run. Rates and p99s are the rounds' means. Last line: machine-readable ratios and figures, and
# whether the goals (issue 17) are met.
# With PROFILE=<folder>, each of nixery's cases runs under perf (on the
# `profiling` build, which has line tables): <case>-<round>.data and a
# report, <case>-<round>.txt, land there. perf slows the registry, so such a
# run's figures are not the benchmark's.
# Usage: scripts/bench-serve.sh [DURATION] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-5}
rounds=${2:-2}
scripts/setup.sh bench > /dev/null
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='
if [[ -n ${PROFILE:-} ]]; then
  mkdir -p "$PROFILE"
  PROFILE=$(realpath "$PROFILE")
fi
if [[ -z ${NIXERY_BIN:-} ]]; then
  profile=${PROFILE:+profiling}
  cargo build --profile "${profile:-release}" --quiet
  NIXERY_BIN=$PWD/target/${profile:-release}/nixery
fi
image=shell/gcc
tools=/opt/nixery-test/bin
oha=/opt/nixery-bench/bin/oha

work=$(mktemp -d)
pids=()
weed_pid=
# SeaweedFS ignores SIGTERM while it serves.
trap 'kill "${pids[@]}" 2>/dev/null || true; [[ -z $weed_pid ]] || kill -9 "$weed_pid"; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_nixery NAME ENV…: a registry on the Debian set; address in $address, pid in $pid.
start_nixery() {
  local name=$1
  shift
  env "$@" NO_COLOR=1 PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH="$PWD/pkgs-debian" \
    NIX_TIMEOUT=600 "$NIXERY_BIN" serve > "$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  address=
  until address=$(sed -n 's|^nixery is serving on http://||p' "$work/$name.log") && [[ -n $address ]]; do
    kill -0 "$pid" || { cat "$work/$name.log" >&2; exit 1; }
    sleep 0.05
  done
}

start_nixery nixery STORAGE_PATH="$work/storage"
nixery=$address
nixery_pid=$pid
echo "building $image (Nix realises the Debian packages the first time)"
curl -fsS --max-time 900 "http://$nixery/v2/$image/manifests/latest" -o "$work/manifest.json"
digest=sha256:$(sha256sum < "$work/manifest.json" | cut -d' ' -f1)
read -r layer size < <(python3 -c '
import json, sys
layer = max(json.load(open(sys.argv[1]))["layers"], key=lambda l: l["size"])
print(layer["digest"], layer["size"])' "$work/manifest.json")
if ((size < 16 * 1024 * 1024)); then echo "bench-serve: the largest layer is only $size bytes" >&2; exit 1; fi

port=$(free_port)
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000000;
  default_type application/octet-stream;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$port reuseport;
    root $work/storage;
  }
}
NGINX
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
nginx=127.0.0.1:$port
until curl -fs -o /dev/null "http://$nginx/blobs/sha256/${digest#sha256:}"; do sleep 0.05; done

# The same bytes from both: the manifest, the layer, and a range of it.
same() {
  local what=$1 a=$2 b=$3 range=${4:-}
  local one two
  one=$(curl -fsS ${range:+-H "Range: bytes=$range"} "$a" | sha256sum)
  two=$(curl -fsS ${range:+-H "Range: bytes=$range"} "$b" | sha256sum)
  [[ $one == "$two" ]] || { echo "bench-serve: $what differs between the servers" >&2; exit 1; }
  echo "${one%% *}"
}
[[ $(same manifest "http://$nixery/v2/$image/manifests/latest" "http://$nginx/blobs/sha256/${digest#sha256:}") == "${digest#sha256:}" ]]
[[ $(same layer "http://$nixery/v2/$image/blobs/$layer" "http://$nginx/blobs/sha256/${layer#sha256:}") == "${layer#sha256:}" ]]
same range "http://$nixery/v2/$image/blobs/$layer" "http://$nginx/blobs/sha256/${layer#sha256:}" 1048576-3145727 > /dev/null

# 1 MiB ranges of the layer, a different one for each request.
cat > "$work/ranges.lua" <<LUA
local size, chunk, n = $size, 1048576, 0
request = function()
  local start = (n * 7919 % math.floor(size / chunk)) * chunk
  n = n + 1
  return wrk.format(nil, nil, { Range = "bytes=" .. start .. "-" .. (start + chunk - 1) })
end
LUA

# run CONNECTIONS URL [wrk args]: prints req/s, MiB/s and p99 (ms); fails on errors.
run() {
  local out
  out=$(wrk -t2 -c"$1" -d"${duration}s" --timeout 60s --latency "${@:3}" "$2")
  if grep -qE 'Non-2xx|Socket errors' <<< "$out"; then
    echo "$out" >&2
    echo "bench-serve: errors from $2" >&2
    exit 1
  fi
  awk '
    function ms(v) { if (v ~ /us$/) { sub(/us/, "", v); return v / 1000 } if (v ~ /ms$/) { sub(/ms/, "", v); return v } sub(/s/, "", v); return v * 1000 }
    function mib(v) { if (v ~ /GB$/) { sub(/GB/, "", v); return v * 1024 } if (v ~ /MB$/) { sub(/MB/, "", v); return v } if (v ~ /KB$/) { sub(/KB/, "", v); return v / 1024 } sub(/B/, "", v); return v / 1048576 }
    /Requests\/sec/ { rps = $2 } /Transfer\/sec/ { rate = mib($2) } $1 == "99%" { p99 = ms($2) }
    END { printf "%.1f %.1f %.2f\n", rps, rate, p99 }' <<< "$out"
}

# run_head CONNECTIONS URL: the same as run, for HEAD requests, which wrk
# cannot make (it waits for a body), with oha.
run_head() {
  "$oha" --no-tui -w -z "${duration}s" -c "$1" -m HEAD --output-format json "$2" | python3 -c '
import json, sys
result = json.load(sys.stdin)
codes, errors = result["statusCodeDistribution"], result["errorDistribution"]
if errors or any(not code.startswith("2") for code in codes):
    sys.exit(f"bench-serve: errors from {sys.argv[1]}: {codes} {errors}")
print("%.1f 0.0 %.2f" % (result["summary"]["requestsPerSec"], result["latencyPercentiles"]["p99"] * 1000))' "$2"
}

# one CASE SERVER: the wrk run of CASE against SERVER (nixery, nginx, bucket or seaweedfs).
one() {
  local case=$1 who=$2 base path
  case $who in
    nixery) base=http://$nixery/v2/$image ;;
    nginx) base=http://$nginx ;;
    bucket) base=http://$bucket/v2/$image ;;
    bucket0) base=http://$bucket0/v2/$image ;;
    seaweedfs) base=$seaweedfs ;;
  esac
  blob_path() { [[ $who == seaweedfs || $who == nginx ]] && echo "/blobs/sha256/${layer#sha256:}" || echo "/blobs/$layer"; }
  manifest_path() { [[ $who == nixery ]] && echo /manifests/latest || echo "/blobs/sha256/${digest#sha256:}"; }
  local profiling=
  if [[ -n ${PROFILE:-} ]] && [[ $who == nixery || $who == bucket ]]; then
    local target=$nixery_pid
    [[ $who == bucket ]] && target=$bucket_pid
    perf record -q -F 499 --call-graph dwarf,16384 -p "$target" -o "$PROFILE/$case-$round.data" 2> /dev/null &
    profiling=$!
    sleep 0.3
  fi
  case $case in
    manifest) run 32 "$base$(manifest_path)" ;;
    head) run_head 32 "$base$(manifest_path)" ;;
    blob | bucket | uncached) run 8 "$base$(blob_path)" ;;
    range) run 8 "$base$(blob_path)" -s "$work/ranges.lua" ;;
    many) run 200 "$base$(blob_path)" ;;
  esac
  if [[ -n $profiling ]]; then
    kill -INT "$profiling"
    wait "$profiling" || true
    perf report -i "$PROFILE/$case-$round.data" --no-children --sort symbol -g caller,0.5,callee \
      --percent-limit 1 2> /dev/null > "$PROFILE/$case-$round.txt" || true
  fi
}

cases=(manifest head blob range many)
pairs=()
for case in "${cases[@]}"; do pairs+=("$case:nixery:nginx"); done
if [[ -x $tools/weed ]]; then
  ports=($(for _ in $(seq 8); do free_port; done))
  mkdir -p "$work/weed/data" "$work/weed/logs"
  "$tools/weed" -logdir="$work/weed/logs" server -dir="$work/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -master.port="${ports[0]}" -master.port.grpc="${ports[1]}" \
    -volume.port="${ports[2]}" -volume.port.grpc="${ports[3]}" -volume.max=5 \
    -filer -filer.port="${ports[4]}" -filer.port.grpc="${ports[5]}" -filer.localSocket="$work/weed/filer.sock" \
    -s3 -s3.port="${ports[6]}" -s3.port.grpc="${ports[7]}" -s3.localSocket="$work/weed/s3.sock" \
    -s3.port.iceberg=0 -s3.port.lance=0 > "$work/weed/out" 2>&1 &
  weed_pid=$!
  disown "$weed_pid" # killed with -9 at the end, without a word from bash
  s3=http://127.0.0.1:${ports[6]}
  until curl -fs -X PUT "$s3/bench" > /dev/null 2>&1; do sleep 0.2; done
  until curl -fs -X PUT --data x "$s3/bench/probe" > /dev/null 2>&1; do sleep 0.2; done
  start_nixery bucket NIXERY_STORAGE_BACKEND=s3 S3_BUCKET=bench S3_ENDPOINT="$s3" S3_ACCESS_KEY=bench \
    S3_SECRET_KEY=bench NIXERY_BLOB_REDIRECT=false NIXERY_SPOOL_PATH="$work/spool"
  bucket=$address
  bucket_pid=$pid
  curl -fsS --max-time 900 "http://$bucket/v2/$image/manifests/latest" -o /dev/null
  seaweedfs=$s3/bench
  [[ $(same "the bucket's layer" "http://$bucket/v2/$image/blobs/$layer" "$seaweedfs/blobs/sha256/${layer#sha256:}") == "${layer#sha256:}" ]]
  # A replica on the same bucket that keeps no blobs on local disk.
  start_nixery bucket0 NIXERY_STORAGE_BACKEND=s3 S3_BUCKET=bench S3_ENDPOINT="$s3" S3_ACCESS_KEY=bench \
    S3_SECRET_KEY=bench NIXERY_BLOB_REDIRECT=false NIXERY_SPOOL_PATH="$work/spool0" NIXERY_BLOB_CACHE_MB=0
  bucket0=$address
  pairs+=("bucket:bucket:seaweedfs" "uncached:bucket0:seaweedfs")
else
  echo "SeaweedFS is not installed (scripts/setup.sh bench): no bucket case"
fi

declare -A rps rate p99
rss=0
for round in $(seq "$rounds"); do
  for pair in "${pairs[@]}"; do
    IFS=: read -r case us them <<< "$pair"
    for who in "$us" "$them"; do
      # The peak RSS of the 200 downloads alone, not of the build before.
      [[ $case-$who == many-nixery ]] && echo 5 > "/proc/$nixery_pid/clear_refs"
      read -r r m p < <(one "$case" "$who")
      if [[ $case-$who == many-nixery ]]; then
        peak=$(($(awk '/VmHWM/ { print $2 }' "/proc/$nixery_pid/status") / 1024))
        ((peak > rss)) && rss=$peak
      fi
      echo "round $round: $case $who: $r req/s, $m MiB/s, p99 $p ms"
      rps[$case-$who]=$(awk -v a="${rps[$case-$who]:-0}" -v b="$r" 'BEGIN { print a + b }')
      rate[$case-$who]=$(awk -v a="${rate[$case-$who]:-0}" -v b="$m" 'BEGIN { print a + b }')
      p99[$case-$who]=$(awk -v a="${p99[$case-$who]:-0}" -v b="$p" -v n="$rounds" 'BEGIN { print a + b / n }')
    done
  done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
per_round() { awk -v a="$1" -v n="$rounds" 'BEGIN { printf "%.1f", a / n }'; }
echo
printf '%-34s %12s %12s %10s %12s %12s %10s %7s\n' case "us req/s" "us MiB/s" "us p99" "ref req/s" "ref MiB/s" "ref p99" ratio
line=()
goals=yes
for pair in "${pairs[@]}"; do
  IFS=: read -r case us them <<< "$pair"
  # Manifests are compared by requests, blobs by bytes.
  if [[ $case == manifest || $case == head ]]; then
    x=$(ratio "${rps[$case-$us]}" "${rps[$case-$them]}")
  else
    x=$(ratio "${rate[$case-$us]}" "${rate[$case-$them]}")
  fi
  printf '%-34s %12s %12s %10s %12s %12s %10s %7s\n' "$case ($us vs $them)" \
    "$(per_round "${rps[$case-$us]}")" "$(per_round "${rate[$case-$us]}")" "${p99[$case-$us]}" \
    "$(per_round "${rps[$case-$them]}")" "$(per_round "${rate[$case-$them]}")" "${p99[$case-$them]}" "$x"
  line+=("${case}_ratio=$x" "${case}_rps=$(per_round "${rps[$case-$us]}")" "${case}_mibs=$(per_round "${rate[$case-$us]}")"
    "${case}_p99_ms=${p99[$case-$us]}" "${case}_ref_p99_ms=${p99[$case-$them]}")
  case $case in
    manifest | head)
      awk -v x="$x" -v a="${p99[$case-$us]}" -v b="${p99[$case-$them]}" 'BEGIN { exit !(x >= 0.6 && a <= 1.5 * b) }' || goals=no ;;
    many) ;; # its goal is the peak RSS
    uncached) ;; # for comparison: the bucket case without the blob cache
    *) awk -v x="$x" 'BEGIN { exit !(x >= 0.8) }' || goals=no ;;
  esac
done
((rss <= 64)) || goals=no
echo "nixery's peak RSS during the 200 downloads: $rss MiB"
echo "${line[*]} rss_mib=$rss goals_met=$goals"
