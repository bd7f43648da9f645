"""Is a many-leaf step bound per buffer or per kernel? (accelerators)

Tiny leaves (so bandwidth does not matter), jitted and donated, 200 calls
queued then one wait; per call:

  A: N leaves, p + g                 (2N in, N out, N kernels)
  B: N leaves, (p+g, m+g, v+g)       (4N in, 3N out, N kernels if fused)
  C: N leaves of p + g, but g one packed buffer sliced per leaf
                                     (N+1 in, N out, N kernels)

    python benchmarks/dispatch_cost.py [--leaves 199] [--size 768]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, args, donate, calls=200, reps=5):
  f = jax.jit(fn, donate_argnums=donate)
  out = f(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(reps):
    args = (*out, *args[len(out) :]) if donate else args
    t0 = time.perf_counter()
    for _ in range(calls):
      out = f(*args)
      args = (*out, *args[len(out) :]) if donate else args
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / calls * 1e6)
  return statistics.median(ts)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--leaves', type=int, default=199)
  ap.add_argument('--size', type=int, default=768)
  a = ap.parse_args(argv)
  n, s = a.leaves, a.size
  leaves = lambda: [jnp.ones(s) for _ in range(n)]  # noqa: E731
  gflat = jnp.ones(n * s)

  def fa(p, g):
    return ([x + y for x, y in zip(p, g, strict=True)],)

  def fb(p, m, v, g):
    return (
      [x + y for x, y in zip(p, g, strict=True)],
      [x + y for x, y in zip(m, g, strict=True)],
      [x + y for x, y in zip(v, g, strict=True)],
    )

  def fc(p, gflat):
    return ([x + gflat[i * s : (i + 1) * s] for i, x in enumerate(p)],)

  print(f'# {jax.devices()[0].device_kind}, jax {jax.__version__}, {n} x {s}')
  print(
    f'A  {2 * n:5d} in {n:5d} out: {timed(fa, (leaves(), leaves()), (0,)):8.1f} us/call'
  )
  print(
    f'B  {4 * n:5d} in {3 * n:5d} out: '
    f'{timed(fb, (leaves(), leaves(), leaves(), leaves()), (0, 1, 2)):8.1f} us/call'
  )
  print(
    f'C  {n + 1:5d} in {n:5d} out: {timed(fc, (leaves(), gflat), (0,)):8.1f} us/call'
  )


if __name__ == '__main__':
  main()
