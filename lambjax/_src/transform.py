"""Composable gradient transformations (the optax protocol)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lambjax._src import base, stacking


def scale_by_adam(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  nu_dtype: jax.typing.DTypeLike | None = None,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's bias-corrected moment ratio.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}}
          + \epsilon}

  This is :func:`optax.scale_by_adam` (same state type, same numbers), plus
  ``nu_dtype``: the second moment can be stored in a lower precision (e.g.
  ``jnp.bfloat16``) while the arithmetic runs in the gradient's dtype.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the denominator outside the square root (``>= 0``).
    eps_root: added inside the square root (``>= 0``).
    mu_dtype: dtype of the first moment; ``None`` follows the params.
    nu_dtype: dtype of the second moment; ``None`` follows the params.
    nesterov: use Nesterov momentum (NAdam).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    ``optax.ScaleByAdamState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.scale_by_adam()
    >>> params = jnp.array([1.0, -2.0])
    >>> u, state = tx.update(jnp.array([0.5, 0.5]), tx.init(params))
    >>> u  # the first Adam direction is sign(g) (up to eps)
    Array([1., 1.], dtype=float32)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  where = 'scale_by_adam'
  base.check_number(where, 'b1', b1, lo=0.0, hi=1.0, hi_open=True)
  base.check_number(where, 'b2', b2, lo=0.0, hi=1.0, hi_open=True)
  base.check_number(where, 'eps', eps, lo=0.0)
  base.check_number(where, 'eps_root', eps_root, lo=0.0)
  inner = optax.scale_by_adam(
    b1=b1,
    b2=b2,
    eps=eps,
    eps_root=eps_root,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
  )
  if nu_dtype is None:
    return inner

  def init_fn(params):
    state = inner.init(params)
    return state._replace(nu=optax.tree.cast(state.nu, nu_dtype))

  # optax's update computes in the gradient's dtype and casts nu back to the
  # dtype held in the state, so only init needs to change.
  return optax.GradientTransformation(init_fn, inner.update)


def _trust_ratio(
  param_norm: jax.Array,
  update_norm: jax.Array,
  trust_coefficient,
  eps,
  dtype,
  min_ratio,
  max_ratio,
) -> jax.Array:
  """optax's trust ratio with its zero-norm fallback, then the clamp."""
  zero_norm = jnp.logical_or(param_norm == 0.0, update_norm == 0.0)
  ratio = guarded_ratio(
    trust_coefficient * param_norm, update_norm + eps, zero_norm, dtype
  )
  if min_ratio is not None or max_ratio is not None:
    ratio = jnp.clip(ratio, min_ratio, max_ratio)
  return ratio


def guarded_ratio(num, den, fallback, dtype) -> jax.Array:
  """``num / den``, or 1 where ``fallback``, never computing 0/0 or x/0.

  The division is guarded too (not only its result) so that no NaN or Inf
  appears anywhere, forward or under ``jax.grad``, and a step passes under
  ``jax_debug_nans``. Where ``fallback`` is False the value is ``num / den``
  exactly.
  """
  # ``1 / 1`` where ``fallback``: the division is the last op, so XLA writes
  # the guarded ratios out once instead of copying the guard into every
  # reader's kernel (2,000 grouped LAMB leaves: XLA compile 0.83x).
  one = jnp.array(1.0, dtype=dtype)
  den = jnp.where(fallback, one.astype(jnp.result_type(den)), den)
  num = jnp.where(fallback, one.astype(jnp.result_type(num)), num)
  ratio = num / den
  return ratio.astype(jnp.result_type(one, ratio))


def paddle_fallback(fallback: jax.Array, weight_decay) -> jax.Array:
  """Paddle's LARS also takes ratio 1 where ``weight_decay`` is 0 (a static
  zero, or an array such as ``optax.inject_hyperparams`` passes)."""
  if base.is_static_number(weight_decay):
    return jnp.ones_like(fallback) if weight_decay == 0.0 else fallback
  return jnp.logical_or(fallback, weight_decay == 0.0)


