"""A leaf's sum of squares on its own shape vs on ``fused.reduction_view``.

Two settings per shape and dtype (jitted, ms, medians of ``--reps``, the two forms interleaved):

* ``alone``: ``sum(x * x)`` and nothing else;
* ``shared``: the sum and an elementwise update that reads ``x`` too
  (``x + s * x``, ``s`` the sum), as in an optimizer step, where XLA:CPU
  may write a float32 copy of a bf16 ``x`` out for the reduction. The
  column ``lone`` counts the float32 converts that fused with nothing.

::

    python benchmarks/sumsq_views.py
    python benchmarks/sumsq_views.py --shapes 512x512x3x3 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lambjax._src import fused

DEFAULT = '512x512x3x3,3x3x512x512,2048x512x1x1,64x3x7x7,768x3072,3072'


def own(x):
  return jnp.sum(x * x)


def viewed(x):
  (v,) = fused.reduction_view(x)
  return jnp.sum(v * v)


def shared(sumsq):
  def step(x):
    s = sumsq(x)
    return x + (s * x).astype(x.dtype)

  return step


def median_ms(fns, x, reps):
  """Each of ``fns`` on ``x``, interleaved; medians in ms."""
  for fn in fns:
    jax.block_until_ready(fn(x))
  times = [[] for _ in fns]
  for r in range(reps):
    order = list(range(len(fns)))
    for i in order if r % 2 else order[::-1]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[i](x))
      times[i].append(time.perf_counter() - t0)
  return [1e3 * statistics.median(t) for t in times]


def lone_converts(compiled) -> int:
  text = compiled.as_text()
  entry = text[text.index('ENTRY') :]
  return len(re.findall(r'%wrapped_convert\S* = f32\[\d', entry))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--shapes', default=DEFAULT)
  ap.add_argument('--dtypes', default='float32,bfloat16')
  ap.add_argument('--reps', type=int, default=101)
  args = ap.parse_args(argv)
  print(f'# jax {jax.__version__} ({jax.default_backend()}); ms, medians')
  print(
    f'{"shape":>14} {"dtype":>9} {"view":>14} | {"alone":>6} {"viewed":>6} '
    f'| {"shared":>6} {"lone":>4} {"viewed":>6} {"lone":>4} {"ratio":>5}'
  )
  rng = np.random.default_rng(0)
  for spec in args.shapes.split(','):
    shape = tuple(int(d) for d in spec.split('x'))
    for dtype in args.dtypes.split(','):
      x = jnp.asarray(rng.normal(size=shape), dtype)
      view = 'x'.join(map(str, fused.reduction_shape(shape, x.dtype)))
      alone = median_ms([jax.jit(own), jax.jit(viewed)], x, args.reps)
      steps = [jax.jit(shared(own)), jax.jit(shared(viewed))]
      both = median_ms(steps, x, args.reps)
      lone = [lone_converts(s.lower(x).compile()) for s in steps]
      row = [*alone, both[0], lone[0], both[1], lone[1]]
      print(
        f'{spec:>14} {dtype:>9} {view:>14} | {row[0]:6.3f} {row[1]:6.3f} | '
        f'{row[2]:6.3f} {row[3]:4d} {row[4]:6.3f} {row[5]:4d} '
        f'{row[2] / row[4]:5.2f}',
        flush=True,
      )


if __name__ == '__main__':
  main()
