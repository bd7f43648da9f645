"""with_packed_state: the same updates as the wrapped optimizer, fewer buffers."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lambjax as lj
from tests import helpers as h

TXS = {
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.1),
  'lamb_bf16_moments': lambda: lj.lamb(
    1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
  ),
  'lamb_schedule_diagnostics': lambda: lj.lamb(
    optax.linear_schedule(1e-2, 1e-3, 5), weight_decay=0.1, diagnostics=True
  ),
  'lars': lambda: lj.lars(0.5, weight_decay=1e-3),
  'adamw': lambda: lj.adamw(1e-2),
  'adam': lambda: lj.adam(1e-2),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
  'paddle.Lamb': lambda: lj.paddle.Lamb(1e-2),
  'paddle.LarsMomentum': lambda: lj.paddle.LarsMomentum(0.1),
  'paddle.Adam_multi_precision': lambda: lj.paddle.Adam(
    1e-2, multi_precision=True
  ),
  'optax.lamb': lambda: optax.lamb(1e-2),
  'clip_then_lamb': lambda: optax.chain(
    lj.clip_by_global_norm(1.0), lj.lamb(1e-2)
  ),
}


def _state_arrays(state):
  return len(jax.tree.leaves(state))


def _ulps_close(a, b, ulps=8):
  """Equal to a few units in the last place of each leaf's dtype: XLA may
  fuse the arithmetic next to a slice or a concatenation differently (FMA
  contraction), a rounding apart, as the workspace test allows on GPUs."""
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    if not jnp.issubdtype(x.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      continue
    eps = float(jnp.finfo(x.dtype).eps)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y64).max(initial=0.0), np.finfo(np.float32).tiny)
    np.testing.assert_allclose(x64, y64, rtol=ulps * eps, atol=eps * scale)


@pytest.mark.parametrize('max_size', [1, 6, 1 << 20])
@pytest.mark.parametrize('name', sorted(TXS))
def test_same_updates(name, max_size):
  """Over several jitted steps the params equal the unwrapped optimizer's
  exactly and the (unpacked) state to a few ulp; leaves above ``max_size``
  stay unpacked."""
  params = h.to_jax(h.mixed_tree())
  if name == 'paddle.Adam_multi_precision':
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  grads = [
    jax.tree.map(lambda g, p: jnp.asarray(g, p.dtype), g, params)
    for g in h.grads_sequence(h.mixed_tree(), 4)
  ]
  plain, packed = TXS[name](), lj.with_packed_state(TXS[name](), max_size)
  (traj_a, state_a), (traj_b, state_b) = (
    h.run_steps(tx, params, grads) for tx in (plain, packed)
  )
  chex.assert_trees_all_equal(traj_b, traj_a)  # Bit for bit, so far.
  assert isinstance(state_b, lj.PackedState)
  _ulps_close(lj.unpack_state(state_b), state_a)
  # What is packed: arrays of 1 to max_size elements, by dtype.
  small = [
    x
    for x in jax.tree.leaves(state_a)
    if np.ndim(x) >= 1 and 0 < np.size(x) <= max_size
  ]
  got = {k: v.shape[0] for k, v in state_b.buffers.items()}
  want = {}
  for x in small:
    want[x.dtype.name] = want.get(x.dtype.name, 0) + x.size
  assert got == want
  assert _state_arrays(state_b) == (
    _state_arrays(state_a) - len(small) + len(want)
  )


def test_fewer_buffers_on_a_transformer_shaped_tree():
  """The point of it: BERT-like leaves' moments in 1 buffer, not hundreds."""
  shapes = {
    f'layer{i}.{k}': s
    for i in range(4)
    for k, s in [
      ('q', (64, 64)),
      ('q_bias', (64,)),
      ('ln', (64,)),
      ('ffn', (64, 256)),
    ]
  }
  shapes['embed'] = (2048, 64)
  params = {k: jnp.ones(v) for k, v in shapes.items()}
  tx = lj.with_packed_state(lj.lamb(1e-3), max_size=64 * 256)
  state = tx.init(params)
  # 2 x 17 moments -> 2 x 1 (embed, above max_size) + 1 buffer + 2 scalars.
  assert _state_arrays(lj.lamb(1e-3).init(params)) == 2 * 17 + 2
  assert _state_arrays(state) == 2 + 1 + 2
  assert state.inner[0].mu['embed'].shape == (2048, 64)


def test_jit_does_not_retrace_and_donation_works():
  params = h.to_jax(h.mixed_tree())
  tx = lj.with_packed_state(lj.lamb(1e-2, weight_decay=0.1))
  traces = []

  def step(p, s, g):
    traces.append(1)
    return h.train_step(tx)(p, s, g)

  jstep = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  for g in h.grads_sequence(h.mixed_tree(), 3):
    params, state = jstep(params, state, h.to_jax(g))
  assert len(traces) == 1
  assert all(x.dtype == jnp.float32 for x in state.buffers.values())


def test_odd_trees():
  tx = lj.with_packed_state(lj.lamb(1e-2))
  for tree in ({}, {'s': jnp.array(2.0)}, {'z': jnp.zeros((0, 3))}):
    state = tx.init(tree)
    u, state = jax.jit(tx.update)(tree, state, tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, tree)
    assert state.buffers == {}  # Scalars and empty arrays stay in place.


def test_get_lr_set_lr_see_through_it():
  p = {'w': jnp.ones((3, 2))}
  tx = lj.with_packed_state(lj.lamb(1e-2))
  state = lj.set_lr(tx.init(p), 5e-3)
  assert float(lj.get_lr(state)) == pytest.approx(5e-3)
  u, state = jax.jit(tx.update)({'w': jnp.ones((3, 2))}, state, p)
  want, _ = lj.lamb(5e-3).update(
    {'w': jnp.ones((3, 2))}, lj.lamb(5e-3).init(p), p
  )
  chex.assert_trees_all_equal(u, want)
  assert float(lj.get_lr(state)) == pytest.approx(5e-3)


