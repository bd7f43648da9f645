"""Opt-in diagnostics: per-leaf trust ratios and norms, read from the state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h

STEPS = 4
WD = 0.01


def _kernel(n):
  return 'kernel' in n


def _run(tx, params, grads_list):
  """Jitted steps; returns (updates, diagnostics) of every step."""
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    has = any(isinstance(x, lj.DiagnosticsState) for x in _top(s))
    return optax.apply_updates(p, u), s, u, lj.diagnostics(s) if has else {}

  out = []
  for g in grads_list:
    params, state, u, d = step(params, state, h.to_jax(g))
    out.append((u, d))
  assert len(traces) == 1  # The second call does not retrace.
  return out


KINDS = (lj.DiagnosticsState, lj.TrustRatioState)


def _top(state):
  return jax.tree_util.tree_leaves(
    state, is_leaf=lambda x: isinstance(x, KINDS)
  )


def _numpy_lamb_ratios(params, grads_list, lo=None, hi=None):
  """float64 LAMB: per-step {name: trust ratio} (trust mask: kernels)."""
  adam = h.NumpyAdam(eps=1e-6)
  p = dict(h.names_and_leaves(h.to_np64(params)))
  s = {n: adam.init(x) for n, x in p.items()}
  per_step = []
  for t, g in enumerate(grads_list, start=1):
    g = dict(h.names_and_leaves(h.to_np64(g)))
    ratios = {}
    for n in p:
      r = adam.direction(g[n], s[n], t) + WD * p[n]
      ratio = (
        h.ref_trust(h.norm(p[n]), h.norm(r), lo=lo, hi=hi)
        if _kernel(n)
        else 1.0
      )
      ratios[n] = ratio
      p[n] = p[n] - 1e-2 * ratio * r
    per_step.append(ratios)
  return per_step


@pytest.mark.parametrize('fused', [True, False])
def test_lamb_trust_ratios_match_numpy(fused):
  params = h.to_jax(h.mixed_tree())
  grads = h.grads_sequence(params, STEPS)
  tx = lj.lamb(
    1e-2,
    weight_decay=WD,
    trust_ratio_mask=lj.mask_by_name(_kernel),
    min_ratio=0.05,
    max_ratio=20.0,
    diagnostics=True,
    fused=fused,
  )
  got = _run(tx, params, grads)
  want = _numpy_lamb_ratios(params, grads, lo=0.05, hi=20.0)
  for (_, d), ref in zip(got, want, strict=True):
    for name, r in ref.items():
      np.testing.assert_allclose(d[f'trust_ratio/{name}'], r, rtol=2e-5)


def test_updates_unchanged_and_norms_exact():
  params = h.to_jax(h.mixed_tree())
  grads = h.grads_sequence(params, STEPS)
  plain = _run(lj.lamb(1e-2, weight_decay=WD), params, grads)
  diag = _run(lj.lamb(1e-2, weight_decay=WD, diagnostics=True), params, grads)
  p = params
  for (u0, _), (u1, d) in zip(plain, diag, strict=True):
    # Bit-identical updates: diagnostics only observe.
    jax.tree.map(np.testing.assert_array_equal, u0, u1)
    for kind, tree in (('update_norm', u1), ('param_norm', p)):
      for name, x in h.names_and_leaves(tree):
        np.testing.assert_allclose(
          d[f'{kind}/{name}'], h.norm(np.float64(x)), rtol=1e-6
        )
    p = optax.apply_updates(p, u1)
  last = dict(h.names_and_leaves(h.to_np64(grads[-1])))
  want = np.sqrt(sum(np.sum(x * x) for x in last.values()))
  np.testing.assert_allclose(diag[-1][1]['global_grad_norm'], want, rtol=1e-6)
  np.testing.assert_allclose(
    diag[-1][1]['grad_norm/encoder.layers.0.kernel'],
    h.norm(last['encoder.layers.0.kernel']),
    rtol=1e-6,
  )
  # The frozen leaf has zero gradient, so r = wd * p: ratio = 1 / wd.
  np.testing.assert_allclose(diag[-1][1]['trust_ratio/frozen'], 1 / WD, 1e-6)
  # The bias starts at zero (||p|| = 0): the first ratio is exactly 1.
  assert float(diag[0][1]['trust_ratio/encoder.layers.0.bias']) == 1.0


@pytest.mark.parametrize('form', ['optax', 'paddle'])
@pytest.mark.parametrize('fused', [True, False])
def test_lars_trust_ratios_match_numpy(form, fused):
  params = h.to_jax(h.mixed_tree())
  grads = h.grads_sequence(params, STEPS)
  coeff, eps, wd = 0.01, 1e-9, 1e-3
  tx = lj.lars(
    0.1,
    weight_decay=wd,
    weight_decay_mask=lj.mask_by_name(_kernel),
    trust_coefficient=coeff,
    eps=eps,
    trust_ratio_form=form,
    diagnostics=True,
    fused=fused,
  )
  got = _run(tx, params, grads)
  p = dict(h.names_and_leaves(h.to_np64(params)))
  v = {n: np.zeros_like(x) for n, x in p.items()}
  for (_, d), g in zip(got, grads, strict=True):
    g = dict(h.names_and_leaves(h.to_np64(g)))
    for n in p:
      w = wd if _kernel(n) else 0.0
      if form == 'paddle':
        pn, gn = h.norm(p[n]), h.norm(g[n])
        adapt = w > 0 and pn > 0 and gn > 0
        ratio = coeff * pn / (gn + w * pn + eps) if adapt else 1.0
      else:  # optax: every leaf adapted, decay only on kernels.
        ratio = h.ref_trust(h.norm(p[n]), h.norm(g[n] + w * p[n]), coeff, eps)
      np.testing.assert_allclose(d[f'trust_ratio/{n}'], ratio, rtol=2e-5)
      v[n] = 0.9 * v[n] - 0.1 * ratio * (g[n] + w * p[n])
      p[n] = p[n] + v[n]


def test_off_by_default_costs_nothing():
  params = h.to_jax(h.mixed_tree())
  for tx in (lj.lamb(1e-2), lj.lars(0.1)):
    state = tx.init(params)
    assert not any(isinstance(x, KINDS) for x in _top(state))
    with pytest.raises(ValueError, match='records no diagnostics'):
      lj.diagnostics(state)


def test_any_optimizer_nested_and_checkpointed():
  params = {'w': jnp.array([3.0, 4.0]), 'b': jnp.zeros(())}
  tx = lj.apply_if_finite(
    optax.chain(
      lj.clip_by_global_norm(1.0), lj.with_diagnostics(lj.adamw(0.1))
    ),
    3,
  )
  state = tx.init(params)
  grads = {'w': jnp.array([0.0, 10.0]), 'b': jnp.array(0.0)}
  _, state = jax.jit(tx.update)(grads, state, params)
  d = lj.diagnostics(state)
  # The wrapper sees the clipped gradient (norm 1), then AdamW's update.
  np.testing.assert_allclose(d['global_grad_norm'], 1.0, rtol=1e-6)
  assert float(d['param_norm/w']) == 5.0 and float(d['param_norm/b']) == 0.0
  assert float(d['update_norm/b']) == 0.0
  restored = lj.load_state_dict(tx.init(params), lj.state_dict(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_debug_nans_and_grad_through_update():
  params = {'w': jnp.zeros((3,)), 'x': jnp.ones((2, 2)), 's': jnp.array(2.0)}
  grads = {'w': jnp.ones((3,)), 'x': jnp.zeros((2, 2)), 's': jnp.array(1.0)}

  def loss(lr):
    tx = lj.lamb(lr, weight_decay=0.1, diagnostics=True)
    u, s = tx.update(grads, tx.init(params), params)
    d = lj.diagnostics(s)
    return sum(jnp.sum(x) for x in jax.tree.leaves(u)) + sum(d.values())

  with jax.debug_nans(True):
    g = jax.grad(loss)(0.1)
  assert np.isfinite(g)


def test_bad_arguments():
  with pytest.raises(ValueError, match='diagnostics'):
    lj.lamb(1e-3, diagnostics='yes')
  with pytest.raises(ValueError, match='with_diagnostics'):
    lj.with_diagnostics(lambda x: x)
