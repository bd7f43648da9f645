"""MNIST-1D generated locally with `mnist1d.data.make_dataset` (no download).

The generated arrays are cached as a .npz file so later runs start at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def load_mnist1d(
  num_samples: int = 10_000,
  seed: int = 42,
  train_split: float = 0.8,
  cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
  """Returns {'x', 'y', 'x_test', 'y_test'} (float32 inputs, int32 labels)."""
  cache = Path(
    cache_dir
    or os.environ.get('LAMBJAX_CACHE', Path.home() / '.cache' / 'lambjax')
  )
  path = cache / f'mnist1d_{num_samples}_{seed}_{train_split}.npz'
  if path.exists():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
  raw = make_dataset(args)  # Generates locally; never the download path.
  data = {
    'x': raw['x'].astype(np.float32),
    'y': raw['y'].astype(np.int32),
    'x_test': raw['x_test'].astype(np.float32),
    'y_test': raw['y_test'].astype(np.int32),
  }
  cache.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp.npz')
  np.savez(tmp, **data)
  tmp.replace(path)
  return data
