"""One sweep of bad input over the whole public API.

Every public callable of ``lj``, ``lj.paddle``, ``lj.schedules`` and
``lj.paddle.lr`` appears in ``CASES`` with at least one bad call, which must
raise a ``ValueError`` / ``TypeError`` whose message names the argument (or
the leaf path) and the value. ``test_every_public_callable_is_swept`` fails
when a public name is added without a case here. Inputs with a documented
correct behaviour (``None`` leaves, zero-size arrays, integer dict keys,
``warmup_steps=0``) are checked for that behaviour at the end.
"""

from __future__ import annotations

import inspect
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lambjax as lj

PD, S, LR = lj.paddle, lj.schedules, lj.paddle.lr
NAN = float('nan')
PARAMS = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}


def _state():
  return lj.lamb(0.1).init(PARAMS)


def _mesh_sharding():
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  return {'w': NamedSharding(mesh, P()), 'b': NamedSharding(mesh, P())}


# (public name, bad call, exception, pattern the message must contain)
CASES = [
  # --- optax-style aliases ---------------------------------------------
  ('lamb', lambda: lj.lamb(0.1, b1=NAN), ValueError, r'`b1`.*nan'),
  ('lamb', lambda: lj.lamb('0.1'), ValueError, r'`learning_rate`.*0\.1'),
  ('lamb', lambda: lj.lamb(None), ValueError, r'`learning_rate`.*None'),
  ('lamb', lambda: lj.lamb(0.1, mask=3), ValueError, r'`mask`.*3'),
  (
    'lamb',
    lambda: lj.lamb(0.1, trust_ratio_mask='kernel'),
    ValueError,
    r'`trust_ratio_mask`.*mask_by_name',
  ),
  ('lamb', lambda: lj.lamb(0.1, diagnostics=1), ValueError, r'`diagnostics`'),
  ('lars', lambda: lj.lars(0.1, momentum=-1.0), ValueError, r'`momentum`'),
  (
    'lars',
    lambda: lj.lars(0.1, weight_decay_mask=[1, 2]),
    ValueError,
    r'`weight_decay_mask`',
  ),
  ('adam', lambda: lj.adam(0.1, b2=1.0), ValueError, r'`b2`.*1\.0'),
  ('adam', lambda: lj.adam(0.1, eps='1e-8'), ValueError, r'`eps`.*1e-8'),
  ('adamw', lambda: lj.adamw(0.1, weight_decay=NAN), ValueError, r'nan'),
  ('adamw', lambda: lj.adamw(0.1, mask=0.5), ValueError, r'`mask`.*0\.5'),
  ('adamw_dl', lambda: lj.adamw_dl(0.1, n_layers=0), ValueError, r'n_layers'),
  (
    'adamw_dl',
    lambda: lj.adamw_dl(0.1, layerwise_decay=NAN),
    ValueError,
    r'layerwise_decay',
  ),
  (
    'layerwise_lr_decay',
    lambda: lj.layerwise_lr_decay(0.5, 2, 3),
    TypeError,
    r'`name`.*3',
  ),
  (
    'layerwise_lr_decay',
    lambda: lj.layerwise_lr_decay(0.5, 2, 'layers.5.w'),
    ValueError,
    r'layers\.5\.w.*layer 5',
  ),
  # --- building blocks ---------------------------------------------------
  ('scale_by_adam', lambda: lj.scale_by_adam(b1=-0.1), ValueError, r'`b1`'),
  (
    'scale_by_trust_ratio',
    lambda: lj.scale_by_trust_ratio(min_ratio=NAN),
    ValueError,
    r'`min_ratio`.*nan',
  ),
  (
    'scale_by_trust_ratio',
    lambda: lj.scale_by_trust_ratio(mask='w'),
    ValueError,
    r'`mask`',
  ),
  (
    'add_decayed_weights',
    lambda: lj.add_decayed_weights(-1e-4),
    ValueError,
    r'`weight_decay`.*-0\.0001',
  ),
  (
    'add_decayed_weights',
    lambda: lj.add_decayed_weights(0.1, 7),
    ValueError,
    r'`mask`.*7',
  ),
  (
    'scale_by_lr_ratio',
    lambda: lj.scale_by_lr_ratio(0.5),
    ValueError,
    r'`lr_ratio_fn`.*0\.5',
  ),
  (
    'scale_by_learning_rate',
    lambda: lj.scale_by_learning_rate(-1.0),
    ValueError,
    r'`learning_rate`.*-1\.0',
  ),
  (
    'clip_by_global_norm',
    lambda: lj.clip_by_global_norm('1'),
    ValueError,
    r'`max_norm`',
  ),
  ('clip_by_norm', lambda: lj.clip_by_norm(NAN), ValueError, r'`max_norm`'),
  ('clip_by_value', lambda: lj.clip_by_value(1.0, 2.0), ValueError, r'`min`'),
  # --- names, learning rate, diagnostics -----------------------------------
  ('mask_by_name', lambda: lj.mask_by_name(3), ValueError, r'`predicate`'),
  ('mask_by_name', lambda: lj.mask_by_name('('), ValueError, r"'\('"),
  (
    'tree_names',
    lambda: lj.tree_names({1: jnp.ones(1), 'a': jnp.ones(1)}),
    ValueError,
    r'`tree`.*sortable',
  ),
  ('get_lr', lambda: lj.get_lr({'a': jnp.ones(1)}), ValueError, 'no learning'),
  ('set_lr', lambda: lj.set_lr(_state(), NAN), ValueError, r'`value`.*nan'),
  (
    'set_lr',
    lambda: lj.set_lr(lj.lamb(optax.constant_schedule(0.1)).init(PARAMS), 0.2),
    ValueError,
    r'schedule',
  ),
  ('diagnostics', lambda: lj.diagnostics(_state()), ValueError, 'diagnostics'),
  ('with_diagnostics', lambda: lj.with_diagnostics(3), ValueError, r'`tx`.*3'),
  # --- wrappers -------------------------------------------------------------
  (
    'apply_if_finite',
    lambda: lj.apply_if_finite(lj.lamb(0.1), 1.5),
    ValueError,
    r'`max_consecutive_errors`.*1\.5',
  ),
  (
    'with_packed_state',
    lambda: lj.with_packed_state(lj.lamb(0.1), max_size=0),
    ValueError,
    r'`max_size`.*0',
  ),
  (
    'with_packed_state',
    lambda: lj.with_packed_state(lj.lamb(0.1), max_size=2.5),
    ValueError,
    r'`max_size`.*2\.5',
  ),
  (
    'with_packed_state',
    lambda: lj.with_packed_state(lj.lamb(0.1)).update(
      PARAMS, lj.lamb(0.1).init(PARAMS), PARAMS
    ),
    ValueError,
    r'PackedState.*got tuple',
  ),
  (
    'unpack_state',
    lambda: lj.unpack_state(
      lj.with_packed_state(lj.lamb(0.1)).init(PARAMS)._replace(buffers={})
    ),
    ValueError,
    r'not in the state.s buffers \(none\)',
  ),
  (
    'apply_if_finite',
    lambda: lj.apply_if_finite('adam', 1),
    ValueError,
    r'`tx`',
  ),
  (
    'with_master_weights',
    lambda: lj.with_master_weights(None),
    ValueError,
    r'`tx`.*None',
  ),
  ('lazy_rows', lambda: lj.lazy_rows(optax.adam), ValueError, r'`tx`'),
  (
    'accumulate_gradients',
    lambda: lj.accumulate_gradients(lj.adam(0.1), 0),
    ValueError,
    r'`every_k_steps`.*0',
  ),
  (
    'accumulate_gradients',
    lambda: lj.accumulate_gradients(None, 2),
    ValueError,
    r'`tx`',
  ),
  (
    'Stacked',
    lambda: lj.lamb(0.1, stacked=lj.Stacked('[')),
    ValueError,
    r'`stacked.pattern`',
  ),
  (
    'scale_by_adam_8bit',
    lambda: lj.scale_by_adam_8bit(b2=1.0),
    ValueError,
    r'`b2`.*1\.0',
  ),
  ('trace_8bit', lambda: lj.trace_8bit(-0.9), ValueError, r'`decay`.*-0\.9'),
  ('state_bytes', lambda: lj.state_bytes({'a': 'x'}), ValueError, r"'a'"),
  ('lamb', lambda: lj.lamb(0.1, state_8bit=8), ValueError, r'`state_8bit`.*8'),
  # --- state on disk ----------------------------------------------------------
  ('state_dict', lambda: lj.state_dict({'a': object()}), ValueError, r"'a'"),
  (
    'load_state_dict',
    lambda: lj.load_state_dict(_state(), {'0': {}}),
    ValueError,
    r"at '0",
  ),
  (
    'load_state_dict',
    lambda: lj.load_state_dict(
      _state(), lj.state_dict(lj.lars(0.1).init(PARAMS))
    ),
    ValueError,
    r'load_state_dict',
  ),
  ('to_bytes', lambda: lj.to_bytes({'a': 'text'}), ValueError, r"'a'"),
  ('from_bytes', lambda: lj.from_bytes(_state(), 'x'), ValueError, r'bytes'),
  (
    'from_bytes',
    lambda: lj.from_bytes(_state(), b'\x00' * 9),
    ValueError,
    r'checkpoint',
  ),
  ('save_state', lambda: lj.save_state(3, _state()), TypeError, r'`path`.*3'),
  (
    'load_state',
    lambda: lj.load_state(os.path.join(tempfile.gettempdir(), 'nope.x'), 1),
    FileNotFoundError,
    r'nope\.x',
  ),
  # --- sharding -----------------------------------------------------------------
  (
    'state_sharding',
    lambda: lj.state_sharding(lj.lamb(0.1), PARAMS, {'w': 1, 'b': 2}),
    ValueError,
    r'NamedSharding',
  ),
  (
    'state_sharding',
    lambda: lj.state_sharding(
      lj.lamb(0.1), PARAMS, _mesh_sharding(), zero_axis='model'
    ),
    ValueError,
    r"`zero_axis` 'model'",
  ),
  # --- lj.paddle ------------------------------------------------------------------
  ('Lamb', lambda: PD.Lamb(beta2=1.5), ValueError, r'`beta2`.*1\.5'),
  ('Lamb', lambda: PD.Lamb(grad_clip=1.0), ValueError, r'`grad_clip`'),
  (
    'LarsMomentum',
    lambda: PD.LarsMomentum(lars_coeff=NAN),
    ValueError,
    r'`lars_coeff`.*nan',
  ),
  (
    'LarsMomentum',
    lambda: PD.LarsMomentum(exclude_from_weight_decay='bias'),
    ValueError,
    r"\['bias'\]",
  ),
  ('Adam', lambda: PD.Adam(epsilon=-1.0), ValueError, r'`epsilon`.*-1\.0'),
  ('Adam', lambda: PD.Adam(weight_decay='x'), ValueError, r'`weight_decay`'),
  ('AdamW', lambda: PD.AdamW(beta1=1.0), ValueError, r'`beta1`.*1\.0'),
  (
    'AdamW',
    lambda: PD.AdamW(parameters=[{'params': ['w'], 'bogus': 1}]),
    ValueError,
    r"'bogus'",
  ),
  (
    'AdamWDL',
    lambda: PD.AdamWDL(layerwise_decay=-1.0),
    ValueError,
    r'layerwise_decay',
  ),
  ('SGD', lambda: PD.SGD(learning_rate=-0.1), ValueError, r'`learning_rate`'),
  (
    'SGD',
    lambda: PD.SGD(parameters=[{'params': ['nope']}]).init(PARAMS),
    ValueError,
    r"'nope'",
  ),
  (
    'ClipGradByGlobalNorm',
    lambda: PD.ClipGradByGlobalNorm(-1.0),
    ValueError,
    r'`clip_norm`.*-1\.0',
  ),
  (
    'ClipGradByNorm',
    lambda: PD.ClipGradByNorm('a'),
    ValueError,
    r"`clip_norm`.*'a'",
  ),
  ('ClipGradByValue', lambda: PD.ClipGradByValue(-1.0), ValueError, r'`min`'),
  ('L1Decay', lambda: PD.L1Decay(-1.0), ValueError, r'`coeff`.*-1\.0'),
  ('L2Decay', lambda: PD.L2Decay(NAN), ValueError, r'`coeff`.*nan'),
  # --- schedules ----------------------------------------------------------------
  ('step_decay', lambda: S.step_decay(0.1, 0), ValueError, r'`step_size`'),
  (
    'multi_step_decay',
    lambda: S.multi_step_decay(0.1, [5, 2]),
    ValueError,
    r'`milestones`',
  ),
  (
    'piecewise_decay',
    lambda: S.piecewise_decay([1], [0.1]),
    ValueError,
    r'`values`',
  ),
  ('noam_decay', lambda: S.noam_decay(-1, 10), ValueError, r'`d_model`'),
  (
    'linear_warmup',
    lambda: S.linear_warmup(0.1, 2.5, 0.0, 0.1),
    ValueError,
    r'`warmup_steps`.*2\.5',
  ),
  (
    'cosine_annealing',
    lambda: S.cosine_annealing(0.1, 0),
    ValueError,
    r'`T_max`',
  ),
  (
    'polynomial_decay',
    lambda: S.polynomial_decay(0.1, 10, power=NAN),
    ValueError,
    r'`power`',
  ),
  (
    'exponential_decay',
    lambda: S.exponential_decay(0.1, -0.5),
    ValueError,
    r'`gamma`',
  ),
  (
    'inverse_time_decay',
    lambda: S.inverse_time_decay(-0.1, 0.5),
    ValueError,
    r'`learning_rate`',
  ),
  (
    'natural_exp_decay',
    lambda: S.natural_exp_decay(0.1, 'a'),
    ValueError,
    r'`gamma`',
  ),
  (
    'one_cycle',
    lambda: S.one_cycle(0.1, 10, phase_pct=1.5),
    ValueError,
    r'`phase_pct`',
  ),
  (
    'inverse_square_root',
    lambda: S.inverse_square_root(-3),
    ValueError,
    r'`warmup_steps`',
  ),
  (
    'StepDecay',
    lambda: LR.StepDecay(0.1, 5, last_epoch=-5),
    ValueError,
    r'`last_epoch`.*-5',
  ),
  (
    'MultiStepDecay',
    lambda: LR.MultiStepDecay(0.1, milestones='a'),
    ValueError,
    r'`milestones`',
  ),
  (
    'PiecewiseDecay',
    lambda: LR.PiecewiseDecay([1], [0.1, 0.2, 0.3]),
    ValueError,
    r'`values`',
  ),
  (
    'NoamDecay',
    lambda: LR.NoamDecay(d_model=0, warmup_steps=1),
    ValueError,
    r'`d_model`',
  ),
  (
    'LinearWarmup',
    lambda: LR.LinearWarmup(0.1, 'a', 0.0, 0.1),
    ValueError,
    r'`warmup_steps`',
  ),
  (
    'CosineAnnealingDecay',
    lambda: LR.CosineAnnealingDecay(0.1, T_max=-2),
    ValueError,
    r'`T_max`',
  ),
  (
    'PolynomialDecay',
    lambda: LR.PolynomialDecay(0.1, 10, power=-1.0),
    ValueError,
    r'`power`',
  ),
  (
    'ExponentialDecay',
    lambda: LR.ExponentialDecay(0.1, gamma='a'),
    ValueError,
    r'`gamma`',
  ),
  (
    'InverseTimeDecay',
    lambda: LR.InverseTimeDecay(NAN, gamma=0.5),
    ValueError,
    r'`learning_rate`',
  ),
  (
    'NaturalExpDecay',
    lambda: LR.NaturalExpDecay(0.1, gamma=-1.0),
    ValueError,
    r'`gamma`',
  ),
  (
    'OneCycleLR',
    lambda: LR.OneCycleLR(0.1, total_steps=0),
    ValueError,
    r'`total_steps`',
  ),
  (
    'InverseSquareRootSchedule',
    lambda: LR.InverseSquareRootSchedule(-3),
    ValueError,
    r'`warmup_steps`',
  ),
]


