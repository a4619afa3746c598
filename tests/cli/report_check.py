"""Checks a `moetrain report` page against the run directories it was made from.

  report_check.py REPORT.html RUN_DIR [RUN_DIR ...]

The page parses as XML (well-formed: every tag closed, every entity known) and holds no script and no reference
to anything outside it; each plot holds as many points as the runs' metrics.jsonl hold values for it (a last line
cut short does not count): train loss, validation loss, LM loss, MTP loss per depth, learning rate, gradient norm,
tokens/s, MFU, MaxVio (mean and per layer), per-expert biases (a line of text where they stay 0); each expert-load heatmap has experts × columns
cells over the records that carry per-expert tokens; the loss plot draws the entropy floor the runs recorded; each
run's config and summary line are on the page."""
import json
import math
import os
import sys
import xml.etree.ElementTree as ET

report, runs = sys.argv[1], sys.argv[2:]
root = ET.parse(report).getroot()
fails = []


def check(cond, what):
    if not cond:
        fails.append(what)


for el in root.iter():
    check(el.tag != "script", "a <script> element")
    for attr in ("src", "href"):
        check(attr not in el.attrib, f"<{el.tag} {attr}=...>: a reference outside the page")

plots = {svg.get("data-plot"): svg for svg in root.iter("svg")}


def points(plot, label):
    svg = plots.get(plot)
    if svg is None:
        fails.append(f"no plot {plot}")
        return None
    for line in svg.iter("polyline"):
        if line.get("data-label") == label:
            return len(line.get("points").split())
    fails.append(f"plot {plot}: no series {label!r}")
    return None


def finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


checked = 0
text = "".join(root.itertext())
for run in runs:
    name = os.path.basename(os.path.normpath(run))
    lines = open(f"{run}/metrics.jsonl").read().split("\n")
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # the empty string after the last newline, or a torn last line
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    want = {("loss", f"{name}: train"): sum(finite(r["loss"]) for r in steps),
            ("lm-mtp", f"{name}: LM"): sum(finite(r["lm_loss"]) for r in steps)}
    if evals:
        want[("loss", f"{name}: validation")] = sum(finite(r["val_loss"]) for r in evals)
    depths = max(len(r.get("mtp_losses", [])) for r in steps)
    for k in range(depths):
        want[("lm-mtp", f"{name}: MTP depth {k + 1}")] = sum(
            len(r.get("mtp_losses", [])) > k and finite(r["mtp_losses"][k]) for r in steps)
    for plot, key in (("lr", "lr"), ("grad-norm", "grad_norm"), ("tokens-per-s", "tokens_per_s"), ("mfu", "mfu")):
        want[(plot, name)] = sum(finite(r.get(key)) for r in steps)
    with_moe = [r for r in steps if r.get("moe")]
    want[("max-vio-mean", name)] = len(with_moe)
    layers = [layer["layer"] for layer in with_moe[0]["moe"]]
    for layer in layers:
        want[(f"max-vio/{name}", layer)] = len(with_moe)
        per_layer = [next(x for x in r["moe"] if x["layer"] == layer) for r in with_moe]
        with_bias = [x for x in per_layer if "bias" in x]
        experts = len(with_bias[0]["bias"])
        if any(x["bias_min"] != 0 or x["bias_max"] != 0 for x in per_layer):
            for e in range(experts):
                want[(f"bias/{name}/{layer}", f"expert {e}")] = len(with_bias)
        else:
            check(f"{name} {layer}: routing bias 0 at every step" in text, f"{name} {layer}: no flat-bias line")
        heat = plots.get(f"expert-load/{name}/{layer}")
        with_tokens = [x for x in per_layer if "tokens" in x]
        if heat is None:
            fails.append(f"no heatmap expert-load/{name}/{layer}")
            continue
        columns = min(len(with_tokens), 240)
        cells = sum(1 for r in heat.iter("rect") if r.get("class") == "cell")
        check(int(heat.get("data-records")) == len(with_tokens) and int(heat.get("data-columns")) == columns and
              int(heat.get("data-experts")) == experts and cells == experts * columns,
              f"heatmap {name}/{layer}: {cells} cells, {heat.attrib}; want {len(with_tokens)} records, {experts} "
              f"experts × {columns} columns")
        checked += 1
    for (plot, label), n in want.items():
        got = points(plot, label)
        check(got is None or got == n, f"plot {plot}, series {label!r}: {got} points, metrics.jsonl has {n}")
        checked += 1
    floors = {r["entropy_rate"] for r in evals if "entropy_rate" in r}
    refs = [line for line in plots["loss"].iter("line") if line.get("class") == "reference"]
    check(len(refs) >= len(floors), f"loss plot: {len(refs)} entropy floor lines, runs recorded {floors}")
    for f in floors:
        check(f"corpus entropy rate {f:.4f}" in text, f"no entropy floor label for {f:.4f}")
    config = open(f"{run}/config.yaml").read()
    check(any(config.strip() == (pre.text or "").strip() for pre in root.iter("pre")), f"{name}: config not shown")
    check(f"{name}: summary: {steps[-1]['step'] - steps[0]['step'] + 1} steps" in text, f"{name}: no summary line")

if fails:
    sys.exit("report check failed:\n  " + "\n  ".join(fails[:20]))
print(f"{report}: well-formed, self-contained; {checked} plots and series of {len(runs)} run(s) hold the points "
      f"their metrics hold")
