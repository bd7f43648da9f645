"""``group_small_leaves=True``: small leaves' state stacked by shape.

The chain (``fused=False``, per-leaf state) is the reference: the grouped
step must give its params, and :func:`lambjax.unpack_state` its state.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from lambjax._src import grouping
from tests import helpers as h
from tests.test_fused import SPECS


def _tree(seed=0, n_layers=2):
  """Layers of same-shape kernels, biases and LayerNorm scales (groups), a
  zero-norm kernel, two 0-d scalars, a frozen leaf, an empty leaf and a
  large kernel (never grouped)."""
  rng = np.random.default_rng(seed)
  return {
    'encoder': {
      'layers': [
        {
          'kernel': rng.normal(size=(4, 3)),
          'bias': np.zeros(3) if i == 0 else rng.normal(size=3),
          'LayerNorm': {'scale': 1 + 0.1 * rng.normal(size=3)},
        }
        for i in range(n_layers)
      ],
    },
    'embeddings': rng.normal(size=(6, 4)),
    'zero_kernel': np.zeros((4, 3)),
    'scale': np.array(1.5),
    'other_scale': np.array(-0.5),
    'frozen': rng.normal(size=(2, 2)),  # Its gradient is always zero.
    'empty': np.zeros((0, 3)),
    'big_kernel': rng.normal(size=(80, 64)),
  }


def _grouped_state(state):
  """The GroupedState inside ``state`` (wrappers such as diagnostics or
  inject_hyperparams keep it inside theirs)."""
  found = [
    x
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, lj.GroupedState)
    )
    if isinstance(x, lj.GroupedState)
  ]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize('name', sorted(SPECS))
def test_grouped_equals_chain(name):
  fn, kw, _ = SPECS[name]
  params = h.to_jax(_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(_tree(), 6, seed=3)]
  got, state = h.run_steps(fn(**kw, group_small_leaves=True), params, grads)
  want, chain_state = h.run_steps(fn(**kw, fused=False), params, grads)
  assert h.trajectory_rel_err(got, want) < 1e-6
  grouped = _grouped_state(state)
  # Kernels, biases and LayerNorm scales of the layers; the scalars.
  assert len(grouped.stacks) >= 3
  unpacked = lj.unpack_state(state)
  chex.assert_trees_all_equal_structs(unpacked, chain_state)
  chex.assert_trees_all_equal_shapes_and_dtypes(unpacked, chain_state)
  chex.assert_trees_all_close(unpacked, chain_state, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', ['lamb', 'lars', 'adamw'])
def test_grouped_equals_chain_with_bf16_params(name):
  fn, kw, _ = SPECS[name]
  params = h.to_jax(_tree(), jnp.bfloat16)
  grads = [h.to_jax(g, jnp.bfloat16) for g in h.grads_sequence(_tree(), 3)]
  got, _ = h.run_steps(fn(**kw, group_small_leaves=True), params, grads)
  want, _ = h.run_steps(fn(**kw, fused=False), params, grads)
  chex.assert_trees_all_equal_dtypes(got[-1], params)
  chex.assert_trees_all_close(got, want, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(
  'name', ['lamb_masks_clamp_ratio', 'lars_masks_nesterov', 'adamw']
)
def test_grouped_under_inject_hyperparams(name):
  fn, kw, static = SPECS[name]
  params = h.to_jax(_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(_tree(), 4, seed=5)]
  injected = optax.inject_hyperparams(fn, static_args=static)
  got, state = h.run_steps(
    injected(**kw, group_small_leaves=True), params, grads
  )
  want, _ = h.run_steps(injected(**kw, fused=False), params, grads)
  assert h.trajectory_rel_err(got, want) < 1e-6
  _grouped_state(state)


def test_grouped_diagnostics_record_each_leafs_ratio():
  kw = dict(learning_rate=1e-2, weight_decay=0.01)
  params = h.to_jax(_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(_tree(), 2)]
  _, state = h.run_steps(
    lj.lamb(**kw, diagnostics=True, group_small_leaves=True), params, grads
  )
  _, ref = h.run_steps(
    lj.lamb(**kw, diagnostics=True, fused=False), params, grads
  )
  chex.assert_trees_all_close(
    lj.diagnostics(state), lj.diagnostics(ref), rtol=1e-5, atol=1e-7
  )


@pytest.mark.parametrize('fn', [lj.lamb, lj.lars, lj.adam])
def test_grouped_no_retrace_donated_and_odd_trees(fn):
  """One trace per tree; donated buffers all reused; trees with nothing to
  group, only scalars, empty leaves and zero-norm leaves."""
  traces = []
  tx = fn(1e-2, group_small_leaves=True)
  ref_tx = fn(1e-2, fused=False)

  def step(p, s, g):
    traces.append(1)
    return h.train_step(tx)(p, s, g)

  jitted = jax.jit(step, donate_argnums=(0, 1))
  for tree in (
    {},
    {'s': jnp.float32(2.0), 't': jnp.float32(-1.0), 'u': jnp.float32(0.0)},
    {'z': jnp.zeros((3, 2)), 'y': jnp.zeros((3, 2)), 'e': jnp.zeros((0, 4))},
    {'w': jnp.ones((2, 3), jnp.bfloat16), 'v': jnp.ones((2, 3), jnp.bfloat16)},
    {'a': jnp.ones(5), 'b': jnp.arange(5.0), 'big': jnp.ones(5000)},
  ):
    traces.clear()
    grads = [
      jax.tree.map(lambda x, k=k: (k + 1.0) * jnp.ones_like(x), tree)
      for k in range(3)
    ]
    s = tx.init(tree)
    p = jax.tree.map(jnp.copy, tree)
    for g in grads:
      p, s = jitted(p, s, g)
    assert len(traces) == 1
    ref, _ = h.run_steps(ref_tx, tree, grads)
    chex.assert_trees_all_equal_shapes_and_dtypes(p, tree)
    chex.assert_trees_all_close(p, ref[-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('fn', [lj.lamb, lj.lars])
def test_grouped_eager_numpy_leaves(fn):
  """Without jit, numpy leaves (vectors and 0-d) are grouped (stacked) as
  jax arrays are, and the update equals the chain's."""
  for tree in (
    {f'w{i}': np.full((3,), 0.1 * (i + 1), np.float32) for i in range(4)},
    {f'w{i}': np.float32(0.1 * (i + 1)) for i in range(4)},
  ):
    grads = jax.tree.map(lambda x: 1.5 * np.ones_like(x), tree)
    got, ref = (
      fn(1e-2, weight_decay=0.01, **kw).update(
        grads, fn(1e-2, weight_decay=0.01, **kw).init(tree), tree
      )[0]
      for kw in ({'group_small_leaves': True}, {'fused': False})
    )
    chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-9)