def _safe_norm(x: jax.Array) -> jax.Array:
  return optax.safe_norm(x, 0.0)


class TrustRatioState(NamedTuple):
  """Trust ratios of the last update, one float32 scalar per leaf.

  Held by ``scale_by_trust_ratio(record=True)`` (and so by ``lamb``/``lars``
  with ``diagnostics=True``); 1.0 on leaves without layer adaptation and
  before the first update. Read it with :func:`lambjax.diagnostics`.
  """

  ratio: base.PyTree


def recorded(unflatten, ratios, template: TrustRatioState) -> TrustRatioState:
  """A ``TrustRatioState`` from per-leaf ratios (``None``: not adapted).

  Stacked leaves record one ratio per layer slice (a 1-D array); the
  ``template`` (from :func:`init_trust_ratios`) fixes every leaf's shape.
  """
  shapes = jax.tree.leaves(template.ratio)
  out = []
  for r, t in zip(ratios, shapes, strict=True):
    if r is None:
      out.append(jnp.ones(t.shape, jnp.float32))
    else:
      out.append(jnp.reshape(r.astype(jnp.float32), t.shape))
  return TrustRatioState(ratio=unflatten(out))


def init_trust_ratios(params: base.PyTree, stacked=None) -> TrustRatioState:
  named, treedef = base.flatten_with_names(params)
  ones = []
  for name, p in named:
    shape = np.shape(base.leaf_value(p))
    axis = stacking.leaf_axis(stacked, name, shape)
    ones.append(jnp.ones(() if axis is None else (shape[axis],), jnp.float32))
  return TrustRatioState(ratio=jax.tree_util.tree_unflatten(treedef, ones))


