"""Scale figures: sharded layouts on 8 simulated devices; gradient accumulation.

    python benchmarks/bench_scale.py              # both parts, ~3 min
    python benchmarks/bench_scale.py --part sharded --rounds 7
    python benchmarks/bench_scale.py --part accumulation

``sharded`` re-executes itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and times a jitted
LAMB step on the ResNet-50-shaped tree, replicated (data parallel) vs ZeRO-1
vs FSDP, with the memory each layout keeps per device (params + optimizer
state, from the arrays' own shards) and XLA's temporary buffers for the step
(``compiled.memory_analysis()``). On one CPU the 8 "devices" share the same
cores and memory, so the times show the partitioner's overhead, not a
speed-up; the per-device bytes are what a real 8-device run holds.

``accumulation`` times one micro-step (a call that only accumulates) of
``lj.accumulate_gradients(lj.lamb(...), 4)`` against
``optax.MultiSteps(optax.lamb(...), 4)`` and against a full ``lj.lamb``
step, on the BERT-base-shaped tree, interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLAG = '--xla_force_host_platform_device_count=8'


def _sharded(rounds: int) -> None:
  import jax
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import lambjax as lj

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import bench_step as bs

  assert len(jax.devices()) == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  shapes = bs.resnet50_shapes()
  # Host copies: every layout gets its own device buffers (donation deletes
  # them).
  params = jax.tree.map(np.asarray, bs.make_tree(shapes, 0))
  grads = jax.tree.map(np.asarray, bs.make_tree(shapes, 1))
  tx = lj.lamb(1e-3, weight_decay=0.01)

  def fsdp(x):
    dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % 8 == 0]
    if not dims:
      return NamedSharding(mesh, P())
    spec = [None] * x.ndim
    spec[int(dims[0])] = 'data'
    return NamedSharding(mesh, P(*spec))

  rep = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  layouts = {
    'replicated': (rep, None),
    'zero1': (rep, 'data'),
    'fsdp': (jax.tree.map(fsdp, params), None),
  }
  runs = {}
  for name, (p_shard, zero) in layouts.items():
    s_shard = lj.state_sharding(tx, params, p_shard, zero_axis=zero)

    def train_step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(
      train_step,
      in_shardings=(p_shard, s_shard, p_shard),
      out_shardings=(p_shard, s_shard),
      donate_argnums=(0, 1),
    )
    p = jax.device_put(params, p_shard)
    s = jax.device_put(jax.device_get(tx.init(params)), s_shard)
    g = jax.device_put(grads, p_shard)
    t0 = time.perf_counter()
    compiled = step.lower(p, s, g).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    p, s = compiled(p, s, g)
    bs.block((p, s))
    dev0 = jax.devices()[0]
    resident = sum(
      sh.data.nbytes
      for x in jax.tree.leaves((p, s))
      for sh in x.addressable_shards
      if sh.device == dev0
    )
    runs[name] = dict(
      compiled=compiled,
      p=p,
      s=s,
      g=g,
      times=[],
      compile_s=compile_s,
      resident=resident,
      temp=getattr(mem, 'temp_size_in_bytes', float('nan')),
    )
  for _ in range(rounds):
    for r in runs.values():
      t0 = time.perf_counter()
      r['p'], r['s'] = r['compiled'](r['p'], r['s'], r['g'])
      bs.block((r['p'], r['s']))
      r['times'].append(time.perf_counter() - t0)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(
    f'# jax {jax.__version__}, {os.cpu_count()} cores, 8 simulated devices; '
    f'ResNet-50 tree {n / 1e6:.1f} M params; lj.lamb; {rounds} rounds'
  )
  print(
    f'{"layout":11} {"step ms (median [min-max])":>28} {"compile s":>10} '
    f'{"params+state MiB/device":>24} {"XLA temp MiB":>13}'
  )
  for name, r in runs.items():
    t = sorted(1e3 * x for x in r['times'])
    cell = f'{statistics.median(t):.0f} [{t[0]:.0f}-{t[-1]:.0f}]'
    print(
      f'{name:11} {cell:>28} {r["compile_s"]:10.2f} '
      f'{r["resident"] / 2**20:24.1f} {r["temp"] / 2**20:13.1f}'
    )


def _accumulation(rounds: int) -> None:
  import jax
  import optax

  import lambjax as lj

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import bench_step as bs

  shapes = bs.bert_base_shapes()
  grads = bs.make_tree(shapes, 1)
  impls = {
    'lj.accumulate_gradients(lj.lamb, 4) micro-step': lj.accumulate_gradients(
      lj.lamb(1e-3, weight_decay=0.01), 4
    ),
    'optax.MultiSteps(optax.lamb, 4) micro-step': optax.MultiSteps(
      optax.lamb(1e-3, weight_decay=0.01), 4
    ),
    'lj.lamb full step (reference)': lj.lamb(1e-3, weight_decay=0.01),
  }
  runs = {}
  for name, tx in impls.items():
    params = bs.make_tree(shapes, 0)
    state = tx.init(params)
    step = bs.make_step(tx)
    compiled = step.lower(params, state, grads).compile()
    runs[name] = dict(c=compiled, p=params, s=state, times=[])
  for _ in range(rounds):
    for name, r in runs.items():
      if 'micro' in name:  # Stay on non-applying micro-steps (1..3 of 4).
        ms = int(r['s'].mini_step)
        while ms == 3:
          r['p'], r['s'] = r['c'](r['p'], r['s'], grads)
          bs.block((r['p'], r['s']))
          ms = int(r['s'].mini_step)
      t0 = time.perf_counter()
      r['p'], r['s'] = r['c'](r['p'], r['s'], grads)
      bs.block((r['p'], r['s']))
      r['times'].append(time.perf_counter() - t0)
  print(
    f'# jax {jax.__version__}, {os.cpu_count()} cores; BERT-base tree; '
    f'{rounds} rounds'
  )
  for name, r in runs.items():
    t = sorted(1e3 * x for x in r['times'])
    print(f'{name:48} {statistics.median(t):7.0f} ms [{t[0]:.0f}-{t[-1]:.0f}]')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    '--part', choices=['sharded', 'accumulation', 'both'], default='both'
  )
  parser.add_argument('--rounds', type=int, default=9)
  a = parser.parse_args(argv)
  if a.part in ('sharded', 'both'):
    if FLAG not in os.environ.get('XLA_FLAGS', ''):
      env = dict(
        os.environ,
        XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {FLAG}',
        JAX_PLATFORMS='cpu',  # 8 host devices, also on a GPU machine.
      )
      cmd = [
        sys.executable,
        __file__,
        '--part',
        'sharded',
        '--rounds',
        str(a.rounds),
      ]
      subprocess.run(cmd, env=env, check=True)
    else:
      _sharded(a.rounds)
  if a.part in ('accumulation', 'both'):
    _accumulation(a.rounds)


if __name__ == '__main__':
  main()