def test_state_dict_round_trip():
  params = h.to_jax(h.mixed_tree())
  tx = lj.with_packed_state(lj.lamb(1e-2, weight_decay=0.1))
  _, state = h.run_steps(tx, params, [h.to_jax(h.grads_sequence(params, 1)[0])])
  for restored in (
    lj.load_state_dict(tx.init(params), lj.state_dict(state)),
    lj.from_bytes(tx.init(params), lj.to_bytes(state)),
  ):
    chex.assert_trees_all_equal(restored, state)


@pytest.mark.parametrize('outer', [True, False], ids=['outside', 'inside'])
def test_apply_if_finite_skips_a_nan_step(outer):
  params = h.to_jax(h.mixed_tree())
  inner = lj.lamb(1e-2, weight_decay=0.1)
  tx = (
    lj.apply_if_finite(lj.with_packed_state(inner), 2)
    if outer
    else lj.with_packed_state(lj.apply_if_finite(inner, 2))
  )
  state = tx.init(params)
  g = h.to_jax(h.grads_sequence(params, 1)[0])
  _, state = jax.jit(tx.update)(g, state, params)
  g_bad = jax.tree.map(lambda x: x.at[...].set(jnp.nan), g)
  u, new_state = jax.jit(tx.update)(g_bad, state, params)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
  # The inner state is left bit-identical, packed or not.
  new, old = lj.unpack_state(new_state), lj.unpack_state(state)
  chex.assert_trees_all_equal(new.inner_state, old.inner_state)
  assert int(new.total_notfinite) == 1


def test_diagnostics_see_through_it():
  params = {'blocks': jnp.ones((3, 4, 5)), 'b': jnp.ones(5)}
  tx = lj.with_packed_state(
    lj.lamb(1e-2, diagnostics=True, stacked=lj.Stacked('blocks'))
  )
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  plain = lj.lamb(1e-2, diagnostics=True, stacked=lj.Stacked('blocks'))
  _, want = plain.update(
    jax.tree.map(jnp.ones_like, params), plain.init(params), params
  )
  chex.assert_trees_all_equal(lj.diagnostics(state), lj.diagnostics(want))


@pytest.mark.parametrize('zero_axis', [None, 'data'])
def test_state_sharding(zero_axis):
  """Large arrays keep their parameter's sharding; buffers are replicated;
  the shardings fit jit's out_shardings."""
  mesh = Mesh(jax.devices()[:1], ('data',))
  params = {'w': jnp.ones((64, 8)), 'b': jnp.ones(8)}
  shard = {'w': NamedSharding(mesh, P('data')), 'b': NamedSharding(mesh, P())}
  tx = lj.with_packed_state(lj.lamb(1e-2), max_size=100)
  s = lj.state_sharding(tx, params, shard, zero_axis=zero_axis)
  assert s.buffers['float32'].spec == P()
  want = P('data') if zero_axis is None else P('data', None)
  assert s.inner[0].mu['w'].spec == want
  state = jax.jit(tx.init, out_shardings=s)(params)
  step = jax.jit(h.train_step(tx), out_shardings=(shard, s))
  params, state = step(params, state, params)
  assert state.buffers['float32'].shape == (16,)


def test_flax_train_state():
  from flax.training import train_state

  params = h.to_jax(h.mixed_tree())
  tx = lj.with_packed_state(lj.lamb(1e-2, weight_decay=0.1))
  ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  g = h.to_jax(h.grads_sequence(params, 1)[0])
  ts = jax.jit(lambda ts, g: ts.apply_gradients(grads=g))(ts, g)
  want, _ = h.run_steps(lj.lamb(1e-2, weight_decay=0.1), params, [g])
  chex.assert_trees_all_equal(ts.params, want[0])


def test_keys_and_integer_arrays_in_the_state():
  """Typed PRNG keys stay in place; integer arrays get their own buffer."""

  def init(params):
    return {'key': jax.random.key(0), 'steps': jnp.zeros((2,), jnp.int32)}

  def update(updates, state, params=None):
    key, sub = jax.random.split(state['key'])
    noise = jax.tree.map(
      lambda u: jax.random.normal(sub, u.shape, u.dtype), updates
    )
    new = {'key': key, 'steps': state['steps'] + 1}
    return jax.tree.map(jnp.add, updates, noise), new

  plain = optax.GradientTransformation(init, update)
  tx = lj.with_packed_state(plain)
  p = {'w': jnp.ones(3)}
  state = tx.init(p)
  assert sorted(state.buffers) == ['int32']
  u, state = jax.jit(tx.update)(p, state)
  want, want_state = jax.jit(plain.update)(p, plain.init(p))
  chex.assert_trees_all_equal(u, want)
  got_state = lj.unpack_state(state)
  np.testing.assert_array_equal(got_state['steps'], want_state['steps'])
  np.testing.assert_array_equal(
    jax.random.key_data(got_state['key']),
    jax.random.key_data(want_state['key']),
  )


def test_a_state_that_changes_dtype_is_refused():
  def init(params):
    return {'m': jnp.zeros((3,), jnp.float32)}

  def update(updates, state, params=None):
    return updates, {'m': state['m'].astype(jnp.bfloat16)}

  tx = lj.with_packed_state(optax.GradientTransformation(init, update))
  with pytest.raises(ValueError, match=r'float32\[3\] to bfloat16\[3\]'):
    tx.update({'w': jnp.ones(3)}, tx.init({'w': jnp.ones(3)}))