def _public_callables():
  out = set()
  for mod in (lj, PD, S, LR):
    for name in dir(mod):
      obj = getattr(mod, name)
      if name.startswith('_') or inspect.ismodule(obj) or not callable(obj):
        continue
      if inspect.isclass(obj) and issubclass(obj, tuple):
        continue  # State classes (NamedTuples): data, not API calls.
      out.add(name)
  return out


def test_every_public_callable_is_swept():
  missing = _public_callables() - {name for name, *_ in CASES}
  assert not missing, f'public names without a bad-input case: {missing}'


@pytest.mark.parametrize(
  'name, call, exc, pattern',
  CASES,
  ids=[f'{c[0]}-{i}' for i, c in enumerate(CASES)],
)
def test_bad_input_raises_clearly(name, call, exc, pattern):
  with pytest.raises(exc, match=pattern) as info:
    call()
  # Short and to the point: no multi-kilobyte XLA dump.
  assert len(str(info.value)) < 600


OPTIMIZERS = {
  'lamb': lambda: lj.lamb(0.1, weight_decay=0.01),
  'lars': lambda: lj.lars(0.1, weight_decay=0.01),
  'adam': lambda: lj.adam(0.1),
  'adamw': lambda: lj.adamw(0.1),
  'adamw_dl': lambda: lj.adamw_dl(0.1, layerwise_decay=0.5, n_layers=2),
  'paddle.Lamb': lambda: PD.Lamb(0.1),
  'paddle.LarsMomentum': lambda: PD.LarsMomentum(0.1),
  'paddle.Adam': lambda: PD.Adam(0.1, weight_decay=0.01),
  'paddle.AdamW': lambda: PD.AdamW(0.1),
  'paddle.AdamWDL': lambda: PD.AdamWDL(0.1, n_layers=2),
  'paddle.SGD': lambda: PD.SGD(0.1),
}


