#!/usr/bin/env bash
# One-shot GPU check of Tessera's CUDA path, run on a GPU machine that has python3 with
# torch 2.11 (+CUDA) and transformers but no Rust: the CUDA tessera-shard binary is built
# elsewhere (scripts/build-cuda.sh) and carried here.
#   (a) correctness: greedy f32 generation on the tiny fixture model, CPU vs CUDA, must match;
#   (b) speed: `tessera-shard bench` (bf16) on a random model of SmolLM2-135M's shape, and
#       Transformers `generate` on the same model and GPU (bench/gpu/transformers_gpu.py).
#   (c) a probe of libtorch's SDPA backends when sequence lengths keep changing (bench/gpu/sdpa_probe.py).
# Writes $OUT/log.txt, $OUT/tessera.json, $OUT/transformers.json, $OUT/summary.txt.
#   BIN=target-cuda/release/tessera-shard.stripped TOKENIZER=target-cuda/gpu/smollm2-tokenizer \
#     OUT=/tmp/out bench/gpu/run_h100.sh
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
OUT="${OUT:-$root/target-cuda/gpu/out}"
BIN="${BIN:-$root/target-cuda/release/tessera-shard.stripped}"
TOKENIZER="${TOKENIZER:-$root/target-cuda/gpu/smollm2-tokenizer}"
PY="${PY:-python3}"
WORK="${WORK:-/tmp/tessera-gpu}"
# Overridable only to dry-run this script on a machine without a GPU.
DEV="${DEV:-cuda}"
BATCHES="${BATCHES:-1,8,32,64}"
PREFILL="${PREFILL:-128,1024}"
TF_BATCHES="${TF_BATCHES:-1 64}"
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
section() { echo; echo "=== $* ($(date +%T))"; }

section environment
chmod +x "$BIN" 2>/dev/null || true
nvidia-smi -L || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
torch_dir="$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
site="$(dirname "$torch_dir")"
"$PY" -c 'import torch,transformers;print("torch",torch.__version__,"cuda",torch.version.cuda,"available",torch.cuda.is_available(),"transformers",transformers.__version__)'
ld="$torch_dir/lib"
for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib; do [ -d "$d" ] && ld="$ld:$d"; done
export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ls -la "$BIN"
ldd "$BIN" | grep -E 'torch|c10|not found'
note "device: $(nvidia-smi -L 2>/dev/null | head -1)"

section "(a) correctness: tiny-llama f32 greedy, cpu vs cuda"
tiny=fixtures/reference/tiny-llama
ok=1
i=0
for prompt in "The capital of France is" "Once upon a time" "1, 2, 3, 4,"; do
  i=$((i + 1))
  for dev in cpu "$DEV"; do
    timeout 60 "$BIN" generate --model "$tiny" --device "$dev" --dtype float32 \
      --max-new-tokens 48 --ignore-eos "$prompt" > "$WORK/tiny-$i-$dev.txt" 2> "$WORK/tiny-$i-$dev.err"
    rc=$?
    echo "[$dev rc=$rc] $(cat "$WORK/tiny-$i-$dev.txt")"
    [ $rc -eq 0 ] || { ok=0; tail -20 "$WORK/tiny-$i-$dev.err"; }
  done
  if [ -s "$WORK/tiny-$i-cpu.txt" ] && cmp -s "$WORK/tiny-$i-cpu.txt" "$WORK/tiny-$i-$DEV.txt"; then
    echo "prompt $i: identical"
  else
    ok=0; echo "prompt $i: DIFFERENT or missing"
  fi
done
[ $ok -eq 1 ] && note "correctness (tiny-llama f32 greedy, 48 tokens x 3 prompts, cpu vs cuda): MATCH" \
              || note "correctness: FAILED (see log)"
# Informational: the same on CUDA in bf16 (may differ from f32 after a few tokens).
timeout 60 "$BIN" generate --model "$tiny" --device "$DEV" --dtype bfloat16 --max-new-tokens 48 \
  --ignore-eos "The capital of France is" > "$WORK/tiny-bf16.txt" 2>&1
echo "[cuda bf16 rc=$?] $(cat "$WORK/tiny-bf16.txt")"

section "(b) build the random SmolLM2-135M-shaped model (bf16 safetensors)"
model="$WORK/smollm2-135m-random"
timeout 150 "$PY" bench/gpu/make_model.py "$model" "$TOKENIZER" "$DEV" 2>&1 | grep -v 'it/s\]' || true
[ -f "$model/model.safetensors" ] || note "model build FAILED"
timeout 60 "$BIN" generate --model "$model" --device "$DEV" --dtype bfloat16 --max-new-tokens 8 \
  --ignore-eos "The capital of France is" > "$WORK/smol-gen.txt" 2>&1
echo "[smol cuda bf16 generate rc=$?] $(head -c 400 "$WORK/smol-gen.txt")"

section "(b) tessera-shard bench, cuda bf16"
timeout 200 "$BIN" bench --model "$model" --device "$DEV" --dtype bfloat16 --dtypes bfloat16 \
  --batch-sizes "$BATCHES" --prefill-lens "$PREFILL" --json "$OUT/tessera.json"
rc=$?
echo "bench rc=$rc"
if [ -f "$OUT/tessera.json" ]; then
  "$PY" - "$OUT/tessera.json" <<'PYEOF' | tee -a "$summary"
import json, sys
for f in json.load(open(sys.argv[1])):
    print(f"tessera {f['dtype']} on {f['device']}: load {f['load_seconds']:.2f} s, peak RSS {f['peak_rss_mib']:.0f} MiB")
    for n, t in f["prefill_tokens_per_second"]:
        print(f"  tessera prefill {n:>5} tokens: {t:10.1f} tokens/s")
    for b, t in f["decode_tokens_per_second"]:
        print(f"  tessera decode batch {b:>3}: {t:10.1f} tokens/s")
PYEOF
else
  note "tessera bench FAILED (rc=$rc)"
fi

section "(b) transformers generate baseline, cuda bf16"
timeout 180 "$PY" bench/gpu/transformers_gpu.py "$model" "$OUT/transformers.json" $TF_BATCHES 2>&1 \
  | grep -v 'it/s\]' | grep -v '^{' | tee -a "$summary"
[ -f "$OUT/transformers.json" ] || note "transformers baseline FAILED"

section "(c) SDPA backends on new vs repeated sequence lengths (why tessera-shard sets TORCH_CUDNN_SDPA_DEPRIORITIZED)"
if [ "$DEV" = cuda ]; then
  note "SDPA probe, libtorch defaults:"
  timeout 60 "$PY" -W ignore bench/gpu/sdpa_probe.py 2>&1 | tee -a "$summary"
  note "SDPA probe, TORCH_CUDNN_SDPA_DEPRIORITIZED=1 (what tessera-shard sets on CUDA):"
  TORCH_CUDNN_SDPA_DEPRIORITIZED=1 timeout 60 "$PY" -W ignore bench/gpu/sdpa_probe.py 2>&1 | tee -a "$summary"
fi

section done
cat "$summary"
