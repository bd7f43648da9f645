"""Building blocks vs float64 numpy implementations of their formulas."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h

VARIANTS = [pytest.param(True, id='jit'), pytest.param(False, id='nojit')]


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize('use_jit', VARIANTS)
@pytest.mark.parametrize(
  'hp', [dict(), dict(b1=0.5, b2=0.9, eps=1e-3, eps_root=1e-4)]
)
def test_scale_by_adam_vs_numpy(use_jit, hp):
  tx = lj.scale_by_adam(**hp)
  params = h.mixed_tree(1)
  grads = h.grads_sequence(params, 10, seed=2)
  ref = h.NumpyAdam(
    **{'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'eps_root': 0.0, **hp}
  )
  state = tx.init(h.to_jax(params))
  ref_state = h.map_named(lambda n, p: ref.init(p), h.to_np64(params))
  update = _maybe_jit(tx.update, use_jit)
  for t, g in enumerate(grads, start=1):
    u, state = update(h.to_jax(g), state)
    want = h.map_named(
      lambda n, gg, s, t=t: ref.direction(gg, s, t), h.to_np64(g), ref_state
    )
    assert h.max_rel_err(u, want) < 2e-5  # float32 vs float64


def test_scale_by_adam_low_precision_moments():
  tx = lj.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  p = {'w': jnp.ones((4, 4))}
  state = tx.init(p)
  assert state.mu['w'].dtype == jnp.bfloat16
  assert state.nu['w'].dtype == jnp.bfloat16
  full = lj.scale_by_adam()
  fstate = full.init(p)
  rng = np.random.default_rng(0)
  for _ in range(5):
    g = {'w': jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
    u, state = jax.jit(tx.update)(g, state)
    fu, fstate = full.update(g, fstate)
    assert u['w'].dtype == jnp.float32  # Arithmetic in the grads' dtype.
  assert state.nu['w'].dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(u['w']), np.asarray(fu['w']), rtol=3e-2, atol=3e-2
  )


def numpy_trust(p, u, min_norm=0.0, coeff=1.0, eps=0.0, lo=None, hi=None):
  pn, un = max(h.norm(p), min_norm), max(h.norm(u), min_norm)
  return h.ref_trust(pn, un, coeff, eps, lo, hi) * u


@pytest.mark.parametrize('use_jit', VARIANTS)
@pytest.mark.parametrize(
  'hp',
  [
    dict(),
    dict(min_norm=0.5, trust_coefficient=0.1, eps=1e-3),
    dict(min_ratio=0.8, max_ratio=1.5),
  ],
)
def test_scale_by_trust_ratio_vs_numpy(use_jit, hp):
  params = h.mixed_tree(5)
  u = h.grads_sequence(params, 1, seed=6)[0]
  tx = lj.scale_by_trust_ratio(**hp)
  out, _ = _maybe_jit(tx.update, use_jit)(
    h.to_jax(u), tx.init(params), h.to_jax(params)
  )
  kw = dict(
    min_norm=hp.get('min_norm', 0.0),
    coeff=hp.get('trust_coefficient', 1.0),
    eps=hp.get('eps', 0.0),
    lo=hp.get('min_ratio'),
    hi=hp.get('max_ratio'),
  )
  want = h.map_named(
    lambda n, p, uu: numpy_trust(p, uu, **kw), h.to_np64(params), h.to_np64(u)
  )
  assert h.max_rel_err(out, want) < 1e-6
  # Zero-norm leaves: the zero bias (||p|| = 0) and the frozen leaf (u = 0).
  if kw['min_norm'] == 0.0:
    np.testing.assert_allclose(
      np.asarray(out['encoder']['layers'][0]['bias']),
      u['encoder']['layers'][0]['bias'],
      rtol=1e-6,
    )
  assert not np.any(np.asarray(out['frozen']))


def test_scale_by_trust_ratio_optax_equal_and_mask():
  params = h.to_jax(h.mixed_tree(5))
  u = h.to_jax(h.grads_sequence(params, 1, seed=6)[0])
  ours, _ = lj.scale_by_trust_ratio(trust_coefficient=0.3, eps=1e-4).update(
    u, optax.EmptyState(), params
  )
  theirs, _ = optax.scale_by_trust_ratio(
    trust_coefficient=0.3, eps=1e-4
  ).update(u, optax.EmptyState(), params)
  chex.assert_trees_all_equal(ours, theirs)
  mask = lj.mask_by_name(r'kernel')
  tx = lj.scale_by_trust_ratio(mask=mask)
  out, _ = tx.update(u, tx.init(params), params)
  for name, leaf in h.names_and_leaves(jax.tree.map(np.asarray, out)):
    raw = dict(h.names_and_leaves(h.to_np64(u)))[name]
    p = dict(h.names_and_leaves(h.to_np64(params)))[name]
    want = numpy_trust(p, raw) if 'kernel' in name else raw
    np.testing.assert_allclose(leaf, want, rtol=1e-6, err_msg=name)


def numpy_paddle_lars(p, g, wd, coeff, eps):
  pn, gn = h.norm(p), h.norm(g)
  r = (
    coeff * pn / (gn + wd * pn + eps) if (wd > 0 and pn > 0 and gn > 0) else 1.0
  )
  return r * (g + wd * p)


@pytest.mark.parametrize('use_jit', VARIANTS)
@pytest.mark.parametrize('wd', [0.0, 0.01])
def test_scale_by_trust_ratio_paddle_lars_form(use_jit, wd):
  params = h.mixed_tree(7)
  g = h.grads_sequence(params, 1, seed=8)[0]
  tx = lj.scale_by_trust_ratio(
    trust_coefficient=0.02, eps=1e-5, weight_decay=wd
  )
  out, _ = _maybe_jit(tx.update, use_jit)(
    h.to_jax(g), tx.init(params), h.to_jax(params)
  )
  want = h.map_named(
    lambda n, p, gg: numpy_paddle_lars(p, gg, wd, 0.02, 1e-5),
    h.to_np64(params),
    h.to_np64(g),
  )
  assert h.max_rel_err(out, want) < 1e-6
  if wd:
    # Zero gradient: raw-lr fallback, the update is wd * p, unscaled.
    np.testing.assert_allclose(
      np.asarray(out['frozen']), wd * params['frozen'], rtol=1e-6
    )


@pytest.mark.parametrize('use_jit', VARIANTS)
def test_add_decayed_weights_mask_and_schedule(use_jit):
  params = h.to_jax(h.mixed_tree(2))
  u = jax.tree.map(jnp.ones_like, params)
  tx = lj.add_decayed_weights(
    lambda c: 0.1 * (c + 1), mask=lj.mask_by_name(r'kernel')
  )
  state = tx.init(params)
  update = _maybe_jit(tx.update, use_jit)
  for t in range(3):
    out, state = update(u, state, params)
    want = h.map_named(
      lambda n, p, t=t: 1.0 + (0.1 * (t + 1) * p if 'kernel' in n else 0.0),
      h.to_np64(params),
    )
    assert h.max_rel_err(out, want) < 1e-6


def test_scale_by_lr_ratio_by_name_and_zero_cost():
  tx = lj.scale_by_lr_ratio(lambda n: {'a': 0.25, 'b.0': 0.0}.get(n, 1.0))
  g = {'a': jnp.ones(2), 'b': [jnp.ones(3)], 'c': jnp.ones((), jnp.bfloat16)}
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(np.asarray(out['a']), [0.25, 0.25])
  np.testing.assert_array_equal(np.asarray(out['b'][0]), [0, 0, 0])
  assert out['c'].dtype == jnp.bfloat16 and float(out['c']) == 1.0
  # The ratios are constants folded at trace time: no extra state, no
  # per-step Python work once traced.
  assert tx.init(g) == optax.EmptyState()


@pytest.mark.parametrize('use_jit', VARIANTS)
def test_scale_by_learning_rate_forms(use_jit):
  g = {'w': jnp.array([1.0, -2.0])}
  # Constant: settable.
  tx = lj.scale_by_learning_rate(0.1)
  s = tx.init(g)
  assert isinstance(s, lj.LearningRateState)
  update = _maybe_jit(tx.update, use_jit)
  u, s = update(g, s)
  np.testing.assert_allclose(np.asarray(u['w']), [-0.1, 0.2], rtol=1e-7)
  u, _ = update(g, lj.set_lr(s, 0.3))
  np.testing.assert_allclose(np.asarray(u['w']), [-0.3, 0.6], rtol=1e-7)
  # Schedule: follows the count; get_lr is the next update's rate.
  sched = lambda c: 0.5**c
  tx = lj.scale_by_learning_rate(sched, flip_sign=False)
  s = tx.init(g)
  update = _maybe_jit(tx.update, use_jit)
  for k in range(4):
    assert float(lj.get_lr(s)) == pytest.approx(0.5**k)
    u, s = update(g, s)
    np.testing.assert_allclose(
      np.asarray(u['w']), 0.5**k * np.array([1.0, -2.0]), rtol=1e-7
    )


class _Pair(NamedTuple):
  a: jax.Array
  b: jax.Array


def test_blocks_on_odd_trees():
  """Empty trees, 0-d leaves and namedtuple nodes go through every block."""
  blocks = [
    lj.scale_by_adam(),
    lj.scale_by_trust_ratio(),
    lj.add_decayed_weights(0.1),
    lj.scale_by_lr_ratio(lambda n: 0.5),
    lj.scale_by_learning_rate(0.1),
    lj.clip_by_global_norm(1.0),
    lj.clip_by_norm(1.0),
    lj.clip_by_value(1.0),
  ]
  for tree in ({}, _Pair(jnp.array(2.0), jnp.ones(3))):
    for tx in blocks:
      out, _ = jax.jit(tx.update)(tree, tx.init(tree), tree)
      chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
      chex.assert_tree_all_finite(out)
