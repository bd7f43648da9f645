"""Stacked (scanned) layers equal the same layers stored separately."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import lambjax as lj
from tests import helpers as h

L = 4
STEPS = 5


def _separate(seed=0):
  rng = np.random.default_rng(seed)
  layers = [
    {
      'attn': {'kernel': rng.normal(size=(6, 5)), 'bias': rng.normal(size=5)},
      'norm': {'scale': 1.0 + 0.1 * rng.normal(size=5)},
    }
    for _ in range(L)
  ]
  layers[2]['attn']['bias'] = np.zeros(5)  # A zero-norm slice.
  return h.to_jax(
    {
      'embeddings': rng.normal(size=(7, 6)),
      'layers': layers,
      'head': {'kernel': rng.normal(size=(5, 3))},
    }
  )


def _stack(tree):
  """The same params with the layers stacked on a leading axis."""
  return {
    'embeddings': tree['embeddings'],
    'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *tree['layers']),
    'head': tree['head'],
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  gs = []
  for _ in range(STEPS):
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    g['layers'][1]['norm']['scale'] = np.zeros(5)  # A zero-gradient slice.
    gs.append(h.to_jax(g))
  return gs


KERNELS = lj.mask_by_name('kernel')
OPTIMIZERS = {
  'lamb': lambda s, f: lj.lamb(
    1e-2, weight_decay=0.01, mask=KERNELS, stacked=s, fused=f
  ),
  'lamb_layerwise_clamped': lambda s, f: lj.lamb(
    1e-2,
    weight_decay=0.01,
    trust_ratio_mask=KERNELS,
    min_ratio=0.05,
    max_ratio=3.0,
    lr_ratio_fn=lambda n: lj.layerwise_lr_decay(0.7, L, n),
    stacked=s,
    fused=f,
  ),
  'lars': lambda s, f: lj.lars(
    0.5, weight_decay=1e-3, trust_coefficient=0.02, stacked=s, fused=f
  ),
  'lars_paddle': lambda s, f: lj.lars(
    0.5,
    weight_decay=1e-3,
    weight_decay_mask=KERNELS,
    trust_ratio_form='paddle',
    stacked=s,
    fused=f,
  ),
  'adamw_dl': lambda s, f: lj.adamw_dl(
    1e-2, layerwise_decay=0.6, n_layers=L, stacked=s, fused=f
  ),
  'clip_by_norm+lamb': lambda s, f: optax.chain(
    lj.clip_by_norm(0.8, stacked=s), lj.lamb(1e-2, stacked=s, fused=f)
  ),
}


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_stacked_equals_separate(name, fused):
  sep = _separate()
  grads = _grads(sep, 1)
  want, _ = h.run_steps(OPTIMIZERS[name](None, fused), sep, grads)
  got, _ = h.run_steps(
    OPTIMIZERS[name](lj.Stacked('layers'), fused),
    _stack(sep),
    [_stack(g) for g in grads],
  )
  err = h.trajectory_rel_err(
    [h.to_np64(p) for p in got], [h.to_np64(_stack(p)) for p in want]
  )
  assert err <= 1e-6, err
  # Without `stacked` the stacked tree gets one ratio per leaf: different.
  plain, _ = h.run_steps(
    OPTIMIZERS[name](None, fused), _stack(sep), [_stack(g) for g in grads]
  )
  if name != 'adamw_dl':  # (its default ratio needs the layer index)
    assert (
      h.trajectory_rel_err(
        [h.to_np64(p) for p in plain], [h.to_np64(_stack(p)) for p in want]
      )
      > 1e-4  # 100x the tolerance above
    )


def test_layerwise_ratios_follow_slice_names():
  sep = _separate()
  stacked = _stack(sep)
  names = lj.tree_names(stacked)
  assert names['layers']['attn']['kernel'] == 'layers.attn.kernel'
  s = lj.Stacked('layers')
  assert [
    lj._src.stacking.slice_name(s, 'layers.attn.kernel', i) for i in range(2)
  ] == ['layers.0.attn.kernel', 'layers.1.attn.kernel']
  # flax names: the slice index goes after the whole matching component.
  assert (
    lj._src.stacking.slice_name(
      lj.Stacked('ScanBlock'), 'params.ScanBlock_0.Dense_0.kernel', 3
    )
    == 'params.ScanBlock_0.3.Dense_0.kernel'
  )


def test_recorded_trust_ratios_are_per_slice():
  sep = _separate()
  g = _grads(sep, 2)[0]
  tx_sep = lj.lamb(1e-2, weight_decay=0.01, diagnostics=True)
  tx_st = lj.lamb(
    1e-2, weight_decay=0.01, diagnostics=True, stacked=lj.Stacked('layers')
  )
  _, s_sep = tx_sep.update(g, tx_sep.init(sep), sep)
  st = _stack(sep)
  state0 = tx_st.init(st)
  _, s_st = jax.jit(tx_st.update)(_stack(g), state0, st)
  d_sep, d_st = lj.diagnostics(s_sep), lj.diagnostics(s_st)
  got = d_st['trust_ratio/layers.attn.kernel']
  assert got.shape == (L,)
  want = [d_sep[f'trust_ratio/layers.{i}.attn.kernel'] for i in range(L)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Structure and shapes never change from step to step.
  chex_shapes = jax.tree.map(jnp.shape, state0)
  assert jax.tree.map(jnp.shape, s_st) == chex_shapes


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(8, name='dense')(x)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      _Block,
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=L,
    )
    x, _ = scan(name='layers')(x, None)
    return nn.Dense(2, name='head')(x)


class _Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x, _ = _Block(name=f'layers_{i}')(x, None)
    return nn.Dense(2, name='head')(x)


def test_flax_linen_scan_model_matches_unrolled_model():
  x = jax.random.normal(jax.random.key(0), (16, 8))
  y = jax.random.normal(jax.random.key(1), (16, 2))
  scanned = _Scanned().init(jax.random.key(2), x)['params']
  assert scanned['layers']['dense']['kernel'].shape == (L, 8, 8)
  unrolled = {
    f'layers_{i}': jax.tree.map(lambda a, i=i: a[i], scanned['layers'])
    for i in range(L)
  }
  unrolled['head'] = scanned['head']

  def loss(model):
    return lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)

  def train(model, params, tx):
    state = tx.init(params)
    for _ in range(3):
      g = jax.grad(loss(model))(params)
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params

  def ratio(n):  # flax's unrolled names are layers_i; scanned slices layers.i
    return lj.layerwise_lr_decay(0.5, L, n.replace('layers.', 'layers_'))

  p_s = train(
    _Scanned(),
    scanned,
    lj.lamb(1e-2, lr_ratio_fn=ratio, stacked=lj.Stacked('layers')),
  )
  p_u = train(_Unrolled(), unrolled, lj.lamb(1e-2, lr_ratio_fn=ratio))
  for i in range(L):
    for a, b in zip(
      jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], p_s['layers'])),
      jax.tree.leaves(p_u[f'layers_{i}']),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_stacked_arguments():
  with pytest.raises(ValueError, match='`stacked`'):
    lj.lamb(1e-3, stacked=3)
  with pytest.raises(ValueError, match=r'`stacked.pattern`.*\('):
    lj.lars(1e-3, stacked='(')
  with pytest.raises(ValueError, match='`stacked.axis`'):
    lj.clip_by_norm(1.0, stacked=lj.Stacked('x', axis=0.5))
  tx = lj.lamb(1e-3, stacked=lj.Stacked('w', axis=2))
  p = {'w': jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"leaf 'w'.*no axis 2"):
    tx.update(p, tx.init(p), p)
