"""8-bit blockwise optimizer state: codes, memory, numerics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from lambjax._src import fused
from lambjax._src import quantized as q
from tests import helpers as h


def _blocks64(x):
  flat = np.ravel(np.asarray(x, np.float64))
  pad = (-flat.size) % 256
  return np.pad(flat, (0, pad)).reshape(-1, 256), flat.size


@pytest.mark.parametrize('shape', [(1000,), (3, 5), (), (300, 7), (0, 4)])
def test_signed_code_error_bound(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
  back = np.asarray(q.dequantize_signed(q.quantize_signed(jnp.asarray(x))))
  assert back.shape == x.shape
  b, n = _blocks64(x)
  bound = np.repeat(np.abs(b).max(1) / 254 * (1 + 1e-6), 256)[:n]
  assert np.all(np.abs(back.ravel() - x.ravel()) <= bound + 1e-12)


def test_positive_code_relative_error_and_zeros():
  rng = np.random.default_rng(1)
  x = (10.0 ** rng.uniform(-4, 0, size=2000)).astype(np.float32)
  x[::7] = 0.0
  back = np.asarray(q.dequantize_positive(q.quantize_positive(jnp.asarray(x))))
  assert np.all(back[::7] == 0.0)
  nz = x > 0
  rel = np.abs(back[nz] - x[nz]) / x[nz]
  assert rel.max() <= 2 ** (1 / 32) - 1 + 1e-5  # half a log step, 2.2%


def _exact_positive_codes(x32):
  """float64 reference of the log code: round(-16 log2(r)) of the float32
  ratio r = x / max (computed in float32, as stored), 255 for zeros."""
  b = x32.reshape(-1, 256)
  s = b.max(1)
  r = (b / np.where(s > 0, s, np.float32(1))[:, None]).astype(np.float64)
  with np.errstate(divide='ignore'):
    c = np.clip(np.round(-np.log2(np.where(r > 0, r, 1)) * 16), 0, 254)
  return np.where(r > 0, c, 255).ravel()


def test_positive_codes_are_rounded_exactly_at_the_thresholds():
  """Ratios at and beside every rounding threshold 2**-((k + 1/2) / 16), over
  the whole code range: the code is the exact rounding of the float32 ratio
  (the log2 form it replaces missed 5 in a million random values)."""
  t = 2.0 ** (-(np.arange(255) + 0.5) / 16)
  near = np.float32(t)
  vals = np.concatenate(
    [near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(1))]
  )
  rng = np.random.default_rng(3)
  vals = np.concatenate(
    # (Not a subnormal ratio: XLA:CPU flushes it to zero, code 255.)
    [vals, np.float32(2.0 ** rng.uniform(-17, 0, 20_000)), [0, 1e-30]]
  ).astype(np.float32)
  vals = np.concatenate([vals, np.zeros((-vals.size) % 255, np.float32)])
  # Each block: its maximum 1, then 255 values (the ratio is the value).
  x = np.concatenate(
    [np.ones((vals.size // 255, 1), np.float32), vals.reshape(-1, 255)], 1
  )
  got = np.asarray(q.quantize_positive(jnp.asarray(x)).codes).ravel()
  np.testing.assert_array_equal(got, _exact_positive_codes(x))
  # Block maxima other than 1: XLA may round the ratio x / max otherwise
  # than numpy (a reciprocal), so codes may differ only where -16 log2 of
  # the ratio is within float32 rounding of a half-integer.
  y = (x * np.float32(3.7)).astype(np.float32)
  got = np.asarray(q.quantize_positive(jnp.asarray(y)).codes).ravel()
  want = _exact_positive_codes(y)
  with np.errstate(divide='ignore'):
    logs = -16 * np.log2(np.where(x > 0, x, 1).astype(np.float64)).ravel()
  tie = np.abs(logs - np.floor(logs) - 0.5) < 1e-4
  assert np.all((got == want) | tie)
  assert np.mean(got == want) > 0.99


def test_positive_dequantize_matches_float64():
  codes = np.arange(256, dtype=np.uint8).reshape(1, 256).repeat(3, 0)
  scale = np.asarray([1.0, 3.7e-3, 6e4], np.float32)
  got = np.asarray(
    q.dequantize_positive(q.QuantizedTensor(jnp.asarray(codes), scale))
  )
  want = scale[:, None].astype(np.float64) * 2.0 ** (-(codes / 16.0))
  want[:, 255] = 0.0
  assert got[:, 255].tolist() == [0.0, 0.0, 0.0]
  # Five float32 roundings at most (exp2's measured error was 2**-20.8).
  np.testing.assert_allclose(got, want, rtol=2**-21, atol=0)


def _numpy_adam_8bit(params, grads_list, b1=0.9, b2=0.999, eps=1e-6):
  """float64 numpy re-implementation of the documented 8-bit algorithm."""

  def qs(x):  # linear absmax int8 per 256
    b, n = _blocks64(x)
    s = np.abs(b).max(1)
    c = np.clip(np.round(b / np.where(s > 0, s, 1)[:, None] * 127), -127, 127)
    return (c * (s[:, None] / 127)).ravel()[:n].reshape(np.shape(x))

  def qp(x):  # log2 code, 16 steps per octave, 255 = zero
    b, n = _blocks64(x)
    s = b.max(1)
    r = b / np.where(s > 0, s, 1)[:, None]
    with np.errstate(divide='ignore'):
      c = np.clip(np.round(-np.log2(np.where(r > 0, r, 1)) * 16), 0, 254)
    v = np.where(r > 0, s[:, None] * 2 ** (-c / 16), 0.0)
    return v.ravel()[:n].reshape(np.shape(x))

  m = {k: np.zeros(np.shape(v)) for k, v in params.items()}
  v = {k: np.zeros(np.shape(x)) for k, x in params.items()}
  out = []
  for t, g in enumerate(grads_list, start=1):
    step = {}
    for k in params:
      gg = np.asarray(g[k], np.float64)
      mm = (1 - b1) * gg + b1 * m[k]
      vv = (1 - b2) * gg * gg + b2 * v[k]
      step[k] = (mm / (1 - b1**t)) / (np.sqrt(vv / (1 - b2**t)) + eps)
      m[k], v[k] = qs(mm), qp(vv)
    out.append(step)
  return out


def test_adam_8bit_matches_numpy_reference():
  rng = np.random.default_rng(2)
  params = {'w': rng.standard_normal((40, 30)), 'b': rng.standard_normal(7)}
  grads = [
    {
      k: rng.standard_normal(np.shape(x))
      * 10.0 ** rng.uniform(-3, 0, np.shape(x))
      for k, x in params.items()
    }
    for _ in range(6)
  ]
  tx = lj.scale_by_adam_8bit(eps=1e-6)
  state = tx.init(h.to_jax(params))
  step = jax.jit(tx.update)
  want = _numpy_adam_8bit(params, grads)
  for g, ref in zip(grads, want, strict=True):
    u, state = step(h.to_jax(g), state)
    for k in params:
      # float32 vs float64 can flip a rounding at a code boundary: allow a
      # few elements one code apart, the rest tight.
      err = np.abs(np.asarray(u[k]) - ref[k]) / (np.abs(ref[k]) + 1e-3)
      assert np.mean(err < 1e-4) > 0.99 and err.max() < 0.1, (k, err.max())


def _numpy_trace_8bit(grads_list, decay):
  """float64 numpy heavy-ball momentum with the linear int8 block code."""
  t = {k: np.zeros(np.shape(g)) for k, g in grads_list[0].items()}
  out = []
  for g in grads_list:
    step = {}
    for k in g:
      new = np.asarray(g[k], np.float64) + decay * t[k]
      b, n = _blocks64(new)
      s = np.abs(b).max(1)
      c = np.round(b / np.where(s > 0, s, 1)[:, None] * 127)
      step[k] = new
      t[k] = (c * (s[:, None] / 127)).ravel()[:n].reshape(np.shape(new))
    out.append(step)
  return out


# Odd leaves for the block layout: a scalar, an empty leaf, sizes that are
# not a multiple of 256, a 4-D conv kernel (4.5 blocks), exactly one block.
ODD_SHAPES = {
  'scalar': (),
  'empty': (0, 4),
  'vec': (1000,),
  'conv': (16, 8, 3, 3),
  'block': (256,),
  'tall': (300, 7),
}


def _odd_params_and_grads(steps, seed=6):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in ODD_SHAPES.items()}
  grads = [
    {
      k: rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0, s)
      for k, s in ODD_SHAPES.items()
    }
    for _ in range(steps)
  ]
  return params, grads


@pytest.mark.parametrize('which', ['adam', 'trace'])
def test_8bit_odd_leaves_match_numpy_reference_under_jit(which):
  """Computed in the block layout, reshaped back: shapes, dtypes and values
  of odd leaves match the float64 reference; the step traces once."""
  params, grads = _odd_params_and_grads(5)
  if which == 'adam':
    tx = lj.scale_by_adam_8bit(eps=1e-6)
    want = _numpy_adam_8bit(params, grads)
  else:
    tx = lj.trace_8bit(0.9)
    want = _numpy_trace_8bit(grads, 0.9)
  state = tx.init(h.to_jax(params))
  step = jax.jit(tx.update)
  for g, ref in zip(grads, want, strict=True):
    u, state = step(h.to_jax(g), state)
    for k, shape in ODD_SHAPES.items():
      assert u[k].shape == shape and u[k].dtype == jnp.float32
      if not np.prod(shape):
        continue
      err = np.abs(np.asarray(u[k]) - ref[k]) / (np.abs(ref[k]) + 1e-3)
      assert np.mean(err < 1e-4) > 0.99 and err.max() < 0.1, (k, err.max())
  assert step._cache_size() == 1  # noqa: SLF001


@pytest.mark.parametrize('make', [lj.lamb, lj.lars, lj.adamw])
def test_8bit_bf16_params_keep_their_dtype(make):
  """bf16 params and grads: bf16 updates, each step within bf16 rounding
  (2e-2 of the leaf's largest update) of a float32 run on the same values."""
  params, grads = _odd_params_and_grads(3, seed=7)

  def as_dtype(tree, dt):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(dt), tree)

  runs = {}
  for dt in (jnp.float32, jnp.bfloat16):
    tx = make(1e-2, weight_decay=0.01, state_8bit=True)
    p = as_dtype(params, dt)
    s = tx.init(p)
    step = jax.jit(tx.update)
    runs[dt] = []
    for g in grads:
      u, s = step(as_dtype(g, dt), s, p)
      chex.assert_trees_all_equal_dtypes(u, p)
      runs[dt].append(u)
  for lo, hi in zip(runs[jnp.bfloat16], runs[jnp.float32], strict=True):
    for x, y in zip(jax.tree.leaves(lo), jax.tree.leaves(hi), strict=True):
      x, y = np.asarray(x, np.float32), np.asarray(y)
      if y.size:
        assert np.max(np.abs(x - y)) <= 2e-2 * np.max(np.abs(y)) + 1e-12


