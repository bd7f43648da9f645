"""The examples run end to end with tiny settings."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / 'examples'


@pytest.fixture(autouse=True)
def _examples_on_path(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(EXAMPLES))
  monkeypatch.setenv('LAMBJAX_CACHE', str(tmp_path))
  yield
  for mod in ('quickstart', 'mnist1d_data'):
    sys.modules.pop(mod, None)


def test_quickstart_learns():
  quickstart = importlib.import_module('quickstart')
  acc = quickstart.main(
    epochs=4, batch_size=128, num_samples=3000, verbose=False
  )
  assert acc > 0.3  # 10 classes: chance is 0.1.


def test_mnist1d_cache_round_trip(tmp_path):
  data_mod = importlib.import_module('mnist1d_data')
  a = data_mod.load_mnist1d(num_samples=500, cache_dir=tmp_path)
  b = data_mod.load_mnist1d(num_samples=500, cache_dir=tmp_path)
  assert a['x'].shape == (400, 40) and a['x_test'].shape == (100, 40)
  assert all((a[k] == b[k]).all() for k in a)
  assert list(tmp_path.glob('*.npz'))
