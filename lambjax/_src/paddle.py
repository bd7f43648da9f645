"""PaddlePaddle's optimizers, clipping and regularizers, computed exactly.

The rules are those of ``paddle-semantics.md`` (paddlepaddle 3.3.1). Every
optimizer is a chain of public lambjax building blocks, per parameter group:

  grad_clip -> coupled regularizer (L2 / L1) -> kernel -> group lr multiplier
  -> base learning rate (held in the state: ``lj.get_lr`` / ``lj.set_lr``)

Functions of a parameter (``exclude_from_weight_decay_fn``,
``apply_decay_param_fun``, ``lr_ratio``, ``set_param_lr_fun``) receive its
:func:`lambjax.tree_names` name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lambjax._src import alias, base, clipping, names, transform, wrappers

# ---------------------------------------------------------------------------
# Regularizers and clipping
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class L2Decay:
  """Coupled L2 regularisation: ``g <- g + coeff * p`` (after clipping).

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.SGD(0.1, weight_decay=lj.paddle.L2Decay(0.01))
  """

  coeff: float = 0.0

  def __post_init__(self):
    base.check_number('L2Decay', 'coeff', self.coeff, lo=0.0)


@dataclasses.dataclass(frozen=True)
class L1Decay:
  """Coupled L1 regularisation: ``g <- g + coeff * sign(p)`` (after clipping).

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.Adam(1e-3, weight_decay=lj.paddle.L1Decay(1e-4))
  """

  coeff: float = 0.0

  def __post_init__(self):
    base.check_number('L1Decay', 'coeff', self.coeff, lo=0.0)


def _add_l1(coeff: float) -> optax.GradientTransformation:
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    return jax.tree.map(
      lambda g, p: g + coeff * jnp.sign(p).astype(g.dtype), updates, params
    ), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _regularizer(
  where: str, reg: Any
) -> tuple[optax.GradientTransformation, ...]:
  """None, a float (L2), L2Decay or L1Decay -> a coupled-decay transform."""
  if reg is None:
    return ()
  if isinstance(reg, L1Decay):
    return () if reg.coeff == 0 else (_add_l1(reg.coeff),)
  coeff = reg.coeff if isinstance(reg, L2Decay) else reg
  base.check_number(where, 'weight_decay', coeff, lo=0.0)
  return () if coeff == 0 else (optax.add_decayed_weights(coeff),)


def ClipGradByGlobalNorm(
  clip_norm: float,
  group_name: str = 'default_group',
  auto_skip_clip: bool = False,
):
  """Paddle's ``ClipGradByGlobalNorm``: ``g * c / max(G, c)`` (per group).

  Returns :func:`lambjax.clip_by_global_norm` (``group_name`` and
  ``auto_skip_clip`` are accepted for compatibility and have no effect).

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.Lamb(grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0))
  """
  del group_name, auto_skip_clip
  base.check_number(
    'paddle.ClipGradByGlobalNorm', 'clip_norm', clip_norm, lo=0.0
  )
  return clipping.clip_by_global_norm(clip_norm)


def ClipGradByNorm(clip_norm: float):
  """Paddle's ``ClipGradByNorm``: per-tensor norm clip (:func:`lambjax.clip_by_norm`)."""
  base.check_number('paddle.ClipGradByNorm', 'clip_norm', clip_norm, lo=0.0)
  return clipping.clip_by_norm(clip_norm)


def ClipGradByValue(max: float, min: float | None = None):  # noqa: A002
  """Paddle's ``ClipGradByValue``: ``clip(g, min, max)``, ``min = -max`` by default."""
  return clipping.clip_by_value(max, min)


def _grad_clip(where, grad_clip) -> tuple[optax.GradientTransformation, ...]:
  if grad_clip is None:
    return ()
  if not isinstance(grad_clip, optax.GradientTransformation):
    raise ValueError(
      f'{where}: `grad_clip` must be None or lj.paddle.ClipGradByGlobalNorm /'
      f' ClipGradByNorm / ClipGradByValue, got {grad_clip!r}.'
    )
  return (grad_clip,)


