"""Variants of lambjax's step inside a whole training step, in one process.

    python benchmarks/train_step_variants.py --model resnet50 --batch 16x64
    python benchmarks/train_step_variants.py --model resnet50 --batch 4x64 \
        --variants plain,gate --opts adamw,lamb --impls lambjax,optax

Two questions left by ``bench_train_step.py`` (benchmarks/RESULTS.md,
"Whole training steps"), answered by patching the step while it is traced
(no library option does either):

* ``order``: LAMB's one-direction-at-a-time chain (``fused.after``) runs in
  the params' flatten order. Inside a training step the backward pass hands
  out gradients in another order (the last layer's first), so the chain
  might hold the optimizer back until the backward pass is done. Variants:
  ``flatten`` (as shipped), ``backward`` (the order in which the step's
  jaxpr produces the gradients), ``forward`` (its reverse) and ``nochain``
  (``fused.breadth_first`` patched to ``False``).
* ``gate``: XLA copies every donated param at the top of the step, because
  the backward pass reads a layer's kernel (for the gradient of its input)
  in an op that the in-place update of that kernel does not depend on.
  ``plain`` is the optimizer as shipped; ``gate`` makes every update
  depend on one element of every update leaf (``fused.after``, an exact
  ``+ -0.0``), so that each param's write comes after every read of every
  param. ``gatesum``: on the sum of every update leaf instead (an extra
  read of each, but no slice for XLA to push through an elementwise op).
  Prints the entry computation's copies, temp and compile time.

Each variant is a ``bench_train_step.TrainStep``; all run interleaved in
rounds beside the forward and backward pass alone. Ratios are medians of
per-round ratios against the first variant of the same optimizer (first/
this > 1: this one is faster), and params rel diff is against that one too
(rounding-level drift: see ``bench_train_step.rel_diff``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bts  # noqa: E402

from lambjax._src import fused  # noqa: E402


def gradient_order(loss, params, data) -> list[int]:
  """Flatten indices of the params, in the order the backward pass of
  ``loss``'s jaxpr produces their gradients."""
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params, *data).jaxpr
  where = {v: k for k, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
  position = [where.get(v, -1) for v in jaxpr.outvars]
  return sorted(range(len(position)), key=position.__getitem__)


def permuted(perm, original=fused.in_windows):
  """``fused.in_windows`` visiting the leaves in the order ``perm``."""

  def in_windows(sizes, first, ratios, last, keys=None):
    return original(
      [sizes[i] for i in perm],
      lambda j: first(perm[j]),
      ratios,
      lambda j, r: last(perm[j], r),
      None if keys is None else [keys[i] for i in perm],
    )

  return in_windows


def gate(whole: bool = False) -> optax.GradientTransformation:
  """Every update leaf made to depend on one element of every update leaf
  (``whole``: on the sum of every update leaf, an extra read of each)."""

  def update_fn(updates, state, params=None):
    del params
    leaves = [x for x in jax.tree.leaves(updates) if x.size]
    pick = jnp.sum if whole else (lambda x: jnp.ravel(x)[0])
    token = sum(pick(x) for x in leaves)
    return jax.tree.map(lambda x: fused.after(x, token), updates), state

  return optax.GradientTransformation(
    lambda params: optax.EmptyState(), update_fn
  )


def build(variant, make, model, loss, params, data, perm):
  """A TrainStep of ``make()`` with ``variant``'s patch while it traces."""
  patches = {
    'backward': ('in_windows', permuted(perm)),
    'forward': ('in_windows', permuted(perm[::-1])),
    'nochain': ('breadth_first', lambda: False),
  }
  tx = make()
  if variant in ('gate', 'gatesum'):
    tx = optax.chain(tx, gate(whole=variant == 'gatesum'))
  name, patch = patches.get(variant, (None, None))
  if name is None:
    return bts.TrainStep(model, loss, params, data, tx)
  saved = getattr(fused, name)
  setattr(fused, name, patch)
  try:
    return bts.TrainStep(model, loss, params, data, tx)
  finally:
    setattr(fused, name, saved)


def entry_copies(step) -> int:
  text = step.compiled.as_text()
  return len(re.findall(r' copy\(', text[text.index('ENTRY') :]))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='resnet50', choices=sorted(bts.MODELS))
  ap.add_argument('--batch', default='16x64', help='BATCHxSIZE')
  ap.add_argument(
    '--variants',
    default='flatten,backward,forward,nochain',
    help='flatten,backward,forward,nochain or plain,gate,gatesum',
  )
  ap.add_argument('--opts', default='lamb')
  ap.add_argument(
    '--impls',
    default='lambjax,optax',
    help='lambjax and/or optax (optax: plain and the gates only)',
  )
  ap.add_argument('--rounds', type=int, default=11)
  a = ap.parse_args(argv)
  batch, size = (int(v) for v in a.batch.split('x'))
  model, params, loss, data = bts.MODELS[a.model](batch, size)
  perm = gradient_order(loss, params, data)
  print(
    f'# {a.model}, batch {a.batch}, jax {jax.__version__}, backend '
    f'{jax.default_backend()}, rounds {a.rounds}',
    flush=True,
  )
  steps = {'fwd+bwd': bts.GradOnly(loss, params, data)}
  for opt in a.opts.split(','):
    for impl in a.impls.split(','):
      make = bts.OPTS[opt][0 if impl == 'lambjax' else 1]
      variants = a.variants.split(',')
      if impl == 'optax':  # The chain patches do not touch optax.
        variants = list(
          dict.fromkeys(
            v if v.startswith('gate') else 'plain' for v in variants
          )
        )
      for variant in variants:
        step = build(variant, make, model, loss, params, data, perm)
        ma = step.compiled.memory_analysis()
        key = f'{impl}.{opt} {variant}'
        steps[key] = step
        print(
          f'{key:26s} compile {step.compile_s:6.1f} s, entry copies '
          f'{entry_copies(step):4d}, temp '
          f'{ma.temp_size_in_bytes / 2**20:4.0f} MiB',
          flush=True,
        )
  runs = list(steps.values())
  for s in runs:
    s.times = []
  for r in range(a.rounds):
    for s in runs[r % len(runs) :] + runs[: r % len(runs)]:
      s.times.append(s.run())
  print(f'{"fwd+bwd":26s} {bts.fmt_ms(steps["fwd+bwd"].times)}')
  first = {}
  for key, s in list(steps.items())[1:]:
    base = first.setdefault(key.split()[0].split('.', 1)[1], s)
    ratio = statistics.median(
      [b / x for x, b in zip(s.times, base.times, strict=True)]
    )
    diff = bts.rel_diff(s.state.params, base.state.params)
    print(
      f'{key:26s} {bts.fmt_ms(s.times)} | first/this {ratio:.3f} | '
      f'params rel diff {diff:.1e}'
    )


if __name__ == '__main__':
  main()
