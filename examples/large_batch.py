"""Large-batch training on MNIST-1D: lambjax LAMB vs AdamW vs LARS.

    python examples/large_batch.py                 # ~2 min on 2 CPU cores
    python examples/large_batch.py --seeds 5 --out large_batch.png
    python examples/large_batch.py --help

Trains the MLP 40-128-128-10 for 10 epochs at batch 64, 256, 1024 and 4096
with each optimizer (linear warmup over the first 10% of steps, then linear
decay to zero; weight decay 1e-4 on kernels only; square-root learning-rate
scaling for LAMB and AdamW), five seeds at once with ``jax.vmap``.
``lamb_recipe`` is lambjax's large-batch LAMB recipe: trust ratio on weight
matrices only (``trust_ratio_mask``), b1 = 0.8 and a 5% warmup. Prints
an accuracy table and writes a PNG: test accuracy against batch size, and the
training loss curves.

MNIST-1D (40,000 samples, generator seed 42: 32k train / 4k validation / 4k
test) is generated locally by the `mnist1d` package, never downloaded.
``benchmarks/convergence.py`` runs the same training against optax.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist1d_data import load_mnist1d  # noqa: E402

import lambjax as lj  # noqa: E402

BATCH_SIZES = (64, 256, 1024, 4096)
OPTIMIZERS = ('lamb', 'adamw', 'lars', 'lamb_recipe')
BASE_BATCH, BASE_LR = 64, 0.01


def peak_lr(name: str, batch_size: int) -> float:
  """Square-root scaling for LAMB and AdamW (``0.01 * sqrt(B / 64)``); LARS
  uses a coefficient-scaled rate of 6 at batch 64 and 12 above."""
  if name in ('lamb', 'adamw', 'lamb_recipe'):
    return BASE_LR * math.sqrt(batch_size / BASE_BATCH)
  if name == 'lars':
    return 6.0 if batch_size <= BASE_BATCH else 12.0
  raise ValueError(f'unknown optimizer {name!r}; choose from {OPTIMIZERS}.')


WEIGHT_DECAY = 1e-4
KERNELS = lj.mask_by_name(r'kernel$')
# lambjax's large-batch LAMB recipe (benchmarks/convergence.py --recipes):
# layer adaptation on weight matrices only, b1 0.8, warmup over 5% of steps.
RECIPE_OPTIONS = {'trust_ratio_mask': KERNELS, 'b1': 0.8}
RECIPE_WARMUP = 0.05


class MLP(nn.Module):
  """40-128-128-10 with ReLU."""

  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name='layers_0')(x))
    x = nn.relu(nn.Dense(self.hidden, name='layers_1')(x))
    return nn.Dense(10, name='head')(x)


def load_splits(num_samples: int = 40_000, seed: int = 42) -> dict:
  """MNIST-1D split 80% train, then the rest halved into val and test."""
  raw = load_mnist1d(num_samples=num_samples, seed=seed, train_split=0.8)
  half = len(raw['x_test']) // 2
  return {
    'x': raw['x'],
    'y': raw['y'],
    'x_val': raw['x_test'][:half],
    'y_val': raw['y_test'][:half],
    'x_test': raw['x_test'][half:],
    'y_test': raw['y_test'][half:],
  }


def warmup_linear_decay(
  peak: float, total_steps: int, warmup_frac: float = 0.1
) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_frac`` of the steps, then linear
  decay to 0 at ``total_steps``."""
  warmup = max(1, round(warmup_frac * total_steps))
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, warmup),
      optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup)),
    ],
    [warmup],
  )


