"""Reliability: NaN-free numerics, property-based tests, checkpoint fuzzing,
determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambjax as lj
from tests import helpers as h

P = lj.paddle

# 200 examples per property (the bar); the deadline is off because
# the first example of a property pays for tracing.
PROPERTY = settings(
  max_examples=200,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EDGE_OPTIMIZERS = {
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.01),
  'lamb_chain': lambda: lj.lamb(1e-2, weight_decay=0.01, fused=False),
  'lars': lambda: lj.lars(0.1, weight_decay=1e-3),
  'lars_chain': lambda: lj.lars(0.1, weight_decay=1e-3, fused=False),
  'lars_paddle': lambda: lj.lars(
    0.1, weight_decay=1e-3, trust_ratio_form='paddle'
  ),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
  'adam': lambda: lj.adam(1e-2),
  'adamw': lambda: lj.adamw(1e-2),
  'paddle.Lamb': lambda: P.Lamb(1e-2, grad_clip=P.ClipGradByNorm(1.0)),
  'paddle.LarsMomentum': lambda: P.LarsMomentum(0.1, epsilon=0.0),
  'paddle.Adam': lambda: P.Adam(1e-2, weight_decay=P.L1Decay(1e-3)),
  'paddle.AdamW': lambda: P.AdamW(1e-2),
  'paddle.AdamWDL': lambda: P.AdamWDL(1e-2, n_layers=2),
  'paddle.SGD': lambda: P.SGD(1e-2, grad_clip=P.ClipGradByGlobalNorm(1.0)),
  'paddle.Lamb_mp': lambda: P.Lamb(1e-2, multi_precision=True),
}


def _edge_tree():
  params = {
    'zero': jnp.zeros((3, 2)),
    'frozen': jnp.ones((2, 2)),
    'scalar': jnp.array(0.0),
    'w': jnp.full((2, 3), 0.5),
  }
  grads = {
    'zero': jnp.zeros((3, 2)),
    'frozen': jnp.zeros((2, 2)),
    'scalar': jnp.array(0.0),
    'w': jnp.full((2, 3), 0.1),
  }
  return params, grads


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'eager'])
@pytest.mark.parametrize('name', sorted(EDGE_OPTIMIZERS))
def test_full_step_passes_under_debug_nans(name, use_jit):
  params, grads = _edge_tree()
  tx = EDGE_OPTIMIZERS[name]()
  with jax.debug_nans(True), jax.debug_infs(True):
    state = tx.init(params)
    update = jax.jit(tx.update) if use_jit else tx.update
    for _ in range(3):
      u, state = update(grads, state, params)
      params = optax.apply_updates(params, u)
  chex.assert_tree_all_finite((params, state))


@pytest.mark.parametrize(
  'name',
  ['lamb', 'lamb_chain', 'lars', 'lars_chain', 'lars_paddle', 'adamw_dl'],
)
def test_meta_gradient_through_update_is_nan_free(name):
  params, grads = _edge_tree()
  tx = EDGE_OPTIMIZERS[name]()

  def loss(params):
    u, _ = tx.update(grads, tx.init(params), params)
    return sum(
      jnp.sum(x**2) for x in jax.tree.leaves(optax.apply_updates(params, u))
    )

  with jax.debug_nans(True):
    g = jax.grad(loss)(params)
  chex.assert_tree_all_finite(g)


# --- property-based ---------------------------------------------------------

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])
SHAPES = st.sampled_from([(), (0,), (1,), (3,), (2, 3), (4, 1, 2)])


@st.composite
def trees(draw, dtype=None):
  n = draw(st.integers(0, 4))
  dt = dtype or draw(DTYPES)
  out = {}
  for i in range(n):
    shape = draw(SHAPES)
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).normal(size=shape)
    if draw(st.booleans()) and x.size:
      x[...] = 0.0  # zero leaves
    out[f'layers.{i}.w'] = jnp.asarray(x, dt)
  return out


HPARAMS = st.fixed_dictionaries(
  {
    'learning_rate': st.floats(1e-4, 1.0),
    'weight_decay': st.sampled_from([0.0, 1e-4, 0.1]),
    'b1': st.floats(0.0, 0.99),
    'b2': st.floats(0.5, 0.9999),
  }
)


def _make(kind, hp, fused=True):
  common = dict(weight_decay=hp['weight_decay'], fused=fused)
  adam_hp = dict(b1=hp['b1'], b2=hp['b2'], **common)
  if kind == 'lamb':
    return lj.lamb(hp['learning_rate'], **adam_hp)
  if kind == 'adamw':
    return lj.adamw(hp['learning_rate'], **adam_hp)
  if kind == 'adamw_dl':
    return lj.adamw_dl(
      hp['learning_rate'], n_layers=4, layerwise_decay=0.9, **adam_hp
    )
  return lj.lars(hp['learning_rate'], **common)


KINDS = st.sampled_from(['lamb', 'adamw', 'adamw_dl', 'lars'])


@PROPERTY
@given(kind=KINDS, hp=HPARAMS, params=trees(), seed=st.integers(0, 2**16))
def test_updates_have_params_structure_and_dtypes(kind, hp, params, seed):
  tx = _make(kind, hp)
  rng = np.random.default_rng(seed)
  g = jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params
  )
  u, state = tx.update(g, tx.init(params), params)
  chex.assert_trees_all_equal_structs(u, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
  if all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)):
    chex.assert_tree_all_finite(u)


@PROPERTY
@given(
  kind=st.sampled_from(['lamb', 'adamw', 'adamw_dl']),
  hp=HPARAMS,
  params=trees(jnp.float32),
)
def test_zero_grads_and_zero_decay_give_zero_updates(kind, hp, params):
  hp = dict(hp, weight_decay=0.0)
  tx = _make(kind, hp)
  g = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update(g, state, params)
    for x in jax.tree.leaves(u):
      assert not np.any(np.asarray(x))


@PROPERTY
@given(
  params=trees(jnp.float32),
  seed=st.integers(0, 2**16),
  lo=st.floats(0.0, 1.0),
  width=st.floats(0.0, 10.0),
)
def test_clamped_trust_ratio_stays_within_bounds(params, seed, lo, width):
  hi = lo + width
  rng = np.random.default_rng(seed)
  u = jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, jnp.float32), params
  )
  tx = lj.scale_by_trust_ratio(min_ratio=lo, max_ratio=hi)
  out, _ = tx.update(u, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(u), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nz = np.abs(b) > 1e-12
    if np.any(nz):
      ratio = a[nz] / b[nz]
      assert np.all(ratio >= lo * (1 - 1e-5) - 1e-7)
      assert np.all(ratio <= hi * (1 + 1e-5) + 1e-7)


@PROPERTY
@given(
  kind=KINDS, hp=HPARAMS, params=trees(jnp.float32), seed=st.integers(0, 2**16)
)
def test_fast_path_equals_chain_and_jit_equals_eager(kind, hp, params, seed):
  rng = np.random.default_rng(seed)
  g = jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
  )
  fast, chain = _make(kind, hp), _make(kind, hp, fused=False)
  u_fast, s_fast = jax.jit(fast.update)(g, fast.init(params), params)
  u_eager, _ = fast.update(g, fast.init(params), params)
  u_chain, s_chain = chain.update(g, chain.init(params), params)
  chex.assert_trees_all_close(u_fast, u_chain, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(u_fast, u_eager, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_equal_structs(s_fast, s_chain)


@PROPERTY
@given(kind=KINDS, hp=HPARAMS, params=trees())
def test_state_dict_round_trip_is_identity(kind, hp, params):
  tx = _make(kind, hp)
  state = tx.init(params)
  g = jax.tree.map(lambda p: jnp.ones_like(p), params)
  _, state = tx.update(g, state, params)
  back = lj.from_bytes(tx.init(params), lj.to_bytes(state))
  chex.assert_trees_all_equal(back, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(back, state)


_STATE = lj.lamb(1e-2, weight_decay=0.1).init(
  {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
)
_GOOD = lj.to_bytes(_STATE)


@PROPERTY
@given(data=st.data())
def test_loader_fuzz_always_clean_value_error(data):
  kind = data.draw(st.sampled_from(['random', 'truncate', 'flip']))
  if kind == 'random':
    blob = data.draw(st.binary(max_size=400))
  elif kind == 'truncate':
    blob = _GOOD[: data.draw(st.integers(0, len(_GOOD) - 1))]
  else:
    b = bytearray(_GOOD)
    i = data.draw(st.integers(0, len(b) - 1))
    b[i] ^= 1 << data.draw(st.integers(0, 7))
    blob = bytes(b)
  with pytest.raises(ValueError):
    lj.from_bytes(_STATE, blob)


def test_loader_accepts_the_good_bytes():
  chex.assert_trees_all_equal(lj.from_bytes(_STATE, _GOOD), _STATE)


# --- determinism --------------------------------------------------------------


@pytest.mark.parametrize('name', ['lamb', 'lars', 'adamw_dl', 'paddle.Lamb'])
def test_same_inputs_give_bitwise_identical_outputs(name):
  params, grads = _edge_tree()
  outs = []
  for _ in range(2):
    tx = EDGE_OPTIMIZERS[name]()
    p, s = params, tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
      u, s = step(grads, s, p)
      p = optax.apply_updates(p, u)
    outs.append((p, s))
  chex.assert_trees_all_equal(outs[0], outs[1])


# Lowers jitted train steps for a BERT-like tree (named layers, large and
# small leaves, so windows and groups of small leaves are exercised) and
# prints a digest of each StableHLO text.
_LOWER_STEPS = """
import hashlib, json
import jax, jax.numpy as jnp, optax
import lambjax as lj

