"""The fused fast path equals the building-block chain (the specification)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h


def _sched(c):
  return 0.02 * jnp.minimum(1.0, (c + 1) / 5.0)


CONFIGS = {
  'lamb': lambda f: lj.lamb(1e-2, weight_decay=0.01, fused=f),
  'lamb_masks_clamp_ratio': lambda f: lj.lamb(
    _sched,
    weight_decay=0.05,
    mask=lj.mask_by_name('kernel|embeddings'),
    trust_ratio_mask=lj.mask_by_name('kernel'),
    min_ratio=0.1,
    max_ratio=5.0,
    lr_ratio_fn=lambda n: 0.5 if 'layers.0' in n else 1.0,
    fused=f,
  ),
  'lamb_bf16_moments': lambda f: lj.lamb(
    1e-2,
    weight_decay=0.01,
    mu_dtype=jnp.bfloat16,
    nu_dtype=jnp.bfloat16,
    fused=f,
  ),
  'adam': lambda f: lj.adam(_sched, b1=0.8, eps_root=1e-8, fused=f),
  'adamw': lambda f: lj.adamw(
    1e-2, weight_decay=0.1, mask=lj.mask_by_name('kernel'), fused=f
  ),
  'adamw_dl': lambda f: lj.adamw_dl(
    1e-2, layerwise_decay=0.7, n_layers=2, fused=f
  ),
  'lars': lambda f: lj.lars(
    0.5, weight_decay=0.01, trust_coefficient=0.1, fused=f
  ),
  'lars_masks_nesterov': lambda f: lj.lars(
    _sched,
    weight_decay=0.02,
    weight_decay_mask=lj.mask_by_name('kernel'),
    trust_ratio_mask=lj.mask_by_name('kernel|emb'),
    nesterov=True,
    eps=1e-4,
    min_ratio=0.01,
    fused=f,
  ),
  'lars_paddle': lambda f: lj.lars(
    0.5,
    weight_decay=0.01,
    trust_coefficient=0.05,
    trust_ratio_form='paddle',
    weight_decay_mask=lj.mask_by_name('kernel'),
    fused=f,
  ),
}


def _big_tree(seed=0):
  """The mixed tree plus a leaf large enough for LARS's expanded norms."""
  tree = h.mixed_tree(seed)
  tree['big_kernel'] = np.random.default_rng(seed).normal(size=(80, 64))
  return tree


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fused_equals_chain(name, use_jit):
  params = _big_tree()
  grads = h.grads_sequence(params, 8, seed=3)
  fast, chain = CONFIGS[name](True), CONFIGS[name](False)
  trajs, states = [], []
  for tx in (fast, chain):
    p = h.to_jax(params)
    s = tx.init(p)
    update = jax.jit(tx.update) if use_jit else tx.update
    traj = []
    for g in grads:
      u, s = update(h.to_jax(g), s, p)
      p = optax.apply_updates(p, u)
      traj.append(p)
    trajs.append(traj)
    states.append(s)
  # Under jit both compile to the same arithmetic up to fusion: 1e-6. Eager
  # op-by-op float32 rounding differs by ~1e-7 absolute, which is up to 5e-6
  # of the zero-initialised bias's small trajectory.
  tol = 1e-6 if use_jit else 1e-5
  assert h.trajectory_rel_err(trajs[0], trajs[1]) < tol
  # Same state structure, shapes and dtypes: checkpoints are interchangeable.
  chex.assert_trees_all_equal_structs(states[0], states[1])
  chex.assert_trees_all_equal_shapes_and_dtypes(states[0], states[1])
  chex.assert_trees_all_close(states[0], states[1], rtol=1e-5, atol=1e-7)
  loaded = lj.load_state_dict(
    CONFIGS[name](False).init(h.to_jax(params)), lj.state_dict(states[0])
  )
  chex.assert_trees_all_equal(loaded, states[0])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fused_equals_chain_bf16_params(name):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _big_tree(1))
  g = jax.tree.map(
    lambda x: jnp.asarray(x, jnp.bfloat16),
    h.grads_sequence(params, 1, seed=5)[0],
  )
  outs = []
  for fused in (True, False):
    tx = CONFIGS[name](fused)
    u, s = jax.jit(tx.update)(g, tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(u, params)
    outs.append(u)
  chex.assert_trees_all_close(outs[0], outs[1], rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fused_odd_trees(name):
  tx = CONFIGS[name](True)
  for tree in ({}, {'s': jnp.array(0.0)}, {'z': jnp.zeros((3, 2))}):
    u, _ = jax.jit(tx.update)(tree, tx.init(tree), tree)
    chex.assert_tree_all_finite(u)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, tree)


def test_lars_expanded_norm_falls_back_on_cancellation():
  """g = -wd * p exactly (the weight-decay equilibrium): d = 0, no NaN."""
  p = {
    'w': jnp.asarray(
      np.random.default_rng(0).normal(size=(128, 64)), jnp.float32
    )
  }
  g = {'w': -0.01 * p['w'] + 1e-6}
  outs = []
  for fused in (True, False):
    tx = lj.lars(0.5, weight_decay=0.01, fused=fused)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    chex.assert_tree_all_finite(u)
    outs.append(u)
  chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize('name', ['lamb', 'lars', 'lars_paddle', 'adamw_dl'])
def test_grad_through_update_is_finite_at_zero_norms(name):
  """Meta-gradients through a step: no NaN at zero params / zero grads."""
  params = {
    'zero': jnp.zeros((3, 2)),
    'w': jnp.ones((2, 2)),
    's': jnp.array(0.0),
  }
  g = {'zero': jnp.zeros((3, 2)), 'w': jnp.ones((2, 2)), 's': jnp.array(0.0)}
  tx = CONFIGS[name](True)

  def loss(params):
    u, _ = tx.update(g, tx.init(params), params)
    new = optax.apply_updates(params, u)
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(new))

  grads = jax.grad(loss)(params)
  chex.assert_tree_all_finite(grads)


def test_fast_path_writes_no_update_sized_temporary_for_lars():
  shapes = {'w': (1024, 1024)}
  p = {k: jnp.ones(v) for k, v in shapes.items()}
  temps = {}
  for fused in (True, False):
    tx = lj.lars(0.1, weight_decay=1e-4, fused=fused)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    c = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()
    temps[fused] = c.memory_analysis().temp_size_in_bytes
  assert temps[True] < 0.25 * 4 * 1024 * 1024 <= temps[False]
