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

import contextlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_step import TREES, Runner, make_tree

import lambjax as lj
from lambjax._src import fused as F

CASES = {
  '3x(256,64,1,1)': {f'c{i}': (256, 64, 1, 1) for i in range(3)},
  '(2048,512,1,1)': {'c': (2048, 512, 1, 1)},
  '3x(64,64,4,4)': {f'c{i}': (64, 64, 4, 4) for i in range(3)},
  '(512,512,3,3)': {'c': (512, 512, 3, 3)},
  '(1024,1024)': {'w': (1024, 1024)},
}


@contextlib.contextmanager
def spelled_form(on):
  """While tracing inside: LARS takes the spelled norm (XLA:CPU's form)."""
  orig = F.materialises_shared
  if on:
    F.materialises_shared = lambda: True
  try:
    yield
  finally:
    F.materialises_shared = orig


def lars(fused=True):
  return lj.lars(0.1, weight_decay=1e-4, fused=fused)


def temp_bytes(tx, p):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  c = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()
  return c.memory_analysis().temp_size_in_bytes


def main():
  print('temp bytes: case, leaf bytes, chain, fused direct, fused spelled+view')
  for name, shapes in CASES.items():
    p = {k: jnp.ones(v) for k, v in shapes.items()}
    row = [temp_bytes(lars(fused=False), p), temp_bytes(lars(), p)]
    with spelled_form(True):
      row.append(temp_bytes(lars(), p))
    leaf = 4 * max(np.prod(v) for v in shapes.values())
    print(f'{name:16s} {leaf:10d}', *[f'{t:10d}' for t in row], flush=True)

  for tree in ('resnet50', 'resnet50_flax', 'bert'):
    shapes = TREES[tree]()
    grads = make_tree(shapes, 99)
    runs = []
    for on in (False, True):
      with spelled_form(on):  # Runner traces and compiles here.
        runs.append(
          Runner('spelled' if on else 'direct', lars(), shapes, grads)
        )
    for rnd in range(15):
      for r in runs if rnd % 2 == 0 else runs[::-1]:
        r.times.append(r.run(inner=20))
    d, s = runs
    ratio = statistics.median(
      a / b for a, b in zip(d.times, s.times, strict=True)
    )
    diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(
        jax.tree.leaves(d.params), jax.tree.leaves(s.params), strict=True
      )
    )
    print(
      f'{tree}: direct {1e3 * statistics.median(d.times):.3f} ms '
      f'(compile {d.compile_s:.2f} s), spelled+view '
      f'{1e3 * statistics.median(s.times):.3f} ms (compile {s.compile_s:.2f} '
      f's); direct/spelled {ratio:.3f}; max|params diff| {diff:.1e}',
      flush=True,
    )


if __name__ == '__main__':
  main()
