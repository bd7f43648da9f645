"""The fused fast path equals the building-block chain (the specification)."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from lambjax._src import fused as fused_lib
from tests import helpers as h


def _sched(c):
  return 0.02 * jnp.minimum(1.0, (c + 1) / 5.0)


def _wd_sched(c):
  """A weight-decay schedule that reaches zero at count 4 (and stays)."""
  return 0.05 * jnp.maximum(0.0, 1.0 - c / 4.0)


# LAMB with every per-leaf option: decay and trust masks, clamps, lr ratios.
LAMB_MASKS_CLAMP = dict(
  learning_rate=_sched,
  weight_decay=0.05,
  mask=lj.mask_by_name('kernel|embeddings'),
  trust_ratio_mask=lj.mask_by_name('kernel'),
  min_ratio=0.1,
  max_ratio=5.0,
  lr_ratio_fn=lambda n: 0.5 if 'layers.0' in n else 1.0,
)

# name: (alias, its arguments, the arguments optax.inject_hyperparams must
# keep static: callables other than schedules, such as masks, lr ratios and
# jnp.bfloat16).
SPECS = {
  'lamb': (lj.lamb, dict(learning_rate=1e-2, weight_decay=0.01), ()),
  'lamb_masks_clamp_ratio': (
    lj.lamb,
    LAMB_MASKS_CLAMP,
    ('mask', 'trust_ratio_mask', 'lr_ratio_fn'),
  ),
  'lamb_bf16_moments': (
    lj.lamb,
    dict(
      learning_rate=1e-2,
      weight_decay=0.01,
      mu_dtype=jnp.bfloat16,
      nu_dtype=jnp.bfloat16,
    ),
    ('mu_dtype', 'nu_dtype'),
  ),
  # A weight-decay schedule: its count lives in the decay link's state
  # (optax's WeightDecaySchedule, in a MaskedState when masked).
  'lamb_wd_schedule': (
    lj.lamb,
    dict(
      learning_rate=1e-2,
      weight_decay=_wd_sched,
      mask=lj.mask_by_name('kernel'),
    ),
    ('mask',),
  ),
  'adam': (lj.adam, dict(learning_rate=_sched, b1=0.8, eps_root=1e-8), ()),
  'nadam': (lj.adam, dict(learning_rate=1e-2, b1=0.8, nesterov=True), ()),
  'nadamw_wd_schedule': (
    lj.adamw,
    dict(learning_rate=_sched, weight_decay=_wd_sched, nesterov=True),
    (),
  ),
  'adamw': (
    lj.adamw,
    dict(learning_rate=1e-2, weight_decay=0.1, mask=lj.mask_by_name('kernel')),
    ('mask',),
  ),
  'adamw_dl': (
    lj.adamw_dl,
    dict(learning_rate=1e-2, layerwise_decay=0.7, n_layers=2),
    ('layerwise_decay', 'n_layers'),
  ),
  'lars': (
    lj.lars,
    dict(learning_rate=0.5, weight_decay=0.01, trust_coefficient=0.1),
    (),
  ),
  'lars_masks_nesterov': (
    lj.lars,
    dict(
      learning_rate=_sched,
      weight_decay=0.02,
      weight_decay_mask=lj.mask_by_name('kernel'),
      trust_ratio_mask=lj.mask_by_name('kernel|emb'),
      nesterov=True,
      eps=1e-4,
      min_ratio=0.01,
    ),
    ('weight_decay_mask', 'trust_ratio_mask'),
  ),
  'lars_wd_schedule': (
    lj.lars,
    dict(
      learning_rate=0.5,
      weight_decay=_wd_sched,
      weight_decay_mask=lj.mask_by_name('kernel'),
    ),
    ('weight_decay_mask',),
  ),
  'lars_paddle': (
    lj.lars,
    dict(
      learning_rate=0.5,
      weight_decay=0.01,
      trust_coefficient=0.05,
      trust_ratio_form='paddle',
      weight_decay_mask=lj.mask_by_name('kernel'),
    ),
    ('weight_decay_mask',),
  ),
}


def _built(fn, kwargs):
  return lambda f: fn(**kwargs, fused=f)


def _injected(fn, static=(), **kwargs):
  """``fn`` under ``optax.inject_hyperparams``: every number (b1, b2, eps,
  weight decay, clamps, momentum...) becomes a float32 array of its state."""
  return lambda f: optax.inject_hyperparams(fn, static_args=static)(
    **kwargs, fused=f
  )


CONFIGS = {name: _built(fn, kw) for name, (fn, kw, _) in SPECS.items()}
# The same configurations, injected.
INJECTED = {
  name: _injected(fn, static, **kw) for name, (fn, kw, static) in SPECS.items()
}


def _big_tree(seed=0):
  """The mixed tree plus a leaf large enough for LARS's expanded norms."""
  tree = h.mixed_tree(seed)
  tree['big_kernel'] = np.random.default_rng(seed).normal(size=(80, 64))
  return tree


def _trajectories(name, params, grads, use_jit=True, configs=CONFIGS):
  """Params after each step and the final state: (fused, chain) pairs. The
  chain (the reference) runs under ``jax.jit``; the fused path under
  ``jax.jit`` or op by op (``use_jit=False``)."""
  trajs, states = [], []
  for fused in (True, False):
    tx = configs[name](fused)
    p = h.to_jax(params)
    s = tx.init(p)
    update = jax.jit(tx.update) if use_jit or not fused else tx.update
    traj = []
    for g in grads:
      u, s = update(h.to_jax(g), s, p)
      p = optax.apply_updates(p, u)
      traj.append(p)
    trajs.append(traj)
    states.append(s)
  return trajs, states


def _one_step_close(name, params, g, configs=CONFIGS):
  """One jitted update, fused vs chain: the same dtypes and states (updates
  in the params' dtypes where ``configs`` is ours), close to bf16 rounding."""
  outs, states = [], []
  for fused in (True, False):
    tx = configs[name](fused)
    u, s = jax.jit(tx.update)(g, tx.init(params), params)
    if configs is CONFIGS:
      chex.assert_trees_all_equal_dtypes(u, params)
    outs.append(u)
    states.append(s)
  chex.assert_trees_all_equal_dtypes(outs[0], outs[1])
  chex.assert_trees_all_close(outs[0], outs[1], rtol=2e-2, atol=1e-4)
  chex.assert_trees_all_equal_shapes_and_dtypes(states[0], states[1])


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fused_equals_chain(name, use_jit, monkeypatch):
  built = _spy_fast_path(monkeypatch)
  params = _big_tree()
  grads = h.grads_sequence(params, 8, seed=3)
  trajs, states = _trajectories(name, params, grads, use_jit)
  assert built, 'the fast path was not taken'
  # Under jit both compile to the same arithmetic up to fusion: 1e-6. Called
  # eagerly, the fused path still compiles its per-leaf pieces (``jax.jit``
  # inside, which also makes tracing it cheap), so it is compared with the
  # jitted chain too: op-by-op dispatch around those pieces rounds by ~1e-7
  # absolute, up to 5e-6 of the zero-initialised bias's small trajectory.
  # (The chain itself run op by op is no reference for bf16 moments: its
  # eager and jitted trajectories differ by 2e-4 there, measured.)
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
  _one_step_close(name, params, g)


def _wide_tree(seed=0, dtypes=(np.float32,)):
  """More leaves than one window of the fast path: 26 of shape ``(4,)``
  (windows of one shape on XLA:CPU, with grouped norms) and 13 of ``(5, 4)``
  (too few for a window there: leaf by leaf), a zero bias, leaves big enough
  for LARS's expanded norms and, with several ``dtypes``, mixed dtypes."""
  rng = np.random.default_rng(seed)
  tree = {}
  for i in range(13):
    dt = dtypes[i % len(dtypes)]
    tree[f'layers{i:02d}'] = {
      'kernel': rng.normal(size=(5, 4)).astype(dt),
      'bias': (np.zeros(4) if i % 4 == 0 else rng.normal(size=4)).astype(dt),
      'scale': rng.normal(size=4).astype(dt),
    }
  tree['big_kernel'] = rng.normal(size=(80, 64)).astype(np.float32)
  tree['big_kernel_2'] = rng.normal(size=(80, 64)).astype(np.float32)
  tree['frozen'] = rng.normal(size=(2, 2)).astype(np.float32)
  return tree


