"""LARS's two norms on one leaf: sums over the inputs vs the spelled norm.

lambjax's LARS (optax form) needs ``‖g + wd p‖²`` and ``‖p‖²`` without
writing ``d = g + wd p`` out. Two forms (``lambjax/_src/fused.py``):

* ``sums``: ``Σ g²``, ``Σ g p``, ``Σ p²`` (then ``‖d‖²`` from them, with a
  guard against cancellation): 4 array reads.
* ``spelled``: ``Σ (g - c p)²`` and ``Σ p²``: 3 reads.
* ``viewed``: the spelled form on a view of ``g`` and ``p`` whose last
  dimension is long (trailing dimensions merged, ``fused.reduction_view``):
  ``(2048, 512, 1, 1)`` is summed as ``(2048, 512)``.

XLA:CPU's YNN reductions run the spelled form slowly when the last
dimension is short; this prints the three per shape (jitted, medians of
31)::

    python benchmarks/lars_norms.py
    python benchmarks/lars_norms.py --shapes 2048x512x1x1,1x1x512x2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lambjax._src import fused

DEFAULT = (
  # ResNet-50 conv kernels in PyTorch (O, I, kh, kw) and Flax (kh, kw, I, O).
  '2048x512x1x1,1x1x512x2048,512x512x3x3,3x3x512x512,64x64x3x3,3x3x64x64,'
  '256x64x1x1,1x1x64x256,64x3x7x7,7x7x3x64,'
  # About 1 M elements, last dimension 1 to 1,024, and a vector.
  '1048576x1,524288x2,349525x3,262144x4,131072x8,65536x16,32768x32,'
  '16384x64,1024x1024,1048576'
)


@jax.jit
def sums(g, p, c):
  del c
  return jnp.sum(g * g), jnp.sum(g * p), jnp.sum(p * p)


@jax.jit
def spelled(g, p, c):
  d = g - c * p
  return jnp.sum(d * d), jnp.sum(p * p)


@jax.jit
def viewed(g, p, c):
  return spelled(*fused.reduction_view(g, p), c)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--shapes', default=DEFAULT)
  ap.add_argument('--reps', type=int, default=31)
  args = ap.parse_args()
  print(f'# jax {jax.__version__} ({jax.default_backend()}); ms, median')
  print(
    f'{"shape":>22s} {"sums":>8s} {"spelled":>8s} {"viewed":>8s}'
    f' {"sp/sums":>8s} {"vw/sums":>8s}'
  )
  rng = np.random.default_rng(0)
  for text in args.shapes.split(','):
    shape = tuple(int(d) for d in text.split('x'))
    g, p = (
      jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
      for _ in range(2)
    )
    c = jnp.float32(-0.01)
    times = {sums: [], spelled: [], viewed: []}
    for f in times:
      jax.block_until_ready(f(g, p, c))
    for _ in range(args.reps):
      for f, ts in times.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(g, p, c))
        ts.append(time.perf_counter() - t0)
    a, b, v = (1e3 * statistics.median(ts) for ts in times.values())
    print(f'{text:>22s} {a:8.3f} {b:8.3f} {v:8.3f} {b / a:8.2f} {v / a:8.2f}')


if __name__ == '__main__':
  main()
