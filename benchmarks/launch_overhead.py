"""How much of a step is per-kernel overhead rather than memory traffic.

For the BERT-base tree: kernels per compiled step (fusions and other ops in
the entry computation) and step time for lambjax and optax LAMB, the
per-leaf 4-read-3-write roof, and the same pass over one flat buffer of all
the parameters (the machine's real bandwidth roof); then lambjax LAMB and
the roof on the same model with its 12 encoder layers stacked (the
``nn.scan`` layout, 21 leaves; ``lj.Stacked`` keeps one trust ratio per
layer slice, so the maths is the per-leaf one).

    python benchmarks/launch_overhead.py [--inner 100] [--rounds 7]
    python benchmarks/launch_overhead.py --tree many_small [--stacked-only]
"""

from __future__ import annotations

import argparse
import re
import statistics

import jax
import numpy as np
import optax
from bench_step import STACKED, TREES, Roof, Runner, make_tree

import lambjax as lj


def kernels(compiled) -> int:
  """Ops in the entry computation that launch work (not tuples/params)."""
  text = compiled.as_text()
  entry = text[text.index('\nENTRY') :]
  entry = entry[: entry.index('\n}')]
  # '%name = TYPE opcode(' where TYPE may be a tuple with spaces.
  ops = re.findall(r'^\s*(?:ROOT )?%?\S+ = .*?\b([a-z][\w-]*)\(', entry, re.M)
  skip = {'parameter', 'tuple', 'get-tuple-element', 'constant', 'bitcast'}
  return sum(op not in skip for op in ops)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--inner', type=int, default=100)
  ap.add_argument('--rounds', type=int, default=7)
  ap.add_argument(
    '--tree',
    default='bert',
    choices=('bert', 'many_small'),
    help='many_small: 2,000 x 1,000 per leaf against one (2000, 1000) '
    'stacked leaf (per-leaf lamb/lars compile for minutes: --stacked-only)',
  )
  ap.add_argument('--stacked-only', action='store_true')
  a = ap.parse_args(argv)
  shapes = TREES[a.tree]()
  n = sum(int(np.prod(s)) for s in shapes.values())
  grads = make_tree(shapes, 99)
  stack, pattern = STACKED[a.tree]
  stacked = stack(shapes)
  if a.tree == 'bert':
    txs = {'lamb': lambda **k: lj.lamb(1e-3, weight_decay=0.01, **k)}
    theirs = {'lamb': optax.lamb(1e-3, weight_decay=0.01)}
  else:
    txs = {
      'lamb': lambda **k: lj.lamb(1e-3, weight_decay=0.01, **k),
      'lars': lambda **k: lj.lars(0.1, weight_decay=1e-4, **k),
    }
    theirs = {}
  impls = {}
  if not a.stacked_only:
    for name, tx in txs.items():
      impls[f'lambjax {name}'] = Runner('lj', tx(), shapes, grads)
    for name, tx in theirs.items():
      impls[f'optax {name}'] = Runner('ox', tx, shapes, grads)
    impls['roof, per leaf'] = Roof(shapes)
  impls['roof, one flat buffer'] = Roof({'all': (n,)})
  stacked_grads = make_tree(stacked, 99)
  for name, tx in txs.items():
    impls[f'lambjax {name}, stacked'] = Runner(
      'lj', tx(stacked=lj.Stacked(pattern)), stacked, stacked_grads
    )
  impls['roof, stacked'] = Roof(stacked)
  times = {k: [] for k in impls}
  for _ in range(a.rounds):
    for k, impl in impls.items():
      times[k].append(impl.run(a.inner))
  print(
    f'# {jax.devices()[0].device_kind}, jax {jax.__version__}, '
    f'{a.rounds} rounds of {a.inner} steps; {a.tree} {n / 1e6:.1f} M params, '
    f'{len(shapes)} leaves; stacked: {len(stacked)} leaves'
  )
  for k, impl in impls.items():
    ms = 1e3 * statistics.median(times[k])
    gbs = 28 * n / (ms / 1e3) / 1e9
    comp = getattr(impl, 'compile_s', None)
    print(
      f'{k:24s} {kernels(impl.compiled):5d} kernels  {ms:7.3f} ms/step '
      f' ({gbs:6.0f} GB/s at 28 B/param)'
      + (f'  compile {comp:5.2f} s' if comp is not None else '')
    )


if __name__ == '__main__':
  main()
