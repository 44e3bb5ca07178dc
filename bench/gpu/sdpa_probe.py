"""Times libtorch's scaled_dot_product_attention on the GPU at SmolLM2's attention shape
(9 query heads, 3 KV heads, head dim 64, bf16, enable_gqa) when every call has a sequence
length never seen before (as in decode, where the context grows by one each step, or in
prefill of prompts of varied lengths) against repeated calls at one length, for the default
backend choice and each backend forced. Milliseconds per call, medians.
    python3 sdpa_probe.py"""
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev, dt = os.environ.get("DEVICE", "cuda"), torch.bfloat16
torch.manual_seed(0)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def ms(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def case(name, make, fresh_lengths, same_length, causal):
    def call(length):
        q, k, v = make(length)
        return ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))

    for label, backends in [("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                            ("flash", [SDPBackend.FLASH_ATTENTION]),
                            ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("math", [SDPBackend.MATH])]:
        try:
            ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
            with ctx:
                call(same_length)
                fresh = [call(n) for n in fresh_lengths]
                same = [call(same_length) for _ in range(10)]
            print(f"{name:8} {label:9}: new length {statistics.median(fresh):8.3f} ms/call, "
                  f"repeated length {statistics.median(same):8.3f} ms/call", flush=True)
        except Exception as e:  # a backend that does not support the shape
            print(f"{name:8} {label:9}: unavailable ({str(e).splitlines()[0][:100]})", flush=True)
        fresh_lengths = [n + 1000 for n in fresh_lengths]  # never reuse a length across backends


with torch.no_grad():
    decode = lambda n: (torch.randn(1, 9, 1, 64, device=dev, dtype=dt),
                        torch.randn(1, 3, n, 64, device=dev, dtype=dt),
                        torch.randn(1, 3, n, 64, device=dev, dtype=dt))
    prefill = lambda n: (torch.randn(1, 9, n, 64, device=dev, dtype=dt),
                         torch.randn(1, 3, n, 64, device=dev, dtype=dt),
                         torch.randn(1, 3, n, 64, device=dev, dtype=dt))
    case("decode", decode, list(range(129, 161)), 160, False)
    case("prefill", prefill, list(range(100, 116)), 128, True)
