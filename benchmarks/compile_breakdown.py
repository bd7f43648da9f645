"""Where a step's compile time goes: trace, lower and XLA compile, apart.

For each optimizer, lambjax and optax on the same tree, one after the other
in one process: ``jit(step).trace`` (Python tracing to a jaxpr),
``.lower()`` (jaxpr to StableHLO) and ``.compile()`` (XLA), in seconds.
``bench_step.py`` reports their sum as "compile".

    python benchmarks/compile_breakdown.py --tree bert --opts lamb,lars,adamw
    python benchmarks/compile_breakdown.py --tree many_small --opts lamb \
      --no-optax
"""

from __future__ import annotations

import argparse
import re
import time

from bench_step import OPTS, TREES, make_step, make_tree


def breakdown(tx, params, grads) -> tuple[float, float, float, int, int]:
  """Seconds to trace, lower and compile one step; StableHLO line count;
  kernels (fusions) in the compiled entry computation."""
  step = make_step(tx)
  state = tx.init(params)
  t0 = time.perf_counter()
  traced = step.trace(params, state, grads)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  text = compiled.as_text()
  kernels = len(re.findall(r'= \S+ fusion\(', text[text.index('ENTRY') :]))
  return t1 - t0, t2 - t1, t3 - t2, lowered.as_text().count('\n'), kernels


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--tree', default='bert', choices=sorted(TREES))
  ap.add_argument('--opts', default='lamb,lars,adamw,adam')
  ap.add_argument('--no-optax', action='store_true')
  args = ap.parse_args(argv)
  shapes = TREES[args.tree]()
  params, grads = make_tree(shapes, 0), make_tree(shapes, 1)
  print(f'# {args.tree}: {len(shapes)} leaves; seconds')
  impls = ('lambjax',) if args.no_optax else ('lambjax', 'optax')
  for opt in args.opts.split(','):
    for k, impl in enumerate(impls):
      tr, lo, co, lines, kernels = breakdown(OPTS[opt][k](), params, grads)
      print(
        f'{opt:20s} {impl:8s} trace {tr:6.2f}  lower {lo:6.2f}  '
        f'compile {co:6.2f}  total {tr + lo + co:6.2f}  '
        f'({lines} StableHLO lines, {kernels} kernels)',
        flush=True,
      )


if __name__ == '__main__':
  main()