shapes = {'embeddings.word_embeddings.weight': (300, 16),
          'embeddings.LayerNorm.weight': (16,)}
for i in range(3):
  for name, shape in [('attention.query.weight', (16, 16)),
                      ('attention.query.bias', (16,)),
                      ('intermediate.dense.weight', (16, 300)),
                      ('intermediate.dense.bias', (300,)),
                      ('output.LayerNorm.weight', (16,))]:
    shapes[f'encoder.layers.{i}.{name}'] = shape
params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
decay = lambda p: {k: 'LayerNorm' not in k and 'bias' not in k for k in p}
optimizers = {
  'lamb': lj.lamb(1e-3, weight_decay=0.01, mask=decay),
  'lamb_grouped': lj.lamb(1e-3, weight_decay=0.01, group_small_leaves=True),
  'lars': lj.lars(0.1, weight_decay=1e-4),
  'adamw_dl': lj.adamw_dl(1e-3, layerwise_decay=0.8, n_layers=3),
  'paddle.Lamb': lj.paddle.Lamb(1e-3, grad_clip=lj.paddle.ClipGradByNorm(1.0)),
  'paddle.AdamW': lj.paddle.AdamW(1e-3, lazy_mode=True),
}
out = {}
for name, tx in optimizers.items():
  def step(p, s, g, tx=tx):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  state = jax.eval_shape(tx.init, params)
  text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
  out[name] = hashlib.sha256(text.as_text().encode()).hexdigest()