layerwise_lr_decay = alias.layerwise_lr_decay

# ---------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------

_FROZEN = 'frozen'


def _group_members(where, groups, params) -> list[str]:
  """Label of each leaf (its group index, or 'frozen'), in flatten order."""
  named, _ = base.flatten_with_names(params)
  leaf_names = [n for n, _ in named]
  labels: list[str | None] = [None] * len(leaf_names)
  for gi, group in enumerate(groups):
    sel = group['params']
    if callable(sel):
      hits = [i for i, n in enumerate(leaf_names) if sel(n)]
    else:
      hits = []
      for name in sel:
        if name not in leaf_names:
          raise ValueError(
            f'{where}: parameter group {gi} names {name!r}, which matches no '
            'parameter (names are lj.tree_names of the params).'
          )
        hits.append(leaf_names.index(name))
    for i in hits:
      if labels[i] is not None:
        raise ValueError(
          f'{where}: parameter {leaf_names[i]!r} is in parameter groups '
          f'{labels[i]} and {gi}; a parameter may be in one group only.'
        )
      labels[i] = str(gi)
  return [_FROZEN if lab is None else lab for lab in labels]


def _check_paddle_numbers(where: str, **values: Any) -> None:
  """Checks hyperparameters under their Paddle names (before delegating)."""
  for arg, v in values.items():
    if arg in ('beta1', 'beta2'):
      base.check_number(where, arg, v, lo=0.0, hi=1.0, hi_open=True)
    else:  # epsilon, momentum, lars_coeff, lars_weight_decay: >= 0.
      base.check_number(where, arg, v, lo=0.0)


def _build(
  where: str,
  make: Callable[..., optax.GradientTransformation],
  hyper: dict[str, Any],
  parameters: Sequence[dict] | None,
  learning_rate: Any,
) -> optax.GradientTransformation:
  """One transformation, or one per group under ``optax.partition``.

  ``make(learning_rate, lr_ratio_fn, **hyper)`` builds a group's whole
  transformation; ``lr_ratio_fn`` is the group's ``learning_rate``
  multiplier (``None`` for 1), applied after any trust ratio.
  """

  base.check_number(
    where, 'learning_rate', learning_rate, lo=0.0, allow_schedule=True
  )

  def group_tx(overrides: dict) -> optax.GradientTransformation:
    merged = dict(hyper)
    merged.update(
      {
        k: v
        for k, v in overrides.items()
        if k not in ('params', 'learning_rate')
      }
    )
    mult = overrides.get('learning_rate', 1.0)
    base.check_number(where, 'learning_rate (group multiplier)', mult, lo=0.0)
    ratio = None if mult == 1.0 else (lambda _: mult)
    return make(learning_rate, ratio, **merged)

  if parameters is None:
    return group_tx({})
  if not isinstance(parameters, list | tuple) or not all(
    isinstance(g, dict) for g in parameters
  ):
    raise ValueError(
      f'{where}: `parameters` must be None or a list of dicts, got '
      f'{parameters!r}.'
    )
  allowed = set(hyper) | {'params', 'learning_rate'}
  for gi, group in enumerate(parameters):
    if 'params' not in group:
      raise ValueError(f'{where}: parameter group {gi} has no "params" key.')
    unknown = sorted(set(group) - allowed)
    if unknown:
      raise ValueError(
        f'{where}: parameter group {gi} has unknown key {unknown[0]!r}; '
        f'allowed: {sorted(allowed)}.'
      )
    sel = group['params']
    if not callable(sel) and (
      isinstance(sel, str) or not all(isinstance(n, str) for n in sel)
    ):
      raise ValueError(
        f'{where}: group {gi} "params" must be a list of parameter names or '
        f'a predicate name -> bool, got {sel!r}.'
      )
  transforms = {str(i): group_tx(g) for i, g in enumerate(parameters)}
  transforms[_FROZEN] = optax.set_to_zero()
  groups = list(parameters)

  def labels(params):
    _, treedef = base.flatten_with_names(params)
    return jax.tree_util.tree_unflatten(
      treedef, _group_members(where, groups, params)
    )

  partition = getattr(optax, 'partition', None) or optax.multi_transform
  return partition(transforms, labels)


