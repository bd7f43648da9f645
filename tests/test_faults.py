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
