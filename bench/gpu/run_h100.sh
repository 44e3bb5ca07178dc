#!/usr/bin/env bash
# One-shot GPU check of Tessera's CUDA path, run on a GPU machine that has python3 with
# torch 2.11 (+CUDA) and transformers but no Rust: the CUDA tessera-shard binary is built
# elsewhere (scripts/build-cuda.sh) and carried here.
#   (a) correctness: greedy f32 generation on the tiny fixture model, CPU vs CUDA, must match;
#   (b) speed: `tessera-shard bench` (bf16) on a random model of SmolLM2-135M's shape, and
#       Transformers `generate` on the same model and GPU (bench/gpu/transformers_gpu.py).
#   (c) a probe of libtorch's SDPA backends when sequence lengths keep changing (bench/gpu/sdpa_probe.py,
#       only with SDPA_PROBE=1);
#   (d) end to end: `tessera serve --device cuda` on that model, one request of each API,
#       `tessera loadgen` at several concurrencies, and two ranks on a one-GPU machine
#       (must be refused with a clear message).
# Writes $OUT/log.txt, $OUT/tessera.json, $OUT/transformers.json, $OUT/loadgen-*.json, $OUT/summary.txt.
#   BIN=target-cuda/release/tessera-shard.stripped TOKENIZER=target-cuda/gpu/smollm2-tokenizer \
#     BINDIR=<folder with tessera, tessera-router, tessera-loadgen> OUT=/tmp/out bench/gpu/run_h100.sh
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
BINDIR="${BINDIR:-$root/target/release}"
CONCURRENCY="${CONCURRENCY:-1,8,32,64}"
# ONLY_SERVE=1 skips (a)-(c); RUN_AHEAD_MODES="false true" runs (d) once per shard
# run-ahead setting (TESSERA_RUN_AHEAD), one after the other on the same GPU.
ONLY_SERVE="${ONLY_SERVE:-0}"
RUN_AHEAD_MODES="${RUN_AHEAD_MODES:-true}"
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

if [ "$ONLY_SERVE" != 1 ]; then
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
fi

section "(b) build the random SmolLM2-135M-shaped model (bf16 safetensors)"
model="$WORK/smollm2-135m-random"
timeout 150 "$PY" bench/gpu/make_model.py "$model" "$TOKENIZER" "$DEV" 2>&1 | grep -v 'it/s\]' || true
[ -f "$model/model.safetensors" ] || note "model build FAILED"
timeout 60 "$BIN" generate --model "$model" --device "$DEV" --dtype bfloat16 --max-new-tokens 8 \
  --ignore-eos "The capital of France is" > "$WORK/smol-gen.txt" 2>&1
echo "[smol cuda bf16 generate rc=$?] $(head -c 400 "$WORK/smol-gen.txt")"

if [ "$ONLY_SERVE" != 1 ]; then
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
if [ "$DEV" = cuda ] && [ "${SDPA_PROBE:-0}" = 1 ]; then
  note "SDPA probe, libtorch defaults:"
  timeout 60 "$PY" -W ignore bench/gpu/sdpa_probe.py 2>&1 | tee -a "$summary"
  note "SDPA probe, TORCH_CUDNN_SDPA_DEPRIORITIZED=1 (what tessera-shard sets on CUDA):"
  TORCH_CUDNN_SDPA_DEPRIORITIZED=1 timeout 60 "$PY" -W ignore bench/gpu/sdpa_probe.py 2>&1 | tee -a "$summary"
fi
fi

section "(d) end to end: tessera serve --device $DEV, bf16, and tessera loadgen"
if [ -x "$BINDIR/tessera" ] && [ -f "$model/model.safetensors" ]; then
  port=3917
  for run_ahead in $RUN_AHEAD_MODES; do
  note "serve with TESSERA_RUN_AHEAD=$run_ahead:"
  TESSERA_RUN_AHEAD="$run_ahead" TESSERA_SHARD_BIN="$BIN" TESSERA_ROUTER_BIN="$BINDIR/tessera-router" \
    timeout 400 "$BINDIR/tessera" serve \
    --model "$model" --device "$DEV" --dtype bfloat16 --port "$port" --hostname 127.0.0.1 \
    --max-concurrent-requests 512 > "$WORK/serve-$run_ahead.log" 2>&1 &
  serve_pid=$!
  ready=0
  for _ in $(seq 1 120); do
    if curl -sf "http://127.0.0.1:$port/health" > /dev/null; then ready=1; break; fi
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
  done
  if [ $ready -eq 1 ]; then
    note "serve: healthy on $DEV"
    curl -s "http://127.0.0.1:$port/info"; echo
    curl -s "http://127.0.0.1:$port/generate" -H 'Content-Type: application/json' \
      -d '{"inputs":"The capital of France is","parameters":{"max_new_tokens":8,"details":true}}' | head -c 600; echo
    curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
      -d '{"model":"tessera","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":0}' | head -c 600; echo
    timeout 240 "$BINDIR/tessera-loadgen" --url "http://127.0.0.1:$port" --concurrency "$CONCURRENCY" \
      --prompt-lens 32,128,512 --max-tokens 64 --warmup 8 --json "$OUT/loadgen-$run_ahead.json" 2>&1 | tee -a "$summary"
    curl -s "http://127.0.0.1:$port/metrics" | grep -E '^tessera_(requests_total|shard_healthy|replica_requests_total|shard_forward_duration_seconds_(sum|count))' | head -20
  else
    note "serve on $DEV FAILED"
  fi
  kill -INT "$serve_pid" 2>/dev/null
  wait "$serve_pid"; echo "serve exit $?"
  tail -30 "$WORK/serve-$run_ahead.log"
  done
  # Two ranks on a machine with one GPU: NCCL needs one GPU per rank, so this must fail
  # at once with a message that says so.
  n_gpu="$(nvidia-smi -L 2>/dev/null | wc -l)"
  if [ "$DEV" = cuda ] && [ "$n_gpu" -lt 2 ]; then
    TESSERA_SHARD_BIN="$BIN" TESSERA_ROUTER_BIN="$BINDIR/tessera-router" timeout 120 "$BINDIR/tessera" serve \
      --model "$model" --device cuda --num-shard 2 --dtype bfloat16 --port $((port + 1)) > "$WORK/serve2.log" 2>&1
    echo "two ranks on $n_gpu GPU(s): exit $?"
    grep -v '^ *[0-9]*: \|^ *at \|backtrace' "$WORK/serve2.log" | tail -8 | tee -a "$summary"
  fi
else
  note "serve skipped: no $BINDIR/tessera or no model"
fi

section done
cat "$summary"
