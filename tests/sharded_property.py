"""Property: sharded equals single device, on 8 simulated devices.

Run by tests/test_sharding.py as its own pytest process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax
starts), with hypothesis statistics shown. Hypothesis draws the optimizer,
the layout (replicated, FSDP, ZeRO-1), the tree (shapes that 8 divides or
not, a 0-d leaf, a zero leaf), the values and the learning rate (set with
``lj.set_lr``, so compiled steps are reused across examples).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lambjax as lj

OPTS = {
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.01),
  'lamb_masked': lambda: lj.lamb(
    1e-2,
    weight_decay=0.01,
    mask=lj.mask_by_name('kernel'),
    trust_ratio_mask=lj.mask_by_name('kernel'),
    min_ratio=0.01,
    max_ratio=10.0,
  ),
  'lars': lambda: lj.lars(0.5, weight_decay=1e-3, trust_coefficient=0.1),
  'lars_paddle': lambda: lj.lars(
    0.5, weight_decay=1e-3, trust_ratio_form='paddle'
  ),
  'adamw': lambda: lj.adamw(1e-2),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
  'paddle.Lamb': lambda: lj.paddle.Lamb(
    1e-2, grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0)
  ),
  'paddle.LarsMomentum': lambda: lj.paddle.LarsMomentum(0.5),
}
TREES = {
  'divisible': {
    'layers_0': {'kernel': (16, 8), 'bias': (8,)},
    'layers_1': {'kernel': (8, 24), 'bias': (24,)},
    'scale': (),
  },
  'odd': {
    'layers_0': {'kernel': (3, 5), 'bias': (5,)},
    'embeddings': (40, 3),
    'scale': (),
  },
}
LAYOUTS = ('replicated', 'fsdp', 'zero1')
STEPS = 2


@functools.cache
def _mesh():
  devices = jax.devices()
  assert len(devices) == 8, 'run with 8 devices (see tests/test_sharding.py)'
  return Mesh(np.array(devices), ('data',))


def _fsdp(shape):
  for d, n in enumerate(shape):
    if n % 8 == 0:
      spec = [None] * len(shape)
      spec[d] = 'data'
      return NamedSharding(_mesh(), P(*spec))
  return NamedSharding(_mesh(), P())


def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _shapes(tree):
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
    TREES[tree],
    is_leaf=lambda x: isinstance(x, tuple),
  )


@functools.cache
def _compiled(opt, tree, layout):
  """(tx, step, params sharding, state sharding), built once per key."""
  tx = OPTS[opt]()
  if layout is None:
    return tx, jax.jit(_step(tx)), None, None
  shapes = _shapes(tree)
  if layout == 'fsdp':
    p_shard = jax.tree.map(lambda x: _fsdp(x.shape), shapes)
  else:
    p_shard = jax.tree.map(lambda _: NamedSharding(_mesh(), P()), shapes)
  zero = 'data' if layout == 'zero1' else None
  s_shard = lj.state_sharding(tx, shapes, p_shard, zero_axis=zero)
  step = jax.jit(
    _step(tx),
    in_shardings=(p_shard, s_shard, p_shard),
    out_shardings=(p_shard, s_shard),
  )
  return tx, step, p_shard, s_shard


def _run(opt, tree, layout, params, grads, lr):
  tx, step, p_shard, s_shard = _compiled(opt, tree, layout)
  state = lj.set_lr(tx.init(params), lr)
  if p_shard is not None:
    params = jax.device_put(params, p_shard)
    state = jax.device_put(state, s_shard)
    grads = [jax.device_put(g, p_shard) for g in grads]
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@settings(max_examples=200, deadline=None, database=None)
@given(
  opt=st.sampled_from(sorted(OPTS)),
  tree=st.sampled_from(sorted(TREES)),
  layout=st.sampled_from(LAYOUTS),
  seed=st.integers(0, 2**31 - 1),
  lr=st.floats(1e-4, 1.0),
  zero_leaf=st.booleans(),
)
def test_sharded_equals_single_device(opt, tree, layout, seed, lr, zero_leaf):
  rng = np.random.default_rng(seed)
  shapes = _shapes(tree)
  params = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), shapes
  )
  if zero_leaf:  # A zero-norm leaf: trust ratio fallbacks must agree too.
    params['layers_0']['bias'] = jnp.zeros_like(params['layers_0']['bias'])
  grads = [
    jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), shapes
    )
    for _ in range(STEPS)
  ]
  want, _ = _run(opt, tree, None, params, grads, lr)
  got, state = _run(opt, tree, layout, params, grads, lr)
  leaves = zip(
    jax.tree.leaves(got),
    jax.tree.leaves(want),
    jax.tree.leaves(params),
    strict=True,
  )
  for a, b, p0 in leaves:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # Relative to the larger of the result and the starting params: with lr
    # near 1, LAMB on a scalar leaf (r and p collinear) takes p to p (1 - lr)
    # each step, so the result can be ~1e-10 of the params it came from, and
    # float32 rounding is relative to those (seed 665, lr 0.99999: 6.7e-11
    # out of 0.68, the two layouts 4.5e-13 apart).
    scale = max(float(np.max(np.abs(b))), float(np.max(np.abs(p0))), 1e-30)
    assert float(np.max(np.abs(a - b))) / scale <= 1e-5, (opt, layout)
  # The state comes out with the shardings asked for.
  s_shard = _compiled(opt, tree, layout)[3]
  wanted = jax.tree.leaves(
    s_shard, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )
  for x, w in zip(jax.tree.leaves(state), wanted, strict=True):
    assert x.sharding.is_equivalent_to(w, x.ndim), (opt, layout)
