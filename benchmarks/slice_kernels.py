"""XLA:CPU compile time of per-leaf kernels that differ by a slice offset.

A per-leaf trust ratio reaches its leaf's update as a scalar. Taken from a
vector of all leaves' ratios with a static ``vec[i]``, XLA fuses the slice
into the leaf's update kernel, so every leaf's kernel is different (its
offset), and XLA:CPU compiles each anew; given as the leaf's own scalar
argument, all the kernels are the same. ``n`` leaves of 1,000 floats, a
momentum-like update per leaf (two outputs), jitted with donation:

    python benchmarks/slice_kernels.py --n 1000,2000
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def compile_seconds(n: int, mode: str) -> float:
  xs = [jnp.full(1000, float(i)) for i in range(n)]
  ms = [jnp.ones(1000) for _ in range(n)]
  vec = jnp.ones(n)
  scalars = [jnp.float32(i) for i in range(n)]

  def step(xs, ms, vec, scalars):
    out_x, out_m = [], []
    for i, (x, m) in enumerate(zip(xs, ms, strict=True)):
      r = {'constant': 1.5, 'slice': vec[i], 'argument': scalars[i]}[mode]
      m = 0.9 * m + 0.1 * x
      out_x.append(x - r * m / (jnp.abs(m) + 1e-3))
      out_m.append(m)
    return out_x, out_m

  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(xs, ms, vec, scalars)
  t0 = time.perf_counter()
  lowered.compile()
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--n', default='1000,2000')
  args = ap.parse_args(argv)
  for n in (int(v) for v in args.n.split(',')):
    for mode in ('constant', 'argument', 'slice'):
      print(
        f'{n:5d} leaves  scalar from {mode:8s}  XLA compile '
        f'{compile_seconds(n, mode):6.2f} s',
        flush=True,
      )


if __name__ == '__main__':
  main()
