"""How well token sequences follow a token shard's transitions, given the last `order` tokens.

  transitions.py SHARD.bin "t0 t1 t2 ...[; s0 s1 ...]" [--order K] [--min-seen F] [--min-best F] [--min-ratio F]

Over each sequence's tokens after its first K (sequences separated by ';'), counts those that followed the same K
tokens somewhere in the shard (uint16 ids), those that are the shard's most frequent successor of those K tokens,
and the mean of (the token's frequency after those K tokens) / (the most frequent successor's); exit 1 below any
bound. With K = 2 (an order-2 corpus) a model that ignored the token before the current one would score low."""
import argparse
import collections
import sys

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("shard")
p.add_argument("tokens")
p.add_argument("--order", type=int, default=1)
p.add_argument("--min-seen", type=float, default=0.0)
p.add_argument("--min-best", type=float, default=0.0)
p.add_argument("--min-ratio", type=float, default=0.0)
a = p.parse_args()
k = a.order
t = np.fromfile(a.shard, dtype=np.uint16).astype(np.int64).tolist()
successors = collections.defaultdict(collections.Counter)
for i in range(k, len(t)):
    successors[tuple(t[i - k:i])][t[i]] += 1
steps = []
for part in a.tokens.split(";"):
    seq = [int(x) for x in part.split()]
    steps += [(tuple(seq[i - k:i]), seq[i]) for i in range(k, len(seq))]
seen = sum(1 for ctx, y in steps if successors[ctx][y] > 0) / len(steps)
best = sum(1 for ctx, y in steps if successors[ctx] and successors[ctx].most_common(1)[0][0] == y) / len(steps)
ratio = sum(successors[ctx][y] / successors[ctx].most_common(1)[0][1] for ctx, y in steps if successors[ctx]) / len(steps)
print(f"{len(steps)} transitions (order {k}): {seen:.0%} seen in the corpus, {best:.0%} its most frequent successor, "
      f"frequency {ratio:.2f} of the most frequent one's on average (bounds {a.min_seen:.0%}, {a.min_best:.0%}, "
      f"{a.min_ratio:.2f})")
sys.exit(0 if seen >= a.min_seen and best >= a.min_best and ratio >= a.min_ratio else 1)
