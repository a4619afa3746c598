"""Reads a run directory's TensorBoard event file with the tensorboard package and checks it against metrics.jsonl.

  tb_events.py RUN_DIR EXPERTS TOKENS_PER_STEP_TIMES_TOP_K

Every scalar of every metrics.jsonl record (train/*, train/mtp_loss_depthK, perf/*, val/*,
moe/max_vio|bias_min|bias_max/LAYER) is in the
event file at that step, equal in float32; no tag has a step twice (a resumed run cut what came after its checkpoint);
each MoE layer has a tokens-per-expert histogram at every step, over EXPERTS experts summing to the routed tokens."""
import json
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea

run, experts, routed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
acc = ea.EventAccumulator(run, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
acc.Reload()
tags = acc.Tags()
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
keys = {"loss": "train/loss", "lm_loss": "train/lm_loss", "mtp_loss": "train/mtp_loss",
        "balance_loss": "train/balance_loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
        "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s", "mfu": "perf/mfu",
        "comm_wait_s": "perf/comm_wait_s", "val_loss": "val/loss", "val_max_vio": "val/max_vio"}
want = {}  # (tag, step) -> value
for r in records:
    for k, tag in keys.items():
        if k in r:
            want[(tag, r["step"])] = r[k]
    for k, v in enumerate(r.get("mtp_losses", [])):
        want[(f"train/mtp_loss_depth{k + 1}", r["step"])] = v
    for layer in r.get("moe", []):
        for k in ("max_vio", "bias_min", "bias_max"):
            want[(f"moe/{k}/{layer['layer']}", r["step"])] = layer[k]
got = {}
for tag in tags["scalars"]:
    steps = [e.step for e in acc.Scalars(tag)]
    if len(steps) != len(set(steps)):
        sys.exit(f"{tag}: steps written twice: {sorted(steps)}")
    for e in acc.Scalars(tag):
        got[(tag, e.step)] = e.value
missing = sorted(set(want) - set(got))
extra = sorted(set(got) - set(want))
if missing or extra:
    sys.exit(f"scalars missing from the event file: {missing[:5]}; not in metrics.jsonl: {extra[:5]}")
bad = [(k, want[k], got[k]) for k in want if np.float32(want[k]) != np.float32(got[k])]
if bad:
    sys.exit(f"scalars that differ from metrics.jsonl: {bad[:5]}")
steps = sorted({r["step"] for r in records if "loss" in r})
layers = [layer["layer"] for layer in records[0]["moe"]]
for layer in layers:
    h = acc.Histograms(f"moe/tokens_per_expert/{layer}")
    if [e.step for e in h] != steps:
        sys.exit(f"{layer}: histograms at steps {[e.step for e in h]}, expected {steps}")
    for e in h:
        v = e.histogram_value
        if v.num != experts or abs(v.sum - routed) > 1e-6 or abs(sum(v.bucket) - experts) > 1e-9:
            sys.exit(f"{layer} step {e.step}: histogram of {v.num} experts summing to {v.sum}, expected {experts} "
                     f"and {routed}")
print(f"{len(want)} scalars over {len(steps)} steps ({len(tags['scalars'])} tags) equal metrics.jsonl, no step "
      f"twice; {len(layers)} tokens-per-expert histograms per step, {experts} experts, {routed:.0f} routed tokens")
