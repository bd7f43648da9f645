"""Does packing the optimizer state into one buffer per dtype shorten a
per-leaf step? An experiment, not a library feature.

On a GPU a per-leaf step is bound by the host issuing it: ~1 us per input
buffer, ~2.7 us per output buffer, ~1.5 us per kernel (benchmarks/RESULTS.md,
"What limits a per-leaf step on the GPU"). LAMB on BERT-base takes 796
input and 597 output buffers, 398 + 398 of them Adam's moments. ``packed``
below wraps any optax ``GradientTransformation`` so that its state is one
flat buffer per dtype: the step unpacks it (static slices and reshapes),
runs the inner update and packs the new state (one concatenate per dtype),
so the params' layout and the maths are untouched. This script times the
wrapped and plain steps side by side (one process, interleaved rounds, median
of per-round ratios, the same 4-read-3-write roof as ``bench_step.py``) and
checks the params agree.

    python benchmarks/packed_state.py --tree bert --rounds 11 \
      --opts lamb,optax.lamb,lars,adamw --max-sizes 65536,1048576,inf
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_step import TREES, Roof, Runner, make_tree

import lambjax as lj


def packed(
  tx: optax.GradientTransformation, max_size: float = float('inf')
) -> optax.GradientTransformation:
  """``tx`` with its state leaves of at most ``max_size`` elements stored as
  one flat buffer per dtype (larger leaves stay as they are).

  The layout is recomputed from ``params`` (``jax.eval_shape(tx.init, ...)``),
  so ``update`` needs them, as LAMB and LARS do anyway.
  """

  def layout(params):
    leaves, treedef = jax.tree.flatten(jax.eval_shape(tx.init, params))
    small = [int(np.prod(x.shape)) <= max_size for x in leaves]
    dtypes = sorted(
      {x.dtype.name for x, s in zip(leaves, small, strict=True) if s}
    )
    return leaves, treedef, small, dtypes

  def pack(state, lay):
    _, _, small, dtypes = lay
    leaves = jax.tree.leaves(state)
    flat = {
      d: jnp.concatenate(
        [
          jnp.ravel(x)
          for x, s in zip(leaves, small, strict=True)
          if s and x.dtype.name == d
        ]
      )
      for d in dtypes
    }
    big = [x for x, s in zip(leaves, small, strict=True) if not s]
    return {'flat': flat, 'big': big}

  def unpack(state, lay):
    leaves, treedef, small, _ = lay
    offsets = dict.fromkeys(state['flat'], 0)
    big = iter(state['big'])
    out = []
    for x, s in zip(leaves, small, strict=True):
      if not s:
        out.append(next(big))
        continue
      d, n = x.dtype.name, int(np.prod(x.shape))
      out.append(state['flat'][d][offsets[d] : offsets[d] + n].reshape(x.shape))
      offsets[d] += n
    return jax.tree.unflatten(treedef, out)

  def init(params):
    return pack(tx.init(params), layout(params))

  def update(updates, state, params=None):
    lay = layout(params)  # Static: shapes and dtypes only.
    updates, inner = tx.update(updates, unpack(state, lay), params)
    return updates, pack(inner, lay)

  return optax.GradientTransformation(init, update)


OPTS = {
  'lamb': lambda: lj.lamb(1e-3, weight_decay=0.01),
  'optax.lamb': lambda: optax.lamb(1e-3, weight_decay=0.01),
  'adamw': lambda: lj.adamw(1e-3, weight_decay=0.01),
  'lars': lambda: lj.lars(1e-3, weight_decay=0.01),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tree', default='bert', choices=sorted(TREES))
  ap.add_argument('--opts', default='lamb,optax.lamb')
  ap.add_argument('--rounds', type=int, default=11)
  ap.add_argument('--inner', type=int, default=None)
  ap.add_argument(
    '--max-sizes',
    default='inf',
    help='pack state leaves of at most this many elements (one variant each)',
  )
  args = ap.parse_args(argv)
  inner = args.inner or (1 if jax.default_backend() == 'cpu' else 20)
  shapes = TREES[args.tree]()
  sizes = [float(x) for x in args.max_sizes.split(',')]
  dev = jax.devices()[0]
  print(
    f'# {getattr(dev, "device_kind", dev.platform)}, jax {jax.__version__}; '
    f'{args.tree} {len(shapes)} leaves; {args.rounds} rounds of {inner} '
    'step(s); median [min-max] per step'
  )
  grads = make_tree(shapes, 1)
  roof = Roof(shapes)
  for opt in args.opts.split(','):
    runners = {'plain': Runner('plain', OPTS[opt](), shapes, grads)}
    for m in sizes:
      runners[f'<={m:g}'] = Runner(
        'packed', packed(OPTS[opt](), m), shapes, grads
      )
    n_state = {k: len(jax.tree.leaves(r.state)) for k, r in runners.items()}
    times = {k: [] for k in runners}
    roofs = []
    for r in range(args.rounds):
      order = list(runners) if r % 2 else list(runners)[::-1]
      t = {k: runners[k].run(inner) for k in order}
      for k in t:
        times[k].append(t[k])
      roofs.append(roof.run(inner))
    for k, ts in times.items():
      med = statistics.median(ts)
      ratio = statistics.median(
        p / t for p, t in zip(times['plain'], ts, strict=True)
      )
      diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
          jax.tree.leaves(runners['plain'].params),
          jax.tree.leaves(runners[k].params),
          strict=True,
        )
      )
      print(
        f'{opt:11s} {k:9s} {med * 1e3:7.3f} [{min(ts) * 1e3:.3f}-'
        f'{max(ts) * 1e3:.3f}] ms  plain/this {ratio:.3f}  roof '
        f'{statistics.median(roofs) / med:.2f}  compile '
        f'{runners[k].compile_s:5.2f} s  state buffers {n_state[k]:3d}  '
        f'max|params - plain| {diff:.0e}'
      )


if __name__ == '__main__':
  main()
