#!/usr/bin/env bash
# Starts a nixery registry in the background on the offline package set in
# pkgs/, with filesystem storage under .nixery/ in the repository, and prints
# how to pull from it. Re-running restarts it. Stop it with
#   kill "$(cat .nixery/nixery.pid)"
# PORT (default 8080) and NIXERY_LISTEN_ADDRESS (default 127.0.0.1) apply.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --quiet

state=$PWD/.nixery
mkdir -p "$state"
if [[ -f $state/nixery.pid ]] && kill -0 "$(cat "$state/nixery.pid")" 2>/dev/null; then
  kill "$(cat "$state/nixery.pid")"
  while kill -0 "$(cat "$state/nixery.pid")" 2>/dev/null; do sleep 0.1; done
fi

port=${PORT:-8080}
address=${NIXERY_LISTEN_ADDRESS:-127.0.0.1}
PORT=$port NIXERY_LISTEN_ADDRESS=$address \
  NIXERY_PKGS_PATH=$PWD/pkgs NIXERY_STORAGE_BACKEND=filesystem STORAGE_PATH=$state/storage \
  setsid target/release/nixery serve > "$state/nixery.log" 2>&1 < /dev/null &
echo $! > "$state/nixery.pid"

for _ in $(seq 100); do
  curl -fs "http://$address:$port/v2/" > /dev/null && break
  kill -0 "$(cat "$state/nixery.pid")" 2>/dev/null || { cat "$state/nixery.log"; exit 1; }
  sleep 0.1
done
curl -fs "http://$address:$port/v2/" > /dev/null || { echo "nixery did not come up; see $state/nixery.log" >&2; exit 1; }

cat <<TXT
nixery is running on http://$address:$port (log: $state/nixery.log, pid $(cat "$state/nixery.pid")).

Pull an image with a shell and hello, unpack it and run it:
  skopeo copy --src-tls-verify=false docker://$address:$port/shell/hello oci:/tmp/hello:latest
  umoci unpack --image /tmp/hello:latest /tmp/hello-bundle
  chroot /tmp/hello-bundle/rootfs hello
  chroot /tmp/hello-bundle/rootfs bash -c 'echo ok'
Docker, podman and containerd pull $address:$port/shell/hello the same way.
Packages in this set: $(nix-instantiate --eval --strict --json -E "builtins.attrNames (import $PWD/pkgs {})" 2>/dev/null | tr -d '[]"' | tr ',' ' ')
Stop it with: kill \$(cat $state/nixery.pid)
TXT