def make_optimizer(
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  lib: str = 'lambjax',
  weight_decay: float = WEIGHT_DECAY,
  **options: Any,
) -> optax.GradientTransformation:
  """One optimizer of the comparison, from lambjax or from optax.

  ``options`` go to the lambjax optimizer (e.g. ``trust_ratio_mask``,
  ``min_ratio``, ``max_ratio``, ``trust_ratio_form``); optax gets none.
  """
  if lib == 'optax':
    if options:
      raise ValueError(f'optax {name} takes no extra options: {options}.')
    if name == 'lamb':
      return optax.lamb(learning_rate, weight_decay=weight_decay, mask=KERNELS)
    if name == 'adamw':
      return optax.adamw(learning_rate, weight_decay=weight_decay, mask=KERNELS)
    if name == 'lars':
      return optax.lars(
        learning_rate, weight_decay=weight_decay, weight_decay_mask=KERNELS
      )
  elif lib == 'lambjax':
    if name == 'lamb_recipe':
      name, options = 'lamb', {**RECIPE_OPTIONS, **options}
    if name == 'lamb':
      return lj.lamb(
        learning_rate, weight_decay=weight_decay, mask=KERNELS, **options
      )
    if name == 'adamw':
      return lj.adamw(
        learning_rate, weight_decay=weight_decay, mask=KERNELS, **options
      )
    if name == 'lars':
      return lj.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=KERNELS,
        **options,
      )
  else:
    raise ValueError(f"`lib` must be 'lambjax' or 'optax', got {lib!r}.")
  if name == 'sgd':  # The baseline: optax's SGD with momentum in both.
    return optax.chain(
      optax.add_decayed_weights(weight_decay, KERNELS),
      optax.sgd(learning_rate, momentum=0.9),
    )
  raise ValueError(f'unknown optimizer {name!r}.')


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
  return -(-num_samples // batch_size)


def train(
  tx: optax.GradientTransformation,
  data: dict,
  batch_size: int,
  epochs: int = 10,
  seeds: Sequence[int] = (0,),
  on_epoch: Callable[[int, np.ndarray], None] | None = None,
  model: nn.Module | None = None,
) -> dict[str, np.ndarray]:
  """Trains one model per seed at once (``jax.vmap``); returns per-seed
  ``test_acc``, ``val_acc`` and ``loss`` (epochs x seeds, mean per epoch).

  ``model`` is a flax module mapping ``(batch, 40)`` inputs to 10 logits
  (default: :class:`MLP`)."""
  model = MLP() if model is None else model
  x, y = jnp.asarray(data['x']), jnp.asarray(data['y'])
  # Every sample once per epoch: the last batch is topped up from the
  # start of the same permutation (so no sample is dropped at batch 4096).
  steps = steps_per_epoch(len(x), batch_size)
  if batch_size > len(x):
    raise ValueError(f'batch_size {batch_size} exceeds {len(x)} samples.')

  def init(key):
    params = model.init(key, x[:1])['params']
    return params, tx.init(params)

  def epoch(params, opt_state, key, x, y):
    perm = jax.random.permutation(key, len(x))
    perm = jnp.concatenate([perm, perm[: steps * batch_size - len(x)]])

    def step(carry, idx):
      params, opt_state = carry

      def loss_fn(p):
        logits = model.apply({'params': p}, x[idx])
        return optax.softmax_cross_entropy_with_integer_labels(
          logits, y[idx]
        ).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
      step, (params, opt_state), perm.reshape(steps, batch_size)
    )
    return params, opt_state, losses.mean()

  def accuracy(params, x, y):
    return jnp.mean(model.apply({'params': params}, x).argmax(-1) == y)

  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  params, opt_state = jax.jit(jax.vmap(init))(
    jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
  )
  run_epoch = jax.jit(
    jax.vmap(epoch, in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1)
  )
  losses = []
  for e in range(epochs):
    epoch_keys = jax.vmap(lambda k, e=e: jax.random.fold_in(k, e + 1))(keys)
    params, opt_state, loss = run_epoch(params, opt_state, epoch_keys, x, y)
    losses.append(np.asarray(loss))
    if on_epoch is not None:
      on_epoch(e, losses[-1])
  acc = jax.jit(jax.vmap(accuracy, in_axes=(0, None, None)))
  return {
    'test_acc': np.asarray(acc(params, data['x_test'], data['y_test'])),
    'val_acc': np.asarray(acc(params, data['x_val'], data['y_val'])),
    'loss': np.stack(losses),
  }


