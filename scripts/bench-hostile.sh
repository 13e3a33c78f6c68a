#!/usr/bin/env bash
# What outsiders cost (README "Benchmarks"), with a release build (or the
# binary in NIXERY_BIN, to measure another version the same way):
#  - refresh: a path source of 200 MiB whose hash has expired; 40 landing
#    pages at once. Prints the registry's CPU seconds for them, and the
#    slowest of 20 cached manifest pulls while 16 clients loop on `/`,
#    against the median of 20 pulls with nothing else running (the
#    reference, measured in the same run).
#  - connections: under `ulimit -n 256`, 400 connections that send nothing
#    and 50 idle HTTP/2 connections, then a skopeo pull of a cached image.
#    Prints how long the pull took and when the last silent connection was
#    closed (the header timeout is 2 s).
# Last line: machine-readable figures.
# Usage: scripts/bench-hostile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test > /dev/null
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='
if [[ -z ${NIXERY_BIN:-} ]]; then
  cargo build --release --quiet
  NIXERY_BIN=$PWD/target/release/nixery
fi

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

# start NAME OPEN_FILES ENV…: a registry in the background, with at most
# OPEN_FILES descriptors (- for the shell's limit); its address in
# $address, its pid in $pid.
start() {
  local name=$1 limit=$2
  shift 2
  [[ $limit == - ]] && limit=$(ulimit -n)
  env "$@" RUST_LOG=warn NO_COLOR=1 PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 STORAGE_PATH="$work/$name" \
    sh -c "ulimit -n $limit && exec \"\$0\" serve" "$NIXERY_BIN" > "$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  address=
  until address=$(sed -n 's|^nixery is serving on http://||p' "$work/$name.log") && [[ -n $address ]]; do
    kill -0 "$pid" || { cat "$work/$name.log"; exit 1; }
    sleep 0.05
  done
}

# A package set whose folder holds 200 MiB besides the shipped set.
mkdir -p "$work/big/data"
echo "import $PWD/pkgs" > "$work/big/default.nix"
for i in $(seq 200); do head -c 1048576 /dev/urandom > "$work/big/data/$i"; done

start refresh - NIXERY_PKGS_PATH="$work/big"
refresh_pid=$pid refresh_address=$address
start connections 256 NIXERY_PKGS_PATH="$PWD/pkgs" NIXERY_HEADER_TIMEOUT=2
connections_address=$address

python3 - "$refresh_pid" "$refresh_address" "$connections_address" "$work" <<'PY'
import concurrent.futures as futures, os, socket, statistics, subprocess, sys, threading, time, urllib.request

pid, refresh, connections, work = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ticks = os.sysconf("SC_CLK_TCK")

def cpu_seconds():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks

def get(address, path):
    started = time.monotonic()
    with urllib.request.urlopen(f"http://{address}{path}", timeout=120) as response:
        response.read()
        assert response.status == 200, response.status
    return time.monotonic() - started

manifest = "/v2/shell/hello/manifests/latest"
get(refresh, manifest)                       # built, and the hash known
idle = statistics.median(get(refresh, manifest) for _ in range(20))

time.sleep(6)                                # the folder's hash has expired
before = cpu_seconds()
with futures.ThreadPoolExecutor(40) as pool:
    list(pool.map(lambda _: get(refresh, "/"), range(40)))
time.sleep(3)                                # a refresh left running finishes
pages_cpu = cpu_seconds() - before

stop = threading.Event()
def loop():
    while not stop.is_set():
        get(refresh, "/")
looping = [threading.Thread(target=loop) for _ in range(16)]
for thread in looping:
    thread.start()
time.sleep(1)
loaded = []
for _ in range(20):
    loaded.append(get(refresh, manifest))
    time.sleep(0.25)
stop.set()
for thread in looping:
    thread.join()
print(f"refresh: 40 landing pages on an expired 200 MiB hash cost {pages_cpu:.2f} CPU s;"
      f" a cached pull takes {idle * 1000:.1f} ms alone, at most {max(loaded) * 1000:.1f} ms while 16 clients loop on /")

layout = os.path.join(work, "oci")
def pull():
    started = time.monotonic()
    try:
        subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{connections}/shell/hello",
                        f"oci:{layout}:latest"], check=True, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired as error:
        raise subprocess.CalledProcessError(1, error.cmd, b"", b"no answer in 60 s")
    return time.monotonic() - started
pull()
host, port = connections.rsplit(":", 1)
unconnected = 0
def connect(hello=b""):
    global unconnected
    try:
        s = socket.create_connection((host, int(port)), timeout=3)
        s.sendall(hello)
        return [s]
    except OSError:
        unconnected += 1
        return []
opened = time.monotonic()
silent = [s for _ in range(400) for s in connect()]
idle_h2 = [s for _ in range(50) for s in connect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")]
try:
    pull_seconds = pull()
except subprocess.CalledProcessError as error:
    pull_seconds = float("nan")
    print("connections: the pull failed:", error.stderr.decode().strip()[-300:])
if unconnected:
    print(f"connections: {unconnected} of the 450 connections could not even connect in 3 s")
closed_at, still_open = 0.0, 0
for s in silent + idle_h2:
    s.settimeout(max(0.01, opened + 15 - time.monotonic()))
    try:
        while s.recv(4096):
            pass
        closed_at = max(closed_at, time.monotonic() - opened)
    except ConnectionResetError:
        closed_at = max(closed_at, time.monotonic() - opened)
    except socket.timeout:
        still_open += 1
print(f"connections: a skopeo pull past 400 silent and 50 idle HTTP/2 connections took {pull_seconds * 1000:.0f} ms;"
      f" {still_open} of them still open after 15 s, the others closed within {closed_at:.2f} s")
print(f"refresh_pages_cpu_s={pages_cpu:.2f} pull_idle_ms={idle * 1000:.1f} pull_loaded_max_ms={max(loaded) * 1000:.1f}"
      f" pull_loaded_vs_idle={max(loaded) / idle:.1f} crowded_pull_ms={pull_seconds * 1000:.0f}"
      f" silent_still_open={still_open} silent_closed_s={closed_at:.2f} unconnected={unconnected}")
PY