def _wide_grads(params, steps, seed):
  grads = h.grads_sequence(params, steps, seed=seed)
  for g in grads:  # A leaf whose update is zero: trust ratio 1.
    g['layers05']['scale'] = np.zeros_like(g['layers05']['scale'])
  return [
    jax.tree.map(lambda x, p: x.astype(p.dtype), g, params) for g in grads
  ]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fused_equals_chain_on_a_wide_tree(name):
  """Windows of leaves, same-shape groups and a zero-update leaf."""
  params = _wide_tree()
  assert len(jax.tree.leaves(params)) > 2 * fused_lib._WINDOW
  sizes = [np.size(x) for x in jax.tree.leaves(params)]
  keys = [np.shape(x) for x in jax.tree.leaves(params)]
  runs = _windows_of(sizes, keys)
  assert max(map(len, runs)) == fused_lib._WINDOW  # Windows of (4,) ...
  assert sum(len(r) == 1 and keys[r[0]] == (5, 4) for r in runs) == 13
  grads = _wide_grads(params, 4, seed=7)
  trajs, _ = _trajectories(name, params, grads)
  assert h.trajectory_rel_err(trajs[0], trajs[1]) < 1e-6


def _spy_fast_path(monkeypatch) -> list[str]:
  """Names of the fast paths built from now on."""
  built = []
  for fn_name in ('adam_family', 'lars'):
    real = getattr(fused_lib, fn_name)

    def spy(*args, _real=real, _name=fn_name, **kwargs):
      built.append(_name)
      return _real(*args, **kwargs)

    monkeypatch.setattr(fused_lib, fn_name, spy)
  return built


@pytest.mark.parametrize('use_jit', [True, False], ids=['jit', 'nojit'])
@pytest.mark.parametrize('name', sorted(INJECTED))
def test_fused_equals_chain_under_inject_hyperparams(
  name, use_jit, monkeypatch
):
  """Injected hyperparameters are arrays, traced under jit: the fast path
  takes them (it fell back to the chain before, BERT-base LAMB 2x slower)
  and computes the chain's numbers with them, in the chain's dtypes."""
  built = _spy_fast_path(monkeypatch)
  params = _big_tree()
  grads = h.grads_sequence(params, 6, seed=3)
  trajs, states = _trajectories(name, params, grads, use_jit, INJECTED)
  assert built, 'the fast path was not taken'
  tol = 1e-6 if use_jit else 1e-5
  assert h.trajectory_rel_err(trajs[0], trajs[1]) < tol
  chex.assert_trees_all_equal_structs(states[0], states[1])
  chex.assert_trees_all_equal_shapes_and_dtypes(states[0], states[1])
  # Called eagerly with array hyperparameters the pieces run op by op (not
  # jitted: the optimizer is rebuilt at each update), so a bf16 moment may
  # round one bf16 ulp (2**-8 relative) away from the jitted chain's.
  rtol = 2**-7 if 'bf16' in name and not use_jit else 1e-5
  chex.assert_trees_all_close(states[0], states[1], rtol=rtol, atol=1e-7)


@pytest.mark.parametrize('name', ['lamb', 'lars', 'lars_paddle', 'adamw'])
def test_inject_hyperparams_fast_path_bf16_params(name):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _big_tree(1))
  g = jax.tree.map(
    lambda x: jnp.asarray(x, jnp.bfloat16),
    h.grads_sequence(params, 1, seed=5)[0],
  )
  _one_step_close(name, params, g, INJECTED)


@pytest.mark.parametrize('fn', [lj.lamb, lj.lars])
def test_inject_hyperparams_fast_path_under_vmap(fn):
  """A sweep: ``jax.vmap`` over an injected weight decay (0 included), eager
  and jitted, gives the chain's updates for each value."""
  params = h.to_jax(_big_tree(3))
  g = h.to_jax(h.grads_sequence(params, 1, seed=6)[0])
  wds = jnp.array([0.0, 0.01, 0.3])

  def update(wd, fused):
    tx = optax.inject_hyperparams(fn)(learning_rate=0.05, fused=fused)
    state = tx.init(params)
    state.hyperparams['weight_decay'] = wd
    return tx.update(g, state, params)[0]

  ref = jax.jit(jax.vmap(lambda wd: update(wd, False)))(wds)
  for run in (jax.vmap, lambda f: jax.jit(jax.vmap(f))):
    got = run(lambda wd: update(wd, True))(wds)
    # Updates are ~0.05; atol 1e-8 is an ulp of those where u + wd p cancels.
    chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
  ('fn', 'kw', 'changed'),
  [
    (lj.lamb, {'weight_decay': 0.01}, {'weight_decay': 0.3, 'b1': 0.7}),
    (lj.lamb, {'weight_decay': 0.01}, {'weight_decay': 0.0}),
    (lj.lars, {'weight_decay': 0.01}, {'weight_decay': 0.0, 'momentum': 0.5}),
    (
      lj.lars,
      {'weight_decay': 0.01, 'trust_ratio_form': 'paddle'},
      {'weight_decay': 0.0},
    ),
    (
      lj.lars,
      {'weight_decay': 0.01, 'trust_ratio_form': 'paddle'},
      {'weight_decay': 0.2, 'trust_coefficient': 0.5},
    ),
  ],
)
def test_injected_values_changed_at_run_time(fn, kw, changed):
  """A value changed in the injected state drives the jitted fast path (no
  retrace) as if the optimizer had been built with it; a weight decay set
  to zero takes the zero-decay rules (Paddle's LARS: trust ratio 1)."""
  params = h.to_jax(_big_tree(2))
  grads = [h.to_jax(g) for g in h.grads_sequence(params, 3, seed=4)]
  tx = optax.inject_hyperparams(fn)(learning_rate=0.05, **kw)
  state = tx.init(params)
  for k, v in changed.items():
    state.hyperparams[k] = jnp.asarray(v, jnp.float32)
  step = jax.jit(tx.update)
  ref = fn(0.05, **{**kw, **changed})
  ref_state = ref.init(params)
  p, q = params, params
  for g in grads:
    u, state = step(g, state, p)
    p = optax.apply_updates(p, u)
    r, ref_state = jax.jit(ref.update)(g, ref_state, q)
    q = optax.apply_updates(q, r)
  assert step._cache_size() == 1  # noqa: SLF001
  # Injected float32 arrays against Python floats: 1 - b2 is 1.00004e-3 in
  # float32 against 1e-3 (optax's own test of inject_hyperparams: 1e-3).
  chex.assert_trees_all_close(p, q, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize(
  'name', ['lamb_wd_schedule', 'lars_wd_schedule', 'nadamw_wd_schedule']
)
def test_weight_decay_schedule_steps_do_not_retrace(name):
  """The schedule is evaluated inside the step, at the count in the state:
  one trace for every step, and each step's decay is the schedule's value
  at that step (checked against the chain in the tests above)."""
  params = h.to_jax(_big_tree())
  tx = CONFIGS[name](True)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in h.grads_sequence(params, 5, seed=2):
    u, state = step(h.to_jax(g), state, params)
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1  # noqa: SLF001
  counts = [
    x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.integer)
  ]
  assert [int(c) for c in counts] == [5] * len(counts)


@pytest.mark.parametrize(
  ('name', 'piece'),
  [('lamb', 'direction'), ('adamw', 'direction'), ('lars', 'momentum_step')],
)
def test_per_leaf_pieces_are_traced_once_per_signature(name, piece):
  """Tracing cost: leaves of one shape share one traced piece (a jitted
  function inlined by XLA), instead of each tracing its own ops."""
  params = {f'w{i:02d}': jnp.full((5, 4), i + 1.0) for i in range(40)}
  tx = CONFIGS[name](True)
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  h.assert_traced_once(jaxpr, piece, len(params))


