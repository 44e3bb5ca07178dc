"""Transformers `generate` on a GPU for side-by-side comparison with `tessera-shard bench`
(same model folder, same GPU, bf16): decode tokens/s at the given batch sizes, computed as
in bench/transformers_baseline.py (128-token prompts, 32 new tokens, min_new_tokens=32,
greedy, median of 3 timed runs after a warm-up, prefill measured separately and
subtracted), plus prefill tokens/s for one prompt of each length.
    python3 transformers_gpu.py MODEL_DIR OUT_JSON [batch ...]"""
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

folder, out_json = sys.argv[1], sys.argv[2]
batches = [int(b) for b in sys.argv[3:]] or [1, 64]
device = "cuda" if torch.cuda.is_available() else "cpu"
try:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
except TypeError:
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
model = model.to(device).eval()
vocab = model.config.vocab_size
new_tokens = 32


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def prompts(batch, length):
    return torch.tensor(
        [[200 + (i * 7919 + j * 104729) % (vocab - 200) for j in range(length)] for i in range(batch)],
        device=device,
    )


results = {
    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "attn_implementation": getattr(model.config, "_attn_implementation", None),
    "decode_tokens_per_second": {},
    "prefill_tokens_per_second": {},
    "generate_seconds": {},
}
with torch.no_grad():
    for batch in batches:
        ids = prompts(batch, 128)
        mask = torch.ones_like(ids)
        times = []
        for run in range(4):
            elapsed, out = timed(lambda: model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0))
            assert out.shape[1] == 128 + new_tokens, out.shape
            if run > 0:
                times.append(elapsed)
        # generate() includes the prefill; subtract it, measured separately, to get decode alone.
        prefill = [timed(lambda: model(ids, attention_mask=mask))[0] for _ in range(3)]
        decode_seconds = statistics.median(times) - statistics.median(prefill)
        tps = batch * (new_tokens - 1) / decode_seconds
        results["decode_tokens_per_second"][batch] = tps
        results["generate_seconds"][batch] = statistics.median(times)
        print(f"transformers bf16 decode batch {batch:>3}: {tps:9.1f} tokens/s", flush=True)
    for length in [128, 1024]:
        ids = prompts(1, length)
        timed(lambda: model(ids))
        t = statistics.median([timed(lambda: model(ids))[0] for _ in range(3)])
        results["prefill_tokens_per_second"][length] = length / t
        print(f"transformers bf16 prefill {length:>5} tokens: {length / t:9.1f} tokens/s", flush=True)
json.dump(results, open(out_json, "w"), indent=2)
print(json.dumps(results))
