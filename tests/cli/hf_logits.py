"""Loads a `moetrain ckpt export --format hf` folder with transformers' AutoModelForCausalLM and compares its logits
with `moetrain eval --dump-logits` on the same windows of a token shard.

  hf_logits.py HF_DIR LOGITS.npy SHARD.bin [--tol 1e-4] [--min-agree 0] [--dtype fp32|bf16]

--dtype bf16: the folder must hold BF16 weights (every safetensors header says so; the routers' bias stays F32, as in
DeepSeek-V3's release), and transformers runs in BF16.

The windows are the ones `eval` reads: from token 0 of the shard, seq_len + 1 + mtp_depth tokens each, stride
seq_len (seq_len and mtp_depth from config.json). Prints the largest absolute difference and the share of positions
whose most likely token is the same; exit 1 above --tol or below --min-agree."""
import argparse
import json
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("hf_dir")
p.add_argument("logits")
p.add_argument("shard")
p.add_argument("--tol", type=float, default=1e-4)
p.add_argument("--min-agree", type=float, default=0.0)
p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
a = p.parse_args()

ours = np.load(a.logits)
windows, seq_len, vocab = ours.shape
config = json.load(open(f"{a.hf_dir}/config.json"))
assert config["max_position_embeddings"] == seq_len, (config["max_position_embeddings"], seq_len)
width = seq_len + 1 + config["num_nextn_predict_layers"]
dtype = np.uint16 if config["vocab_size"] <= 65536 else np.uint32
tokens = np.fromfile(a.shard, dtype=dtype).astype(np.int64)
ids = torch.tensor(np.stack([tokens[w * seq_len: w * seq_len + seq_len] for w in range(windows)]))
assert all(w * seq_len + width <= len(tokens) for w in range(windows))

# The stored dtype, from each safetensors header (8 bytes of length, then JSON), without loading the tensors.
index = f"{a.hf_dir}/model.safetensors.index.json"
names = set(json.load(open(index))["weight_map"].values()) if os.path.exists(index) else {"model.safetensors"}
stored = set()
for name in sorted(names):
    with open(f"{a.hf_dir}/{name}", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    stored |= {(k, v["dtype"]) for k, v in header.items() if k != "__metadata__"}
want = {"fp32": "F32", "bf16": "BF16"}[a.dtype]
wrong = sorted(f"{k} ({t})" for k, t in stored if t != ("F32" if k.endswith("e_score_correction_bias") else want))
if wrong:
    sys.exit(f"{len(wrong)} tensors not stored as {want}: {', '.join(wrong[:5])}")

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
model.eval()
with torch.no_grad():
    theirs = model(input_ids=ids).logits.float().numpy()
diff = float(np.abs(theirs - ours).max())
agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
print(f"transformers {__import__('transformers').__version__} {type(model).__name__} ({want} weights, run in "
      f"{a.dtype}): {windows} windows x {seq_len} tokens x {vocab} logits, max |transformers - moetrain| = "
      f"{diff:.3g} (tolerance {a.tol:g}; largest |logit| {float(np.abs(ours).max()):.3g}), same argmax at "
      f"{100 * agree:.1f}% of positions (at least {100 * a.min_agree:g}%)")
sys.exit(0 if diff <= a.tol and agree >= a.min_agree else 1)