def _bert_like():
  rng = np.random.default_rng(3)
  shapes = {
    'embeddings': (3000, 64),
    'layers.0.kernel': (64, 256),
    'layers.0.bias': (256,),
    'layers.1.kernel': (256, 64),
    'LayerNorm.scale': (64,),
    'head.kernel': (64, 10),
  }
  return {
    k: jnp.asarray(rng.standard_normal(s), jnp.float32)
    for k, s in shapes.items()
  }


@pytest.mark.parametrize(
  'make',
  [
    lambda b: lj.lamb(1e-3, weight_decay=0.01, state_8bit=b),
    lambda b: lj.adamw(1e-3, state_8bit=b),
    lambda b: lj.adamw_dl(1e-3, n_layers=2, state_8bit=b),
    lambda b: lj.lars(0.1, weight_decay=1e-4, state_8bit=b),
  ],
)
def test_state_memory_at_most_0_3x(make):
  params = _bert_like()
  full = lj.state_bytes(make(False).init(params))
  small = lj.state_bytes(make(True).init(params))
  assert small <= 0.3 * full, (small, full, small / full)


@pytest.mark.parametrize(
  'make',
  [
    lambda b: lj.lamb(1e-2, weight_decay=0.01, state_8bit=b),
    lambda b: lj.adamw(1e-2, state_8bit=b),
    lambda b: lj.lars(
      0.5, weight_decay=1e-4, trust_coefficient=0.05, state_8bit=b
    ),
  ],
)
def test_8bit_trains_like_float32(make):
  """Noisy quadratic: the 8-bit run follows the float32 one closely."""
  rng = np.random.default_rng(4)
  target = h.to_jax(
    {'w': rng.standard_normal((64, 32)), 'b': rng.standard_normal(32)}
  )
  params0 = {'w': jnp.full((64, 32), 0.5, jnp.float32), 'b': jnp.zeros(32)}

  def loss(p):
    return sum(jnp.sum((p[k] - target[k]) ** 2) for k in ('w', 'b'))

  def train(tx):
    traces = []

    @jax.jit
    def step(p, s, key):
      traces.append(1)
      g = jax.grad(loss)(p)
      g = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(key, x.shape), g)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p, s = params0, tx.init(params0)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), s)
    for i in range(300):
      p, s = step(p, s, jax.random.key(i))
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), s) == shapes
    return float(loss(p))

  start = float(loss(params0))
  f32, f8 = train(make(False)), train(make(True))
  assert f32 < 0.5 * start  # The problem is really being solved...
  assert abs(f8 - f32) <= 0.05 * (start - f32), (start, f32, f8)  # ...alike.