def plot(results: dict, batch_sizes: Sequence[int], path: str | Path) -> None:
  """Accuracy vs batch size, and loss curves at the smallest and largest."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  for i, name in enumerate(sorted({n for n, _ in results})):
    color = f'C{i}'
    accs = np.array([results[name, b]['test_acc'] for b in batch_sizes])
    ax0.errorbar(
      batch_sizes,
      100 * accs.mean(1),
      yerr=100 * accs.std(1),
      marker='o',
      capsize=3,
      color=color,
      label=name,
    )
    for b, style in ((batch_sizes[0], '-'), (batch_sizes[-1], '--')):
      loss = results[name, b]['loss'].mean(1)
      ax1.plot(
        np.arange(1, len(loss) + 1),
        loss,
        style,
        color=color,
        label=f'{name}, batch {b}',
      )
  ax0.set(
    xscale='log',
    xlabel='batch size',
    ylabel='test accuracy (%)',
    title='MNIST-1D, 10 epochs',
  )
  ax0.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
  ax0.grid(alpha=0.3)
  ax0.legend()
  ax1.set(
    yscale='log', xlabel='epoch', ylabel='training loss', title='Loss curves'
  )
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(
  batch_sizes: Sequence[int] = BATCH_SIZES,
  optimizers: Sequence[str] = OPTIMIZERS,
  epochs: int = 10,
  seeds: int = 5,
  num_samples: int = 40_000,
  out: str | Path | None = 'large_batch.png',
  progress: bool = True,
) -> dict:
  """Runs the comparison; returns ``{(optimizer, batch): train(...)}``."""
  from tqdm.auto import tqdm

  for name in optimizers:
    peak_lr(name, BASE_BATCH)  # Unknown names fail before any training.
  data = load_splits(num_samples)
  results = {}
  bar = tqdm(
    total=len(batch_sizes) * len(optimizers) * epochs,
    disable=not progress,
    unit='epoch',
  )
  start = time.time()
  for b in batch_sizes:
    total_steps = epochs * steps_per_epoch(len(data['x']), b)
    for name in optimizers:
      warmup = RECIPE_WARMUP if name == 'lamb_recipe' else 0.1
      tx = make_optimizer(
        name, warmup_linear_decay(peak_lr(name, b), total_steps, warmup)
      )
      bar.set_description(f'{name} batch {b}')
      results[name, b] = train(
        tx,
        data,
        b,
        epochs,
        range(seeds),
        on_epoch=lambda e, loss: (
          bar.update(1),
          bar.set_postfix(loss=f'{float(loss.mean()):.3f}'),
        ),
      )
  bar.close()
  print(
    f'\nTest accuracy (%), mean ± std over {seeds} seeds, {epochs} epochs '
    f'({time.time() - start:.0f} s):'
  )
  print('batch  ' + ''.join(f'{n:>16}' for n in optimizers))
  for b in batch_sizes:
    cells = (
      f'{100 * results[n, b]["test_acc"].mean():8.1f} ± '
      f'{100 * results[n, b]["test_acc"].std():4.1f}'
      for n in optimizers
    )
    print(f'{b:5d}  ' + ''.join(f'{c:>16}' for c in cells))
  if out is not None:
    plot(results, list(batch_sizes), out)
    print(f'plot written to {out}')
  return results


if __name__ == '__main__':
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--batch-sizes', type=int, nargs='+', default=BATCH_SIZES)
  parser.add_argument('--optimizers', nargs='+', default=OPTIMIZERS)
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--num-samples', type=int, default=40_000)
  parser.add_argument('--out', default='large_batch.png')
  a = parser.parse_args()
  if a.epochs < 1 or a.seeds < 1:
    parser.error('--epochs and --seeds must be >= 1')
  main(a.batch_sizes, a.optimizers, a.epochs, a.seeds, a.num_samples, a.out)
