"""XLA:CPU compile time of per-leaf kernels that differ by a slice offset.

A per-leaf trust ratio reaches its leaf's update as a scalar. Taken from a
vector of all leaves' ratios with a static ``vec[i]``, XLA fuses the slice
into the leaf's update kernel, so every leaf's kernel is different (its
offset), and XLA:CPU compiles each anew; given as the leaf's own scalar
argument, all the kernels are the same. ``barrier`` takes ``vec[i]`` at an
index that comes out of an optimization barrier (``dynamic_index_in_dim``):
XLA:CPU drops the barrier before fusion, the index folds back to a
constant, and the kernels differ as with the slice. ``n`` leaves of 1,000
floats, a momentum-like update per leaf (two outputs), jitted with
donation:

    python benchmarks/slice_kernels.py --n 1000,2000
    python benchmarks/slice_kernels.py --n 1000 --modes constant,slice,barrier
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def compile_seconds(n: int, mode: str) -> float:
  xs = [jnp.full(1000, float(i)) for i in range(n)]
  ms = [jnp.ones(1000) for _ in range(n)]
  vec = jnp.ones(n)
  scalars = [jnp.float32(i) for i in range(n)]

  def step(xs, ms, vec, scalars):
    out_x, out_m = [], []
    if mode == 'barrier':
      idx = jax.lax.optimization_barrier(tuple(np.uint32(i) for i in range(n)))
    for i, (x, m) in enumerate(zip(xs, ms, strict=True)):
      if mode == 'barrier':
        r = jax.lax.dynamic_index_in_dim(vec, idx[i], keepdims=False)
      else:
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
  ap.add_argument('--modes', default='constant,argument,slice,barrier')
  args = ap.parse_args(argv)
  modes = args.modes.split(',')
  known = ('constant', 'argument', 'slice', 'barrier')
  if any(mode not in known for mode in modes):
    raise SystemExit(f'--modes: a comma-separated list of {known}')
  for n in (int(v) for v in args.n.split(',')):
    for mode in modes:
      print(
        f'{n:5d} leaves  scalar from {mode:8s}  XLA compile '
        f'{compile_seconds(n, mode):6.2f} s',
        flush=True,
      )


if __name__ == '__main__':
  main()