@pytest.mark.parametrize(
  'name', ['lamb', 'lars', 'lamb_wd_schedule', 'lars_wd_schedule', 'nadam']
)
def test_eager_steps_compile_the_pieces_once(name, caplog):
  """Called without ``jax.jit``, the second step reuses the first's
  compilations: the fast path compiles nothing per step. (Eagerly, jax
  compiles ``b1 ** count`` anew each step, a concrete integer exponent being
  a static ``integer_pow``; the fast path computes it jitted.)"""
  params = h.to_jax(_big_tree())
  grads = h.grads_sequence(params, 2, seed=4)
  tx = CONFIGS[name](True)
  state = tx.init(params)
  pieces = ('direction', 'trust_ratio', 'momentum_step', 'after')
  with jax.log_compiles():
    for k, g in enumerate(grads):
      caplog.clear()
      _, state = tx.update(h.to_jax(g), state, params)
      compiled = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith('Compiling ')
      ]
      if k == 0:
        # The check below can see these compilations.
        assert any(
          c.startswith(tuple(f'Compiling jit({p})' for p in pieces))
          for c in compiled
        )
  assert compiled == []


def _windows_of(sizes, keys):
  """The windows ``fused.in_windows`` runs, in order, as lists of leaves."""
  runs, finished = [], []

  def ratios(entries):
    runs.append(list(entries))
    return [None] * len(entries)

  fused_lib.in_windows(
    sizes, lambda i: i, ratios, lambda i, r: finished.append(i), keys
  )
  assert sorted(finished) == list(range(len(sizes)))  # Each leaf once.
  assert [i for r in runs for i in r] == finished
  return runs


def test_windows_hold_one_key_and_only_keys_of_many_leaves():
  win = fused_lib._WINDOW
  n_a, n_b = 2 * win + 3, fused_lib._WINDOWED_MIN - 1
  # 'a': enough small leaves for windows; 'b': one too few; 'L': large.
  keys = ['a'] * n_a + ['b'] * n_b + ['L'] * 5
  keys = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
  sizes = [fused_lib._SMALL + 1 if k == 'L' else 8 for k in keys]
  runs = _windows_of(sizes, keys)
  for r in runs:
    assert len({keys[i] for i in r}) == 1  # One key per window.
    assert len(r) <= win
  a_runs = [r for r in runs if keys[r[0]] == 'a']
  assert [len(r) for r in a_runs] == [win, win, 3]
  # Too few leaves of 'b', and every large leaf: one at a time, in order.
  alone = [r[0] for r in runs if keys[r[0]] != 'a']
  assert all(len(r) == 1 for r in runs if keys[r[0]] != 'a')
  assert alone == [i for i, k in enumerate(keys) if k != 'a']
  # Without keys (not XLA:CPU): small leaves of any kind share windows.
  mixed = _windows_of(sizes, None)
  assert max(len(r) for r in mixed) == win
  assert any(len({keys[i] for i in r}) == 2 for r in mixed)


@pytest.mark.parametrize('name', ['lamb', 'lars', 'lars_paddle'])
def test_fused_equals_chain_with_mixed_dtypes_in_a_window(name, monkeypatch):
  """Leaves of two dtypes: one window on most backends; on XLA:CPU (windows
  of one dtype) made to form windows of each dtype."""
  monkeypatch.setattr(fused_lib, '_WINDOWED_MIN', 2)
  tree = _wide_tree(2, dtypes=(np.float32, jnp.bfloat16))
  params = jax.tree.map(jnp.asarray, tree)
  g = jax.tree.map(jnp.asarray, _wide_grads(tree, 1, seed=9)[0])
  assert {x.dtype for x in jax.tree.leaves(params)} == {
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.bfloat16),
  }
  _one_step_close(name, params, g)


def test_sumsqs_matches_float64():
  rng = np.random.default_rng(0)
  xs = [
    rng.normal(size=(3, 4)),
    rng.normal(size=(3, 4)),  # Same shape: summed in one group.
    np.zeros((3, 4)),
    rng.normal(size=(2, 5, 3)),  # Stacked along axis 1: per slice.
    rng.normal(size=(fused_lib._SMALL + 1,)),  # Large: on its own.
    None,
    rng.normal(size=()),
    rng.normal(size=(3, 4)).astype(jnp.bfloat16),  # Another dtype group.
  ]
  axes = [None, None, None, 1, None, None, None, None]
  got = fused_lib.sumsqs(
    [None if x is None else jnp.asarray(x) for x in xs], axes
  )
  for x, axis, out in zip(xs, axes, got, strict=True):
    if x is None:
      assert out is None
      continue
    x64 = np.asarray(x, np.float64)
    want = (
      np.sum(x64**2)
      if axis is None
      else np.sum(x64**2, axis=(0, 2), keepdims=True)
    )
    assert out.dtype == jnp.asarray(x).dtype
    assert np.shape(out) == np.shape(want)
    rtol = 1e-2 if out.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=rtol)


def test_batched_is_the_same_as_leaf_by_leaf():
  def fn(a, b):
    return jnp.where(b > 0, jnp.sqrt(jnp.abs(a)) / b, 1.0)

  rng = np.random.default_rng(1)
  a = [jnp.asarray(rng.normal(size=s), np.float32) for s in [(), (), (3, 1)]]
  b = [jnp.asarray(rng.normal(size=jnp.shape(x)), np.float32) for x in a]
  a.append(jnp.asarray(2.0, jnp.bfloat16))  # A dtype of its own.
  b.append(jnp.asarray(0.5, jnp.bfloat16))
  for call in (fused_lib.batched, jax.jit(fused_lib.batched, static_argnums=0)):
    got = call(fn, a, b)
    for x, y, out in zip(a, b, got, strict=True):
      want = fn(x, y)
      assert out.dtype == want.dtype and out.shape == want.shape
      np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


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


