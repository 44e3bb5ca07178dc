"""Builds a randomly initialised Llama with SmolLM2-135M's exact shape, saved in bf16 as
safetensors with SmolLM2's tokenizer, for speed measurements (the trained weights are
only shipped as a 98 MB GGUF, too big to carry to a GPU machine).
    python3 make_model.py OUT_DIR TOKENIZER_DIR [cuda|cpu]"""
import json
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out, tok_dir = sys.argv[1], sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
with torch.device(device):
    model = LlamaForCausalLM(config)
model = model.to(torch.bfloat16).eval()
os.makedirs(out, exist_ok=True)
model.save_pretrained(out, safe_serialization=True)
# Tessera reads rope_theta at the top level of config.json; newer Transformers may move it
# into rope_parameters only.
path = os.path.join(out, "config.json")
cfg = json.load(open(path))
cfg["rope_theta"] = 100000.0
cfg["tie_word_embeddings"] = True
if cfg.get("rope_scaling") is None:
    cfg.pop("rope_scaling", None)
json.dump(cfg, open(path, "w"), indent=2)
for name in os.listdir(tok_dir):
    shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
params = sum(p.numel() for p in model.parameters())
print(f"made {out}: {params / 1e6:.1f}M parameters, files {sorted(os.listdir(out))}", flush=True)
