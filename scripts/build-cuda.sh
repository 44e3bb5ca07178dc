#!/usr/bin/env bash
# Builds a CUDA-capable tessera-shard into target-cuda/ (the CPU build in target/ is left
# alone): links libtorch_cuda.so from the wheel's real torch/lib folder, which
# scripts/setup.sh installed. No CUDA libraries are needed to link, only to run: on a GPU
# machine point LD_LIBRARY_PATH at its own torch 2.11 lib folder.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export LIBTORCH_LIB="$root/.deps/py/torch"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
cargo build --release -p tessera-shard --features cuda "$@"
bin="$CARGO_TARGET_DIR/release/tessera-shard"
linked="$(ldd "$bin")"  # captured, not piped: `| grep -q` under pipefail can fail on SIGPIPE
grep -q 'libtorch_cuda.so' <<<"$linked" || { echo "build-cuda: $bin does not need libtorch_cuda.so" >&2; exit 1; }
strip -o "$CARGO_TARGET_DIR/release/tessera-shard.stripped" "$bin"
echo "$CARGO_TARGET_DIR/release/tessera-shard.stripped"
