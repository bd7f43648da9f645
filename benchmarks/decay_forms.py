"""One optimizer's step with its weight decay as a number, a schedule and an
injected array (and with a learning-rate schedule), side by side in one
process.

    python benchmarks/decay_forms.py --opt lars --rounds 41

Each form is a jitted, donated ``update + apply_updates`` on the BERT-base
tree (``bench_step.py``); rounds alternate the order. Prints the median and
min per form and the median of per-round ratios to the number form (> 1:
slower than with a number). benchmarks/RESULTS.md, "Weight-decay schedules
and Nesterov Adam".
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from bench_step import _WD_SCHEDULE, TREES, make_step, make_tree

import lambjax as lj

FORMS = {
  'lars': lambda wd, inject=False, lr=0.1: (
    optax.inject_hyperparams(lj.lars) if inject else lj.lars
  )(lr, weight_decay=wd, trust_coefficient=0.001),
  'lamb': lambda wd, inject=False, lr=1e-3: (
    optax.inject_hyperparams(lj.lamb) if inject else lj.lamb
  )(lr, weight_decay=wd),
}
# A learning-rate schedule (its count advanced in place, like the decay's).
_LR_SCHEDULE = {
  'lars': optax.linear_schedule(0.1, 0.2, 10_000),
  'lamb': optax.linear_schedule(1e-3, 2e-3, 10_000),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--opt', default='lars', choices=sorted(FORMS))
  ap.add_argument('--tree', default='bert', choices=sorted(TREES))
  ap.add_argument('--rounds', type=int, default=25)
  a = ap.parse_args(argv)
  make = FORMS[a.opt]
  txs = {
    'number': make(1e-4),
    'schedule': make(_WD_SCHEDULE),
    'injected': make(1e-4, inject=True),
    'lr_schedule': make(1e-4, lr=_LR_SCHEDULE[a.opt]),
  }
  shapes = TREES[a.tree]()
  runs = {}
  for name, tx in txs.items():
    p, g = make_tree(shapes, 0), make_tree(shapes, 1)
    step = make_step(tx)
    p, s = step(p, tx.init(p), g)
    jax.block_until_ready(p)
    runs[name] = [step, p, s, g]
  times = {name: [] for name in txs}
  order = list(txs)
  for r in range(a.rounds):
    for name in order if r % 2 else order[::-1]:
      step, p, s, g = runs[name]
      t0 = time.perf_counter()
      p, s = step(p, s, g)
      jax.block_until_ready(p)
      times[name].append(time.perf_counter() - t0)
      runs[name][1:3] = [p, s]
  base = np.array(times['number'])
  print(f'# {a.opt} on {a.tree}, {a.rounds} rounds, jax {jax.__version__}')
  for name, ts in times.items():
    ratio = float(np.median(np.array(ts) / base))
    print(
      f'{name:9s} median {1e3 * np.median(ts):7.1f} ms  '
      f'min {1e3 * min(ts):7.1f} ms  / number {ratio:.3f}'
    )


if __name__ == '__main__':
  main()