@pytest.mark.parametrize('name', ['lamb', 'lars', 'lars_paddle'])
def test_grad_through_update_of_large_leaves_equals_chain(name):
  """Meta-gradients through the large-leaf forms (LARS's spelled norm, on
  a view with a long last dimension for the PyTorch-layout kernel, LAMB's
  ordered directions) equal the chain's."""
  rng = np.random.default_rng(3)
  shapes = {'w': (80, 64), 'conv': (16, 16, 5, 5), 'b': (64,)}
  params = h.to_jax({k: rng.normal(size=v) for k, v in shapes.items()})
  g = h.to_jax({k: rng.normal(size=v) * 0.1 for k, v in shapes.items()})
  got = []
  for fused in (True, False):
    tx = CONFIGS[name](fused)

    def loss(params, tx=tx):
      u, _ = tx.update(g, tx.init(params), params)
      new = optax.apply_updates(params, u)
      return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new))

    got.append(jax.jit(jax.grad(loss))(params))
  chex.assert_tree_all_finite(got[0])
  chex.assert_trees_all_close(got[0], got[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'shapes',
  [
    {'w': (1024, 1024)},
    # Same-shape leaves share a broadcast of any constant: XLA:CPU writes it
    # out in full unless each leaf's scalar is its own (``norm_operand``).
    {f'w{i}': (512, 512) for i in range(3)},
    {f'conv{i}': (64, 64, 4, 4) for i in range(3)},  # Viewed as (4096, 16).
    # Viewed as (1024, 256). (On XLA:GPU three 64 KiB leaves carried one
    # leaf's worth of temporary, chain and fused alike, in any norm form.)
    {f'conv{i}': (1024, 256, 1, 1) for i in range(3)},
    {f'conv{i}': (4, 4, 64, 64) for i in range(3)},  # Flax layout: as is.
    # Stacked layers (``nn.scan`` layout), norms per layer: BERT-base's
    # stacked LARS step wrote 324 MiB of ``d`` and ran 1.8x slower.
    {'layers': (4, 512, 256), 'layers_b': (4, 256, 512)},
  ],
  ids=[
    'matrix',
    'same_shape_matrices',
    'conv_kernels',
    'conv_kernels_1x1',
    'conv_kernels_hwio',
    'stacked_layers',
  ],
)
def test_fast_path_writes_no_update_sized_temporary_for_lars(shapes):
  p = {k: jnp.ones(v) for k, v in shapes.items()}
  size = 4 * max(np.prod(v) for v in shapes.values())
  stacked = lj.Stacked('layers') if 'layers' in shapes else None
  temps = {}
  for fused in (True, False):
    tx = lj.lars(0.1, weight_decay=1e-4, fused=fused, stacked=stacked)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    c = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()
    temps[fused] = c.memory_analysis().temp_size_in_bytes
  assert temps[True] < 0.25 * size
  if jax.default_backend() == 'cpu':  # XLA:GPU fuses the chain's too.
    assert temps[False] >= 0.25 * size  # The check can fail.


# PyTorch-layout conv kernels (short last dimensions), Flax's layout and a
# matrix (long last dimensions), and a scalar.
@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions"
)
@pytest.mark.parametrize(
  'make',
  [
    lambda: lj.lars(0.1, weight_decay=1e-4),
    lambda: lj.paddle.LarsMomentum(0.1, 0.9, 0.001, 1e-4),
  ],
  ids=['lars', 'paddle.Lars'],
)
def test_lars_update_fuses_with_the_callers_add(make, monkeypatch):
  """LARS's update is its new trace, also a state output, so the caller's
  ``p + u`` fused with nothing: a lone add, which XLA:CPU runs 8-12x slower
  on a conv kernel's 3x3 or 1x1 last dimensions. The fast path adds an exact
  ``-0.0`` there so that it fuses; numbers and state stay the same bit for
  bit."""
  params = h.conv_tree()
  grads = [jax.tree.map(lambda x: 0.1 * x + 0.01, params)]
  grads.append(jax.tree.map(jnp.zeros_like, params))  # Zero norms.
  grads.append(jax.tree.map(lambda x: -0.3 * x, params))
  lone, runs = {}, {}
  for on in (True, False):
    if not on:
      monkeypatch.setattr(fused_lib, 'slow_lone_ops', lambda shape: False)
    tx = make()
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    lone[on] = h.lone_adds_on_short_last_dims(
      step.lower(p, s, grads[0]).compile().as_text()
    )
    for g in grads:
      p, s = step(p, s, g)
    runs[on] = (p, s)
    assert step._cache_size() == 1  # No retrace.
  assert lone[True] == []
  # The check can fail: without the added op both conv kernels' adds are lone.
  assert len(lone[False]) == 2, lone[False]
  chex.assert_trees_all_equal(runs[True], runs[False])


def test_slow_lone_ops_are_the_short_last_dimensions_on_cpu():
  on_cpu = jax.default_backend() == 'cpu'
  assert fused_lib.slow_lone_ops((512, 512, 3, 3)) == on_cpu
  assert fused_lib.slow_lone_ops((2048, 512, 1, 1)) == on_cpu
  assert not fused_lib.slow_lone_ops((3, 3, 512, 512))
  assert not fused_lib.slow_lone_ops((768, 3072))
  assert not fused_lib.slow_lone_ops((8,))


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions"
)
@pytest.mark.parametrize(
  'make, per_leaf',
  [
    (lambda: lj.lamb(1e-3, weight_decay=0.01), 1),
    (lambda: lj.paddle.Lamb(1e-3, 0.01), 1),
    # optax's LARS norm reads ``g - c p`` with ``c`` a scalar of the leaf's
    # own (``norm_operand``): one more scalar kernel.
    (lambda: lj.lars(0.1, weight_decay=1e-4), 2),
    (lambda: lj.lars(0.1, weight_decay=1e-4, trust_ratio_form='paddle'), 1),
    (lambda: lj.paddle.LarsMomentum(0.1, 0.9, 0.001, 1e-4), 1),
  ],
  ids=['lamb', 'paddle.Lamb', 'lars', 'lars_paddle_form', 'paddle.Lars'],
)
def test_trust_ratio_is_one_scalar_kernel_per_leaf(make, per_leaf):
  """Each kernel is compiled and scheduled: the trust ratio's square roots,
  guard and division form one scalar kernel per leaf, not three (XLA keeps
  an expensive scalar op apart when two kernels read it)."""
  n = 6
  params = {f'w{i}': jnp.full((96, 64), 0.1 * (i + 1)) for i in range(n)}
  tx = make()
  step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
  text = step.lower(params, tx.init(params), params).compile().as_text()
  entry = text[text.index('ENTRY') :]
  scalar = re.findall(r'= f32\[\] fusion\(.*kind=kLoop', entry)
  # At most 3 for the whole step: the count and the bias corrections.
  assert len(scalar) <= per_leaf * n + 3, scalar


# ---------------------------------------------------------------------------
# LAMB under XLA:CPU's breadth-first schedule: one large direction at a time.
# ---------------------------------------------------------------------------


def _large_tree(seed=0, blocks=4):
  """Leaves over the window size (``fused._SMALL``) with small ones between."""
  rng = np.random.default_rng(seed)
  return {
    f'block{i}': {
      'kernel': rng.normal(size=(96, 64)).astype(np.float32),
      'bias': rng.normal(size=64).astype(np.float32),
    }
    for i in range(blocks)
  }


ORDERED_CONFIGS = {
  name: CONFIGS[name]
  for name in ('lamb', 'lamb_masks_clamp_ratio', 'lamb_bf16_moments')
}
ORDERED_CONFIGS['lamb_stacked'] = lambda f: lj.lamb(
  1e-2, weight_decay=0.01, stacked=lj.Stacked('layers'), fused=f
)


@pytest.mark.parametrize('nan', [False, True], ids=['finite', 'nan_leaf'])
@pytest.mark.parametrize('name', sorted(ORDERED_CONFIGS))
def test_one_direction_at_a_time_changes_no_number(name, nan, monkeypatch):
  """The ordering is a data dependency through an exact zero: params and
  state are bit for bit those of the unordered step, and a NaN leaf stays in
  its leaf (the next leaf depends on its trust ratio)."""
  params = _large_tree()
  if name == 'lamb_stacked':  # Stacked leaves: the ratios are vectors.
    params = {
      'layers': jax.tree.map(lambda *xs: np.stack(xs), *params.values())
    }
    params['head'] = _large_tree(1, blocks=1)['block0']
  rng = np.random.default_rng(4)
  grads = [
    jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
    for _ in range(3)
  ]
  first_big = 'layers' if name == 'lamb_stacked' else 'block0'
  if nan:
    grads[1][first_big]['kernel'][3, 5] = np.nan
  params, grads = h.to_jax(params), [h.to_jax(g) for g in grads]
  runs, calls = h.ordered_and_unordered_runs(
    monkeypatch, fused_lib, lambda: ORDERED_CONFIGS[name](True), params, grads
  )
  # Every large leaf after the first waits for a ratio; with bf16 moments the
  # gradient waits too (the f32 moments are temporaries), and every large
  # leaf's new bf16 moments wait for its own ratio (no copy of the old ones).
  waiting = 1 if name == 'lamb_stacked' else 3
  want = waiting + ((waiting + 2 * (waiting + 1)) if 'bf16' in name else 0)
  assert calls[True] == want
  assert calls[False] == 0  # Not ordered: no dependency added.
  chex.assert_trees_all_equal(runs[True], runs[False])
  if nan:  # The NaN stays in its leaf.
    for leaf_name, x in h.names_and_leaves(runs[True][0][-1]):
      assert np.all(np.isfinite(x)) == (leaf_name != f'{first_big}.kernel')