def _finish(where, tx, needs_params, multi_precision, lazy_mode=False):
  if lazy_mode:
    tx = wrappers.lazy_rows(tx)
  tx = alias._checked(where, tx, needs_params=needs_params)
  if multi_precision:
    tx = wrappers.with_master_weights(tx)
  return tx


def _combine_ratios(*fns):
  """The product of the given ``name -> ratio`` functions (``None`` = 1)."""
  fns = [f for f in fns if f is not None]
  if not fns:
    return None
  if len(fns) == 1:
    return fns[0]
  return lambda name: float(np.prod([f(name) for f in fns]))


def _decay_mask(where: str, fn: Callable[[str], bool] | None, negate: bool):
  if fn is None:
    return None
  if not callable(fn):
    raise ValueError(
      f'{where}: expected a function of the parameter name, got {fn!r}.'
    )
  return names.mask_by_name((lambda n: not fn(n)) if negate else fn)


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def Lamb(
  learning_rate=0.001,
  lamb_weight_decay=0.01,
  beta1=0.9,
  beta2=0.999,
  epsilon=1e-6,
  parameters=None,
  grad_clip=None,
  exclude_from_weight_decay_fn=None,
  multi_precision=False,
  always_adapt=False,
  *,
  group_small_leaves: bool = False,
  workspace: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Paddle's ``paddle.optimizer.Lamb``.

  .. math::
    r = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + wd\,p,\qquad
    p \leftarrow p - \eta\,\rho\,\frac{\|p\|}{\|r\|}\,r

  with ``wd = 0`` on leaves where ``exclude_from_weight_decay_fn(name)`` is
  True; the trust ratio is 1 where a norm is zero and is **not applied at
  all** where ``wd == 0`` unless ``always_adapt`` (Paddle's rule; optax and
  :func:`lambjax.lamb` adapt every leaf). ``grad_clip`` runs first.

  ``group_small_leaves`` (keyword only, a lambjax addition) keeps the
  state of small same-shape leaves as rows of one array, as in
  :func:`lambjax.lamb`: the same numbers, fewer compiled kernels.
  ``workspace`` (keyword only, a lambjax addition; CPU) keeps a buffer in
  the state for each update direction over 16 MiB, as in
  :func:`lambjax.lamb`: the same numbers up to rounding, a faster step on
  XLA:CPU for directions of 16-32 MiB (larger ones are not written out
  without it either).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.paddle.Lamb(
    ...     learning_rate=1e-3, lamb_weight_decay=0.01,
    ...     exclude_from_weight_decay_fn=lambda n: 'norm' in n or 'bias' in n,
    ...     grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0))
    >>> params = {'dense': {'weight': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}}
    >>> state = tx.init(params)
  """
  where = 'paddle.Lamb'

  def make(
    learning_rate,
    lr_ratio_fn,
    beta1,
    beta2,
    epsilon,
    lamb_weight_decay,
    exclude_from_weight_decay_fn,
    grad_clip,
  ):
    base.check_number(where, 'lamb_weight_decay', lamb_weight_decay, lo=0.0)
    _check_paddle_numbers(where, beta1=beta1, beta2=beta2, epsilon=epsilon)
    decay = _decay_mask(where, exclude_from_weight_decay_fn, negate=True)
    if always_adapt:
      adapt = None
    elif lamb_weight_decay == 0:
      adapt = False
    else:
      adapt = decay
    return optax.chain(
      *_grad_clip(where, grad_clip),
      alias.lamb(
        learning_rate,
        b1=beta1,
        b2=beta2,
        eps=epsilon,
        weight_decay=lamb_weight_decay,
        mask=decay,
        trust_ratio_mask=adapt,
        lr_ratio_fn=lr_ratio_fn,
        group_small_leaves=group_small_leaves,
        workspace=workspace,
      ),
    )

  hyper = dict(
    beta1=beta1,
    beta2=beta2,
    epsilon=epsilon,
    lamb_weight_decay=lamb_weight_decay,
    exclude_from_weight_decay_fn=exclude_from_weight_decay_fn,
    grad_clip=grad_clip,
  )
  return _finish(
    where,
    _build(where, make, hyper, parameters, learning_rate),
    True,
    multi_precision,
  )


def LarsMomentum(
  learning_rate=0.001,
  momentum=0.9,
  lars_coeff=0.001,
  lars_weight_decay=0.0005,
  parameters=None,
  regularization=None,
  grad_clip=None,
  exclude_from_weight_decay=None,
  epsilon=0.0,
  multi_precision=False,
  rescale_grad=1.0,
  *,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Paddle's ``LarsMomentumOptimizer`` (``paddle.incubate``).

  .. math::
    g \leftarrow s\,(\mathrm{clip}(g) + \mathrm{reg}(p)),\quad
    \eta_\ell = \eta\,c\,\frac{\|p\|}{\|g\| + wd\,\|p\| + \epsilon},\quad
    v \leftarrow \mu v + \eta_\ell (g + wd\,p),\quad p \leftarrow p - v,

  with :math:`\eta_\ell = \eta` (raw lr, no coefficient) where ``wd``,
  :math:`\|p\|` or :math:`\|g\|` is zero; ``wd = 0`` for parameters whose
  name contains a string of ``exclude_from_weight_decay``. ``s`` is
  ``rescale_grad``.

  ``group_small_leaves`` (keyword only, a lambjax addition) keeps the
  state of small same-shape leaves as rows of one array, as in
  :func:`lambjax.lars`: the same numbers, fewer compiled kernels.

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.LarsMomentum(0.1, momentum=0.9, lars_coeff=0.001,
    ...                             exclude_from_weight_decay=['bias', 'bn'])
  """
  where = 'paddle.LarsMomentum'

  def make(
    learning_rate,
    lr_ratio_fn,
    momentum,
    lars_coeff,
    lars_weight_decay,
    regularization,
    grad_clip,
    exclude_from_weight_decay,
    epsilon,
    rescale_grad,
  ):
    base.check_number(where, 'rescale_grad', rescale_grad)
    _check_paddle_numbers(
      where,
      momentum=momentum,
      lars_coeff=lars_coeff,
      lars_weight_decay=lars_weight_decay,
      epsilon=epsilon,
    )
    # A bare string would be iterated character by character: reject it.
    if isinstance(exclude_from_weight_decay, str):
      raise ValueError(
        f'{where}: `exclude_from_weight_decay` must be a list of strings, got '
        f'the string {exclude_from_weight_decay!r}; write '
        f'[{exclude_from_weight_decay!r}].'
      )
    excluded = list(exclude_from_weight_decay or [])
    if not all(isinstance(s, str) for s in excluded):
      raise ValueError(
        f'{where}: `exclude_from_weight_decay` must be a list of strings, got '
        f'{exclude_from_weight_decay!r}.'
      )
    mask = (
      names.mask_by_name(lambda n: not any(s in n for s in excluded))
      if excluded
      else True
    )
    rescale = () if rescale_grad == 1.0 else (optax.scale(rescale_grad),)
    return optax.chain(
      *_grad_clip(where, grad_clip),
      *_regularizer(where, regularization),
      *rescale,
      # Paddle's velocity accumulates lr-scaled steps: lars's trace follows
      # the learning rate.
      alias.lars(
        learning_rate,
        weight_decay=lars_weight_decay,
        weight_decay_mask=mask,
        trust_coefficient=lars_coeff,
        eps=epsilon,
        momentum=momentum,
        trust_ratio_form='paddle',
        lr_ratio_fn=lr_ratio_fn,
        group_small_leaves=group_small_leaves,
      ),
    )

  hyper = dict(
    momentum=momentum,
    lars_coeff=lars_coeff,
    lars_weight_decay=lars_weight_decay,
    regularization=regularization,
    grad_clip=grad_clip,
    exclude_from_weight_decay=exclude_from_weight_decay,
    epsilon=epsilon,
    rescale_grad=rescale_grad,
  )
  tx = _build(where, make, hyper, parameters, learning_rate)
  return _finish(where, tx, True, multi_precision)


