"""Whole training steps: a model's forward and backward pass plus the
optimizer, lambjax against optax, in one process.

    python benchmarks/bench_train_step.py                  # ~13 min on 2 cores
    python benchmarks/bench_train_step.py --models bert --batches 1x128 \
        --opts lamb --rounds 5

``bench_step.py`` times the optimizer alone on fixed gradients. Here the
gradients come from a real model inside the same jitted step, as in
training: a Flax ``TrainState`` whose ``apply_gradients`` runs the
optimizer, the state donated. The models are BERT-base-sized
(``examples/tiny_bert.TinyBert`` with 12 layers of 768, vocabulary 30,522,
a token head: 132 M params in 196 leaves) and ResNet-50 in Flax's layout
(bottleneck blocks, GroupNorm instead of BatchNorm so that the step has no
batch statistics: 25.6 M params in 161 leaves). Data are random tokens and
images drawn locally.

Each round times, in rotating order, the forward and backward pass alone
(``jax.value_and_grad`` of the loss, its gradients returned) and the two
training steps. We report medians [min-max] over rounds, the median of the
per-round ratios optax/lambjax of the whole step, and each optimizer's
share: (training step - forward and backward) from the medians. Compile is
``lower + compile`` of the whole training step, what a restart costs. After
the rounds both states have taken the same steps on the same batch from the
same params, so the relative difference of their params (whole-tree norm)
is printed as a check that the maths is the same, beside how far optax's
own step carries params that start 1e-8 (relative) apart over as many
steps: the training dynamics amplify rounding (Adam divides tiny gradients
by their own size), so two correct implementations that round differently
drift apart by about that much.

``train_step_variants.py`` times variants of lambjax's step inside this
same training step (the order of LAMB's direction chain, every update
forced after every gradient).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'examples'))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
import tiny_bert  # noqa: E402

import lambjax as lj  # noqa: E402

# Any optimizer pair of bench_step.py (lambjax, optax) can be named.
OPTS = bench_step.OPTS
fmt_ms = bench_step.fmt_ms


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class Bottleneck(nn.Module):
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.GroupNorm, num_groups=32)
    y = nn.Conv(self.width, (1, 1), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.width, (3, 3), self.stride, use_bias=False)(y)
    y = nn.relu(norm()(y))
    y = nn.Conv(4 * self.width, (1, 1), use_bias=False)(y)
    y = norm()(y)
    if x.shape[-1] != 4 * self.width or self.stride != 1:
      x = nn.Conv(4 * self.width, (1, 1), self.stride, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet50(nn.Module):
  classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), 2, use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=32)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    for i, (blocks, width) in enumerate(
      zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)
    ):
      for b in range(blocks):
        x = Bottleneck(width, 2 if b == 0 and i > 0 else 1)(x)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


def bert_case(batch: int, size: int):
  model = tiny_bert.TinyBert(
    vocab=30522, dim=768, heads=12, n_layers=12, max_len=512
  )
  tokens, targets = tiny_bert.make_tokens(batch, size, vocab=30522)
  params = tiny_bert.init_params(model, seq_len=size)

  def loss(params, tokens, targets):
    logits = model.apply({'params': params}, tokens)
    return tiny_bert.loss_and_accuracy(logits, targets)[0]

  return model, params, loss, (jnp.asarray(tokens), jnp.asarray(targets))


def resnet50_case(batch: int, size: int):
  model = ResNet50()
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  labels = rng.integers(0, 1000, size=batch, dtype=np.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))[
    'params'
  ]

  def loss(params, images, labels):
    logits = model.apply({'params': params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  return model, params, loss, (jnp.asarray(images), jnp.asarray(labels))


MODELS = {'bert': bert_case, 'resnet50': resnet50_case}
DEFAULT_BATCHES = {'bert': '1x128,4x128', 'resnet50': '4x64,16x64'}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class GradOnly:
  """Forward and backward alone: the floor under both training steps."""

  def __init__(self, loss, params, batch):
    fn = jax.jit(jax.value_and_grad(loss))
    self.compiled = fn.lower(params, *batch).compile()
    self.params, self.batch = params, batch
    self.times = []
    self.run()

  def run(self):
    t0 = time.perf_counter()
    jax.block_until_ready(self.compiled(self.params, *self.batch))
    return time.perf_counter() - t0


class TrainStep:
  """One optimizer's jitted, donated Flax training step."""

  def __init__(self, model, loss, params, batch, tx):
    def step(state, *batch):
      value, grads = jax.value_and_grad(loss)(state.params, *batch)
      return state.apply_gradients(grads=grads), value

    self.apply_fn, self.tx, self.batch = model.apply, tx, batch
    self.state = self.new_state(params)
    fn = jax.jit(step, donate_argnums=0)
    t0 = time.perf_counter()
    self.compiled = fn.lower(self.state, *batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.times = []
    self.run()

  def new_state(self, params):
    return train_state.TrainState.create(
      apply_fn=self.apply_fn, params=copy(params), tx=self.tx
    )

  def replay(self, params, steps):
    """The params after ``steps`` of this compiled step from ``params``."""
    state = self.new_state(params)
    for _ in range(steps):
      state, _ = self.compiled(state, *self.batch)
    return state.params

  def run(self):
    t0 = time.perf_counter()
    self.state, value = self.compiled(self.state, *self.batch)
    jax.block_until_ready((self.state, value))
    return time.perf_counter() - t0


def rel_diff(a, b):
  """||a - b|| / ||b|| over the whole params tree.

  Not the worst leaf: a leaf whose gradient is zero in exact arithmetic
  (an attention key bias: softmax ignores a shift shared by all keys) gets
  rounding noise of ~1e-10 from the backward pass, which Adam's
  normalisation blows up, and the two steps' backward passes are fused
  differently by XLA, so such a leaf drifts apart in both directions.
  """
  num = den = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    num += float(np.sum((x - y) ** 2))
    den += float(np.sum(y**2))
  return (num / max(den, 1e-300)) ** 0.5


def nudged(params, scale=1e-8, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: x * (1 + scale * rng.standard_normal(x.shape, np.float32)),
    params,
  )


def bench(name, batch_spec, opts, rounds):
  batch, size = (int(v) for v in batch_spec.split('x'))
  model, params, loss, data = MODELS[name](batch, size)
  leaves = jax.tree.leaves(params)
  n = sum(x.size for x in leaves)
  what = f'{size} tokens each' if name == 'bert' else f'{size}x{size} images'
  print(
    f'\n## {name}: {len(leaves)} leaves, {n / 1e6:.1f} M params; batch of '
    f'{batch}, {what}',
    flush=True,
  )
  grad_only = GradOnly(loss, params, data)
  for opt in opts:
    ours_fn, theirs_fn = OPTS[opt]
    ours = TrainStep(model, loss, params, data, ours_fn())
    theirs = TrainStep(model, loss, params, data, theirs_fn())
    grad_only.times = []
    impls = [grad_only, ours, theirs]
    for r in range(rounds):
      for impl in impls[r % 3 :] + impls[: r % 3]:
        impl.times.append(impl.run())
    fb = statistics.median(grad_only.times)
    ratio = statistics.median(
      [b / a for a, b in zip(ours.times, theirs.times, strict=True)]
    )
    share = [statistics.median(t.times) - fb for t in (ours, theirs)]
    diff = rel_diff(ours.state.params, theirs.state.params)
    # The same optax step from params moved by ~1e-8: how far rounding
    # alone carries two runs apart over as many steps (see rel_diff).
    floor = rel_diff(
      theirs.replay(nudged(params), len(theirs.times) + 1),
      theirs.state.params,
    )
    print(
      f'{opt:6s} fwd+bwd {fmt_ms(grad_only.times)} | lambjax '
      f'{fmt_ms(ours.times)} compile {ours.compile_s:5.1f} s | optax '
      f'{fmt_ms(theirs.times)} compile {theirs.compile_s:5.1f} s | '
      f'optax/lambjax {ratio:.2f}x | optimizer ms {1e3 * share[0]:.0f} vs '
      f'{1e3 * share[1]:.0f} | params rel diff {diff:.1e} '
      f'(optax from params moved by 1e-8: {floor:.1e})',
      flush=True,
    )
    del ours, theirs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='bert,resnet50')
  p.add_argument(
    '--batches',
    default=None,
    help='comma-separated BxS (batch x sequence length or image size); '
    f'default per model: {DEFAULT_BATCHES}',
  )
  p.add_argument(
    '--opts',
    default='lamb,lars,adamw',
    help='names from bench_step.OPTS (e.g. paddle.Lamb, lamb_grouped)',
  )
  p.add_argument('--rounds', type=int, default=7)
  a = p.parse_args(argv)
  print(
    f'# machine: {platform.machine()}, nproc {os.cpu_count()}, jax '
    f'{jax.__version__} ({jax.default_backend()}), optax {optax.__version__}'
    f', lambjax {lj.__version__}'
  )
  print(f'# rounds {a.rounds}; times are medians [min-max] over rounds, ms')
  for name in a.models.split(','):
    for spec in (a.batches or DEFAULT_BATCHES[name]).split(','):
      bench(name, spec, a.opts.split(','), a.rounds)


if __name__ == '__main__':
  main()