def test_state_dict_round_trip_and_sharding():
  params = _bert_like()
  tx = lj.lamb(1e-3, state_8bit=True)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  back = lj.load_state_dict(tx.init(params), lj.state_dict(state))
  jax.tree.map(np.testing.assert_array_equal, back, state)
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  s = lj.state_sharding(tx, params, shard, zero_axis='data')
  assert jax.tree.structure(s) == jax.tree.structure(state)


def test_bad_state_8bit_and_inject_hyperparams():
  with pytest.raises(ValueError, match='`state_8bit`.*8'):
    lj.lamb(1e-3, state_8bit=8)
  # A bool stays static under inject_hyperparams (a number would be traced).
  tx = optax.inject_hyperparams(lj.adamw)(learning_rate=1e-3, state_8bit=True)
  p = {'w': jnp.ones(300)}
  u, _ = jax.jit(tx.update)(p, tx.init(p), p)
  assert np.all(np.isfinite(u['w']))
  with pytest.raises(ValueError, match='`mu_dtype'):
    lj.adamw(1e-3, mu_dtype=jnp.bfloat16, state_8bit=True)
  with pytest.raises(ValueError, match='`nesterov'):
    lj.lars(0.1, nesterov=True, state_8bit=True)


# Under XLA:CPU's breadth-first schedule, large leaves one after the other.