def _window_between_tree():
  """Four large leaves with a full window of small leaves before each."""
  rng = np.random.default_rng(1)
  return {
    f'block{i}': {
      **{f'bias{j:02d}': rng.normal(size=64) for j in range(16)},
      'kernel': rng.normal(size=(256, 128)),
    }
    for i in range(4)
  }


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason='XLA:CPU schedules breadth first'
)
@pytest.mark.parametrize('tree', ['bias', 'window'])
def test_one_direction_at_a_time_keeps_one_temporary(monkeypatch, tree):
  """What the ordering is for: without it XLA:CPU keeps every large leaf's
  direction alive at once; with it, one buffer is reused leaf after leaf.
  ``window``: a full window of small leaves before each large leaf; their
  ratios do not wait for the large leaf before them, so the chain must run
  from large leaf to large leaf, not through them (it broke there before)."""
  params = _large_tree() if tree == 'bias' else _window_between_tree()
  params = h.to_jax(jax.tree.map(lambda x: x.astype(np.float32), params))
  temps = {}
  for ordered in (True, False):
    monkeypatch.setattr(fused_lib, 'breadth_first', lambda o=ordered: o)
    tx = lj.lamb(1e-3, weight_decay=0.01)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    compiled = step.lower(params, tx.init(params), params).compile()
    temps[ordered] = compiled.memory_analysis().temp_size_in_bytes
  leaf_bytes = params['block0']['kernel'].nbytes
  small_bytes = 64 * 1024 if tree == 'window' else 16 * 1024
  assert temps[True] < 1.5 * leaf_bytes + small_bytes, temps
  assert temps[False] >= 3 * leaf_bytes, temps  # The check can fail.


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason='XLA:CPU schedules breadth first'
)
def test_bf16_moments_are_updated_in_place(monkeypatch):
  """The direction re-reads the old bf16 moments that the new ones replace
  in their donated buffers; written after the leaf's trust ratio, they need
  no copy of the old ones (which XLA:CPU otherwise makes every step)."""
  params = h.to_jax(_large_tree())
  copies = {}
  for ordered in (True, False):
    monkeypatch.setattr(fused_lib, 'breadth_first', lambda o=ordered: o)
    tx = lj.lamb(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    text = step.lower(params, tx.init(params), params).compile().as_text()
    entry = text[text.index('ENTRY') :]
    # Large leaves only: a 64-element bias's copy costs less than ordering.
    copies[ordered] = entry.count('bf16[96,64]{1,0} copy(')
  assert copies == {True: 0, False: 8}  # 4 large leaves x 2 moments.


@pytest.mark.parametrize(
  'previous',
  [2.0, -3.0, 0.0, np.nan, np.inf, -np.inf, [1.0, np.nan], [3e38, 3e38], []],
)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_after_returns_its_input_bit_for_bit(previous, dtype):
  x = jnp.asarray([1e-6, 1.5, -0.25, 0.0, -0.0, np.inf, np.nan], dtype)
  got = jax.jit(fused_lib.after)(x, jnp.asarray(previous, jnp.float32))
  assert got.dtype == x.dtype
  bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
  # Bit for bit (-0.0 stays -0.0), except a NaN's payload: XLA:GPU's add
  # returns its canonical NaN, so a NaN need only stay a NaN.
  finite = ~np.isnan(np.asarray(x, np.float32))
  np.testing.assert_array_equal(
    np.asarray(got).view(bits)[finite], np.asarray(x).view(bits)[finite]
  )
  assert np.isnan(np.asarray(got, np.float32)[~finite]).all()


# ---------------------------------------------------------------------------
# lamb(workspace=True): the direction goes into a buffer in the state.
# ---------------------------------------------------------------------------

WORKSPACE_CONFIGS = {
  'plain': dict(learning_rate=1e-2, weight_decay=0.01),
  'masks_clamp_ratio': LAMB_MASKS_CLAMP,
  'bf16_moments': dict(
    learning_rate=1e-2,
    weight_decay=0.01,
    mu_dtype=jnp.bfloat16,
    nu_dtype=jnp.bfloat16,
  ),
  'diagnostics': dict(learning_rate=1e-2, weight_decay=0.01, diagnostics=True),
  'wd_schedule': dict(learning_rate=1e-2, weight_decay=_wd_sched),
}


@pytest.mark.parametrize('min_bytes', [-1, 64])
@pytest.mark.parametrize('name', sorted(WORKSPACE_CONFIGS))
def test_workspace_changes_no_number(name, min_bytes, monkeypatch):
  """Same params and same inner state as without the workspace, bit for bit
  (the same arithmetic in the same order), and the buffer holds the last
  direction r = m_hat / (sqrt(v_hat) + eps) + wd p of a float64 reference.
  The size from which a direction gets a buffer is lowered so that these
  small leaves have one: every adapted leaf (-1), or some (64 bytes)."""
  monkeypatch.setattr(fused_lib, '_WORKSPACE_MIN_BYTES', min_bytes)
  kw = WORKSPACE_CONFIGS[name]
  params = h.to_jax(_big_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(_big_tree(), 4, seed=7)]
  plain, ws = lj.lamb(**kw), lj.lamb(**kw, workspace=True)
  (traj_a, state_a), (traj_b, state_b) = (
    h.run_steps(tx, params, grads) for tx in (plain, ws)
  )

  # XLA:CPU compiles both to the same arithmetic. XLA:GPU fuses the two
  # programs differently (FMA contraction), which moves bf16-moment runs by
  # an ulp (seen on an H100): there, equal to 4 ulp of each leaf's dtype.
  def same(a, b):
    if jax.default_backend() == 'cpu':
      return chex.assert_trees_all_equal(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      eps = (
        float(jnp.finfo(x.dtype).eps)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else 0.0
      )
      np.testing.assert_allclose(
        np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=4 * eps
      )

  same(traj_a, traj_b)
  ws_state = state_b
  if 'diagnostics' in kw:  # with_diagnostics wraps the workspace state.
    same(lj.diagnostics(state_a), lj.diagnostics(state_b))
    state_a, ws_state = state_a.inner_state, state_b.inner_state
  same(state_a, ws_state.inner_state)
  assert isinstance(ws_state, lj.WorkspaceState)

  # Float64 reference of the direction of the last step.
  adam = h.NumpyAdam(eps=1e-6)
  wd = kw['weight_decay']
  decay = kw.get('mask', lambda p: jax.tree.map(lambda _: True, p))(params)
  adapt = kw.get('trust_ratio_mask', lambda p: jax.tree.map(lambda _: 1, p))(
    params
  )
  p64 = h.to_np64(params)
  st = jax.tree.map(adam.init, p64)
  for t, (g, p_before) in enumerate(
    zip(grads, [params, *traj_a[:-1]], strict=True), start=1
  ):
    # A schedule is read at the count before the step, as optax reads it.
    wd_t = float(wd(t - 1)) if callable(wd) else wd
    r = jax.tree.map(
      lambda g, s, p, dec, t=t, wd_t=wd_t: (
        adam.direction(np.float64(g), s, t)
        + (wd_t * np.float64(p) if dec else 0)
      ),
      h.to_np64(g),
      st,
      h.to_np64(p_before),
      decay,
      is_leaf=lambda x: isinstance(x, dict) and set(x) == {'m', 'v'},
    )
  buffers = 0
  for (name_, want), (_, got), (_, a) in zip(
    h.names_and_leaves(r),
    h.names_and_leaves(ws_state.direction),
    h.names_and_leaves(adapt),
    strict=True,
  ):
    if not a or want.size * 4 <= min_bytes:  # The directions are float32.
      assert got.shape == (0,), name_
      continue
    buffers += 1
    tol = 2e-2 if 'bf16' in name else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name_)
  # Both settings keep some buffers; -1 one per adapted leaf.
  n_adapted = sum(bool(a) for _, a in h.names_and_leaves(adapt))
  assert buffers == n_adapted if min_bytes < 0 else 0 < buffers < n_adapted


_PADDLE_WS_GROUPS = [
  {'params': lambda n: 'kernel' in n, 'learning_rate': 0.5},
  {'params': lambda n: 'kernel' not in n},
]


@pytest.mark.parametrize('master', [False, True])
def test_paddle_lamb_takes_a_workspace(master, monkeypatch):
  """``lj.paddle.Lamb(workspace=True)``: per parameter group, under the grad
  clip (and master weights), the same params bit for bit on CPU."""
  monkeypatch.setattr(fused_lib, '_WORKSPACE_MIN_BYTES', 64)  # Some leaves.
  dtype = jnp.bfloat16 if master else jnp.float32
  params = h.to_jax(_big_tree(), dtype)
  grads = [h.to_jax(g, dtype) for g in h.grads_sequence(_big_tree(), 3)]

  def make(**kw):
    return lj.paddle.Lamb(
      1e-2,
      exclude_from_weight_decay_fn=lambda n: 'bias' in n,
      grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0),
      parameters=_PADDLE_WS_GROUPS,
      multi_precision=master,
      **kw,
    )

  got, state = h.run_steps(make(workspace=True), params, grads)
  want, _ = h.run_steps(make(), params, grads)
  if jax.default_backend() == 'cpu':
    chex.assert_trees_all_equal(got, want)
  else:  # XLA:GPU may contract differently (see above): a rounding apart.
    assert h.trajectory_rel_err(got, want) < 1e-6
  ws = [
    x
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, lj.WorkspaceState)
    )
    if isinstance(x, lj.WorkspaceState)
  ]
  assert len(ws) == 2  # One per parameter group.
  assert any(x.size for w in ws for x in jax.tree.leaves(w.direction))
  with pytest.raises(ValueError, match='workspace'):
    make(workspace=1)


