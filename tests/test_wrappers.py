"""``lj.lazy_rows`` on every state layout it meets.

The reference is a float64 numpy Adam(W) in which a row whose gradient is
all zero keeps its param and both moments (Paddle's ``lazy_mode``), while
the step count advances.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj

LR, B1, B2, EPS, WD = 0.05, 0.9, 0.99, 1e-8, 0.1
SMALL = ('layers.0.bias', 'layers.1.bias', 'layers.2.bias')


def _params():
  rng = np.random.default_rng(0)
  p = {name: rng.normal(size=(5, 3)) for name in SMALL}
  p['embeddings'] = rng.normal(size=(12, 4))
  p['scale'] = np.array(1.5)
  p['head'] = rng.normal(size=(70, 64))  # Never grouped.
  return p


def _grads(steps=5):
  """Random gradients with all-zero rows that change from step to step, so
  a kept row later gets a gradient again (its old moments then matter)."""
  rng = np.random.default_rng(1)
  out = []
  for t in range(steps):
    g = {k: rng.normal(size=np.shape(v)) for k, v in _params().items()}
    for k in (*SMALL, 'embeddings', 'head'):
      g[k][(t % 3) :: 3] = 0.0
    g['layers.1.bias'][:] = 0.0 if t == 2 else g['layers.1.bias']
    out.append(g)
  return out


def _reference(ratio, decayed):
  """float64 lazy Adam(W): ``ratio(name)`` scales lr, ``decayed(name)``
  turns on decoupled decay; all-zero gradient rows are left alone."""
  p = {k: np.array(v, np.float64) for k, v in _params().items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(_grads(), start=1):
    for k in p:
      gk = g[k]
      rows = (
        np.ones((), bool)
        if gk.ndim == 0
        else np.any(gk != 0, axis=tuple(range(1, gk.ndim)))
      )
      rows = rows.reshape(rows.shape + (1,) * max(gk.ndim - 1, 0))
      m_new = B1 * m[k] + (1 - B1) * gk
      v_new = B2 * v[k] + (1 - B2) * gk**2
      m_hat = m_new / (1 - B1**t)
      v_hat = v_new / (1 - B2**t)
      step = m_hat / (np.sqrt(v_hat) + EPS)
      if decayed(k):
        step = step + WD * p[k]
      p_new = p[k] - LR * ratio(k) * step
      m[k] = np.where(rows, m_new, m[k])
      v[k] = np.where(rows, v_new, v[k])
      p[k] = np.where(rows, p_new, p[k])
  return p, m, v


_GROUPS = [
  {'params': ['embeddings', 'layers.0.bias'], 'learning_rate': 0.5},
  {'params': lambda n: n not in ('embeddings', 'layers.0.bias')},
]


def _adam(**kw):
  return lj.lazy_rows(lj.adam(LR, B1, B2, EPS, **kw))


def _paddle_adamw(**kw):
  return lj.paddle.AdamW(
    LR,
    B1,
    B2,
    EPS,
    parameters=_GROUPS,
    weight_decay=WD,
    apply_decay_param_fun=lambda n: n != 'scale',
    lazy_mode=True,
    **kw,
  )


CASES = {
  'adam': (_adam, lambda k: 1.0, lambda k: False),
  'adam_chain': (
    lambda: _adam(fused=False),
    lambda k: 1.0,
    lambda k: False,
  ),
  'adam_grouped': (
    lambda: _adam(group_small_leaves=True),
    lambda k: 1.0,
    lambda k: False,
  ),
  'paddle_adam_groups': (
    lambda: lj.paddle.Adam(LR, B1, B2, EPS, parameters=_GROUPS, lazy_mode=True),
    lambda k: 0.5 if k in ('embeddings', 'layers.0.bias') else 1.0,
    lambda k: False,
  ),
  'paddle_adamw_groups': (
    lambda: _paddle_adamw(),
    lambda k: 0.5 if k in ('embeddings', 'layers.0.bias') else 1.0,
    lambda k: k != 'scale',
  ),
  'paddle_adamw_groups_grouped': (
    lambda: _paddle_adamw(group_small_leaves=True),
    lambda k: 0.5 if k in ('embeddings', 'layers.0.bias') else 1.0,
    lambda k: k != 'scale',
  ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_lazy_adam_matches_float64_reference(case):
  make, ratio, decayed = CASES[case]
  tx = make()
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params())
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for g in _grads():
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    params, state = step(params, state, g)
  assert len(traces) == 1
  p_ref, m_ref, v_ref = _reference(ratio, decayed)
  chex.assert_trees_all_close(params, p_ref, rtol=2e-5, atol=2e-6)
  # The moments of kept rows too (in the chain's layout).
  mus = [
    s
    for s in jax.tree.leaves(
      lj.unpack_state(state),
      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState),
    )
    if isinstance(s, optax.ScaleByAdamState)
  ]
  assert mus
  for s in mus:
    for k, ref in m_ref.items():
      got = s.mu[k]
      if isinstance(got, optax.MaskedNode):
        continue
      np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-7)
      np.testing.assert_allclose(s.nu[k], v_ref[k], rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize(
  'make',
  [
    lambda **kw: lj.lamb(0.05, weight_decay=0.01, **kw),
    lambda **kw: lj.lars(0.1, weight_decay=1e-3, **kw),
    lambda **kw: lj.adamw(0.05, weight_decay=0.01, **kw),
  ],
  ids=['lamb', 'lars', 'adamw'],
)
def test_lazy_rows_grouped_and_partitioned_equal_per_leaf(make):
  """Grouped state and optax.partition's masked states keep the same rows
  as the per-leaf state (where lazy_rows once kept none)."""
  labels = {k: 'a' if k in SMALL[:2] else 'b' for k in _params()}
  variants = {
    'per_leaf': make(),
    'grouped': make(group_small_leaves=True),
    'partition': optax.partition(
      {'a': make(), 'b': make(group_small_leaves=True)}, labels
    ),
  }
  out = {}
  for name, inner in variants.items():
    tx = lj.lazy_rows(inner)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params())
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in _grads():
      g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
      updates, state = step(g, state, params)
      params = optax.apply_updates(params, updates)
    out[name] = params
  # Without keeping rows the trajectories differ by ~1e-2 here.
  chex.assert_trees_all_close(out['grouped'], out['per_leaf'], atol=1e-6)
  chex.assert_trees_all_close(out['partition'], out['per_leaf'], atol=1e-6)


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: lj.with_packed_state(lj.adam(0.1)), 'with_packed_state'),
    (lambda: lj.adam(0.1, state_8bit=True), '8-bit'),
    (lambda: lj.lars(0.1, state_8bit=True), '8-bit'),
  ],
  ids=['packed', 'adam_8bit', 'lars_8bit'],
)
def test_lazy_rows_rejects_state_it_cannot_keep(make, match):
  params = jax.tree.map(jnp.asarray, _params())
  tx = lj.lazy_rows(make())
  with pytest.raises(ValueError, match=match):
    tx.init(params)
  with pytest.raises(ValueError, match=match):
    tx.update(params, make().init(params), params)


def test_packed_around_lazy_rows_keeps_rows():
  """The order the error message suggests works, and equals lazy_rows."""
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params())
  a = lj.with_packed_state(lj.lazy_rows(lj.adam(LR, B1, B2, EPS)))
  b = lj.lazy_rows(lj.adam(LR, B1, B2, EPS))
  pa, pb, sa, sb = params, params, a.init(params), b.init(params)
  for g in _grads():
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    ua, sa = a.update(g, sa, pa)
    ub, sb = b.update(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  chex.assert_trees_all_close(pa, pb, rtol=1e-6, atol=1e-7)