def Adam(
  learning_rate=0.001,
  beta1=0.9,
  beta2=0.999,
  epsilon=1e-8,
  parameters=None,
  weight_decay=None,
  grad_clip=None,
  lazy_mode=False,
  multi_precision=False,
  *,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Paddle's ``paddle.optimizer.Adam``.

  ``g <- clip(g) + reg(p)`` (``weight_decay``: None, a float or ``L2Decay``
  for ``c*p``, ``L1Decay`` for ``c*sign(p)``), then
  :math:`p \leftarrow p - \eta\,\hat m / (\sqrt{\hat v} + \epsilon)`.
  ``lazy_mode`` leaves rows with an all-zero gradient untouched.

  ``group_small_leaves`` (keyword only, a lambjax addition) keeps the
  state of small same-shape leaves as rows of one array, as in
  :func:`lambjax.adam`: the same numbers, fewer compiled kernels.

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.Adam(1e-3, weight_decay=lj.paddle.L2Decay(1e-4))
  """
  where = 'paddle.Adam'

  def make(
    learning_rate, lr_ratio_fn, beta1, beta2, epsilon, weight_decay, grad_clip
  ):
    _check_paddle_numbers(where, beta1=beta1, beta2=beta2, epsilon=epsilon)
    return optax.chain(
      *_grad_clip(where, grad_clip),
      *_regularizer(where, weight_decay),
      alias._adam_like(
        where,
        learning_rate,
        beta1,
        beta2,
        epsilon,
        0.0,
        None,
        None,
        False,
        0.0,
        None,
        lr_ratio_fn,
        True,
        decoupled=False,
        group_small_leaves=group_small_leaves,
      ),
    )

  hyper = dict(
    beta1=beta1,
    beta2=beta2,
    epsilon=epsilon,
    weight_decay=weight_decay,
    grad_clip=grad_clip,
  )
  needs = weight_decay is not None or bool(parameters)
  return _finish(
    where,
    _build(where, make, hyper, parameters, learning_rate),
    needs,
    multi_precision,
    lazy_mode,
  )


def AdamW(
  learning_rate=0.001,
  beta1=0.9,
  beta2=0.999,
  epsilon=1e-8,
  parameters=None,
  weight_decay=0.01,
  lr_ratio=None,
  apply_decay_param_fun=None,
  grad_clip=None,
  lazy_mode=False,
  multi_precision=False,
  *,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Paddle's ``paddle.optimizer.AdamW`` (GPU / documented ``lr_ratio``).

  .. math::
    p \leftarrow p - \eta\,\rho(n)\Big(\frac{\hat m}{\sqrt{\hat v}+\epsilon}
      + wd\,p\Big)

  with ``wd = 0`` where ``apply_decay_param_fun(name)`` is False and
  :math:`\rho` = ``lr_ratio(name)`` (1 by default). With ``lr_ratio=None``
  this is ``optax.adamw``.

  ``group_small_leaves`` (keyword only, a lambjax addition) keeps the
  state of small same-shape leaves as rows of one array, as in
  :func:`lambjax.adamw`: the same numbers, fewer compiled kernels.

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.AdamW(1e-3, weight_decay=0.01,
    ...                      apply_decay_param_fun=lambda n: 'bias' not in n)
  """
  where = 'paddle.AdamW'

  def make(
    learning_rate,
    lr_ratio_fn,
    beta1,
    beta2,
    epsilon,
    weight_decay,
    grad_clip,
    lr_ratio,
    apply_decay_param_fun,
  ):
    base.check_number(where, 'weight_decay', weight_decay, lo=0.0)
    _check_paddle_numbers(where, beta1=beta1, beta2=beta2, epsilon=epsilon)
    ratio = _combine_ratios(lr_ratio, lr_ratio_fn)
    return optax.chain(
      *_grad_clip(where, grad_clip),
      alias._adam_like(
        where,
        learning_rate,
        beta1,
        beta2,
        epsilon,
        0.0,
        None,
        None,
        False,
        weight_decay,
        _decay_mask(where, apply_decay_param_fun, False),
        ratio,
        True,
        decoupled=True,
        group_small_leaves=group_small_leaves,
      ),
    )

  hyper = dict(
    beta1=beta1,
    beta2=beta2,
    epsilon=epsilon,
    weight_decay=weight_decay,
    grad_clip=grad_clip,
    lr_ratio=lr_ratio,
    apply_decay_param_fun=apply_decay_param_fun,
  )
  return _finish(
    where,
    _build(where, make, hyper, parameters, learning_rate),
    True,
    multi_precision,
    lazy_mode,
  )


def AdamWDL(
  learning_rate=0.001,
  beta1=0.9,
  beta2=0.999,
  epsilon=1e-8,
  parameters=None,
  weight_decay=0.01,
  apply_decay_param_fun=None,
  grad_clip=None,
  lazy_mode=False,
  multi_precision=False,
  layerwise_decay=1.0,
  n_layers=12,
  set_param_lr_fun=None,
  *,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""PaddleNLP's ``AdamWDL``, as documented: a single decay with ``lr*ratio``.

  .. math::
    p \leftarrow p - \eta\,\rho(n)\Big(\frac{\hat m}{\sqrt{\hat v}+\epsilon}
      + wd\,p\Big),\qquad
    \rho = \texttt{set\_param\_lr\_fun}(n)

  with, by default, ``set_param_lr_fun = partial(layerwise_lr_decay,
  layerwise_decay, n_layers)`` called with the parameter's name.

  .. warning::
    PaddleNLP's class on Paddle >= 2.2 decays **twice**: it multiplies by
    ``1 - lr*wd`` in Python and then Paddle's AdamW kernel decays again with
    ``lr*ratio*wd``, i.e. ``p*(1 - lr*wd)*(1 - lr*ratio*wd)`` per step. This
    class implements the documented single decay (Paddle's GPU ``lr_ratio``
    semantics), as ``lj.adamw_dl`` does.

  ``group_small_leaves`` (keyword only, a lambjax addition) keeps the
  state of small same-shape leaves as rows of one array, as in
  :func:`lambjax.adamw_dl`: the same numbers, fewer compiled kernels.

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.AdamWDL(5e-5, layerwise_decay=0.8, n_layers=12)
  """
  where = 'paddle.AdamWDL'
  alias._check_layerwise(where, layerwise_decay, n_layers)
  ratio = set_param_lr_fun or functools.partial(
    alias.layerwise_lr_decay, layerwise_decay, n_layers
  )
  tx = AdamW(
    learning_rate,
    beta1,
    beta2,
    epsilon,
    parameters,
    weight_decay,
    ratio,
    apply_decay_param_fun,
    grad_clip,
    lazy_mode,
    multi_precision,
    group_small_leaves=group_small_leaves,
  )
  return tx


def SGD(
  learning_rate=0.001,
  parameters=None,
  weight_decay=None,
  grad_clip=None,
) -> optax.GradientTransformationExtraArgs:
  """Paddle's ``paddle.optimizer.SGD``: ``p <- p - lr * (clip(g) + reg(p))``.

  Examples:
    >>> import lambjax as lj
    >>> tx = lj.paddle.SGD(0.1, grad_clip=lj.paddle.ClipGradByNorm(1.0))
  """
  where = 'paddle.SGD'

  def make(learning_rate, lr_ratio_fn, weight_decay, grad_clip):
    return optax.chain(
      *_grad_clip(where, grad_clip),
      *_regularizer(where, weight_decay),
      *alias._lr_ratio(lr_ratio_fn),
      transform.scale_by_learning_rate(learning_rate),
    )

  hyper = dict(weight_decay=weight_decay, grad_clip=grad_clip)
  needs = weight_decay is not None or bool(parameters)
  return _finish(
    where, _build(where, make, hyper, parameters, learning_rate), needs, False
  )