@pytest.mark.parametrize('opt', OPTIMIZERS)
@pytest.mark.parametrize('dtype', [jnp.int32, jnp.complex64, jnp.bool_])
def test_non_float_leaves_named_at_init(opt, dtype):
  params = {'ok': jnp.ones(2), 'bad': jnp.zeros(2, dtype)}
  with pytest.raises(ValueError, match=r"leaf 'bad' has dtype"):
    OPTIMIZERS[opt]().init(params)


@pytest.mark.parametrize('opt', OPTIMIZERS)
def test_mismatched_grads_name_the_leaf(opt):
  tx = OPTIMIZERS[opt]()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"'c'"):
    tx.update({'w': PARAMS['w'], 'c': PARAMS['b']}, state, PARAMS)
  with pytest.raises(ValueError, match=r"'b'.*shape \(4,\)"):
    tx.update({'w': PARAMS['w'], 'b': jnp.ones(4)}, state, PARAMS)


@pytest.mark.parametrize('opt', OPTIMIZERS)
def test_none_leaves_pass_through(opt):
  """Documented: ``None`` leaves (flax's empty collections) stay ``None``."""
  params = {'w': jnp.ones(3), 'gone': None}
  tx = OPTIMIZERS[opt]()
  updates, _ = jax.jit(tx.update)(
    {'w': jnp.ones(3), 'gone': None}, tx.init(params), params
  )
  assert updates['gone'] is None
  assert np.all(np.isfinite(updates['w'])) and np.any(updates['w'] != 0)


@pytest.mark.parametrize('opt', OPTIMIZERS)
def test_zero_size_leaves_work(opt):
  """Documented: a zero-size leaf gets a zero-size update, no NaN anywhere."""
  params = {'w': jnp.ones((2, 2)), 'empty': jnp.zeros((0, 4))}
  tx = OPTIMIZERS[opt]()
  grads = {'w': jnp.ones((2, 2)), 'empty': jnp.zeros((0, 4))}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates['empty'].shape == (0, 4)
  for leaf in jax.tree.leaves((updates, state)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


def test_documented_edge_behaviour():
  # Integer dict keys are names too (decimal, like sequence indices).
  assert lj.tree_names({1: jnp.ones(1), 2: [jnp.ones(1)]}) == {
    1: '1',
    2: ['2.0'],
  }
  # warmup_steps=0: no warmup, lr / sqrt(max(k, 1)).
  s = S.inverse_square_root(0, 2.0)
  np.testing.assert_allclose([s(0), s(1), s(4)], [2.0, 2.0, 1.0])
  # An empty params tree is a valid (empty) problem.
  tx = lj.lamb(0.1)
  assert tx.update({}, tx.init({}), {})[0] == {}