def _large_tree(seed=0):
  rng = np.random.default_rng(seed)
  tree = {f'w{i}': rng.normal(size=(96, 64)) for i in range(4)}
  tree['bias'] = rng.normal(size=64)
  return h.to_jax(tree)


def test_8bit_leaves_one_at_a_time_change_no_number(monkeypatch):
  """The ordering adds an exact -0.0: params and 8-bit state are bit for bit
  those of the unordered step."""
  params = _large_tree()
  rng = np.random.default_rng(1)
  grads = [
    jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params
    )
    for _ in range(3)
  ]
  runs, calls = h.ordered_and_unordered_runs(
    monkeypatch,
    fused,
    lambda: lj.lamb(1e-2, weight_decay=0.01, state_8bit=True),
    params,
    grads,
  )
  assert calls == {True: 3, False: 0}  # Every large leaf after the first.
  chex.assert_trees_all_equal(runs[True], runs[False])


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason='XLA:CPU schedules breadth first'
)
def test_8bit_leaves_one_at_a_time_shrink_the_temporary(monkeypatch):
  """What the ordering is for: XLA:CPU keeps fewer leaves' float32 moments
  alive at once."""
  params = _large_tree()
  temps = {}
  for ordered in (True, False):
    monkeypatch.setattr(fused, 'breadth_first', lambda o=ordered: o)
    tx = lj.lamb(1e-3, weight_decay=0.01, state_8bit=True)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    compiled = step.lower(params, tx.init(params), params).compile()
    temps[ordered] = compiled.memory_analysis().temp_size_in_bytes
  # Fewer float32 moments alive at once: at least two leaves' m and v less
  # (measured: 285 KB vs 446 KB, a leaf is 24 KB).
  leaf_bytes = 96 * 64 * 4
  assert temps[False] - temps[True] >= 4 * leaf_bytes, temps


@pytest.mark.parametrize(
  'make', [lambda: lj.scale_by_adam_8bit(), lambda: lj.trace_8bit(0.9)]
)
def test_8bit_leaves_are_traced_once_per_signature(make):
  """Leaves of one shape share one traced per-leaf function (inlined by
  XLA) instead of each tracing its quantisation ops."""
  params = {f'w{i:02d}': jnp.full((300,), i + 1.0) for i in range(12)}
  tx = make()
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state)
  h.assert_traced_once(jaxpr, 'leaf', len(params))
