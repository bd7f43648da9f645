"""A/B of the fast path: ``lambjax/_src/fused.py`` at a git revision against
the working tree's, in one process (the machine is noisy; runs in separate
processes are not comparable to a few percent). ``--module quantized`` does
the same for the 8-bit state (``lambjax/_src/quantized.py``), ``--module
accumulation`` / ``faults`` / ``diagnostics`` for
``lj.accumulate_gradients`` / ``lj.apply_if_finite`` /
``lj.with_diagnostics``. ``--module transform`` runs the working tree's
fast path on ``lambjax/_src/transform.py`` at the revision against the
working tree's (the trust-ratio arithmetic the fast path shares with the
chain).

Both versions build the same optimizer on the same tree. Step time: the two
compiled steps run interleaved for ``--rounds`` rounds (order alternating),
reported as the median of per-round ratios old/new (> 1: new faster).
Compile time: ``lower + compile`` of each, interleaved ``--compiles`` times.
An A/A run (``--rev`` equal to the working tree) of this harness has read
0.96 on BERT-base, so read ratios within ~0.04 of 1 as ties.

    python benchmarks/ab_fused.py --rev HEAD~1 --tree bert --opt lamb
    python benchmarks/ab_fused.py --rev HEAD~1 --tree many_small --n 500
    python benchmarks/ab_fused.py --rev HEAD --tree bert --opt lars --stacked
    python benchmarks/ab_fused.py --rev HEAD~1 --module quantized --opt lamb_8bit
    python benchmarks/ab_fused.py --rev HEAD~1 --module accumulation \
      --opt lars_accum4 --tree resnet50 --inner 4

Where the checkout has no git history (the device machine), save the old
module first and pass it as a file; on an accelerator time 20 steps a round:

    git show HEAD~1:lambjax/_src/fused.py > /tmp/fused_old.py
    python benchmarks/ab_fused.py --old-file /tmp/fused_old.py --inner 20
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import pathlib
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import optax
from bench_step import STACKED, TREES, Roof, Runner, make_tree

import lambjax as lj
from lambjax._src import accumulation as new_accumulation
from lambjax._src import alias
from lambjax._src import diagnostics as new_diagnostics
from lambjax._src import faults as new_faults
from lambjax._src import fused as new_fused
from lambjax._src import quantized as new_quantized
from lambjax._src import wrappers as new_wrappers

# The modules this harness swaps: where the optimizers look each one up
# (a namespace and a name), the working tree's module, and the function taken
# from it (``None``: the module itself).
MODULES = {
  'fused': (alias, 'fused_lib', new_fused, None),
  'quantized': (alias, 'quantized', new_quantized, None),
  'accumulation': (
    lj,
    'accumulate_gradients',
    new_accumulation,
    'accumulate_gradients',
  ),
  'faults': (lj, 'apply_if_finite', new_faults, 'apply_if_finite'),
  'wrappers': (
    lj,
    'with_master_weights',
    new_wrappers,
    'with_master_weights',
  ),
  'diagnostics': (
    lj,
    'with_diagnostics',
    new_diagnostics,
    'with_diagnostics',
  ),
  # The working tree's fast path, on the old or the new transform.py.
  'transform': (alias, 'fused_lib', new_fused, None),
}

OPTS = {
  # lamb and lars take ``stacked=`` (``--stacked``).
  'lamb': lambda **kw: lj.lamb(1e-3, weight_decay=0.01, **kw),
  'lamb_bf16': lambda: lj.lamb(
    1e-3, weight_decay=0.01, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
  ),
  'lamb_grouped': lambda: lj.lamb(
    1e-3, weight_decay=0.01, group_small_leaves=True
  ),
  'lamb_workspace': lambda: lj.lamb(1e-3, weight_decay=0.01, workspace=True),
  'lars': lambda **kw: lj.lars(1e-3, weight_decay=0.01, **kw),
  'lars_grouped': lambda: lj.lars(
    1e-3, weight_decay=0.01, group_small_leaves=True
  ),
  'adamw': lambda: lj.adamw(1e-3, weight_decay=0.01),
  'adam': lambda: lj.adam(1e-3),
  'paddle.Lamb': lambda: lj.paddle.Lamb(1e-3, 0.01),
  'paddle.LarsMomentum': lambda: lj.paddle.LarsMomentum(0.1, 0.9, 0.001, 1e-4),
  'lamb_8bit': lambda: lj.lamb(1e-3, weight_decay=0.01, state_8bit=True),
  'adamw_8bit': lambda: lj.adamw(1e-3, weight_decay=0.01, state_8bit=True),
  # Wrappers (``--module accumulation`` / ``faults``); with ``--inner 4`` a
  # round is one accumulation cycle.
  'lars_accum4': lambda: lj.accumulate_gradients(
    lj.lars(1e-3, weight_decay=0.01), 4
  ),
  'lamb_accum4': lambda: lj.accumulate_gradients(
    lj.lamb(1e-3, weight_decay=0.01), 4
  ),
  'adamw_accum4': lambda: lj.accumulate_gradients(
    lj.adamw(1e-3, weight_decay=0.01), 4
  ),
  'lars_finite': lambda: lj.apply_if_finite(
    lj.lars(1e-3, weight_decay=0.01), 3
  ),
  'lamb_finite': lambda: lj.apply_if_finite(
    lj.lamb(1e-3, weight_decay=0.01), 3
  ),
  'lamb_diag': lambda: lj.with_diagnostics(lj.lamb(1e-3, weight_decay=0.01)),
  'lars_diag': lambda: lj.with_diagnostics(lj.lars(1e-3, weight_decay=0.01)),
  'lars_master': lambda: lj.with_master_weights(
    lj.lars(1e-3, weight_decay=0.01)
  ),
  'lamb_master': lambda: lj.with_master_weights(
    lj.lamb(1e-3, weight_decay=0.01)
  ),
}


def module_at(rev: str, old_file: str | None = None, name: str = 'fused'):
  """``lambjax/_src/<name>.py`` at ``rev`` (or read from ``old_file``) as a
  module; for ``transform``, the working tree's ``fused.py`` with that
  ``transform.py`` as its ``transform``."""
  if name != 'transform':
    return _load(_source(rev, old_file, name), name, rev)
  mod = _load(pathlib.Path(new_fused.__file__).read_text(), 'fused', 'tree')
  mod.transform = _load(_source(rev, old_file, name), name, rev)
  return mod


def _source(rev: str, old_file: str | None, name: str) -> str:
  """``lambjax/_src/<name>.py``'s text at ``rev``, or ``old_file``'s."""
  if old_file is not None:
    return pathlib.Path(old_file).read_text()
  root = pathlib.Path(__file__).resolve().parents[1]
  return subprocess.run(
    ['git', 'show', f'{rev}:lambjax/_src/{name}.py'],
    capture_output=True,
    text=True,
    check=True,
    cwd=root,
  ).stdout


def _load(src: str, name: str, rev: str):
  """A module from ``src``, its new keyword arguments dropped where it does
  not take them."""
  spec = importlib.util.spec_from_loader(f'lambjax._src.{name}_ab', loader=None)
  mod = importlib.util.module_from_spec(spec)
  exec(compile(src, f'{name}.py@{rev}', 'exec'), mod.__dict__)
  for fn in ('adam_family', 'lars'):
    if fn in mod.__dict__:
      mod.__dict__[fn] = _without_new_kwargs(mod.__dict__[fn])
  return mod


def _without_new_kwargs(fn):
  """``fn`` dropping keyword arguments it does not take: the aliases pass
  options added after an old revision (``group_small=False``)."""
  params = inspect.signature(fn).parameters

  def call(*args, **kwargs):
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})

  return call


def build(opt: str, module, name: str = 'fused', **kw):
  """The optimizer built with ``module`` as its ``name`` module (``kw``:
  more keyword arguments for it)."""
  where, attr, _, fn = MODULES[name]
  current = getattr(where, attr)
  setattr(where, attr, module if fn is None else getattr(module, fn))
  try:
    return OPTS[opt](**kw)
  finally:
    setattr(where, attr, current)


def compile_s(tx, shapes, dtype=jnp.float32) -> tuple[float, int]:
  """Seconds to lower + compile the donated step, and its temp bytes."""
  ps = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
  state = jax.eval_shape(tx.init, ps)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  c = jax.jit(step, donate_argnums=(0, 1)).lower(ps, state, ps).compile()
  return time.perf_counter() - t0, c.memory_analysis().temp_size_in_bytes


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rev', default='HEAD~1')
  ap.add_argument('--tree', default='bert', choices=sorted(TREES))
  ap.add_argument('--n', type=int, default=None, help='many_small leaves')
  ap.add_argument('--opt', default='lamb', choices=sorted(OPTS))
  ap.add_argument('--rounds', type=int, default=15)
  ap.add_argument('--compiles', type=int, default=3)
  ap.add_argument('--old-file', default=None, help='old module file (no git)')
  ap.add_argument(
    '--stacked',
    action='store_true',
    help='the tree with its layers stacked (bench_step.STACKED; lamb, lars)',
  )
  ap.add_argument('--module', default='fused', choices=sorted(MODULES))
  ap.add_argument(
    '--dtype',
    default='float32',
    choices=['float32', 'bfloat16'],
    help='params and grads (bfloat16: the roof stays float32)',
  )
  ap.add_argument(
    '--inner',
    type=int,
    default=None,
    help='steps per round (default 1 on CPU, 20 on an accelerator)',
  )
  args = ap.parse_args(argv)
  shapes = TREES[args.tree]() if args.n is None else TREES[args.tree](args.n)
  kw = {}
  if args.stacked:
    stack, pattern = STACKED[args.tree]
    shapes, kw = stack(shapes), {'stacked': lj.Stacked(pattern)}
  old = module_at(args.rev, args.old_file, args.module)
  inner = args.inner or (1 if jax.default_backend() == 'cpu' else 20)
  impls = {'old': old, 'new': MODULES[args.module][2]}
  dtype = jnp.dtype(args.dtype)
  print(
    f'# {args.tree}{" stacked" if args.stacked else ""} '
    f'({len(shapes)} leaves, {args.dtype}), {args.opt}, '
    f'{args.module}.py: '
    f'{args.old_file or args.rev} vs tree; {jax.default_backend()}, '
    f'{inner} step(s) a round'
  )

  compiles = {k: [] for k in impls}
  temps = {}
  for r in range(args.compiles):
    order = list(impls) if r % 2 == 0 else list(impls)[::-1]
    for k in order:
      seconds, temps[k] = compile_s(
        build(args.opt, impls[k], args.module, **kw), shapes, dtype
      )
      compiles[k].append(seconds)
  ratio = statistics.median(
    n / o for n, o in zip(compiles['new'], compiles['old'], strict=True)
  )
  print(
    'compile  old {:.2f} s  new {:.2f} s  new/old {:.2f}'.format(
      statistics.median(compiles['old']),
      statistics.median(compiles['new']),
      ratio,
    )
  )
  print(
    'temp     old {:.1f} MiB  new {:.1f} MiB (compiled.memory_analysis())'.format(
      temps['old'] / 2**20, temps['new'] / 2**20
    )
  )

  grads = jax.tree.map(lambda x: x.astype(dtype), make_tree(shapes, 1))
  runners = {
    k: Runner(k, build(args.opt, m, args.module, **kw), shapes, grads, dtype)
    for k, m in impls.items()
  }
  roof = Roof(shapes)
  times = {k: [] for k in runners}
  ratios, roofs = [], []
  for r in range(args.rounds):
    order = list(runners) if r % 2 else list(runners)[::-1]
    t = {k: runners[k].run(inner) for k in order}
    for k in t:
      times[k].append(t[k])
    ratios.append(t['old'] / t['new'])
    roofs.append(roof.run(inner))
  for k, ts in times.items():
    med = statistics.median(ts)
    print(
      f'step     {k} {med * 1e3:8.1f} ms  roof '
      f'{statistics.median(roofs) / med:.2f}'
    )
  print(
    f'step     old/new (median of per-round ratios) '
    f'{statistics.median(ratios):.3f}'
  )
  diff = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a.astype(float) - b.astype(float)))),
    runners['old'].params,
    runners['new'].params,
  )
  print(f'max |old - new| params: {max(jax.tree.leaves(diff)):.2e}')


if __name__ == '__main__':
  main()
