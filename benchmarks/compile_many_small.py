"""Compile and step time of lambjax's per-leaf step on the many-small tree
(2,000 leaves of 1,000 floats), without optax (whose compile there takes
minutes on a GPU).

    python benchmarks/compile_many_small.py --opts lars,lamb
"""

from __future__ import annotations

import argparse

from bench_step import TREES, Runner, make_tree

import lambjax as lj

OPTS = {
  'lamb': lambda: lj.lamb(1e-3, weight_decay=0.01),
  'lars': lambda: lj.lars(0.1, weight_decay=1e-4),
  'adam': lambda: lj.adam(1e-3),
  # Small leaves' state stacked by shape (lj.GroupedState).
  'lamb_grouped': lambda: lj.lamb(
    1e-3, weight_decay=0.01, group_small_leaves=True
  ),
  'lars_grouped': lambda: lj.lars(
    0.1, weight_decay=1e-4, group_small_leaves=True
  ),
  'adam_grouped': lambda: lj.adam(1e-3, group_small_leaves=True),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--opts', default='lars,lamb')
  args = ap.parse_args()
  shapes = TREES['many_small']()
  grads = make_tree(shapes, 99)
  for name in args.opts.split(','):
    r = Runner(name, OPTS[name](), shapes, grads)  # Compiles, one warm step.
    step_ms = 1e3 * r.run(inner=20)
    print(
      f'many_small {name}: compile {r.compile_s:.1f} s, step {step_ms:.2f} ms'
    )


if __name__ == '__main__':
  main()
