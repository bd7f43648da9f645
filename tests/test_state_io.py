"""state_dict / load_state_dict, msgpack files, orbax, exact resume."""

from __future__ import annotations

import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h

OPTIMIZERS = {
  'lamb': lambda: lj.lamb(
    1e-2, weight_decay=0.1, mask=lj.mask_by_name('kernel')
  ),
  'lars': lambda: lj.lars(0.5, weight_decay=1e-3),
  'adam': lambda: lj.adam(lj.schedules.step_decay(1e-2, 3, 0.5)),
  'adamw': lambda: lj.adamw(1e-2),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
}


def _leaves_are_plain(tree):
  for x in jax.tree.leaves(tree):
    assert isinstance(x, np.ndarray | str | int | float), type(x)


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_round_trip_and_exact_resume(name, tmp_path):
  tx = OPTIMIZERS[name]()
  params = h.to_jax(h.mixed_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, 8)]
  step = jax.jit(h.train_step(tx))

  # Uninterrupted run.
  p, s = params, tx.init(params)
  for g in grads:
    p, s = step(p, s, g)
  p_full = p

  # Interrupted after 3 steps: save params and state, restore, continue.
  p, s = params, tx.init(params)
  for g in grads[:3]:
    p, s = step(p, s, g)
  sd = lj.state_dict(s)
  _leaves_are_plain(sd)
  lj.save_state(tmp_path / 'opt.msgpack', s)
  p_saved = jax.tree.map(np.asarray, p)
  del p, s
  template = tx.init(params)
  s = lj.load_state(tmp_path / 'opt.msgpack', template)
  chex.assert_trees_all_equal(lj.load_state_dict(template, sd), s)
  chex.assert_trees_all_equal_structs(s, template)
  p = jax.tree.map(jnp.asarray, p_saved)
  for g in grads[3:]:
    p, s = step(p, s, g)
  chex.assert_trees_all_equal(p, p_full)  # Bit for bit.


def test_rejects_another_optimizers_state_and_wrong_shapes():
  params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
  lamb_state = lj.lamb(1e-3).init(params)
  adamw_sd = lj.state_dict(lj.adamw(1e-3).init(params))
  with pytest.raises(ValueError, match=r"at '\d"):
    lj.load_state_dict(lamb_state, adamw_sd)
  # Same layout, different state class: caught by the type tag.
  adam_sd = lj.state_dict(lj.adam(1e-3).init(params))
  sgd_like = lj.state_dict(
    optax.chain(optax.scale_by_rms(), lj.scale_by_learning_rate(1e-3)).init(
      params
    )
  )
  with pytest.raises(ValueError, match="'0'.*ScaleByRmsState"):
    lj.load_state_dict(lj.adam(1e-3).init(params), sgd_like)
  wrong = lj.state_dict(
    lj.adam(1e-3).init({'w': jnp.ones((2, 4)), 'b': jnp.zeros(3)})
  )
  with pytest.raises(ValueError, match=r"'0\.mu\.w'.*shape"):
    lj.load_state_dict(lj.adam(1e-3).init(params), wrong)
  bf16 = lj.state_dict(lj.adam(1e-3, mu_dtype=jnp.bfloat16).init(params))
  with pytest.raises(ValueError, match=r"'0\.mu\.[bw]'.*dtype"):
    lj.load_state_dict(lj.adam(1e-3).init(params), bf16)
  missing = dict(adam_sd)
  del missing['1']
  with pytest.raises(ValueError, match="'1'.*missing"):
    lj.load_state_dict(lj.adam(1e-3).init(params), missing)


def test_bf16_state_survives_msgpack():
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  tx = lj.adam(1e-3)
  s = tx.update(params, tx.init(params), params)[1]
  back = lj.from_bytes(tx.init(params), lj.to_bytes(s))
  chex.assert_trees_all_equal(back, s)
  assert back[0].mu['w'].dtype == jnp.bfloat16


def test_bad_files_raise_clear_errors(tmp_path):
  params = {'w': jnp.ones(3)}
  tx = lj.lamb(1e-3)
  state = tx.init(params)
  path = tmp_path / 'opt.msgpack'
  lj.save_state(path, state)
  data = path.read_bytes()
  for i, bad in enumerate(
    [data[: len(data) // 2], b'', b'\x00garbage', pickle.dumps({'x': 1})]
  ):
    p = tmp_path / f'bad{i}'
    p.write_bytes(bad)
    with pytest.raises(ValueError, match='bad'):
      lj.load_state(p, state)
  flipped = bytearray(data)
  flipped[len(flipped) // 2] ^= 0xFF  # In the payload: caught by SHA-256.
  p = tmp_path / 'flipped'
  p.write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match='flipped'):
    lj.load_state(p, state)


def test_orbax_round_trip_of_train_state(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  from flax.training import train_state

  params = h.to_jax(h.mixed_tree())
  ts = train_state.TrainState.create(
    apply_fn=None, params=params, tx=lj.lamb(1e-2, weight_decay=0.1)
  )
  g = h.to_jax(h.grads_sequence(params, 1)[0])
  ts = ts.apply_gradients(grads=g)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', ts)
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, ts)
    restored = ckpt.restore(tmp_path / 'ckpt', target)
  chex.assert_trees_all_equal(restored.opt_state, ts.opt_state)
  chex.assert_trees_all_equal(restored.params, ts.params)
  assert float(lj.get_lr(restored.opt_state)) == pytest.approx(1e-2)
