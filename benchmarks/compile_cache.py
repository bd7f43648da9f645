"""Compile time across restarts, with jax's persistent compilation cache.

A training job that restarts (preemption, a crashed run, a notebook kernel
restart) compiles its step again. With ``jax_compilation_cache_dir`` set,
jax stores each compiled executable on disk, keyed by the lowered program,
and a later process that lowers the same program loads it instead. That
only works when the optimizer lowers to the same program in every process.

For each optimizer, lambjax and optax, this runs fresh processes: cold ones,
each on an empty cache directory, which compile and write it; and warm ones
on the cache the first cold process wrote, which load from it. It prints
medians of trace+lower and compile (or load) seconds, how many warm
processes wrote a new cache entry (a miss), and the medians of per-rep
lambjax/optax ratios. Processes use
different ``PYTHONHASHSEED`` values, so set-order or ``hash()``-dependent
lowering would show up as misses. Params are abstract
(``jax.ShapeDtypeStruct``): only the program matters.

    python benchmarks/compile_cache.py --tree bert \
      --opts lamb,lamb_grouped,lars,adamw --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = """
import json, os, sys, time
sys.path.insert(0, {here!r})
import jax
import jax.numpy as jnp
jax.config.update('jax_compilation_cache_dir', {cache!r})
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
import bench_step as b
shapes = b.TREES[{tree!r}]()
params = {{k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}}
tx = b.OPTS[{opt!r}][{k}]()
state = jax.eval_shape(tx.init, params)
before = len(os.listdir({cache!r}))
t0 = time.perf_counter()
lowered = b.make_step(tx).lower(params, state, params)
t1 = time.perf_counter()
lowered.compile()
t2 = time.perf_counter()
print(json.dumps(dict(lower=t1 - t0, compile=t2 - t1,
                      miss=len(os.listdir({cache!r})) > before)))
"""


def child(tree, opt, impl, cache, hash_seed):
  code = _CHILD.format(
    here=os.path.dirname(os.path.abspath(__file__)),
    cache=cache,
    tree=tree,
    opt=opt,
    k=0 if impl == 'lambjax' else 1,
  )
  env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
  out = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    check=True,
    env=env,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--tree', default='bert')
  ap.add_argument('--opts', default='lamb,lamb_grouped,lars,adamw')
  ap.add_argument('--reps', type=int, default=3)
  args = ap.parse_args(argv)
  impls = ('lambjax', 'optax')
  print(
    f'# {args.tree}; seconds, medians of {args.reps} processes per column; '
    'cold: each on an empty cache; warm: each on the cache a cold process '
    'wrote; lambjax and optax processes alternate'
  )
  for opt in args.opts.split(','):
    cold = {impl: [] for impl in impls}
    warm = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory() as root:
      for r in range(args.reps):
        for impl in impls if r % 2 == 0 else impls[::-1]:
          cache = os.path.join(root, f'{impl}{r}')
          os.mkdir(cache)
          cold[impl].append(child(args.tree, opt, impl, cache, 2 * r))
          shared = os.path.join(root, f'{impl}0')
          warm[impl].append(child(args.tree, opt, impl, shared, 2 * r + 1))

    def total(run):
      return run['lower'] + run['compile']

    for impl in impls:
      c, w = cold[impl], warm[impl]
      misses = sum(x['miss'] for x in w)
      print(
        f'{opt:16s} {impl:8s} cold: trace+lower '
        f'{statistics.median(x["lower"] for x in c):5.2f} compile '
        f'{statistics.median(x["compile"] for x in c):5.2f} total '
        f'{statistics.median(map(total, c)):5.2f} | warm: trace+lower '
        f'{statistics.median(x["lower"] for x in w):5.2f} load '
        f'{statistics.median(x["compile"] for x in w):5.2f} total '
        f'{statistics.median(map(total, w)):5.2f}; {misses}/{len(w)} '
        'warm misses',
        flush=True,
      )
    ratio = {
      kind: statistics.median(
        total(a) / total(b)
        for a, b in zip(runs['lambjax'], runs['optax'], strict=True)
      )
      for kind, runs in (('cold', cold), ('warm', warm))
    }
    print(
      f'{opt:16s} lambjax/optax, median of per-rep ratios: cold '
      f'{ratio["cold"]:.2f}, warm {ratio["warm"]:.2f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
