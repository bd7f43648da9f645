"""Bad input gets a clear ValueError naming the argument / path and value."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import lambjax as lj

BAD_HYPERPARAMS = [
  (lj.lamb, dict(learning_rate=0.1, b1=-0.1), 'b1', '-0.1'),
  (lj.lamb, dict(learning_rate=0.1, b1=1.0), 'b1', '1.0'),
  (lj.adam, dict(learning_rate=0.1, b2=1.5), 'b2', '1.5'),
  (lj.adamw, dict(learning_rate=0.1, b2=-1e-3), 'b2', '-0.001'),
  (lj.adamw_dl, dict(learning_rate=0.1, b1=2.0), 'b1', '2.0'),
  (lj.lamb, dict(learning_rate=0.1, eps=-1e-6), 'eps', '-1e-06'),
  (lj.adam, dict(learning_rate=0.1, eps=-1.0), 'eps', '-1.0'),
  (lj.lars, dict(learning_rate=0.1, eps=-1.0), 'eps', '-1.0'),
  (
    lj.lamb,
    dict(learning_rate=0.1, weight_decay=-0.01),
    'weight_decay',
    '-0.01',
  ),
  (
    lj.adamw,
    dict(learning_rate=0.1, weight_decay=-1.0),
    'weight_decay',
    '-1.0',
  ),
  (
    lj.adamw_dl,
    dict(learning_rate=0.1, weight_decay=-1.0),
    'weight_decay',
    '-1.0',
  ),
  (lj.lars, dict(learning_rate=0.1, weight_decay=-1.0), 'weight_decay', '-1.0'),
  (
    lj.lars,
    dict(learning_rate=0.1, weight_decay=-1.0, trust_ratio_form='paddle'),
    'weight_decay',
    '-1.0',
  ),
  (lj.lars, dict(learning_rate=0.1, momentum=-0.5), 'momentum', '-0.5'),
  (
    lj.lars,
    dict(learning_rate=0.1, trust_coefficient=-1.0),
    'trust_coefficient',
    '-1.0',
  ),
  (
    lj.lars,
    dict(learning_rate=0.1, trust_ratio_form='lamb'),
    'trust_ratio_form',
    "'lamb'",
  ),
  (lj.adamw_dl, dict(learning_rate=0.1, n_layers=0), 'n_layers', '0'),
  (lj.adamw_dl, dict(learning_rate=0.1, n_layers=2.5), 'n_layers', '2.5'),
  (
    lj.adamw_dl,
    dict(learning_rate=0.1, layerwise_decay=0.0),
    'layerwise_decay',
    '0.0',
  ),
  (
    lj.adamw_dl,
    dict(learning_rate=0.1, layerwise_decay=-0.5),
    'layerwise_decay',
    '-0.5',
  ),
  (lj.lamb, dict(learning_rate=-0.1), 'learning_rate', '-0.1'),
  (lj.lamb, dict(learning_rate=float('nan')), 'learning_rate', 'nan'),
  (
    lj.lamb,
    dict(learning_rate=0.1, min_ratio=2.0, max_ratio=1.0),
    'min_ratio',
    '2.0',
  ),
  (lj.lamb, dict(learning_rate=0.1, max_ratio=-1.0), 'max_ratio', '-1.0'),
  (lj.lamb, dict(learning_rate='0.1'), 'learning_rate', "'0.1'"),
]


@pytest.mark.parametrize(
  'fn,kwargs,arg,value',
  BAD_HYPERPARAMS,
  ids=[f'{f.__name__}-{a}={v}' for f, _, a, v in BAD_HYPERPARAMS],
)
def test_bad_hyperparameter_raises_at_construction(fn, kwargs, arg, value):
  with pytest.raises(ValueError) as info:
    fn(**kwargs)
  msg = str(info.value)
  assert f'`{arg}`' in msg, msg
  assert value in msg, msg


@pytest.mark.parametrize(
  'factory,kwargs',
  [
    (lj.clip_by_global_norm, dict(max_norm=-1.0)),
    (lj.clip_by_norm, dict(max_norm=-0.5)),
    (lj.clip_by_value, dict(max=0.1, min=0.5)),
    (lj.layerwise_lr_decay, dict(decay_rate=0.0, n_layers=2, name='x')),
    (lj.scale_by_lr_ratio, dict(lr_ratio_fn=0.5)),
    (lj.mask_by_name, dict(predicate=3)),
  ],
)
def test_bad_building_block_arguments(factory, kwargs):
  arg = next(iter(kwargs)) if factory is not lj.clip_by_value else 'min'
  arg = {'decay_rate': 'layerwise_decay'}.get(arg, arg)
  with pytest.raises(ValueError, match=re.escape(f'`{arg}`')):
    factory(**kwargs)


def test_bad_lr_ratio_value_names_the_leaf():
  tx = lj.adamw(0.1, lr_ratio_fn=lambda n: -1.0 if n == 'b' else 1.0)
  p = {'a': jnp.ones(2), 'b': jnp.ones(2)}
  with pytest.raises(ValueError, match=r"lr_ratio_fn\('b'\)"):
    tx.update(p, tx.init(p), p)


@pytest.mark.parametrize('fn', [lj.lamb, lj.lars, lj.adamw, lj.adamw_dl])
def test_update_without_params_says_so(fn):
  tx = fn(0.1)
  p = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match='params'):
    tx.update(p, tx.init(p))


def test_adam_without_params_is_fine():
  tx = lj.adam(0.1)
  p = {'w': jnp.ones(2)}
  u, _ = tx.update(p, tx.init(p))
  assert u['w'].shape == (2,)


@pytest.mark.parametrize(
  'fn', [lj.lamb, lj.lars, lj.adam, lj.adamw, lj.adamw_dl]
)
def test_grads_tree_differs_from_state_names_first_path(fn):
  tx = fn(0.1)
  params = {
    'enc': {'layers': [{'w': jnp.ones(2)}, {'w': jnp.ones(3)}]},
    'head': jnp.ones(2),
  }
  state = tx.init(params)
  missing = {'enc': {'layers': [{'w': jnp.ones(2)}]}, 'head': jnp.ones(2)}
  with pytest.raises(ValueError, match=r"'enc\.layers\.1\.w'"):
    tx.update(missing, state, params)
  extra = {
    'enc': {'layers': [{'w': jnp.ones(2)}, {'w': jnp.ones(3)}]},
    'head': jnp.ones(2),
    'new': jnp.ones(1),
  }
  with pytest.raises(ValueError, match=r"'new'"):
    tx.update(extra, state, params)
  wrong_shape = {
    'enc': {'layers': [{'w': jnp.ones(2)}, {'w': jnp.ones(4)}]},
    'head': jnp.ones(2),
  }
  with pytest.raises(ValueError, match=r"'enc\.layers\.1\.w'.*\(4,\)"):
    tx.update(wrong_shape, state, params)
  if fn is lj.adam:  # No params: compared against the state.
    with pytest.raises(ValueError, match=r"'enc\.layers\.1\.w'"):
      tx.update(missing, state)


@pytest.mark.parametrize(
  'fn', [lj.lamb, lj.lars, lj.adam, lj.adamw, lj.adamw_dl]
)
@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_, np.int64])
def test_integer_leaves_are_rejected_at_init(fn, dtype):
  params = {'w': jnp.ones(2), 'step': np.zeros((), dtype)}
  with pytest.raises(ValueError, match=r"'step'.*floating point"):
    fn(0.1).init(params)


def test_set_lr_with_schedule_raises():
  tx = lj.lamb(lambda c: 0.1)
  with pytest.raises(ValueError, match='schedule'):
    lj.set_lr(tx.init(jnp.ones(2)), 0.5)


def test_get_lr_on_foreign_state_raises():
  import optax

  with pytest.raises(ValueError, match='no learning rate'):
    lj.get_lr(optax.sgd(0.1).init(jnp.ones(2)))
