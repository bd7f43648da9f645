"""apply_if_finite over lambjax optimizers."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h

TXS = {
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.1),
  'lars': lambda: lj.lars(0.5, weight_decay=1e-3),
  'adamw': lambda: lj.adamw(1e-2),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
  'paddle.Lamb': lambda: lj.paddle.Lamb(1e-2),
  'paddle.LarsMomentum': lambda: lj.paddle.LarsMomentum(0.1),
  'paddle.AdamW_groups': lambda: lj.paddle.AdamW(
    1e-2,
    parameters=[
      {'params': lambda n: 'encoder' in n, 'learning_rate': 0.5},
      {'params': lambda n: 'encoder' not in n},
    ],
  ),
  'master_weights': lambda: lj.with_master_weights(lj.lamb(1e-2)),
  'paddle.Adam_multi_precision': lambda: lj.paddle.Adam(
    1e-2, multi_precision=True
  ),
}


@pytest.mark.parametrize('name', sorted(TXS))
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_step_is_skipped_and_counted(name, bad):
  tx = lj.apply_if_finite(TXS[name](), max_consecutive_errors=2)
  params = h.to_jax(h.mixed_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, 6)]
  step = jax.jit(tx.update)
  state = tx.init(params)
  _, state = step(grads[0], state, params)
  inner_before = state.inner_state
  g_bad = jax.tree.map(lambda x: x, grads[1])
  g_bad['scale'] = jnp.asarray(bad, jnp.float32)
  for k in (1, 2):
    u, state = step(g_bad, state, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_state, inner_before)
    assert int(state.notfinite_count) == k
    assert int(state.total_notfinite) == k
  # The third bad step in a row goes through (optax's semantics).
  _, state = step(g_bad, state, params)
  assert int(state.notfinite_count) == 3
  # get_lr sees through the wrapper.
  assert float(lj.get_lr(state)) > 0


def test_equals_optax_apply_if_finite():
  params = h.to_jax(h.mixed_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, 4)]
  grads[2]['frozen'] = grads[2]['frozen'].at[0, 0].set(jnp.nan)
  ours = lj.apply_if_finite(lj.lamb(1e-2), 5)
  theirs = optax.apply_if_finite(optax.lamb(1e-2), 5)
  so, st = ours.init(params), theirs.init(params)
  for g in grads:
    uo, so = ours.update(g, so, params)
    ut, st = theirs.update(g, st, params)
    chex.assert_trees_all_close(uo, ut, rtol=1e-6)


@pytest.mark.parametrize('bad', [-1, 1.5, True, None])
def test_bad_arguments(bad):
  with pytest.raises(ValueError, match='max_consecutive_errors'):
    lj.apply_if_finite(lj.lamb(1e-2), bad)


@pytest.mark.parametrize('name', sorted(TXS))
def test_none_leaves_are_ignored(name):
  """flax can leave None in param trees: they are empty subtrees."""
  tx = TXS[name]()
  params = {'encoder': {'w': jnp.ones((2, 3)), 'b': None}, 'head': jnp.ones(2)}
  grads = {'encoder': {'w': jnp.ones((2, 3)), 'b': None}, 'head': jnp.ones(2)}
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert u['encoder']['b'] is None
  chex.assert_tree_all_finite(u)


def _optax_all_finite(leaves):
  """optax.apply_if_finite's own test (0.2.8), the reference."""
  return bool(np.all([np.all(np.isfinite(np.asarray(x))) for x in leaves]))


BIG = np.float32(3e38)
ALL_FINITE_CASES = {
  'finite': [np.ones((4, 3), np.float32), np.float32(2.0)],
  'nan': [np.ones((4, 3), np.float32), np.float32(np.nan)],
  'inf': [np.array([1.0, np.inf], np.float32)],
  '-inf': [np.array([[1.0], [-np.inf]], np.float32)],
  # inf and -inf in one leaf: its sum is NaN.
  'inf-inf': [np.array([np.inf, -np.inf], np.float32)],
  # Finite, but the sum overflows: the exact test decides (True).
  'overflowing sum': [np.array([BIG, BIG], np.float32), np.zeros(2)],
  'overflow and nan': [np.array([BIG, BIG], np.float32), np.float32(np.nan)],
  'float16 sum over its max': [np.full(4, 60000.0, np.float16)],
  'bfloat16 inf': [jnp.array([1.0, np.inf], jnp.bfloat16)],
  'int and bool': [np.arange(3, dtype=np.int32), np.array([True, False])],
  'empty': [],
  'zero-size leaf': [np.zeros((0, 3), np.float32)],
}


@pytest.mark.parametrize('case', sorted(ALL_FINITE_CASES))
def test_all_finite_gives_optax_answer(case):
  from lambjax._src.faults import all_finite

  leaves = [jnp.asarray(x) for x in ALL_FINITE_CASES[case]]
  want = _optax_all_finite(ALL_FINITE_CASES[case])
  assert bool(all_finite(leaves)) is want
  assert bool(jax.jit(all_finite)(leaves)) is want


def test_equals_optax_apply_if_finite_bit_for_bit():
  """The same skips and the same numbers as optax's wrapper, jitted, over
  finite steps, a NaN step, an Inf step and finite gradients whose sum
  overflows (the fast test's only false alarm, which optax takes)."""
  params = h.conv_tree()
  grads = h.normal_like(params, 6, seed=2)
  grads[1]['conv3'] = grads[1]['conv3'].at[0, 0, 0, 0].set(jnp.nan)
  grads[2]['scale'] = jnp.asarray(-jnp.inf, jnp.float32)
  grads[3]['dense'] = jnp.full((48, 64), 3e38, jnp.float32)
  ours = lj.apply_if_finite(lj.lars(0.1, weight_decay=1e-3), 1)
  theirs = optax.apply_if_finite(lj.lars(0.1, weight_decay=1e-3), 1)
  for (po, so), (pt, st) in h.lockstep(ours, theirs, params, grads):
    chex.assert_trees_all_equal((po, so), (pt, st))
  assert int(so.total_notfinite) == 2


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions"
)
def test_the_callers_add_fuses(monkeypatch):
  """The updates leave a ``lax.cond``: the caller's ``p + u`` would be a
  lone add (several times slower on XLA:CPU on conv kernels) but for an exact
  ``-0.0`` added after the cond."""
  from lambjax._src import fused as fused_lib

  params = h.conv_tree()
  lone, runs = {}, {}
  for on in (True, False):
    if not on:
      monkeypatch.setattr(fused_lib, 'slow_lone_ops', lambda shape: False)
    tx = lj.apply_if_finite(lj.lamb(1e-2, weight_decay=0.01), 2)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    lone[on] = h.lone_adds_on_short_last_dims(
      step.lower(p, s, params).compile().as_text()
    )
    for scale in (0.1, np.nan, -0.2):
      p, s = step(p, s, jax.tree.map(lambda x, c=scale: c * x, params))
    runs[on] = (p, s)
  assert lone[True] == []
  assert len(lone[False]) == 2, lone[False]  # The check can fail.
  chex.assert_trees_all_equal(runs[True], runs[False])