def scale_by_trust_ratio(
  min_norm: jax.typing.ArrayLike = 0.0,
  trust_coefficient: jax.typing.ArrayLike = 1.0,
  eps: jax.typing.ArrayLike = 0.0,
  *,
  min_ratio: float | None = None,
  max_ratio: float | None = None,
  mask: base.MaskOrFn | None = None,
  weight_decay: float | None = None,
  record: bool = False,
  stacked: stacking.Stacked | str | None = None,
) -> optax.GradientTransformation:
  r"""Scales each leaf's update by its trust ratio (layer adaptation).

  By default this is :func:`optax.scale_by_trust_ratio` (same numbers):

  .. math::
    r = \frac{c \, \max(\|p\|, n_{min})}{\max(\|u\|, n_{min}) + \epsilon},
    \qquad u \leftarrow r\,u,

  with :math:`r = 1` where :math:`\|p\| = 0` or :math:`\|u\| = 0`. Options
  optax lacks:

  * ``min_ratio`` / ``max_ratio`` clamp :math:`r` (after the zero-norm
    fallback, so the bounds always hold);
  * ``mask`` picks the leaves that get adaptation; the others pass through;
  * ``weight_decay`` switches to PaddlePaddle's LARS form. The incoming
    updates are then raw gradients :math:`g` and the output is
    :math:`r\,(g + wd\,p)` with
    :math:`r = c\,\|p\| / (\|g\| + wd\,\|p\| + \epsilon)`, and :math:`r = 1`
    (the raw learning rate, no coefficient) where ``weight_decay``,
    :math:`\|p\|` or :math:`\|g\|` is zero. ``min_norm`` is not used there.

  Args:
    min_norm: lower bound of both norms (optax's option).
    trust_coefficient: the multiplier :math:`c`.
    eps: added to the denominator.
    min_ratio: optional lower bound of :math:`r`.
    max_ratio: optional upper bound of :math:`r`.
    mask: pytree prefix of bools, or a callable on params returning one,
      selecting the adapted leaves (``None``: all). Static, as in
      ``optax.masked``.
    weight_decay: ``None`` (optax form) or Paddle's LARS weight decay.
    record: keep the last ratios in the state (:class:`TrustRatioState`,
      1.0 on unadapted leaves) for logging with :func:`lambjax.diagnostics`.
      ``False`` (default) keeps the transformation stateless.
    stacked: optional :class:`lambjax.Stacked` (or its pattern): leaves
      holding stacked layers get one trust ratio per layer slice.

  Returns:
    An ``optax.GradientTransformation`` (it needs ``params``); stateless
    unless ``record``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.scale_by_trust_ratio()
    >>> p, u = jnp.array([3.0, 4.0]), jnp.array([0.0, 0.5])
    >>> tx.update(u, tx.init(p), p)[0]  # ratio = 5 / 0.5 = 10
    Array([0., 5.], dtype=float32)

  References:
    You et al., `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017 (LARS);
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020 (LAMB).
  """
  where = 'scale_by_trust_ratio'
  base.check_number(where, 'min_norm', min_norm, lo=0.0)
  base.check_number(where, 'trust_coefficient', trust_coefficient, lo=0.0)
  base.check_number(where, 'eps', eps, lo=0.0)
  for arg, v in (('min_ratio', min_ratio), ('max_ratio', max_ratio)):
    if v is not None:
      base.check_number(where, arg, v, lo=0.0)
  if (
    base.is_static_number(min_ratio)
    and base.is_static_number(max_ratio)
    and min_ratio > max_ratio
  ):
    raise ValueError(
      f'{where}: `min_ratio` ({min_ratio}) must be <= `max_ratio` '
      f'({max_ratio}).'
    )
  if weight_decay is not None:
    base.check_number(where, 'weight_decay', weight_decay, lo=0.0)
  base.check_mask(where, 'mask', mask)

  stacked = stacking.check(where, stacked)

  def scale_optax(update, param, axis):
    axes = stacking.reduce_axes(param.ndim, axis)
    keep = axis is not None
    param_norm = optax.safe_norm(param, min_norm, axis=axes, keepdims=keep)
    update_norm = optax.safe_norm(update, min_norm, axis=axes, keepdims=keep)
    ratio = _trust_ratio(
      param_norm,
      update_norm,
      trust_coefficient,
      eps,
      param.dtype,
      min_ratio,
      max_ratio,
    )
    return update * ratio, ratio

  def scale_paddle(grad, param, axis):
    wd = weight_decay
    axes = stacking.reduce_axes(param.ndim, axis)
    keep = axis is not None
    param_norm = optax.safe_norm(param, 0.0, axis=axes, keepdims=keep)
    grad_norm = optax.safe_norm(grad, 0.0, axis=axes, keepdims=keep)
    fallback = paddle_fallback(
      jnp.logical_or(param_norm == 0.0, grad_norm == 0.0), wd
    )
    ratio = guarded_ratio(
      trust_coefficient * param_norm,
      grad_norm + wd * param_norm + eps,
      fallback,
      param.dtype,
    )
    if min_ratio is not None or max_ratio is not None:
      ratio = jnp.clip(ratio, min_ratio, max_ratio)
    return (grad + wd * param) * ratio, ratio

  scale = scale_optax if weight_decay is None else scale_paddle

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    updates = jax.tree.map(
      lambda u, p: None if u is None else scale(u, p, None)[0],
      updates,
      params,
      is_leaf=lambda x: x is None,
    )
    return updates, state

  if not record and stacked is None:
    tx = optax.GradientTransformation(optax.init_empty_state, update_fn)
    if mask is not None:
      return optax.masked(tx, mask)
    return tx

  def named_update(updates, state, params=None):
    """Per-leaf loop: masks, stacked slices and recorded ratios."""
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    named, treedef = base.flatten_with_names(updates)
    adapt = base.leaf_flags(mask, params)
    out, ratios = [], []
    for (name, u), p, on in zip(
      named, treedef.flatten_up_to(params), adapt, strict=True
    ):
      ratio = None
      if on and u is not None:
        axis = stacking.leaf_axis(stacked, name, p.shape)
        u, ratio = scale(u, p, axis)
      out.append(u)
      ratios.append(ratio)
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    if not record:
      return unflat(out), state
    return unflat(out), recorded(
      unflat, ratios, init_trust_ratios(params, stacked)
    )

  def init_fn(params):
    if not record:
      return optax.EmptyState()
    return init_trust_ratios(params, stacked)

  return optax.GradientTransformation(init_fn, named_update)


