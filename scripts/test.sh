#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests, which start real
# registries and pull from them with skopeo, umoci and chroot, and with
# podman, containerd and dockerd, which the tests start privately (needs root);
# then each fuzz target for a bounded time (FUZZ_SECONDS, default 15).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh test
# The same settings setup.sh writes to nix.conf, for a machine whose
# nix.conf is managed elsewhere.
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='
# The engines work on this kind of machine: a test that cannot start one fails
# rather than skips.
export NIXERY_REQUIRE_ENGINES=1
cargo test --all-targets
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
