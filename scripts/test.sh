#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests, which start real
# registries and pull from them with skopeo, umoci and chroot (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The same settings setup.sh writes to nix.conf, for a machine whose
# nix.conf is managed elsewhere (TOOLCHAIN.md §1).
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='
cargo test --all-targets