def test_grouped_step_compiles_one_kernel_per_small_leaf():
  """What it is for: 300 leaves of one shape, each finished by the same
  kernel at its run-time row (a static row would make each one different)."""
  params = {
    f'layers.{i}.w': jnp.full((100,), 0.01 * (i + 1)) for i in range(300)
  }
  grads = jax.tree.map(jnp.ones_like, params)
  counts = {}
  for grouped in (False, True):
    tx = lj.lamb(1e-3, weight_decay=0.01, group_small_leaves=grouped)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    text = step.lower(params, tx.init(params), grads).compile().as_text()
    entry = text[text.index('ENTRY') :]
    counts[grouped] = len(re.findall(r' fusion\(', entry))
  assert counts[True] <= 300 + 20
  assert counts[False] >= 2 * 300


def test_grouped_leaf_kernels_read_the_ratios_not_the_norms():
  """Each small leaf's kernel reads the group's guarded trust ratios, one
  ``(k, 1)`` vector written once, not the two norms with the zero-norm guard
  copied into all ``k`` kernels (XLA:CPU compiled 2,000 such leaves 0.83x as
  long, benchmarks/RESULTS.md). Before ``transform.guarded_ratio`` ended on
  its division, each kernel read three ``(k, 1)`` vectors."""
  k = 300
  params = {f'layers.{i}.w': jnp.full((100,), 0.01 * (i + 1)) for i in range(k)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = lj.lamb(1e-3, weight_decay=0.01, group_small_leaves=True)
  step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
  text = step.lower(params, tx.init(params), grads).compile().as_text()
  entry = text[text.index('ENTRY') :]
  called = re.findall(r'= f32\[100\]\{0\} fusion\(.*calls=%([\w.]+)', entry)
  assert len(called) == k
  vectors = set()
  for name in called:
    signature = re.search(rf'%{re.escape(name)} \((.*?)\) ->', text).group(1)
    vectors.add(signature.count(f'f32[{k},1]'))
  assert vectors == {1}


def test_grouped_state_layout_and_unpack():
  params = {
    'a': jnp.ones(3),
    'b': 2 * jnp.ones(3),
    'c': jnp.ones(4),
    'w': jnp.ones((2, 3)),
  }
  tx = lj.lars(0.1, weight_decay=0.01, group_small_leaves=True)
  state = tx.init(params)
  assert isinstance(state, lj.GroupedState)
  # 'a' and 'b' share a group; 'c' is alone of its shape, 'w' too.
  ((trace,),) = state.stacks
  assert trace.shape == (2, 3)
  assert [int(r) for r in state.digits] == [0, 1]  # Digits: 2 rows, base 2.
  assert state.digits[0].dtype == jnp.uint32
  slots = state.inner[-1].trace
  assert slots['a'] == grouping.GroupSlot(0, 0, 0)
  assert slots['b'] == grouping.GroupSlot(0, 1, 0)
  assert slots['c'].shape == (4,)
  grads = {k: jnp.full_like(v, 0.5) for k, v in params.items()}
  _, state = jax.jit(tx.update)(grads, state, params)
  _, ref = lj.lars(0.1, weight_decay=0.01).update(
    grads, lj.lars(0.1, weight_decay=0.01).init(params), params
  )
  chex.assert_trees_all_close(lj.unpack_state(state), ref, rtol=1e-6)


def test_grouped_state_checkpoint_and_sharding():
  params = h.to_jax(_tree())
  tx = lj.lamb(1e-2, weight_decay=0.01, group_small_leaves=True)
  _, state = h.run_steps(
    tx, params, [h.to_jax(h.grads_sequence(_tree(), 1)[0])]
  )
  loaded = lj.from_bytes(tx.init(params), lj.to_bytes(state))
  chex.assert_trees_all_equal(loaded, state)
  mesh = jax.sharding.Mesh(jax.devices()[:1], ('data',))
  shard = jax.tree.map(
    lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    params,
  )
  shardings = lj.state_sharding(tx, params, shard)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)


