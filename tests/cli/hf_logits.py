"""Loads a `moetrain ckpt export --format hf` folder with transformers' AutoModelForCausalLM and compares its logits
with `moetrain eval --dump-logits` on the same windows of a token shard.

  hf_logits.py HF_DIR LOGITS.npy SHARD.bin [--tol 1e-4]

The windows are the ones `eval` reads: from token 0 of the shard, seq_len + 1 + mtp_depth tokens each, stride
seq_len (seq_len and mtp_depth from config.json). Prints the largest absolute difference; exit 1 above --tol."""
import argparse
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("hf_dir")
p.add_argument("logits")
p.add_argument("shard")
p.add_argument("--tol", type=float, default=1e-4)
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

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
model.eval()
with torch.no_grad():
    theirs = model(input_ids=ids).logits.float().numpy()
diff = float(np.abs(theirs - ours).max())
print(f"transformers {__import__('transformers').__version__} {type(model).__name__}: {windows} windows x "
      f"{seq_len} tokens x {vocab} logits, max |transformers - moetrain| = {diff:.3g} (tolerance {a.tol:g})")
sys.exit(0 if diff <= a.tol else 1)
