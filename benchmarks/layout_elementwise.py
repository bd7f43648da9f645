"""Elementwise optimizer arithmetic on one leaf, by layout.

XLA:CPU's loop for an elementwise fusion follows the shape of the fusion's
output. A PyTorch/Paddle-layout 3x3 conv kernel ``(O, I, 3, 3)`` has a last
dimension of 3, and the same arithmetic on it runs slower than on Flax's
``(3, 3, I, O)`` or on a matrix of the same elements; this prints, per
fusion, the in-place (donated) time on each layout, and on the PyTorch
layout computed through a 2-D view inside the jit (reshape in, compute,
reshape out), which does not help: the output is still 4-D, so the loop is
too. This is what every optimizer pays on such leaves, optax's included.

    python benchmarks/layout_elementwise.py
    python benchmarks/layout_elementwise.py --o 256 --i 256 --k 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

FUSIONS = {
  # A momentum or moment update: 2 reads, 1 write.
  'axpy': lambda x, g: 0.9 * x + 0.1 * g,
  # Adam's direction applied to the params.
  'adam_direction': lambda p, v: p - 1e-3 * p / (jnp.sqrt(jnp.abs(v)) + 1e-8),
  'divide': lambda p, g: p - 1e-3 * g / (p + 1e-8),
  'sqrt': lambda p, g: p - 1e-3 * jnp.sqrt(jnp.abs(g)),
}


def via_view(fn, view):
  def viewed(x, g):
    return fn(x.reshape(view), g.reshape(view)).reshape(x.shape)

  return viewed


def time_ms(fn, shape, reps):
  key = jax.random.key(0)
  x, g = (jax.random.normal(k, shape) + 2 for k in jax.random.split(key))
  compiled = jax.jit(fn, donate_argnums=0).lower(x, g).compile()
  x = compiled(x, g)
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    x = compiled(x, g)
    x.block_until_ready()
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--o', type=int, default=512)
  ap.add_argument('--i', type=int, default=512)
  ap.add_argument('--k', type=int, default=3)
  ap.add_argument('--reps', type=int, default=31)
  args = ap.parse_args()
  o, i, k = args.o, args.i, args.k
  torch, flax, matrix = (o, i, k, k), (k, k, i, o), (o, i * k * k)
  print(f'# jax {jax.__version__} ({jax.default_backend()}); ms, median')
  cols = [
    f'{torch}',
    f'{flax}',
    f'{matrix}',
    f'{torch} via {matrix}',
  ]
  print(f'{"fusion":>16s} ' + ' '.join(f'{c:>24s}' for c in cols))
  for name, fn in FUSIONS.items():
    row = [
      time_ms(fn, torch, args.reps),
      time_ms(fn, flax, args.reps),
      time_ms(fn, matrix, args.reps),
      time_ms(via_view(fn, matrix), torch, args.reps),
    ]
    print(f'{name:>16s} ' + ' '.join(f'{t:24.3f}' for t in row))


if __name__ == '__main__':
  main()
