#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch and the default model
# (idempotent), then builds and runs every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
# The end-to-end tests in tests/ run the real binaries, which `cargo test` alone
# builds only for packages that have integration tests of their own.
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
