"""Does packing the optimizer state into one buffer per dtype shorten a
per-leaf step? ``lj.with_packed_state`` against the plain optimizer.

On a GPU a per-leaf step is bound by the host issuing it: ~1 us per input
buffer, ~2.7 us per output buffer, ~1.5 us per kernel (benchmarks/RESULTS.md,
"What limits a per-leaf step on the GPU"). LAMB on BERT-base takes 796
input and 597 output buffers, 398 + 398 of them Adam's moments.
``lj.with_packed_state`` wraps any optax ``GradientTransformation`` so that
its small state arrays are one flat buffer per dtype: the step unpacks them
(static slices and reshapes), runs the inner update and packs the new state
(one concatenate per dtype), so the params' layout and the maths are
untouched. (The first runs, recorded in RESULTS.md, used this script's own
copy of the same mechanism, before it became ``lj.with_packed_state``.)
This script times the wrapped and plain steps side by side (one process,
interleaved rounds, median of per-round ratios, the same 4-read-3-write roof
as ``bench_step.py``) and checks the params agree.

    python benchmarks/packed_state.py --tree bert --rounds 11 \
      --opts lamb,optax.lamb,lars,adamw --max-sizes 65536,1048576,inf
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax
from bench_step import TREES, Roof, Runner, make_tree

import lambjax as lj

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
      max_size = 2**62 if m == float('inf') else int(m)
      runners[f'<={m:g}'] = Runner(
        'packed', lj.with_packed_state(OPTS[opt](), max_size), shapes, grads
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
