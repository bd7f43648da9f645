"""LAMB's norm spelled apart against its direction written out, by leaf size.

On XLA:CPU the direction ``r`` of a LAMB leaf is read by its norm and by the
update, so XLA writes it out, unless the norm computes ``r`` for itself
from ``m``, ``v`` and ``p`` (``spelled_direction`` in
``lambjax/_src/fused.py``). lambjax spells the norms of directions over
``_SPELLED_MIN_BYTES`` (16 MiB). This script times ``lj.lamb`` on each set
of leaves both ways (the threshold set to 0 or out of reach while the step
is traced), in one process, interleaved rounds, params and state donated,
against the in-run roof (a 4-read 3-write pass over as many float32s)::

    python benchmarks/lamb_spelled_norm.py --rounds 15 \\
      --sets '30522x768;36864x768;12*3072x768;8*768x768'

A set is leaves separated by commas, ``N*shape`` for N leaves of a shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_step as b
import jax
import optax

import lambjax as lj
from lambjax._src import fused


def parse_set(text):
  shapes = {}
  for part in text.split(','):
    count, _, shape = part.rpartition('*')
    dims = tuple(int(d) for d in shape.split('x'))
    for _ in range(int(count or 1)):
      shapes[f'w{len(shapes):03d}'] = dims
  return shapes


def build(shapes, spelled):
  fused._SPELLED_MIN_BYTES = 0 if spelled else 2**62
  tx = lj.lamb(1e-3, weight_decay=0.01)
  params = b.make_tree(shapes, 0, keep=False)
  grads = b.make_tree(shapes, 1, keep=False)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  compiled = (
    jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  )
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  box = [params, state]

  def run():
    t0 = time.perf_counter()
    box[0], box[1] = compiled(box[0], box[1], grads)
    b.block(box[0])
    return time.perf_counter() - t0

  run()  # Warm-up: pages touched once.
  return run, temp


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--sets', default='30522x768;36864x768;12*3072x768')
  ap.add_argument('--rounds', type=int, default=15)
  args = ap.parse_args()
  default = fused._SPELLED_MIN_BYTES
  print(
    f'# jax {jax.__version__} ({jax.default_backend()}); lj.lamb, float32; '
    f'ms, medians of {args.rounds} interleaved rounds'
  )
  for text in args.sets.split(';'):
    shapes = parse_set(text)
    runs = {}
    for spelled in (False, True):
      runs[spelled] = build(shapes, spelled)
    fused._SPELLED_MIN_BYTES = default
    roof = b.Roof(shapes)
    times = {False: [], True: [], 'roof': []}
    for i in range(args.rounds):
      order = (False, True) if i % 2 == 0 else (True, False)
      for k in order:
        times[k].append(runs[k][0]())
      times['roof'].append(roof.run())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f'{text}: roof {1e3 * med["roof"]:.1f} ms')
    for k, label in ((False, 'written'), (True, 'spelled')):
      print(
        f'  r {label:8s} {1e3 * med[k]:7.1f} ms  roof {med["roof"] / med[k]:.2f}'
        f'  temp {runs[k][1]:6.1f} MiB'
      )


if __name__ == '__main__':
  main()
