#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch and the default model
# (idempotent), then builds and runs every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
cargo test --release --workspace "$@"
