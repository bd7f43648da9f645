"""Every example's main() runs end to end with tiny settings."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
  'quickstart',
  'mnist1d_data',
  'large_batch',
  'lars_cnn',
  'finetune_layerwise',
  'paddle_recipe',
  'tiny_bert',
  'convergence',
  'train_step_variants',
  'bench_train_step',
  'bench_step',
)


@pytest.fixture(autouse=True)
def _examples_on_path(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / 'examples'))
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  monkeypatch.setenv('LAMBJAX_CACHE', str(tmp_path))
  yield
  for mod in MODULES:
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


def test_large_batch_main_writes_plot(tmp_path, capsys):
  lb = importlib.import_module('large_batch')
  out = tmp_path / 'plot.png'
  results = lb.main(
    batch_sizes=(64, 256),
    epochs=2,
    seeds=2,
    num_samples=3000,
    out=out,
    progress=False,
  )
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert set(results) == {(n, b) for n in lb.OPTIMIZERS for b in (64, 256)}
  for r in results.values():
    assert r['test_acc'].shape == (2,) and r['loss'].shape == (2, 2)
    assert np.all(r['test_acc'] > 0.2)  # Learns: chance is 0.1.
    assert np.all(r['loss'][-1] < r['loss'][0])
  assert 'Test accuracy' in capsys.readouterr().out


def test_large_batch_schedule_and_lr_scaling():
  lb = importlib.import_module('large_batch')
  s = lb.warmup_linear_decay(1.0, 100, 0.1)
  np.testing.assert_allclose(
    [s(0), s(5), s(10), s(55), s(100)], [0, 0.5, 1, 0.5, 0], atol=1e-6
  )
  assert lb.peak_lr('lamb', 4096) == pytest.approx(0.08)
  with pytest.raises(ValueError, match='unknown optimizer'):
    lb.main(optimizers=('sgdd',), progress=False)


def test_seeds_are_independent_and_reproducible():
  lb = importlib.import_module('large_batch')
  data = lb.load_splits(2000)
  tx = lb.make_optimizer('lamb', 0.01)
  a = lb.train(tx, data, 256, 1, seeds=(0, 1))
  b = lb.train(tx, data, 256, 1, seeds=(1,))
  # vmap over seeds changes nothing: seed 1 alone gives the same loss.
  np.testing.assert_allclose(a['loss'][:, 1], b['loss'][:, 0], rtol=1e-5)
  assert a['loss'][0, 0] != a['loss'][0, 1]


def test_convergence_lambjax_matches_optax_where_maths_is_same(capsys):
  cv = importlib.import_module('convergence')
  cv.main(
    ['--epochs', '1', '--num-samples', '2000', '--batch-sizes', '256']
    + ['--optimizers', 'adamw', 'lamb']
  )
  out = capsys.readouterr().out
  rows = [line.split() for line in out.splitlines() if '256' in line]
  assert len(rows) == 2
  for row in rows:
    diff = float(row[-3])  # lambjax - optax, in points
    assert abs(diff) < 1.0, out


def test_lars_cnn_learns():
  lars_cnn = importlib.import_module('lars_cnn')
  out = lars_cnn.main(
    epochs=4, batch_size=128, seeds=1, num_samples=2000, progress=False
  )
  assert out['lars'].mean() > 0.2


def test_finetune_layerwise_rates():
  ft = importlib.import_module('finetune_layerwise')
  out = ft.main(
    pretrain_steps=20,
    finetune_steps=10,
    layerwise_decay=0.5,
    num_samples=256,
    progress=False,
    verbose=False,
  )
  lr = 3e-3
  want = {f'layers_{m}': lr * 0.5 ** (4 - m) for m in range(4)}
  want |= {'embeddings': lr * 0.5**5, 'head': lr}
  assert out['effective_lr'] == pytest.approx(want)
  assert set(out['relative_update']) == set(want)


def test_paddle_recipe_resumes_bit_exact():
  if jax.default_backend() == 'gpu':
    # XLA:GPU's scatter-add (the embedding gradient) uses atomics, so two
    # identical runs differ in the last bits unless deterministic ops are on,
    # which must be set before jax starts: run the recipe in a new process.
    env = dict(os.environ)
    env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '') + ' --xla_gpu_deterministic_ops=true'
    ).strip()
    code = (
      'import paddle_recipe as pr; '
      'out = pr.main(steps=12, batch_size=8, num_samples=64, progress=False); '
      "assert out['resumed_exact'] is True, out"
    )
    subprocess.run(
      [sys.executable, '-c', code], cwd=ROOT / 'examples', env=env, check=True
    )
    return
  pr = importlib.import_module('paddle_recipe')
  out = pr.main(steps=12, batch_size=8, num_samples=64, progress=False)
  assert out['resumed_exact'] is True
  assert np.isfinite(out['loss'])


def test_train_step_variants_reorders_the_chain_without_changing_numbers():
  """benchmarks/train_step_variants.py patches ``fused.in_windows`` to visit
  the leaves in another order: the targets it patches exist, and LAMB's
  update (written by leaf index) does not depend on that order."""
  import optax

  import lambjax as lj
  from lambjax._src import fused

  variants = importlib.import_module('train_step_variants')
  rng = np.random.default_rng(0)
  shapes = [(96, 64), (8,), (130, 40), (8,), (300,)] + [(8,)] * 17
  params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  params[1] *= 0.0  # a zero-norm leaf

  def step():
    tx = lj.lamb(1e-2, weight_decay=0.1)
    fn = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    out = []
    for _ in range(2):
      updates, state = fn(grads, state, params)
      out.append(updates)
    return out

  want = step()
  perm = list(range(len(shapes)))[::-1]
  saved = fused.in_windows
  fused.in_windows = variants.permuted(perm)
  try:
    got = step()
  finally:
    fused.in_windows = saved
  assert fused.breadth_first() is (jax.default_backend() == 'cpu')
  # Reversed, the small leaves fall into windows of other sizes, whose
  # vectors of trust-ratio arithmetic XLA may round differently in the last
  # bit or two; the large leaves are bit for bit the same.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if a.size > fused._SMALL:
      np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  # The gate is an exact identity on the updates.
  gated = optax.chain(lj.lamb(1e-2), variants.gate(whole=True))
  plain = lj.lamb(1e-2)
  u1, _ = jax.jit(gated.update)(grads, gated.init(params), params)
  u2, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
