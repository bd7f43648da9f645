"""LARS on a small 1-D convolutional network, MNIST-1D at batch 1024.

    python examples/lars_cnn.py               # ~2 min on 2 CPU cores
    python examples/lars_cnn.py --help

LARS (You et al., 2017) was made for large-batch training of convnets. This
trains a three-layer 1-D conv net with ``lj.lars`` (weight decay on kernels,
layer adaptation on every leaf as in optax; ``--paddle`` switches to
Paddle's denominator), and beside it the same net with optax's SGD with
momentum at the same batch size, several seeds at once (``jax.vmap``).
MNIST-1D is generated locally (`mnist1d`), never downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import large_batch as lb  # noqa: E402

import lambjax as lj  # noqa: E402


class ConvNet(nn.Module):
  """Conv(16, 5, stride 2) x 2 -> Conv(16, 3) -> flatten -> Dense(10)."""

  @nn.compact
  def __call__(self, x):
    x = x[..., None]  # (batch, 40, 1 channel)
    x = nn.relu(nn.Conv(16, (5,), strides=2, name='conv_0')(x))
    x = nn.relu(nn.Conv(16, (5,), strides=2, name='conv_1')(x))
    x = nn.relu(nn.Conv(16, (3,), name='conv_2')(x))
    return nn.Dense(10, name='head')(x.reshape(x.shape[0], -1))


def main(
  epochs: int = 10,
  batch_size: int = 1024,
  learning_rate: float = 10.0,
  sgd_learning_rate: float = 0.1,
  seeds: int = 3,
  num_samples: int = 40_000,
  paddle: bool = False,
  progress: bool = True,
  verbose: bool = True,
) -> dict:
  """Returns ``{'lars': test accuracies, 'sgd': test accuracies}``."""
  from tqdm.auto import tqdm

  data = lb.load_splits(num_samples)
  steps = epochs * lb.steps_per_epoch(len(data['x']), batch_size)
  out = {}
  for name in ('lars', 'sgd'):
    peak = learning_rate if name == 'lars' else sgd_learning_rate
    schedule = lb.warmup_linear_decay(peak, steps)
    if name == 'lars':
      tx = lj.lars(
        schedule,
        weight_decay=lb.WEIGHT_DECAY,
        weight_decay_mask=lb.KERNELS,
        trust_ratio_form='paddle' if paddle else 'optax',
      )
    else:
      tx = lb.make_optimizer('sgd', schedule)
    bar = tqdm(total=epochs, desc=name, disable=not progress, unit='epoch')
    result = lb.train(
      tx,
      data,
      batch_size,
      epochs,
      range(seeds),
      on_epoch=lambda e, loss, bar=bar: (
        bar.update(1),
        bar.set_postfix(loss=f'{float(loss.mean()):.3f}'),
      ),
      model=ConvNet(),
    )
    bar.close()
    out[name] = result['test_acc']
  if verbose:
    print(f'\nConvNet, batch {batch_size}, {epochs} epochs, {seeds} seeds:')
    for name, acc in out.items():
      print(
        f'  {name:5} test accuracy {100 * np.mean(acc):5.1f} ± '
        f'{100 * np.std(acc):.1f} %'
      )
  return out


if __name__ == '__main__':
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=1024)
  parser.add_argument('--learning-rate', type=float, default=10.0)
  parser.add_argument('--sgd-learning-rate', type=float, default=0.1)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument(
    '--paddle',
    action='store_true',
    help="Paddle's LARS denominator ||g|| + wd ||p||",
  )
  a = parser.parse_args()
  main(
    a.epochs,
    a.batch_size,
    a.learning_rate,
    a.sgd_learning_rate,
    a.seeds,
    paddle=a.paddle,
  )
