"""Compile time of lambjax and optax, warmed up and interleaved in one process.

``bench_step.py`` compiles each row once, lambjax before optax, so
whatever the process has not yet done once (jax's first traces of ``jnp``
functions, XLA's first compile of a large program) is paid by lambjax's
step. Here each optimizer is first compiled once per implementation and
that time is dropped; then ``--reps`` times each is traced, lowered and
compiled again from a fresh optimizer and a fresh ``jax.jit`` (nothing is
reused), the order of lambjax and optax alternating from rep to rep. It
prints medians [min-max] of trace+lower and of XLA's compile, their sum, and
the median of per-rep ratios lambjax/optax (< 1: lambjax compiles faster).
Params are abstract (``jax.ShapeDtypeStruct``): only the program matters.
``*_stacked`` rows compile lambjax's step for the layers stacked
(``bench_step.STACKED``) against optax's for the per-leaf tree.
This is the optimizer's share of a step's compile; a fresh process pays a
one-off start on top, whatever it compiles first (``compile_cache.py``
measures whole fresh processes).

    python benchmarks/compile_interleaved.py --tree bert \
      --opts lamb,lamb_grouped,lars,lars_grouped,adamw --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from bench_step import OPTS, TREES, lambjax_side, make_step, roof_fn


def compile_once(tx, params) -> tuple[float, float]:
  """Seconds to trace+lower, and to compile, a fresh jitted step of ``tx``."""
  state = jax.eval_shape(tx.init, params)
  t0 = time.perf_counter()
  lowered = make_step(tx).lower(params, state, params)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def abstract(shapes):
  return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def fmt(xs):
  return f'{statistics.median(xs):6.2f} [{min(xs):.2f}-{max(xs):.2f}]'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--tree', default='bert', choices=sorted(TREES))
  ap.add_argument('--opts', default='lamb,lamb_grouped,lars,adamw')
  ap.add_argument('--reps', type=int, default=5)
  args = ap.parse_args(argv)
  shapes = TREES[args.tree]()
  params = abstract(shapes)
  # XLA's first compile in a process: paid here, by neither optimizer.
  jax.jit(roof_fn).lower(params, params, params, params).compile()
  print(
    f'# {args.tree}: {len(shapes)} leaves; jax {jax.__version__} '
    f'({jax.default_backend()}); {args.reps} reps after one warm-up compile '
    'each; seconds, median [min-max]'
  )
  for opt in args.opts.split(','):
    side = lambjax_side(opt, args.tree, shapes)
    if side is None:
      print(f'{opt:16s} (no stacked layout of {args.tree})', flush=True)
      continue
    our_params = abstract(side[1])
    makers = {
      0: (lambda o=opt: lambjax_side(o, args.tree, shapes)[0], our_params),
      1: (OPTS[opt][1], params),
    }
    for make, p in makers.values():  # Warm-up, dropped.
      compile_once(make(), p)
    times = {0: [], 1: []}
    for rep in range(args.reps):
      for k in (0, 1) if rep % 2 == 0 else (1, 0):
        make, p = makers[k]
        times[k].append(compile_once(make(), p))
    totals = {k: [a + b for a, b in ts] for k, ts in times.items()}
    ratio = statistics.median(
      [a / b for a, b in zip(totals[0], totals[1], strict=True)]
    )
    for k, impl in enumerate(('lambjax', 'optax')):
      print(
        f'{opt:16s} {impl:8s} trace+lower {fmt([t for t, _ in times[k]])}  '
        f'compile {fmt([c for _, c in times[k]])}  total {fmt(totals[k])}'
        + (f'  lambjax/optax {ratio:.2f}' if k else ''),
        flush=True,
      )


if __name__ == '__main__':
  main()
