"""LARS's two norm forms off XLA:CPU: temporaries and step time.

On XLA:CPU, LARS takes ``‖g + wd p‖`` spelled apart from the update, on a
view with a long last dimension (``fused.norm_operand``); elsewhere it takes
the direct norm of ``d`` (``fused.materialises_shared()`` is false). This
script forces each form on the current backend and prints, per tree of
conv kernels and matrices, ``memory_analysis().temp_size_in_bytes`` of the
chain and of both fused forms, then times the two fused forms side by side
(interleaved rounds of 20 steps, median of per-round ratios) on ResNet-50
(both layouts) and BERT-base. Meant for a GPU (on XLA:CPU both forms are the
spelled one). Recorded in benchmarks/RESULTS.md, third H100 session.

    python benchmarks/lars_norm_forms.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_step import TREES, make_step, make_tree

import lambjax as lj
from lambjax._src import fused as F

ORIG = F.materialises_shared


def compiled(tx, p):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()


def make(fused, spelled):
  F.materialises_shared = (lambda: True) if spelled else ORIG
  return lj.lars(0.1, weight_decay=1e-4, fused=fused)


CASES = {
  '3x(256,64,1,1)': {f'c{i}': (256, 64, 1, 1) for i in range(3)},
  '(2048,512,1,1)': {'c': (2048, 512, 1, 1)},
  '3x(64,64,4,4)': {f'c{i}': (64, 64, 4, 4) for i in range(3)},
  '(512,512,3,3)': {'c': (512, 512, 3, 3)},
  '(1024,1024)': {'w': (1024, 1024)},
}
print('temp bytes: case, leaf bytes, chain, fused direct, fused spelled+view')
for name, shapes in CASES.items():
  p = {k: jnp.ones(v) for k, v in shapes.items()}
  row = []
  for fused, spelled in ((False, False), (True, False), (True, True)):
    c = compiled(make(fused, spelled), p)
    row.append(c.memory_analysis().temp_size_in_bytes)
    F.materialises_shared = ORIG
  print(
    f'{name:16s} {4 * max(np.prod(v) for v in shapes.values()):10d}',
    *[f'{t:10d}' for t in row],
    flush=True,
  )

for tree in ('resnet50', 'resnet50_flax', 'bert'):
  shapes = TREES[tree]()
  grads = make_tree(shapes, 99)
  runs = {}
  for label, spelled in (('direct', False), ('spelled', True)):
    tx = make(True, spelled)
    params = make_tree(shapes, 0)
    state = tx.init(params)
    t0 = time.perf_counter()
    c = make_step(tx).lower(params, state, grads).compile()
    cs = time.perf_counter() - t0
    F.materialises_shared = ORIG
    runs[label] = [c, params, state, cs, []]
  for r in runs.values():
    r[1], r[2] = r[0](r[1], r[2], grads)
  for rnd in range(15):
    for label in list(runs) if rnd % 2 == 0 else list(runs)[::-1]:
      r = runs[label]
      jax.block_until_ready((r[1], r[2]))
      t0 = time.perf_counter()
      for _ in range(20):
        r[1], r[2] = r[0](r[1], r[2], grads)
      jax.block_until_ready((r[1], r[2]))
      r[4].append((time.perf_counter() - t0) / 20)
  d, s = runs['direct'], runs['spelled']
  ratio = statistics.median(a / b for a, b in zip(d[4], s[4], strict=True))
  diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(d[1]), jax.tree.leaves(s[1]), strict=True)
  )
  print(
    f'{tree}: direct {1e3 * statistics.median(d[4]):.3f} ms (compile {d[3]:.2f} s), spelled+view {1e3 * statistics.median(s[4]):.3f} ms (compile {s[3]:.2f} s); direct/spelled {ratio:.3f}; max|params diff| {diff:.1e}',
    flush=True,
  )
