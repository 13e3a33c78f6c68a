#!/usr/bin/env bash
# Starts a nixery registry in the background on Debian bookworm's programs
# (the package set in pkgs-debian/, whose .deb files setup.sh fetches), with
# filesystem storage under .nixery/ in the repository, and prints how to pull
# from it. Re-running restarts it. Stop it with
#   kill "$(cat .nixery/nixery.pid)"
# PORT (default 8080), NIXERY_LISTEN_ADDRESS (default 127.0.0.1) and
# NIXERY_PKGS_PATH (default pkgs-debian; pkgs/ is the small busybox set the
# fast tests use) and NIX_TIMEOUT (default here 600 s: a first image of large
# Debian packages unpacks a hundred of them) apply.
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

# Builds run in Nix's sandbox as the nixbld users (setup.sh) where the
# machine allows it (user namespaces), so that a package can neither read this
# registry's files (its signing key, its storage) or its environment, nor
# write to the host (README, Operations, What builds can reach). The Debian
# set's builders run the host's bash, awk and dpkg-deb: those folders are in
# the sandbox, nothing else of the host. A build of a new trivial derivation
# so configured tells whether it works; else builds as the nixbld users,
# without the sandbox.
sandboxed=$'build-users-group = nixbld\nsandbox = true\nextra-sandbox-paths = /bin /usr /lib /lib64 /etc/alternatives'
separate=$'build-users-group = nixbld\nsandbox = false'
probe='{ salt }: derivation { name = "nixery-build-probe"; inherit salt; system = builtins.currentSystem;
  builder = "/bin/sh"; args = [ "-c" "echo built > $out" ]; }'
builds() {
  NIX_CONFIG="${NIX_CONFIG:-}"$'\n'"$1" \
    nix-build --no-out-link --argstr salt "$(date +%s%N)" -E "$probe" > /dev/null 2>&1
}
if builds "$sandboxed"; then
  export NIX_CONFIG="${NIX_CONFIG:-}"$'\n'"$sandboxed"
elif builds "$separate"; then
  export NIX_CONFIG="${NIX_CONFIG:-}"$'\n'"$separate"
  echo "run: Nix's sandbox does not work here: builds run unsandboxed as the nixbld users (README, What builds can reach)" >&2
else
  echo "run: neither Nix's sandbox nor build users work here: builds run as $(id -un) (README, What builds can reach)" >&2
fi

port=${PORT:-8080}
address=${NIXERY_LISTEN_ADDRESS:-127.0.0.1}
pkgs=${NIXERY_PKGS_PATH:-$PWD/pkgs-debian}
PORT=$port NIXERY_LISTEN_ADDRESS=$address NIX_TIMEOUT=${NIX_TIMEOUT:-600} \
  NIXERY_PKGS_PATH=$pkgs NIXERY_STORAGE_BACKEND=filesystem STORAGE_PATH=$state/storage \
  setsid target/release/nixery serve > "$state/nixery.log" 2>&1 < /dev/null &
echo $! > "$state/nixery.pid"

for _ in $(seq 100); do
  curl -fs "http://$address:$port/v2/" > /dev/null && break
  kill -0 "$(cat "$state/nixery.pid")" 2>/dev/null || { cat "$state/nixery.log"; exit 1; }
  sleep 0.1
done
curl -fs "http://$address:$port/v2/" > /dev/null || { echo "nixery did not come up; see $state/nixery.log" >&2; exit 1; }

cat <<TXT
nixery is running on http://$address:$port (log: $state/nixery.log, pid $(cat "$state/nixery.pid")),
serving the package set in $pkgs.

Pull and run an image (the first pull of an image builds it):
  podman run --rm --tls-verify=false $address:$port/shell/git/curl/python3 git --version
  docker run --rm $address:$port/shell/git/curl/python3 python3 -c 'import ssl; print(ssl.OPENSSL_VERSION)'
  skopeo copy --src-tls-verify=false docker://$address:$port/shell/jq oci:/tmp/jq:latest
Its page: http://$address:$port/image/shell/git/curl/python3
Stop it with: kill \$(cat $state/nixery.pid)
TXT
