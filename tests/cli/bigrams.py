"""How well a token sequence follows a token shard's transitions.

  bigrams.py SHARD.bin "t0 t1 t2 ..." [--min-seen F] [--min-best F]

Counts, over the sequence's transitions after its first token, those seen in the shard (uint16 ids) and those that
are the shard's most frequent successor of their token; exit 1 below either bound."""
import argparse
import collections
import sys

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("shard")
p.add_argument("tokens")
p.add_argument("--min-seen", type=float, default=0.0)
p.add_argument("--min-best", type=float, default=0.0)
a = p.parse_args()
t = np.fromfile(a.shard, dtype=np.uint16).astype(np.int64)
successors = collections.defaultdict(collections.Counter)
for x, y in zip(t[:-1].tolist(), t[1:].tolist()):
    successors[x][y] += 1
seq = [int(x) for x in a.tokens.split()]
pairs = list(zip(seq[:-1], seq[1:]))
seen = sum(1 for x, y in pairs if successors[x][y] > 0) / len(pairs)
best = sum(1 for x, y in pairs if successors[x] and successors[x].most_common(1)[0][0] == y) / len(pairs)
print(f"{len(pairs)} transitions: {seen:.0%} seen in the corpus, {best:.0%} its most frequent successor "
      f"(bounds {a.min_seen:.0%}, {a.min_best:.0%})")
sys.exit(0 if seen >= a.min_seen and best >= a.min_best else 1)