def test_workspace_takes_the_large_directions_only(monkeypatch):
  """The reason it exists: XLA:CPU writes a large r into the donated buffer
  instead of a fresh temporary. Directions of at most 16 MiB stay
  temporaries (one at a time), so the temporary is the largest of those.
  Without a workspace the large direction's norm is spelled apart and it
  is not written at all; spelled nowhere, it is a temporary. Compiled only
  (abstract arrays): nothing of this size is allocated."""
  mib = 2**20
  shapes = {'w': (2304, 2048), 'v': (1024, 1024), 'b': (1024,)}  # 18, 4 MiB
  p = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  temps = {}
  for workspace, spelled in ((False, True), (False, False), (True, True)):
    # Every norm spelled apart, or none.
    monkeypatch.setattr(
      fused_lib, '_SPELLED_MIN_BYTES', -1 if spelled else 2**40
    )
    tx = lj.lamb(1e-3, weight_decay=0.01, workspace=workspace)
    state = jax.eval_shape(tx.init, p)
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    m = step.lower(p, state, p).compile().memory_analysis()
    temps[workspace, spelled] = m.temp_size_in_bytes
    monkeypatch.undo()
    # Every output, the new workspace included, reuses a donated buffer (jit
    # drops unused arguments, so a never-read workspace would not be).
    assert m.alias_size_in_bytes >= 0.99 * m.output_size_in_bytes
  assert jax.tree.map(jnp.shape, state.direction) == {
    'w': (2304, 2048),
    'v': (0,),
    'b': (0,),
  }
  assert temps[True, True] < 4.5 * mib
  assert temps[False, True] < 4.5 * mib
  if jax.default_backend() == 'cpu':  # XLA:GPU needs no workspace for r.
    assert temps[False, False] >= 18 * mib


def test_workspace_no_retrace_and_odd_trees(monkeypatch):
  monkeypatch.setattr(fused_lib, '_WORKSPACE_MIN_BYTES', -1)  # Every leaf.
  traces = []
  tx = lj.lamb(1e-2, weight_decay=0.1, workspace=True)

  def step(p, s, g):
    traces.append(1)
    return h.train_step(tx)(p, s, g)

  step = jax.jit(step)
  for tree in (
    {},
    {'s': jnp.array(2.0, jnp.float32)},  # Not weak-typed: no retrace.
    {'z': jnp.zeros((3, 2)), 'e': jnp.zeros((0, 4))},
    {'w': jnp.ones((2, 3), jnp.bfloat16)},
  ):
    traces.clear()
    s = tx.init(tree)
    p = tree
    for _ in range(3):
      p, s = step(p, s, jax.tree.map(jnp.ones_like, tree))
    assert len(traces) == 1
    chex.assert_tree_all_finite(p)
    chex.assert_trees_all_equal_shapes_and_dtypes(p, tree)
    ref, _ = h.run_steps(
      lj.lamb(1e-2, weight_decay=0.1),
      tree,
      [jax.tree.map(jnp.ones_like, tree)] * 3,
    )
    chex.assert_trees_all_equal(p, ref[-1])


def test_workspace_state_round_trips_through_a_checkpoint(monkeypatch):
  monkeypatch.setattr(fused_lib, '_WORKSPACE_MIN_BYTES', 64)  # Some leaves.
  params = h.to_jax(_big_tree())
  tx = lj.lamb(1e-2, weight_decay=0.01, workspace=True)
  _, state = h.run_steps(tx, params, [h.to_jax(h.grads_sequence(params, 1)[0])])
  loaded = lj.from_bytes(tx.init(params), lj.to_bytes(state))
  chex.assert_trees_all_equal(loaded, state)


@pytest.mark.parametrize(
  'kw, pattern',
  [
    (dict(workspace=1), r'`workspace` must be True or False, got 1'),
    (dict(workspace=True, fused=False), r'workspace.*fused=False'),
    (dict(workspace=True, state_8bit=True), r'workspace.*state_8bit=True'),
  ],
)
def test_workspace_bad_inputs(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    lj.lamb(1e-3, **kw)


def test_workspace_takes_array_hyperparameters(monkeypatch):
  """Scalar arrays (as ``optax.inject_hyperparams`` passes them) keep the
  fast path, so the workspace too: the chain's numbers."""
  monkeypatch.setattr(fused_lib, '_WORKSPACE_MIN_BYTES', -1)  # Every leaf.
  params = h.to_jax(_big_tree())
  grads = [h.to_jax(g) for g in h.grads_sequence(params, 3)]
  kw = dict(b1=jnp.asarray(0.9), weight_decay=jnp.asarray(0.01))
  got, state = h.run_steps(lj.lamb(1e-2, **kw, workspace=True), params, grads)
  want, _ = h.run_steps(lj.lamb(1e-2, **kw, fused=False), params, grads)
  assert isinstance(state, fused_lib.WorkspaceState)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)


# The norm of LARS's ``d = g + wd p`` on XLA:CPU: spelled apart from the
# update's ``d`` (``norm_operand``), as the leaf is where the last dimension
# is long (matrices, Flax-layout conv kernels), on a view with a long last
# dimension where it is short (PyTorch-layout conv kernels, narrow matrices);
# elsewhere (``materialises_shared`` False) the update's ``d`` itself. 8,192
# elements.
NORM_FORMS = {
  'spelled': (True, (128, 64)),
  'spelled_hwio': (True, (4, 4, 16, 32)),
  'viewed': (True, (32, 16, 4, 4)),
  'viewed_1x1': (True, (512, 16, 1, 1)),
  'viewed_narrow': (True, (1024, 8)),
  'direct': (False, (128, 64)),
}


@pytest.mark.parametrize(
  'shape, want',
  [
    ((2048, 512, 1, 1), (2048, 512)),
    ((512, 512, 3, 3), (512, 4608)),
    ((64, 3, 7, 7), (192, 49)),
    ((32, 16, 4, 4), (512, 16)),
    ((1024, 8), (8192,)),
    ((1048576, 1), (1048576,)),
    ((3, 3, 64, 64), (3, 3, 64, 64)),
    ((128, 16), (128, 16)),
    ((4096,), (4096,)),
    ((2, 3), (6,)),
  ],
)
def test_long_last_shape(shape, want):
  assert fused_lib.long_last_shape(shape) == want


def test_long_last_shape_keeps_the_size_and_a_long_last_dimension():
  rng = np.random.default_rng(0)
  for _ in range(200):
    shape = tuple(int(d) for d in rng.integers(1, 20, size=rng.integers(1, 6)))
    got = fused_lib.long_last_shape(shape)
    assert np.prod(got) == np.prod(shape) and len(got) <= max(2, len(shape))
    assert got[-1] >= min(16, np.prod(shape))
    assert fused_lib.long_last_shape(got) == got
    if shape[-1] >= 16:
      assert got == shape