@pytest.mark.parametrize(
  'kw, pattern',
  [
    (dict(group_small_leaves=1), r'`group_small_leaves` must be True or False'),
    (dict(group_small_leaves=True, fused=False), r'fast path.*fused=False'),
    (
      dict(group_small_leaves=True, state_8bit=True),
      r'fast path.*state_8bit=True',
    ),
    (dict(group_small_leaves=True, workspace=True), r'cannot be combined'),
  ],
)
def test_grouped_bad_arguments(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    lj.lamb(1e-3, **kw)


def test_grouped_bad_state():
  params = {'a': jnp.ones(3), 'b': jnp.ones(3)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = lj.lamb(1e-3, weight_decay=0.1, group_small_leaves=True)
  plain = lj.lamb(1e-3, weight_decay=0.1).init(params)
  with pytest.raises(ValueError, match='must be the GroupedState'):
    tx.update(grads, plain, params)
  # A mask that changed since init: the group's leaves now differ.
  masked = lj.lamb(
    1e-3,
    weight_decay=0.1,
    mask={'a': True, 'b': False},
    group_small_leaves=True,
  )
  with pytest.raises(ValueError, match=r"'a'.*'b'.*weight decay"):
    masked.update(grads, tx.init(params), params)
  # Another tree's state.
  other = tx.init({'a': jnp.ones(4), 'b': jnp.ones(4)})
  with pytest.raises(ValueError, match='another tree'):
    tx.update(grads, other, params)


def test_grouped_in_nnx_optimizer():
  """A jitted ``nnx.Optimizer`` step takes the grouped state (slots and
  digits inside its state variables) and trains as the chain does."""
  from flax import nnx

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
      for layer in self.layers:
        x = layer(x)
      return x

  got = {}
  for grouped in (False, True):
    model = Mlp(nnx.Rngs(0))
    tx = (
      lj.lamb(1e-2, weight_decay=0.01, group_small_leaves=True)
      if grouped
      else lj.lamb(1e-2, weight_decay=0.01, fused=False)
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
      grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
      opt.update(model, grads)

    for _ in range(3):
      step(model, opt, jnp.ones((2, 3)))
    got[grouped] = nnx.state(model, nnx.Param)
  chex.assert_trees_all_close(got[True], got[False], rtol=1e-6, atol=1e-7)


_PADDLE_GROUPS = [
  {'params': lambda n: 'LayerNorm' in n, 'learning_rate': 0.5},
  {'params': lambda n: 'LayerNorm' not in n},
]


_PADDLE = {
  'Lamb': lambda **kw: lj.paddle.Lamb(
    1e-2,
    exclude_from_weight_decay_fn=lambda n: 'bias' in n,
    grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0),
    parameters=_PADDLE_GROUPS,
    **kw,
  ),
  'LarsMomentum': lambda **kw: lj.paddle.LarsMomentum(
    0.1, lars_weight_decay=1e-3, exclude_from_weight_decay=['LayerNorm'], **kw
  ),
  'Adam': lambda **kw: lj.paddle.Adam(1e-2, weight_decay=1e-3, **kw),
  'AdamW': lambda **kw: lj.paddle.AdamW(
    1e-2, lr_ratio=lambda n: 0.5 if 'bias' in n else 1.0, **kw
  ),
  'AdamWDL': lambda **kw: lj.paddle.AdamWDL(
    1e-2, layerwise_decay=0.8, n_layers=2, **kw
  ),
  'Lamb_master_weights': lambda **kw: lj.paddle.Lamb(
    1e-2, multi_precision=True, **kw
  ),
}


@pytest.mark.parametrize('name', sorted(_PADDLE))
def test_paddle_optimizers_take_group_small_leaves(name):
  """``lj.paddle``'s optimizers group too (per parameter group, under the
  grad clip and master weights) and give their own per-leaf numbers."""
  make = _PADDLE[name]
  dtype = jnp.bfloat16 if 'master' in name else jnp.float32
  params = h.to_jax(_tree(), dtype)
  grads = [h.to_jax(g, dtype) for g in h.grads_sequence(_tree(), 4, seed=7)]
  got, state = h.run_steps(make(group_small_leaves=True), params, grads)
  want, _ = h.run_steps(make(), params, grads)
  assert h.trajectory_rel_err(got, want) < 1e-6
  assert any(
    isinstance(x, lj.GroupedState)
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, lj.GroupedState)
    )
  )
  with pytest.raises(ValueError, match='group_small_leaves'):
    make(group_small_leaves=1)