def add_decayed_weights(
  weight_decay: base.ScalarOrSchedule = 0.0,
  mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformation:
  r"""Adds ``weight_decay * params`` to the updates: :math:`u + wd\,p`.

  This is :func:`optax.add_decayed_weights` (reused, same numbers) with
  argument checking.

  Args:
    weight_decay: a number ``>= 0`` or a schedule of the update count.
    mask: pytree prefix of bools, or a callable on params returning one, of
      the leaves that are decayed (``None``: all). Use
      :func:`lambjax.mask_by_name` to decide by parameter name.

  Returns:
    An ``optax.GradientTransformation`` (it needs ``params``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.add_decayed_weights(0.1)
    >>> p = jnp.array([1.0, 2.0])
    >>> tx.update(jnp.zeros(2), tx.init(p), p)[0]
    Array([0.1, 0.2], dtype=float32)

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  base.check_number(
    'add_decayed_weights',
    'weight_decay',
    weight_decay,
    lo=0.0,
    allow_schedule=True,
  )
  base.check_mask('add_decayed_weights', 'mask', mask)
  return optax.add_decayed_weights(weight_decay, mask)


def lr_ratio_value(lr_ratio_fn: Callable[[str], float], name: str) -> float:
  """``lr_ratio_fn(name)`` as a float, checked to be finite and ``>= 0``."""
  r = lr_ratio_fn(name)
  base.check_number('scale_by_lr_ratio', f'lr_ratio_fn({name!r})', r, lo=0.0)
  return float(r)


def scale_by_lr_ratio(
  lr_ratio_fn: Callable[[str], float],
  stacked: stacking.Stacked | str | None = None,
) -> optax.GradientTransformation:
  r"""Multiplies each leaf's update by ``lr_ratio_fn(name)``.

  The per-leaf learning-rate multiplier of layer-wise learning-rate decay
  (:func:`lambjax.adamw_dl`): :math:`u \leftarrow \rho(\mathrm{name})\,u`,
  with names from :func:`lambjax.tree_names`. The ratios are computed once
  per trace from the tree's names, so they cost nothing at run time. Place
  it *after* :func:`scale_by_trust_ratio` in a chain: a multiplier before
  the trust ratio is cancelled by it.

  Args:
    lr_ratio_fn: ``name -> float``, a finite number ``>= 0`` per leaf.
    stacked: optional :class:`lambjax.Stacked`: a stacked leaf gets
      ``lr_ratio_fn`` of each layer slice's name, slice by slice.

  Returns:
    A stateless ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.scale_by_lr_ratio(lambda name: 0.5 if 'emb' in name else 1.0)
    >>> g = {'emb': jnp.ones(2), 'out': jnp.ones(2)}
    >>> tx.update(g, tx.init(g))[0]['emb']
    Array([0.5, 0.5], dtype=float32)
  """
  if not callable(lr_ratio_fn):
    raise ValueError(
      f'scale_by_lr_ratio: `lr_ratio_fn` must be callable, got {lr_ratio_fn!r}.'
    )

  stacked = stacking.check('scale_by_lr_ratio', stacked)

  def update_fn(updates, state, params=None):
    del params
    named, treedef = base.flatten_with_names(updates)
    out = []
    for name, u in named:
      if u is None:
        out.append(u)
        continue
      r = stacking.lr_ratios(
        stacked, lr_ratio_fn, lr_ratio_value, name, u.shape
      )
      if isinstance(r, float) and r == 1.0:
        out.append(u)
      else:
        out.append(u * jnp.asarray(r, u.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class LearningRateState(NamedTuple):
  """State of a constant learning rate that can be changed at run time.

  ``learning_rate`` (float32, shape ``()``) is what the next update uses;
  :func:`lambjax.set_lr` replaces it, inside ``jax.jit`` too.
  """

  learning_rate: jax.Array


class ScheduledLearningRateState(NamedTuple):
  """State of a learning rate driven by a schedule of the update count.

  ``count`` is the number of updates so far and ``learning_rate`` the
  schedule's value for the next update (read with :func:`lambjax.get_lr`).
  """

  count: jax.Array
  learning_rate: jax.Array


class InjectedLearningRateState(NamedTuple):
  """State of a learning rate given as a jax array (e.g. by
  ``optax.inject_hyperparams``): the array drives the update and
  ``learning_rate`` records the value last used."""

  learning_rate: jax.Array


_LR_STATES = (
  LearningRateState,
  ScheduledLearningRateState,
  InjectedLearningRateState,
)


def scale_by_learning_rate(
  learning_rate: base.ScalarOrSchedule,
  *,
  flip_sign: bool = True,
) -> optax.GradientTransformation:
  r"""Scales updates by ``-learning_rate``, keeping the rate in the state.

  :math:`u \leftarrow -\eta_t\,u`. Same numbers as
  :func:`optax.scale_by_learning_rate`, but the rate lives in the state as a
  float32 array so that :func:`lambjax.get_lr` can read it and
  :func:`lambjax.set_lr` can change it inside ``jax.jit`` without a
  recompile:

  * a number gives :class:`LearningRateState` (settable);
  * a schedule ``count -> lr`` gives :class:`ScheduledLearningRateState`
    (``set_lr`` raises, as in Paddle);
  * a jax array (what ``optax.inject_hyperparams`` passes) drives the update
    itself and gives :class:`InjectedLearningRateState`.

  .. note::
    With a number, the rate held in the state is the one used: a state
    restored from a checkpoint keeps its rate even if the optimizer is
    rebuilt with another number (as ``torch.optim``'s ``load_state_dict``
    restores the learning rate). Change it with :func:`lambjax.set_lr`.

  Args:
    learning_rate: a number ``>= 0``, a jax scalar array or a schedule.
    flip_sign: multiply by ``-learning_rate`` (descent) when True.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.scale_by_learning_rate(0.1)
    >>> state = tx.init(jnp.zeros(2))
    >>> tx.update(jnp.ones(2), lj.set_lr(state, 0.5))[0]
    Array([-0.5, -0.5], dtype=float32)
  """
  base.check_number(
    'scale_by_learning_rate',
    'learning_rate',
    learning_rate,
    lo=0.0,
    allow_schedule=True,
  )
  sign = -1.0 if flip_sign else 1.0

  def apply(updates, lr):
    step = sign * lr
    return jax.tree.map(
      lambda g: None if g is None else jnp.asarray(step, g.dtype) * g,
      updates,
      is_leaf=lambda x: x is None,
    )

  def as_f32(x):
    return jnp.asarray(x, jnp.float32)

  if callable(learning_rate):

    def init_fn(params):
      del params
      count = jnp.zeros([], jnp.int32)
      return ScheduledLearningRateState(count, as_f32(learning_rate(count)))

    def update_fn(updates, state, params=None):
      del params
      updates = apply(updates, learning_rate(state.count))
      count = optax.safe_increment(state.count)
      return updates, ScheduledLearningRateState(
        count, as_f32(learning_rate(count))
      )

  elif base.is_static_number(learning_rate):

    def init_fn(params):
      del params
      return LearningRateState(as_f32(learning_rate))

    def update_fn(updates, state, params=None):
      del params
      return apply(updates, state.learning_rate), state

  else:

    def init_fn(params):
      del params
      return InjectedLearningRateState(as_f32(learning_rate))

    def update_fn(updates, state, params=None):
      del params, state
      return apply(updates, learning_rate), InjectedLearningRateState(
        as_f32(learning_rate)
      )

  return optax.GradientTransformation(init_fn, update_fn)