@pytest.mark.parametrize(
  'shape, dtype, want',
  [
    ((512, 512, 3, 3), jnp.float32, (512, 4608)),
    ((512, 512, 3, 3), jnp.bfloat16, (512, 4608)),
    ((3, 3, 512, 512), jnp.float32, (3, 3, 512, 512)),
    ((3, 3, 512, 512), jnp.bfloat16, (1, 3, 3, 512, 512)),
    ((768, 3072), jnp.float32, (768, 3072)),
    ((768, 3072), jnp.bfloat16, (1, 768, 3072)),
    ((768, 3072), jnp.float16, (1, 768, 3072)),
    ((5000,), jnp.bfloat16, (1, 5000)),
    ((5000,), jnp.int8, (5000,)),
    ((), jnp.bfloat16, (1,)),
  ],
)
def test_reduction_shape(shape, dtype, want):
  if jax.default_backend() != 'cpu':
    want = shape  # The views are for XLA:CPU's fusion decisions.
  assert fused_lib.reduction_shape(shape, dtype) == want


# bf16 leaves over the fast path's small-leaf size: PyTorch- and Flax-layout
# conv kernels, a matrix and a vector.
BF16_SHAPES = {
  'oihw': (32, 16, 3, 3),
  'hwio': (3, 3, 16, 32),
  'dense': (96, 64),
  'vec': (5000,),
}


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions"
)
@pytest.mark.parametrize(
  'make',
  [
    lambda: lj.lars(0.1, weight_decay=1e-4),
    lambda: lj.lamb(1e-3, weight_decay=0.01),
    lambda: lj.paddle.LarsMomentum(0.1, 0.9, 0.001, 1e-4),
    lambda: lj.paddle.Lamb(1e-3, 0.01),
  ],
  ids=['lars', 'lamb', 'paddle.Lars', 'paddle.Lamb'],
)
def test_bf16_leaves_norms_write_no_float32_copy(make, monkeypatch):
  """XLA:CPU reduces in float32. Summed on the leaf's own shape, a bf16
  param (or direction) read by the update too had its float32 convert
  written out as a lone op, a temporary twice the leaf (BERT-base LARS:
  835 MiB, step 3x slower). On a view the norm's fusion converts for
  itself; results stay those of the unviewed sums."""
  rng = np.random.default_rng(0)
  params = {
    k: jnp.asarray(rng.normal(size=v), jnp.bfloat16)
    for k, v in BF16_SHAPES.items()
  }
  grads = [
    jax.tree.map(lambda x: (0.1 * x + 0.01).astype(x.dtype), params),
    jax.tree.map(jnp.zeros_like, params),  # Zero norms.
    jax.tree.map(lambda x: (-0.3 * x).astype(x.dtype), params),
  ]
  lone, temp, runs = {}, {}, {}
  for on in (True, False):
    if not on:
      monkeypatch.setattr(
        fused_lib, 'reduction_shape', lambda shape, dtype: tuple(shape)
      )
    tx = make()
    step = jax.jit(h.train_step(tx), donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    compiled = step.lower(p, s, grads[0]).compile()
    lone[on] = h.lone_widening_converts(compiled.as_text())
    temp[on] = compiled.memory_analysis().temp_size_in_bytes
    for g in grads:
      p, s = step(p, s, g)
    runs[on] = (p, s)
    assert step._cache_size() == 1  # No retrace.
  assert lone[True] == [], lone[True]
  # The check can fail: unviewed, the params' converts are written out.
  assert len(lone[False]) >= len(BF16_SHAPES), lone[False]
  f32_copy = 4 * sum(np.prod(v) for v in BF16_SHAPES.values())
  assert temp[True] < 0.5 * f32_copy <= temp[False], temp
  chex.assert_trees_all_equal(runs[True], runs[False])


def _lars_first_update_f64(g, p, wd, lr, c):
  """optax-form LARS's first update of one leaf (or layer), in float64."""
  d = g + wd * p
  return -lr * c * np.linalg.norm(p) / np.linalg.norm(d) * d


@pytest.mark.parametrize('form', sorted(NORM_FORMS))
@pytest.mark.parametrize('delta', [1e-3, 3e-3, 0.03, 0.1, 0.3, 1.0, 10.0, -3.0])
def test_lars_norm_near_cancellation_matches_float64(delta, form, monkeypatch):
  """g = -wd p (1 - delta) + noise: ‖g + wd p‖ is a small part of ‖g‖ and
  wd ‖p‖ near delta = 0; the first step equals float64 numpy to 1e-4 in each
  form of the norm (none expands the square, so none cancels)."""
  on_cpu, shape = NORM_FORMS[form]
  monkeypatch.setattr(fused_lib, 'materialises_shared', lambda: on_cpu)
  rng = np.random.default_rng(0)
  wd, lr, c = 0.01, 0.5, 0.1
  p = rng.normal(size=shape)
  g = -wd * p * (1 - delta) + 1e-5 * wd * rng.normal(size=p.shape)
  want = _lars_first_update_f64(g, p, wd, lr, c)
  tx = lj.lars(lr, weight_decay=wd, trust_coefficient=c)
  u, _ = jax.jit(tx.update)(
    {'w': jnp.asarray(g, jnp.float32)},
    tx.init({'w': jnp.asarray(p, jnp.float32)}),
    {'w': jnp.asarray(p, jnp.float32)},
  )
  np.testing.assert_allclose(
    u['w'], want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
  )


@pytest.mark.parametrize('form', sorted(NORM_FORMS))
def test_lars_norm_of_the_cancelling_leaf_among_several(form, monkeypatch):
  """With one leaf at the weight-decay equilibrium (an expanded norm would
  lose ~10%) and others not, every update equals float64 numpy. No form
  needs a ``lax.cond`` guard; the short-last-dimension ones take the view."""
  on_cpu, shape = NORM_FORMS[form]
  monkeypatch.setattr(fused_lib, 'materialises_shared', lambda: on_cpu)
  rng = np.random.default_rng(1)
  wd, lr, c = 0.01, 0.5, 0.1
  shapes = {k: (shape[0] + 16 * j, *shape[1:]) for j, k in enumerate('abc')}
  p = {k: rng.normal(size=v) for k, v in shapes.items()}
  g = {k: rng.normal(size=v) for k, v in shapes.items()}
  g['b'] = -wd * p['b'] * (1 - 1e-3) + 1e-5 * wd * rng.normal(size=shapes['b'])
  tx = lj.lars(lr, weight_decay=wd, trust_coefficient=c)
  p32, g32 = h.to_jax(p), h.to_jax(g)
  jaxpr = str(jax.make_jaxpr(tx.update)(g32, tx.init(p32), p32))
  assert 'cond[' not in jaxpr
  assert ('optimization_barrier' in jaxpr) == form.startswith('viewed')
  u, _ = jax.jit(tx.update)(g32, tx.init(p32), p32)
  for k in p:
    want = _lars_first_update_f64(g[k], p[k], wd, lr, c)
    np.testing.assert_allclose(
      u[k], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=k
    )


@pytest.mark.parametrize('spelled', [True, False], ids=['spelled', 'direct'])
def test_lars_stacked_norms_near_cancellation_match_float64(
  spelled, monkeypatch
):
  """A stacked leaf whose middle layer sits at the weight-decay equilibrium
  (``‖g + wd p‖`` a thousandth of ``‖g‖``): each layer's update equals
  float64 numpy, spelled apart (XLA:CPU) or on the update's ``d``."""
  monkeypatch.setattr(fused_lib, 'materialises_shared', lambda: spelled)
  rng = np.random.default_rng(4)
  wd, lr, c = 0.01, 0.5, 0.1
  p = rng.normal(size=(3, 128, 64))
  g = rng.normal(size=p.shape)
  g[1] = -wd * p[1] * (1 - 1e-3) + 1e-5 * wd * rng.normal(size=p[1].shape)
  tx = lj.lars(
    lr, weight_decay=wd, trust_coefficient=c, stacked=lj.Stacked('layers')
  )
  p32, g32 = h.to_jax({'layers': p}), h.to_jax({'layers': g})
  u, _ = jax.jit(tx.update)(g32, tx.init(p32), p32)
  for i in range(3):
    want = _lars_first_update_f64(g[i], p[i], wd, lr, c)
    np.testing.assert_allclose(
      u['layers'][i],
      want,
      rtol=1e-4,
      atol=1e-4 * np.abs(want).max(),
      err_msg=f'layer {i}',
    )


@pytest.mark.parametrize('stacked', [False, True], ids=['leaves', 'stacked'])
def test_lars_spelled_norm_is_the_direct_norm(stacked, monkeypatch):
  """``g - (-wd) p`` is ``g + wd p`` bit for bit, so the spelled norm's
  updates equal those of the update's own ``d`` (which XLA:CPU writes out),
  per layer too where layers are stacked."""
  rng = np.random.default_rng(2)
  shapes = {'a': (96, 64), 'b': (96, 64), 'c': (8192,)}
  if stacked:
    shapes = {'layers': (3, 96, 64), 'c': (8192,)}
  p = h.to_jax({k: rng.normal(size=v) for k, v in shapes.items()})
  g = h.to_jax({k: rng.normal(size=v) * 1e-2 for k, v in shapes.items()})
  p['c'], g['c'] = p['c'].astype(jnp.bfloat16), g['c'].astype(jnp.bfloat16)
  tx = lj.lars(
    0.3, weight_decay=0.01, stacked=lj.Stacked('layers') if stacked else None
  )
  outs = []
  for spelled in (True, False):
    monkeypatch.setattr(fused_lib, 'materialises_shared', lambda s=spelled: s)
    jaxpr = str(jax.make_jaxpr(tx.update)(g, tx.init(p), p))
    assert 'cond[' not in jaxpr
    outs.append(jax.jit(tx.update)(g, tx.init(p), p)[0])
  chex.assert_trees_all_equal(outs[0], outs[1])


def _spy_spelled(monkeypatch, min_bytes=None) -> list[bool]:
  """Per LAMB leaf asked, whether its norm was spelled apart; with
  ``min_bytes``, the size from which it is spelled (-1: every leaf)."""
  if min_bytes is not None:
    monkeypatch.setattr(fused_lib, '_SPELLED_MIN_BYTES', min_bytes)
  asked, real = [], fused_lib.spells_norm

  def spy(u):
    asked.append(real(u))
    return asked[-1]

  monkeypatch.setattr(fused_lib, 'spells_norm', spy)
  return asked


# LAMB configurations whose norms are spelled apart (on XLA:CPU) once the
# size is lowered, and one whose moments are recast and never are. Decay
# masks leave some adapted leaves without ``wd p``; a schedule and injected
# hyperparameters make the decay and eps arrays.
_SPELLED_CONFIGS = {
  'lamb': CONFIGS['lamb'],
  'lamb_masks_clamp_ratio': CONFIGS['lamb_masks_clamp_ratio'],
  'lamb_wd_schedule': CONFIGS['lamb_wd_schedule'],
  'lamb_injected': INJECTED['lamb'],
  'lamb_wd_schedule_injected': INJECTED['lamb_wd_schedule'],
  'lamb_bf16_moments': CONFIGS['lamb_bf16_moments'],
}


@pytest.mark.parametrize(
  'name, use_jit',
  [(name, True) for name in sorted(_SPELLED_CONFIGS)]
  # Eagerly too, where the spelled piece runs compiled on its own.
  + [('lamb', False), ('lamb_masks_clamp_ratio', False)],
)
def test_spelled_lamb_norm_equals_chain(name, use_jit, monkeypatch):
  """LAMB's norm taken from its own spelling of the direction (leaves over
  32 MiB on XLA:CPU; here every leaf) gives the chain's trajectory and
  state, zero-norm leaves (a zero bias, a frozen leaf) included."""
  asked = _spy_spelled(monkeypatch, -1)
  params = _big_tree()
  grads = h.grads_sequence(params, 6, seed=3)
  trajs, states = _trajectories(name, params, grads, use_jit, _SPELLED_CONFIGS)
  cpu = fused_lib.materialises_shared()
  if 'bf16' in name:  # Recast moments: the stored ones are not m and v.
    assert not asked
  else:
    assert asked and all(asked) == cpu
  tol = 1e-6 if use_jit else 1e-5
  assert h.trajectory_rel_err(trajs[0], trajs[1]) < tol
  chex.assert_trees_all_equal_shapes_and_dtypes(states[0], states[1])
  rtol = 2**-7 if 'bf16' in name and not use_jit else 1e-5
  chex.assert_trees_all_close(states[0], states[1], rtol=rtol, atol=1e-7)


def test_spelled_lamb_norm_with_bf16_params_and_float32_moments(monkeypatch):
  """bf16 params, float32 moments: a float32 direction, spelled; its decay
  ``wd p`` rounds in bf16 as the chain's does."""
  asked = _spy_spelled(monkeypatch, -1)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _big_tree(1))
  g = jax.tree.map(
    lambda x: jnp.asarray(x, jnp.bfloat16),
    h.grads_sequence(params, 1, seed=5)[0],
  )
  kw = dict(
    learning_rate=1e-2,
    weight_decay=0.01,
    mu_dtype=jnp.float32,
    nu_dtype=jnp.float32,
  )
  configs = {'lamb': _built(lj.lamb, kw)}
  _one_step_close('lamb', params, g, configs)
  assert asked and all(asked) == fused_lib.materialises_shared()


