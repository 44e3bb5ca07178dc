#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch and the default model
# (idempotent), then builds and runs every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
# The OpenAI Python client, for the end-to-end test that it completes chats
# against `tessera serve` (tests/python/openai_client.py); test-only, no torch.
client="$root/.deps/venv-client"
client_stamp="$client/.openai-3.51.0"
if [ ! -f "$client_stamp" ]; then
  echo "tessera test: installing the openai==3.51.0 client into $client" >&2
  python3 -m venv "$client"
  "$client/bin/pip" install --quiet --disable-pip-version-check 'openai==3.51.0'
  touch "$client_stamp"
fi
# The end-to-end tests in tests/ run the real binaries, which `cargo test` alone
# builds only for packages that have integration tests of their own.
cargo build --release --workspace --bins
# --no-fail-fast: one failing test binary must not hide the results of the others.
status=0
cargo test --release --workspace --no-fail-fast "$@" || status=$?
# The CUDA build must keep compiling and linking (it links libtorch_cuda.so from the
# same wheel; no GPU or CUDA library is needed to link). Built for the whole workspace
# so that dependencies keep their features and only the shard crate is rebuilt; cargo
# keeps both variants, so the CPU binaries are restored at once afterwards.
echo "tessera test: checking that the CUDA build links" >&2
cargo build --release --workspace --bins --features tessera-shard/cuda
# ldd's output is captured first: `ldd | grep -q` under pipefail fails at random when
# grep exits at its first match and ldd dies writing the rest (SIGPIPE).
linked="$(ldd target/release/tessera-shard)"
if ! grep -q 'libtorch_cuda.so' <<<"$linked"; then
  echo "tessera test: the CUDA build does not link libtorch_cuda.so" >&2
  status=1
fi
cargo build --release --workspace --bins
exit "$status"
