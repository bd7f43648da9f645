"""Gradient accumulation: optax.MultiSteps' numbers, without its extra work."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from lambjax._src import fused as fused_lib
from tests import helpers as h

K = 3
STEPS = 12

OPTIMIZERS = {
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.01),
  'lars': lambda: lj.lars(0.5, weight_decay=1e-3, trust_coefficient=0.05),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
  'paddle.Lamb': lambda: lj.paddle.Lamb(
    1e-2, grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0)
  ),
  'master_weights(adamw)': lambda: lj.with_master_weights(lj.adamw(1e-2)),
}


def _counting(tx, counter):
  """``tx`` whose every executed update bumps ``counter`` (a host list)."""

  def update(u, s, params=None, **kw):
    jax.debug.callback(lambda: counter.append(1))
    return tx.update(u, s, params, **kw)

  return optax.GradientTransformationExtraArgs(tx.init, update)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_equals_optax_multisteps_and_skips_the_inner_update(name):
  params = h.to_jax(h.mixed_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, STEPS)]
  ours_count, theirs_count = [], []
  ours, state = h.run_steps(
    lj.accumulate_gradients(_counting(OPTIMIZERS[name](), ours_count), K),
    params,
    grads,
  )
  theirs, _ = h.run_steps(
    optax.MultiSteps(_counting(OPTIMIZERS[name](), theirs_count), K),
    params,
    grads,
  )
  err = h.trajectory_rel_err(
    [h.to_np64(p) for p in ours], [h.to_np64(p) for p in theirs]
  )
  assert err <= 1e-6, err
  jax.effects_barrier()
  # The inner optimizer ran only on the applying steps; optax's every step.
  assert len(ours_count) == STEPS // K
  assert len(theirs_count) == STEPS
  assert int(state.gradient_step) == STEPS // K and int(state.mini_step) == 0


def test_micro_steps_leave_params_and_inner_state_untouched():
  params = h.to_jax(h.mixed_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, K)]
  tx = lj.accumulate_gradients(lj.lamb(1e-2), K)
  state = tx.init(params)
  for g in grads[:-1]:
    updates, new = jax.jit(tx.update)(g, state, params)
    assert all(
      float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates)
    )
    jax.tree.map(
      np.testing.assert_array_equal, new.inner_state, state.inner_state
    )
    state = new
  # The mean of the K gradients reaches the optimizer.
  want = jax.tree.map(lambda *gs: sum(gs) / K, *grads)
  inner = lj.lamb(1e-2)
  u_want, _ = inner.update(want, inner.init(params), params)
  u_got, _ = tx.update(grads[-1], state, params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
    u_got,
    u_want,
  )


def test_resume_mid_cycle_is_bit_exact():
  params = h.to_jax(h.mixed_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, 8)]
  tx = lj.accumulate_gradients(lj.lamb(1e-2, weight_decay=0.01), K)
  step = jax.jit(h.train_step(tx))
  p, s = params, tx.init(params)
  for g in grads[:4]:  # Stop in the middle of the second cycle.
    p, s = step(p, s, g)
  blob = lj.to_bytes(s)
  p2, s2 = p, lj.from_bytes(tx.init(params), blob)
  for g in grads[4:]:
    p, s = step(p, s, g)
    p2, s2 = step(p2, s2, g)
  jax.tree.map(np.testing.assert_array_equal, (p, s), (p2, s2))


def test_lr_through_the_wrapper_and_k1_is_identity():
  params = {'w': jnp.ones(3)}
  tx = lj.accumulate_gradients(lj.lamb(0.1), 2)
  state = lj.set_lr(tx.init(params), 0.05)
  assert float(lj.get_lr(state)) == pytest.approx(0.05)
  one = lj.accumulate_gradients(lj.adam(0.1), 1)
  ref = lj.adam(0.1)
  g = {'w': jnp.array([1.0, -2.0, 3.0])}
  np.testing.assert_array_equal(
    one.update(g, one.init(params), params)[0]['w'],
    ref.update(g, ref.init(params), params)[0]['w'],
  )


@pytest.mark.parametrize('k', [0, -1, 2.5, True])
def test_bad_every_k_steps(k):
  with pytest.raises(ValueError, match=r'`every_k_steps`'):
    lj.accumulate_gradients(lj.adam(0.1), k)


ACC_TXS = {
  'lars': lambda: lj.lars(0.1, weight_decay=1e-3),
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.01),
  'adamw': lambda: lj.adamw(1e-2, weight_decay=0.01),
}


@pytest.mark.parametrize('name', sorted(ACC_TXS))
def test_accumulator_and_params_equal_multisteps_bit_for_bit(name):
  """The running mean is optax.MultiSteps' expression (``acc + (g - acc) /
  (n + 1)``), reset on the applying step: the same bits, jitted, on a tree
  with conv kernels, scalars and a zero gradient."""
  params = h.conv_tree()
  grads = h.normal_like(params, 2 * K + 1, seed=3)
  grads[1] = jax.tree.map(jnp.zeros_like, params)
  ours = lj.accumulate_gradients(ACC_TXS[name](), K)
  theirs = optax.MultiSteps(ACC_TXS[name](), K)
  for (po, so), (pt, st) in h.lockstep(ours, theirs, params, grads):
    chex.assert_trees_all_equal(so.acc_grads, st.acc_grads)
    chex.assert_trees_all_equal(po, pt)


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions"
)
@pytest.mark.parametrize('name', sorted(ACC_TXS))
def test_micro_steps_copy_nothing_and_the_callers_add_fuses(name, monkeypatch):
  """The updates leave a ``lax.cond``, so the caller's ``p + u`` fused with
  nothing: a lone add, several times slower on XLA:CPU on conv kernels. An exact
  ``-0.0`` added after the cond fuses it. The new accumulator is made
  outside the cond, after it, so it overwrites the old one in place (through
  a cond it was copied: one more read and write of it every micro-step)."""
  params = h.conv_tree()
  grads = [jax.tree.map(lambda x, i=i: 0.1 * i * x, params) for i in range(4)]
  lone, runs = {}, {}
  for on in (True, False):
    if not on:
      monkeypatch.setattr(fused_lib, 'slow_lone_ops', lambda shape: False)
    tx = lj.accumulate_gradients(ACC_TXS[name](), K)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    text = step.lower(p, s, grads[0]).compile().as_text()
    lone[on] = h.lone_adds_on_short_last_dims(text)
    copies = h.array_copies(text)
    if name != 'lars':
      assert copies == [], copies
    elif on:
      # LARS's update is its new trace: the applying branch returns both,
      # so leaves with a long last dimension (not given the -0.0) are copied
      # there, once per cycle.
      assert sorted(copies) == ['f32[3,3,16,32]', 'f32[48,64]'], copies
    for g in grads:
      p, s = step(p, s, g)
    runs[on] = (p, s)
  assert lone[True] == []
  assert len(lone[False]) == 2, lone[False]  # The check can fail.
  chex.assert_trees_all_equal(runs[True], runs[False])