def _lamb_first_update_f64(g, p, wd, lr, eps):
  """LAMB's first update in float64: ``-lr ‖p‖/‖r‖ r`` (ratio 1 where a
  norm is zero), ``r = m_hat / (sqrt(v_hat) + eps) + wd p``."""
  adam = h.NumpyAdam(eps=eps)
  r = adam.direction(g, adam.init(p), 1) + wd * p
  return -lr * h.ref_trust(np.linalg.norm(p), np.linalg.norm(r)) * r


@pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions"
)
@pytest.mark.parametrize(
  'shape', [(8704, 1024), (2176, 1024, 2, 2)], ids=['matrix', 'conv_kernel']
)
@pytest.mark.parametrize('decayed', [True, False], ids=['decayed', 'no_decay'])
def test_lamb_large_leaf_writes_no_direction(shape, decayed, monkeypatch):
  """A 34 MiB leaf (over ``_SPELLED_MIN_BYTES``): the chain writes its
  direction out, the fast path writes no update-sized temporary, and its
  first update equals float64 numpy; zero params (ratio 1) too."""
  asked = _spy_spelled(monkeypatch)
  size = 4 * int(np.prod(shape))
  assert size > fused_lib._SPELLED_MIN_BYTES
  wd, lr, eps = 0.01, 1e-2, 1e-6
  mask = None if decayed else lj.mask_by_name('bias')
  spec = {
    'w': jax.ShapeDtypeStruct(shape, jnp.float32),
    'bias': jax.ShapeDtypeStruct((64,), jnp.float32),
  }
  temps = {}
  for fused in (True, False):
    tx = lj.lamb(lr, weight_decay=wd, eps=eps, mask=mask, fused=fused)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    state = jax.eval_shape(tx.init, spec)
    c = jax.jit(step, donate_argnums=(0, 1)).lower(spec, state, spec)
    temps[fused] = c.compile().memory_analysis().temp_size_in_bytes
  assert temps[True] < 0.25 * size, temps
  assert temps[False] >= 0.25 * size, temps  # The check can fail.
  assert asked == [False, True]  # Not the bias; the 34 MiB leaf.

  rng = np.random.default_rng(6)
  tx = lj.lamb(lr, weight_decay=wd, eps=eps, mask=mask)
  update = jax.jit(tx.update)
  for zero in (False, True):
    p = {'w': rng.normal(size=shape), 'bias': rng.normal(size=64)}
    g = {k: rng.normal(size=np.shape(x)) for k, x in p.items()}
    if zero:
      p['w'] = np.zeros(shape)
    p32, g32 = h.to_jax(p), h.to_jax(g)
    u, _ = update(g32, tx.init(p32), p32)
    want = _lamb_first_update_f64(g['w'], p['w'], wd if decayed else 0, lr, eps)
    np.testing.assert_allclose(
      u['w'], want, rtol=1e-5, atol=1e-6 * np.abs(want).max()
    )
