"""lambjax's steps for two or more rows of ``bench_step.OPTS``, interleaved.

``bench_step.py`` times each row against optax in rounds of its own, so two
lambjax rows (``lamb`` and ``lamb_workspace``, say) are never timed in the
same rounds. Here their compiled steps (donated, as in ``bench_step.py``)
and the in-run roof run interleaved, the order rotating each round; it
prints each step's median [min-max] and roof fraction, and the median of
the per-round ratios of the first row's time to each other row's (> 1: the
other row is faster).

    python benchmarks/ab_opts.py --tree bert --opts lamb,lamb_workspace \
      --rounds 15
"""

from __future__ import annotations

import argparse
import statistics

from bench_step import OPTS, TREES, Roof, Runner, fmt_ms, make_tree


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--tree', default='bert', choices=sorted(TREES))
  ap.add_argument('--opts', default='lamb,lamb_workspace')
  ap.add_argument('--rounds', type=int, default=15)
  args = ap.parse_args(argv)
  opts = args.opts.split(',')
  rows = sorted(o for o in OPTS if not o.endswith('_stacked'))
  if len(opts) < 2 or any(o not in rows for o in opts):
    raise SystemExit(f'--opts: two or more of {rows}')
  shapes = TREES[args.tree]()
  grads = make_tree(shapes, 1)
  runners = [Runner(o, OPTS[o][0](), shapes, grads) for o in opts]
  roof = Roof(shapes)
  times = {o: [] for o in opts}
  roof_times = []
  for r in range(args.rounds):
    k = r % len(runners)
    for runner in runners[k:] + runners[:k]:
      times[runner.name].append(runner.run())
    roof_times.append(roof.run())
  print(f'# {args.tree}: {len(shapes)} leaves; {args.rounds} rounds')
  for o in opts:
    frac = [a / b for a, b in zip(roof_times, times[o], strict=True)]
    print(f'{o:20s} {fmt_ms(times[o])}  roof {statistics.median(frac):.2f}')
  print(f'{"roof (4r3w pass)":20s} {fmt_ms(roof_times)}')
  for o in opts[1:]:
    ratio = statistics.median(
      a / b for a, b in zip(times[opts[0]], times[o], strict=True)
    )
    print(f'{opts[0]}/{o} (median of per-round ratios) {ratio:.3f}')


if __name__ == '__main__':
  main()
