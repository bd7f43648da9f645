"""Parameter names and name-based masks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

import lambjax as lj


class _Pair(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def test_contract_examples():
  tree = {'encoder': {'layers': [{'weight': jnp.ones(1)}]}}
  assert lj.tree_names(tree) == {
    'encoder': {'layers': [{'weight': 'encoder.layers.0.weight'}]}
  }
  params = {'params': {'Dense_0': {'kernel': jnp.ones((2, 2))}}}
  assert lj.tree_names(params) == {
    'params': {'Dense_0': {'kernel': 'params.Dense_0.kernel'}}
  }


def test_tuples_namedtuples_frozendict_and_scalars():
  tree = {
    'a': (jnp.ones(1), _Pair(jnp.ones(1), jnp.ones(1))),
    'f': FrozenDict({'x': jnp.ones(())}),
  }
  names = jax.tree.leaves(lj.tree_names(tree))
  assert names == ['a.0', 'a.1.kernel', 'a.1.bias', 'f.x']
  assert lj.tree_names(jnp.ones(2)) == ''
  assert lj.tree_names({}) == {}


def test_linen_model_names():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm(name='norm')(nn.Dense(3, name='dense')(x))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = Block(name=f'layers_{i}')(x)
      return x

  params = Model().init(jax.random.key(0), jnp.ones((1, 3)))
  names = set(jax.tree.leaves(lj.tree_names(params)))
  assert 'params.layers_1.dense.kernel' in names
  assert 'params.layers_0.norm.scale' in names


def test_nnx_state_names_equal_for_variables_and_arrays():
  class M(nnx.Module):
    def __init__(self):
      self.layers = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])

  state = nnx.state(M(), nnx.Param)
  with_vars = jax.tree.leaves(lj.tree_names(state))
  arrays = nnx.as_pure(state)  # What nnx.Optimizer passes to update.
  assert not any(
    lj._src.base.is_nnx_variable(x)
    for x in jax.tree.leaves(arrays, is_leaf=lambda x: True)
  )
  assert sorted(with_vars) == ['layers.0.bias', 'layers.0.kernel']
  assert sorted(jax.tree.leaves(lj.tree_names(arrays))) == sorted(with_vars)


def test_mask_by_name_in_optax_masked():
  params = {
    'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
    'norm': {'scale': jnp.ones(2)},
  }
  mask = lj.mask_by_name(lambda n: n.endswith('kernel'))
  assert mask(params) == {
    'dense': {'kernel': True, 'bias': False},
    'norm': {'scale': False},
  }
  tx = optax.masked(optax.scale(0.0), mask)
  out, _ = tx.update(params, tx.init(params))
  assert float(out['dense']['kernel'].sum()) == 0.0
  assert float(out['dense']['bias'].sum()) == 2.0
  assert lj.mask_by_name('^norm')(params)['norm']['scale'] is True
