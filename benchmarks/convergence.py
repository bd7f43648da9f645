"""Large-batch convergence on MNIST-1D: lambjax against optax, 5 seeds.

    python benchmarks/convergence.py              # the table (~5 min, 2 cores)
    python benchmarks/convergence.py --recipes    # batch-4096 recipe search
    python benchmarks/convergence.py --eight-bit  # 8-bit LAMB state vs float32
    python benchmarks/convergence.py --help

MNIST-1D with 40,000 samples (generator seed 42; 32k train / 4k val / 4k
test), MLP 40-128-128-10 (ReLU), 10 epochs at every batch size (64, 256,
1024, 4096), linear warmup over the first 10% of steps then linear decay to
0, weight decay 1e-4 on kernels only, seeds 0-4 trained at once with
``jax.vmap``. Every lambjax optimizer runs beside optax's in the same process
with the same data order and initialisation, so where the maths is the same
the two columns should agree within seed noise. SGD with momentum is optax's
in both (lambjax has no plain momentum SGD alias): it is the baseline.

``--recipes`` evaluates large-batch recipes at batch 4096 (validation
accuracy picks; test accuracy reports). The training loop is
``examples/large_batch.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'examples'))
import large_batch as lb  # noqa: E402

import lambjax as lj  # noqa: E402

BATCH_SIZES = (64, 256, 1024, 4096)
# Peak learning rates (64 / 256 / 1024 / 4096), from the protocol.
PEAK_LR = {
  'lamb': (0.01, 0.02, 0.04, 0.08),
  'adamw': (0.01, 0.02, 0.04, 0.04),
  'lars': (6.0, 12.0, 12.0, 12.0),
  'sgd': (0.2, 0.8, 0.8, 0.8),
}
SEEDS = tuple(range(5))


def run(
  name: str,
  lib: str,
  batch: int,
  peak: float,
  data: dict,
  epochs: int = 10,
  seeds=SEEDS,
  warmup_frac: float = 0.1,
  **options: Any,
) -> dict:
  steps = epochs * lb.steps_per_epoch(len(data['x']), batch)
  schedule = lb.warmup_linear_decay(peak, steps, warmup_frac)
  tx = lb.make_optimizer(name, schedule, lib, **options)
  return lb.train(tx, data, batch, epochs, seeds)


def fmt(acc: np.ndarray) -> str:
  return f'{100 * acc.mean():5.1f} ± {100 * acc.std():3.1f}'


def table(data: dict, epochs: int, batch_sizes, optimizers) -> dict:
  results = {}
  header = f'{"optimizer":10} {"batch":>5}  {"lambjax":>12}  {"optax":>12}'
  print(header + '  diff (pts)')
  for name in optimizers:
    for b in batch_sizes:
      peak = PEAK_LR[name][BATCH_SIZES.index(b)]
      t0 = time.time()
      ours = run(name, 'lambjax', b, peak, data, epochs)['test_acc']
      if name == 'sgd':
        theirs = ours  # The same optax optimizer on both sides.
      else:
        theirs = run(name, 'optax', b, peak, data, epochs)['test_acc']
      results[name, b] = (ours, theirs)
      diff = 100 * (ours.mean() - theirs.mean())
      print(
        f'{name:10} {b:5d}  {fmt(ours):>12}  {fmt(theirs):>12}  {diff:+6.2f}'
        f'   ({time.time() - t0:.0f} s)',
        flush=True,
      )
  return results


K = lj.mask_by_name(r'kernel$')  # Trust ratio on weight matrices only.
# Large-batch recipes at batch 4096 (name, optimizer, peak lr, warmup
# fraction, lambjax options). The first is the protocol's LAMB baseline.
RECIPES: list[tuple[str, str, float, float, dict]] = [
  ('lamb (baseline)', 'lamb', 0.08, 0.1, {}),
  ('lamb lr 0.16', 'lamb', 0.16, 0.1, {}),
  ('lamb, trust ratio on kernels', 'lamb', 0.08, 0.1, {'trust_ratio_mask': K}),
  ('  + lr 0.1', 'lamb', 0.1, 0.1, {'trust_ratio_mask': K}),
  ('  + b2 0.99', 'lamb', 0.08, 0.1, {'trust_ratio_mask': K, 'b2': 0.99}),
  (
    '  + ratio clamped to <= 5',
    'lamb',
    0.08,
    0.1,
    {
      'trust_ratio_mask': K,
      'max_ratio': 5.0,
    },
  ),
  ('  + b1 0.8', 'lamb', 0.08, 0.1, {'trust_ratio_mask': K, 'b1': 0.8}),
  (
    '  + b1 0.8, warmup 5% (best)',
    'lamb',
    0.08,
    0.05,
    {
      'trust_ratio_mask': K,
      'b1': 0.8,
    },
  ),
  ('lamb b1 0.8, all leaves', 'lamb', 0.08, 0.1, {'b1': 0.8}),
  ('lars (baseline)', 'lars', 12.0, 0.1, {}),
  ('lars paddle form', 'lars', 12.0, 0.1, {'trust_ratio_form': 'paddle'}),
  ('lars lr 24', 'lars', 24.0, 0.1, {}),
]


def recipes(data: dict, epochs: int, batch: int = 4096) -> None:
  print(f'batch {batch}, {epochs} epochs, seeds {SEEDS}:')
  print(f'{"recipe":34} {"val":>12}  {"test":>12}')
  for label, name, peak, warmup, options in RECIPES:
    r = run(
      name, 'lambjax', batch, peak, data, epochs, SEEDS, warmup, **options
    )
    print(f'{label:34} {fmt(r["val_acc"]):>12}  {fmt(r["test_acc"]):>12}')


def eight_bit(data: dict, epochs: int, batch_sizes=(1024, 4096)) -> None:
  """lambjax LAMB with float32 vs 8-bit blockwise moments (state_8bit=True)."""
  print(
    f'{"optimizer":22} {"batch":>5}  {"float32":>12}  {"8-bit":>12}  diff (pts)'
  )
  configs = [
    ('lamb', 0.1, {}),
    ('lamb recipe', 0.05, {'trust_ratio_mask': K, 'b1': 0.8}),
  ]
  for label, warmup, options in configs:
    for b in batch_sizes:
      peak = PEAK_LR['lamb'][BATCH_SIZES.index(b)]
      accs = [
        run(
          'lamb',
          'lambjax',
          b,
          peak,
          data,
          epochs,
          SEEDS,
          warmup,
          state_8bit=bits,
          **options,
        )['test_acc']
        for bits in (False, True)
      ]
      diff = 100 * (accs[1].mean() - accs[0].mean())
      print(
        f'{label:22} {b:5d}  {fmt(accs[0]):>12}  {fmt(accs[1]):>12}'
        f'  {diff:+6.2f}',
        flush=True,
      )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--num-samples', type=int, default=40_000)
  parser.add_argument('--batch-sizes', type=int, nargs='+', default=BATCH_SIZES)
  parser.add_argument('--optimizers', nargs='+', default=list(PEAK_LR))
  parser.add_argument('--recipes', action='store_true')
  parser.add_argument(
    '--eight-bit',
    action='store_true',
    help='LAMB with 8-bit state against float32 at batch 1024 and 4096',
  )
  a = parser.parse_args(argv)
  import jax

  print(f'jax {jax.__version__}, {jax.devices()[0].platform}')
  data = lb.load_splits(a.num_samples)
  start = time.time()
  if a.recipes:
    recipes(data, a.epochs)
  elif a.eight_bit:
    eight_bit(data, a.epochs)
  else:
    table(data, a.epochs, a.batch_sizes, a.optimizers)
  print(f'total {time.time() - start:.0f} s')


if __name__ == '__main__':
  main()
