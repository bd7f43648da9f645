"""Quickstart: train a Flax MLP on MNIST-1D with `lambjax.lamb`.

    python examples/quickstart.py            # ~20 s on 2 CPU cores
    python examples/quickstart.py --help

MNIST-1D is generated locally by the `mnist1d` package (no download).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_batch import MLP  # noqa: E402  (40-128-128-10, ReLU)
from mnist1d_data import load_mnist1d  # noqa: E402

import lambjax as lj  # noqa: E402


def main(
  epochs: int = 20,
  batch_size: int = 128,
  learning_rate: float = 1e-2,
  weight_decay: float = 1e-4,
  num_samples: int = 40_000,
  seed: int = 0,
  verbose: bool = True,
) -> float:
  """Trains and returns the test accuracy (a float in [0, 1])."""
  data = load_mnist1d(num_samples=num_samples)
  x, y = jnp.asarray(data['x']), jnp.asarray(data['y'])
  steps_per_epoch = max(1, len(x) // batch_size)
  total = epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps=max(1, total // 10), decay_steps=total
  )
  # LAMB with decoupled weight decay on the kernels only.
  tx = lj.lamb(
    schedule, weight_decay=weight_decay, mask=lj.mask_by_name(r'kernel$')
  )
  model = MLP()
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(seed), x[:1])['params'],
    tx=tx,
  )

  @jax.jit
  def train_epoch(state, key):
    perm = jax.random.permutation(key, len(x))[: steps_per_epoch * batch_size]
    batches = perm.reshape(steps_per_epoch, batch_size)

    def step(state, idx):
      def loss_fn(p):
        logits = state.apply_fn({'params': p}, x[idx])
        return optax.softmax_cross_entropy_with_integer_labels(
          logits, y[idx]
        ).mean()

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return state.apply_gradients(grads=grads), loss

    return jax.lax.scan(step, state, batches)

  key = jax.random.key(seed + 1)
  start = time.time()
  for epoch in range(epochs):
    key, sub = jax.random.split(key)
    state, losses = train_epoch(state, sub)
    if verbose and (epoch + 1) % max(1, epochs // 5) == 0:
      print(
        f'epoch {epoch + 1:3d}  loss {float(losses.mean()):.4f}  '
        f'lr {float(lj.get_lr(state.opt_state)):.5f}'
      )
  logits = model.apply({'params': state.params}, jnp.asarray(data['x_test']))
  acc = float(np.mean(np.asarray(logits.argmax(-1)) == data['y_test']))
  if verbose:
    print(f'test accuracy {acc:.4f}  ({time.time() - start:.1f} s training)')
  return acc


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--learning-rate', type=float, default=1e-2)
  parser.add_argument('--num-samples', type=int, default=40_000)
  a = parser.parse_args()
  main(
    epochs=a.epochs,
    batch_size=a.batch_size,
    learning_rate=a.learning_rate,
    num_samples=a.num_samples,
  )