print(json.dumps(out))
"""


def test_lowering_is_the_same_in_every_process():
  # jax's persistent compilation cache (``jax_compilation_cache_dir``) keys
  # executables by the lowered program: a restarted job reuses its compiled
  # step only if the optimizer lowers to the same program in a new process.
  # String hashing differs between processes (PYTHONHASHSEED), so anything
  # ordered by a set or by hash() would show up here.
  def lower(hash_seed):
    return subprocess.Popen(
      [sys.executable, '-c', _LOWER_STEPS],
      env=dict(os.environ, PYTHONHASHSEED=str(hash_seed), JAX_PLATFORMS='cpu'),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  procs = [lower(seed) for seed in (1, 2)]
  digests = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    digests.append(json.loads(stdout.strip().splitlines()[-1]))
  assert len(digests[0]) == 6
  assert digests[0] == digests[1]


def test_resume_is_exact_under_gradient_accumulation(tmp_path):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  grads = [
    {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)} for _ in range(9)
  ]

  def make():
    return optax.MultiSteps(
      lj.lamb(1e-2, weight_decay=0.01), every_k_schedule=3
    )

  tx = make()
  step = jax.jit(h.train_step(tx))
  p, s = params, tx.init(params)
  for g in grads:
    p, s = step(p, s, g)
  full = p
  p, s = params, tx.init(params)
  for g in grads[:4]:  # Stop mid-accumulation.
    p, s = step(p, s, g)
  lj.save_state(tmp_path / 's.msgpack', s)
  s = lj.load_state(tmp_path / 's.msgpack', make().init(params))
  for g in grads[4:]:
    p, s = step(p, s, g)
  chex.assert_trees_all_equal(p, full)
