"""Named optimizers: each is a chain of public lambjax building blocks."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import jax
import optax

from lambjax._src import base, quantized, stacking, transform
from lambjax._src import diagnostics as diagnostics_lib
from lambjax._src import fused as fused_lib

_LAYER_RE = re.compile(r'(?:^|\.)layers[._](\d+)(?=\.|$)')


def layerwise_lr_decay(decay_rate: float, n_layers: int, name: str) -> float:
  r"""The PaddleNLP layer-wise learning-rate decay ratio of a parameter.

  A name holding a 0-based layer index ``m`` after ``layers.`` or
  ``layers_`` (``encoder.layers.3.…``, flax's ``layers_3``) gets
  ``decay_rate ** (n_layers - m)``; else a name containing ``embedding``
  gets ``decay_rate ** (n_layers + 1)``; anything else (pooler, heads) gets
  ``1.0``. So the top layer gets ``decay_rate`` and the embeddings the
  smallest ratio.

  Args:
    decay_rate: the per-layer decay, ``> 0`` (usually in ``(0, 1]``).
    n_layers: the number of layers, ``>= 1``.
    name: the parameter's :func:`lambjax.tree_names` name.

  Returns:
    The learning-rate multiplier, a Python float.

  Raises:
    ValueError: on a bad ``decay_rate`` / ``n_layers``, or a layer index
      ``>= n_layers`` (``n_layers`` does not describe the model).

  Examples:
    >>> import lambjax as lj
    >>> lj.layerwise_lr_decay(0.5, 3, 'encoder.layers.2.attn.kernel')
    0.5
    >>> lj.layerwise_lr_decay(0.5, 3, 'params.layers_0.kernel')
    0.125
    >>> lj.layerwise_lr_decay(0.5, 3, 'embeddings.word_embeddings')
    0.0625
    >>> lj.layerwise_lr_decay(0.5, 3, 'pooler.dense.kernel')
    1.0

  References:
    Clark et al., `ELECTRA: Pre-training Text Encoders as Discriminators
    Rather Than Generators <https://arxiv.org/abs/2003.10555>`_, 2020;
    Yang et al., `XLNet <https://arxiv.org/abs/1906.08237>`_, 2019;
    PaddleNLP ``paddlenlp/ops/optimizer/adamwdl.py``.
  """
  _check_layerwise('layerwise_lr_decay', decay_rate, n_layers)
  if not isinstance(name, str):
    raise TypeError(
      f'layerwise_lr_decay: `name` must be a parameter name (str), got '
      f'{name!r}.'
    )
  match = _LAYER_RE.search(name)
  if match is not None:
    m = int(match.group(1))
    if m >= n_layers:
      raise ValueError(
        f'layerwise_lr_decay: parameter {name!r} is in layer {m}, but '
        f'`n_layers` is {n_layers} (layers are numbered from 0).'
      )
    return float(decay_rate ** (n_layers - m))
  if 'embedding' in name:
    return float(decay_rate ** (n_layers + 1))
  return 1.0


# Both fix each parameter's ratio when the optimizer is built, from its name.
_LAYERWISE_STATIC = (
  " (under optax.inject_hyperparams pass static_args=('layerwise_decay', "
  "'n_layers'))"
)


def _check_layerwise(where: str, decay_rate, n_layers) -> None:
  if isinstance(decay_rate, jax.core.Tracer):
    raise ValueError(
      f'{where}: `layerwise_decay` must be a number, got a traced value'
      f' {decay_rate!r}{_LAYERWISE_STATIC}.'
    )
  base.check_number(where, 'layerwise_decay', decay_rate, lo=0.0, lo_open=True)
  if isinstance(n_layers, bool) or not isinstance(n_layers, int):
    hint = _LAYERWISE_STATIC if isinstance(n_layers, jax.Array) else ''
    raise ValueError(
      f'{where}: `n_layers` must be an int, got {n_layers!r}{hint}.'
    )
  if n_layers < 1:
    raise ValueError(f'{where}: `n_layers` must be >= 1, got {n_layers!r}.')


def _param_shaped_state(state) -> base.PyTree | None:
  """The first params-shaped tree of a state (Adam's mu or the momentum)."""
  kinds = (optax.ScaleByAdamState, optax.TraceState)
  for node in jax.tree_util.tree_leaves(
    state, is_leaf=lambda x: isinstance(x, kinds)
  ):
    if isinstance(node, optax.ScaleByAdamState):
      return node.mu
    if isinstance(node, optax.TraceState):
      return node.trace
  return None


def _checked(
  where: str, tx: optax.GradientTransformation, needs_params: bool
) -> optax.GradientTransformationExtraArgs:
  """Adds clear errors for bad leaves, missing params and mismatched trees.

  The checks run in Python at trace time (tree structure, shapes, dtypes),
  so they cost nothing in a jitted step. The state is ``tx``'s own.
  """

  def init_fn(params):
    base.check_leaves(where, params)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      if needs_params:
        raise ValueError(f'{where}: {base.NO_PARAMS_MSG}')
      reference = _param_shaped_state(state)
      if reference is not None:
        base.check_same_tree(where, reference, updates, 'state', 'updates')
    else:
      base.check_same_tree(where, params, updates, 'params', 'updates')
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _maybe_diagnosed(
  tx: optax.GradientTransformation, diagnostics: bool
) -> optax.GradientTransformation:
  if not isinstance(diagnostics, bool):
    raise ValueError(
      f'`diagnostics` must be True or False, got {diagnostics!r}.'
    )
  return diagnostics_lib.with_diagnostics(tx) if diagnostics else tx


def _adam_block(
  where, state_8bit, b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov=False
):
  """Adam's moments: float (optax's) or 8-bit blockwise (``state_8bit``)."""
  _check_8bit(where, state_8bit)
  if not state_8bit:
    return transform.scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      nesterov=nesterov,
    )
  _check_8bit(
    where, state_8bit, mu_dtype=mu_dtype, nu_dtype=nu_dtype, nesterov=nesterov
  )
  return quantized.scale_by_adam_8bit(b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def _check_grouped(where, group_small_leaves, fast, fused, state_8bit) -> None:
  """``group_small_leaves`` is a bool, and True only on the fast path."""
  if not isinstance(group_small_leaves, bool):
    raise ValueError(
      f'{where}: `group_small_leaves` must be True or False, got '
      f'{group_small_leaves!r}.'
    )
  if group_small_leaves and not fast:
    raise ValueError(
      f'{where}: `group_small_leaves=True` needs the fused fast path, which '
      'runs with fused=True and state_8bit=False (and numbers, scalar arrays '
      f'or a weight-decay schedule); got fused={fused!r}, '
      f'state_8bit={state_8bit!r}.'
    )


def _check_8bit(where, state_8bit, **unsupported) -> None:
  # A bool, not a number: optax.inject_hyperparams leaves bools static.
  if not isinstance(state_8bit, bool):
    raise ValueError(
      f'{where}: `state_8bit` must be True or False, got {state_8bit!r}.'
    )
  for arg, v in unsupported.items():
    if state_8bit and v not in (None, False):
      raise ValueError(
        f'{where}: `{arg}={v!r}` cannot be combined with state_8bit=True.'
      )


def _lr_ratio(
  lr_ratio_fn, stacked=None
) -> tuple[optax.GradientTransformation, ...]:
  if lr_ratio_fn is None:
    return ()
  return (transform.scale_by_lr_ratio(lr_ratio_fn, stacked),)


def _adam_like(
  where,
  learning_rate,
  b1,
  b2,
  eps,
  eps_root,
  mu_dtype,
  nu_dtype,
  nesterov,
  weight_decay,
  mask,
  lr_ratio_fn,
  fused,
  decoupled,
  stacked=None,
  state_8bit=False,
  group_small_leaves=False,
) -> optax.GradientTransformationExtraArgs:
  """Adam (``decoupled=False``) or AdamW-style chains, fused where possible."""
  base.check_mask(where, 'mask', mask)
  stacked = stacking.check(where, stacked)
  lr_tx = transform.scale_by_learning_rate(learning_rate)
  decay = (
    (transform.add_decayed_weights(weight_decay, mask),) if decoupled else ()
  )
  chain = optax.chain(
    _adam_block(
      where, state_8bit, b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov
    ),
    *decay,
    *_lr_ratio(lr_ratio_fn, stacked),
    lr_tx,
  )
  fast = (
    fused
    and not state_8bit
    and fused_lib.applies(
      (b1, b2, eps, eps_root), weight_decay if decoupled else 0.0
    )
  )
  _check_grouped(where, group_small_leaves, fast, fused, state_8bit)
  if fast:
    chain = fused_lib.adam_family(
      chain,
      lr_tx,
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      weight_decay=weight_decay if decoupled else 0.0,
      decay_mask=mask,
      trust=False,
      trust_mask=None,
      min_ratio=None,
      max_ratio=None,
      lr_ratio_fn=lr_ratio_fn,
      stacked=stacked,
      nesterov=nesterov,
      group_small=group_small_leaves,
    )
  return _checked(where, chain, needs_params=decoupled)


def lamb(
  learning_rate: base.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  eps_root: jax.typing.ArrayLike = 0.0,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: base.MaskOrFn | None = None,
  *,
  trust_ratio_mask: base.MaskOrFn | None = None,
  min_ratio: float | None = None,
  max_ratio: float | None = None,
  lr_ratio_fn: Callable[[str], float] | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  fused: bool = True,
  diagnostics: bool = False,
  stacked: stacking.Stacked | str | None = None,
  state_8bit: bool = False,
  workspace: bool = False,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The LAMB optimizer (layer-wise adaptive Adam with decoupled decay).

  For each leaf, with Adam's bias-corrected moments :math:`\hat m, \hat v`:

  .. math::
    r = \frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon} + wd\,p,
    \qquad
    p \leftarrow p - \eta_t\,\rho(\mathrm{name})\,
      \mathrm{clip}\Big(\frac{\|p\|}{\|r\|}\Big)\,r,

  with trust ratio 1 where :math:`\|p\| = 0` or :math:`\|r\| = 0`. The chain
  (the specification) is ``scale_by_adam -> add_decayed_weights(mask) ->
  scale_by_trust_ratio(trust_ratio_mask, min_ratio, max_ratio) ->
  [scale_by_lr_ratio(lr_ratio_fn)] -> scale_by_learning_rate``. With only
  optax's arguments it equals :func:`optax.lamb`.

  .. note::
    **optax vs Paddle.** optax (and this default) adapts every leaf. Paddle's
    ``Lamb`` skips layer adaptation on leaves whose weight decay is zero
    (excluded leaves, or ``lamb_weight_decay=0``) unless ``always_adapt``:
    pass ``trust_ratio_mask=mask`` to get Paddle's rule, or use
    :class:`lambjax.paddle.Lamb`.

  Args:
    learning_rate: a number or a schedule of the update count.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the Adam denominator, ``>= 0``.
    eps_root: added inside the square root, ``>= 0``.
    weight_decay: decoupled weight decay, ``>= 0`` (inside the trust ratio).
    mask: pytree prefix / callable of leaves that are decayed (``None``: all).
      Use :func:`lambjax.mask_by_name` to decide by name. Under
      ``optax.inject_hyperparams`` pass ``static_args=('mask',)``.
    trust_ratio_mask: leaves that get layer adaptation (``None``: all).
    min_ratio: optional lower clamp of the trust ratio.
    max_ratio: optional upper clamp of the trust ratio.
    lr_ratio_fn: optional ``name -> float`` learning-rate multiplier (e.g.
      layer-wise decay), applied after the trust ratio so it is not cancelled.
    mu_dtype: dtype of the first moment (e.g. ``jnp.bfloat16``).
    nu_dtype: dtype of the second moment.
    fused: use the fused per-leaf fast path (same numbers and state as the
      chain) where it applies; ``False`` runs the chain itself.
    diagnostics: record per-leaf trust ratios and gradient / parameter /
      update norms in the state (:func:`lambjax.diagnostics`); off by default
      (then nothing is computed or stored).
    stacked: optional :class:`lambjax.Stacked` declaring leaves that hold
      stacked (scanned) layers: each layer slice gets its own trust ratio
      and ``lr_ratio_fn`` value, as if the layers were separate leaves.
      Fewer leaves compile faster, and on GPUs step faster (a per-leaf step
      there is bound by dispatching each leaf).
    state_8bit: store Adam's moments 8-bit blockwise
      (:func:`lambjax.scale_by_adam_8bit`, about 0.25x the state memory);
      trust ratio and update stay float32. Runs the chain, not the fast path.
    workspace: keep a buffer in the state (:class:`lambjax.WorkspaceState`)
      for each adapted leaf whose direction ``r`` takes more than 16 MiB,
      and write ``r`` into it each step. A speed option for XLA:CPU with a
      donated state: ``r`` has two consumers (its norm and the update), so
      XLA materialises it, and a temporary that large is fresh memory there,
      page-faulted every step (smaller ones are computed one at a time and
      reuse heap memory). Since the fast path computes the norm of a
      direction over 32 MiB from ``m``, ``v`` and ``p`` instead, writing
      no ``r`` at all, this gains about nothing on BERT-base (its word
      embedding's 89 MiB: 0.55 of the bandwidth roof with the buffer, 0.57
      without, benchmarks/RESULTS.md); it still serves directions of 16-32
      MiB and stacked layers. A tree with no leaf that large gets no
      buffer. The numbers are the same up to rounding (a buffered leaf's
      ratio is summed from the written ``r``, in another order than a
      spelled one); the state structure is not. Needs the fast
      path (static hyperparameters, no ``state_8bit``, ``fused=True``).
      Leave it off on GPUs: XLA:GPU fuses ``r`` away, and on an H100 the
      option (then a buffer per leaf) made the step slower (0.75x) and used
      more memory.
    group_small_leaves: keep the state of small leaves that share a shape,
      dtype and masks stacked, one array per group, and update each group
      as one leaf with a ratio per row: the same numbers, far fewer kernels
      on trees of many small leaves (:class:`lambjax.GroupedState` says
      when it pays). Needs the fast path.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lambjax as lj
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = lj.lamb(learning_rate=0.003)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{f(params):.3f}')
    13.616

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  base.check_mask('lamb', 'mask', mask)
  base.check_mask('lamb', 'trust_ratio_mask', trust_ratio_mask)
  if not isinstance(workspace, bool):
    raise ValueError(f'`workspace` must be True or False, got {workspace!r}.')
  stacked = stacking.check('lamb', stacked)
  lr_tx = transform.scale_by_learning_rate(learning_rate)
  chain = optax.chain(
    _adam_block('lamb', state_8bit, b1, b2, eps, eps_root, mu_dtype, nu_dtype),
    transform.add_decayed_weights(weight_decay, mask),
    transform.scale_by_trust_ratio(
      min_ratio=min_ratio,
      max_ratio=max_ratio,
      mask=trust_ratio_mask,
      record=diagnostics,
      stacked=stacked,
    ),
    *_lr_ratio(lr_ratio_fn, stacked),
    lr_tx,
  )
  fast = (
    fused
    and not state_8bit
    and fused_lib.applies(
      (b1, b2, eps, eps_root, min_ratio, max_ratio), weight_decay
    )
  )
  _check_grouped('lamb', group_small_leaves, fast, fused, state_8bit)
  if fast:
    chain = fused_lib.adam_family(
      chain,
      lr_tx,
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      weight_decay=weight_decay,
      decay_mask=mask,
      trust=True,
      trust_mask=trust_ratio_mask,
      min_ratio=min_ratio,
      max_ratio=max_ratio,
      lr_ratio_fn=lr_ratio_fn,
      record_index=2 if diagnostics else None,
      stacked=stacked,
      workspace=workspace,
      nu_dtype=nu_dtype,
      group_small=group_small_leaves,
    )
  elif workspace:
    raise ValueError(
      'lamb: `workspace=True` needs the fused fast path, which runs with '
      'fused=True and state_8bit=False (and numbers, scalar arrays or a '
      f'weight-decay schedule); got fused={fused!r}, '
      f'state_8bit={state_8bit!r}.'
    )
  return _checked('lamb', _maybe_diagnosed(chain, diagnostics), True)


def lars(
  learning_rate: base.ScalarOrSchedule,
  weight_decay: base.ScalarOrSchedule = 0.0,
  weight_decay_mask: base.MaskOrFn = True,
  trust_coefficient: jax.typing.ArrayLike = 0.001,
  eps: jax.typing.ArrayLike = 0.0,
  trust_ratio_mask: base.MaskOrFn = True,
  momentum: jax.typing.ArrayLike = 0.9,
  nesterov: bool = False,
  *,
  trust_ratio_form: str = 'optax',
  min_ratio: float | None = None,
  max_ratio: float | None = None,
  lr_ratio_fn: Callable[[str], float] | None = None,
  fused: bool = True,
  diagnostics: bool = False,
  stacked: stacking.Stacked | str | None = None,
  state_8bit: bool = False,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The LARS optimizer (layer-wise adaptive rate scaling with momentum).

  ``trust_ratio_form='optax'`` (default, equal to :func:`optax.lars`):

  .. math::
    d = g + wd\,p,\quad r = \frac{c\,\|p\|}{\|d\| + \epsilon},\quad
    v \leftarrow \mu v - \eta_t\,\rho\,r\,d,\quad p \leftarrow p + v.

  ``trust_ratio_form='paddle'`` (PaddlePaddle's ``LarsMomentum`` kernel):
  :math:`r = c\,\|p\| / (\|g\| + wd\,\|p\| + \epsilon)`, and :math:`r = 1`
  (the raw learning rate, no coefficient) where ``wd``, :math:`\|p\|` or
  :math:`\|g\|` is zero or the leaf is outside ``weight_decay_mask``
  (Paddle's excluded parameters get plain momentum SGD).

  The chain is ``add_decayed_weights(weight_decay_mask) ->
  scale_by_trust_ratio(trust_ratio_mask) -> [scale_by_lr_ratio] ->
  scale_by_learning_rate -> optax.trace`` (optax form) or
  ``scale_by_trust_ratio(weight_decay=..., mask=weight_decay_mask) -> ...``
  (paddle form).

  Args:
    learning_rate: a number or a schedule of the update count.
    weight_decay: coupled weight decay, ``>= 0`` (a number in paddle form).
    weight_decay_mask: leaves that are decayed.
    trust_coefficient: the trust coefficient :math:`c`, ``>= 0``.
    eps: added to the trust-ratio denominator, ``>= 0``.
    trust_ratio_mask: leaves that get layer adaptation (optax form only).
    momentum: momentum :math:`\mu`, ``>= 0``.
    nesterov: use Nesterov momentum.
    trust_ratio_form: ``'optax'`` or ``'paddle'``.
    min_ratio: optional lower clamp of the trust ratio.
    max_ratio: optional upper clamp of the trust ratio.
    lr_ratio_fn: optional ``name -> float`` learning-rate multiplier.
    fused: use the fused per-leaf fast path where it applies.
    diagnostics: record per-leaf trust ratios and gradient / parameter /
      update norms in the state (:func:`lambjax.diagnostics`); off by default.
    stacked: optional :class:`lambjax.Stacked`: per-layer-slice trust ratios
      and ``lr_ratio_fn`` values for leaves holding stacked layers.
    state_8bit: store the momentum 8-bit blockwise
      (:func:`lambjax.trace_8bit`; not with ``nesterov``).
    group_small_leaves: keep the state of small leaves that share a shape,
      dtype and masks stacked, one array per group, and update each group
      as one leaf with a ratio per row: the same numbers, far fewer kernels
      on trees of many small leaves (:class:`lambjax.GroupedState` says
      when it pays). Needs the fast path.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lambjax as lj
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = lj.lars(learning_rate=1.0)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{f(params):.3f}')
    13.635

  References:
    You et al., `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017.
  """
  where = 'lars'
  base.check_number(where, 'momentum', momentum, lo=0.0)
  base.check_mask(where, 'weight_decay_mask', weight_decay_mask)
  base.check_mask(where, 'trust_ratio_mask', trust_ratio_mask)
  stacked = stacking.check(where, stacked)
  _check_8bit(where, state_8bit, nesterov=nesterov)
  if trust_ratio_form == 'optax':
    adapt = (
      transform.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      transform.scale_by_trust_ratio(
        trust_coefficient=trust_coefficient,
        eps=eps,
        min_ratio=min_ratio,
        max_ratio=max_ratio,
        mask=trust_ratio_mask,
        record=diagnostics,
        stacked=stacked,
      ),
    )
    record_index = 1
  elif trust_ratio_form == 'paddle':
    if trust_ratio_mask is not True:
      raise ValueError(
        "lars: `trust_ratio_mask` is not used with trust_ratio_form='paddle'"
        ' (Paddle adapts exactly the decayed leaves); use '
        '`weight_decay_mask`.'
      )
    if callable(weight_decay):
      raise ValueError(
        "lars: trust_ratio_form='paddle' needs a number `weight_decay`, "
        f'got {weight_decay!r}.'
      )
    adapt = (
      transform.scale_by_trust_ratio(
        trust_coefficient=trust_coefficient,
        eps=eps,
        min_ratio=min_ratio,
        max_ratio=max_ratio,
        mask=weight_decay_mask,
        weight_decay=weight_decay,
        record=diagnostics,
        stacked=stacked,
      ),
    )
    record_index = 0
  else:
    raise ValueError(
      "lars: `trust_ratio_form` must be 'optax' or 'paddle', got "
      f'{trust_ratio_form!r}.'
    )
  lr_tx = transform.scale_by_learning_rate(learning_rate)
  chain = optax.chain(
    *adapt,
    *_lr_ratio(lr_ratio_fn, stacked),
    lr_tx,
    optax.trace(decay=momentum, nesterov=nesterov)
    if not state_8bit
    else quantized.trace_8bit(momentum),
  )
  fast = (
    fused
    and not state_8bit
    and fused_lib.applies(
      (trust_coefficient, eps, momentum, min_ratio, max_ratio), weight_decay
    )
  )
  _check_grouped(where, group_small_leaves, fast, fused, state_8bit)
  if fast:
    chain = fused_lib.lars(
      chain,
      lr_tx,
      weight_decay=weight_decay,
      decay_mask=weight_decay_mask,
      trust_coefficient=trust_coefficient,
      eps=eps,
      trust_mask=trust_ratio_mask,
      momentum=momentum,
      nesterov=nesterov,
      form=trust_ratio_form,
      min_ratio=min_ratio,
      max_ratio=max_ratio,
      lr_ratio_fn=lr_ratio_fn,
      record_index=record_index if diagnostics else None,
      stacked=stacked,
      group_small=group_small_leaves,
    )
  return _checked(where, _maybe_diagnosed(chain, diagnostics), True)


def adam(
  learning_rate: base.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  nesterov: bool = False,
  nu_dtype: jax.typing.DTypeLike | None = None,
  fused: bool = True,
  state_8bit: bool = False,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The Adam optimizer: :math:`p \leftarrow p - \eta_t\,\hat m /
  (\sqrt{\hat v + \epsilon_{root}} + \epsilon)`.

  The chain is ``scale_by_adam -> scale_by_learning_rate``; it equals
  :func:`optax.adam`, and keeps the learning rate in the state
  (:func:`lambjax.get_lr`, :func:`lambjax.set_lr`).

  Args:
    learning_rate: a number or a schedule of the update count.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the denominator, ``>= 0``.
    eps_root: added inside the square root, ``>= 0``.
    mu_dtype: dtype of the first moment.
    nesterov: use Nesterov momentum (NAdam).
    nu_dtype: dtype of the second moment.
    fused: use the fused per-leaf fast path where it applies.
    state_8bit: store the moments 8-bit blockwise
      (:func:`lambjax.scale_by_adam_8bit`).
    group_small_leaves: keep the state of small leaves that share a shape,
      dtype and masks stacked, one array per group, and update each group
      as one leaf: the same numbers, far fewer kernels on trees of many
      small leaves (:class:`lambjax.GroupedState`). Needs the fast path.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lambjax as lj
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = lj.adam(learning_rate=0.003)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{f(params):.3f}')
    13.821

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  return _adam_like(
    'adam',
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    mu_dtype,
    nu_dtype,
    nesterov,
    0.0,
    None,
    None,
    fused,
    decoupled=False,
    state_8bit=state_8bit,
    group_small_leaves=group_small_leaves,
  )


def adamw(
  learning_rate: base.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay: base.ScalarOrSchedule = 1e-4,
  mask: base.MaskOrFn | None = None,
  *,
  nesterov: bool = False,
  nu_dtype: jax.typing.DTypeLike | None = None,
  lr_ratio_fn: Callable[[str], float] | None = None,
  fused: bool = True,
  state_8bit: bool = False,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW: Adam with weight decay decoupled from the gradient.

  .. math::
    p \leftarrow p - \eta_t\,\rho(\mathrm{name})\Big(
      \frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon} + wd\,p\Big)

  The chain is ``scale_by_adam -> add_decayed_weights(mask) ->
  [scale_by_lr_ratio] -> scale_by_learning_rate``; it equals
  :func:`optax.adamw` (the decay is multiplied by the learning rate, as in
  optax and Paddle).

  Args:
    learning_rate: a number or a schedule of the update count.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the denominator, ``>= 0``.
    eps_root: added inside the square root, ``>= 0``.
    mu_dtype: dtype of the first moment.
    weight_decay: decoupled weight decay, ``>= 0``, or a schedule.
    mask: leaves that are decayed (``None``: all); see
      :func:`lambjax.mask_by_name`.
    nesterov: use Nesterov momentum (NAdamW).
    nu_dtype: dtype of the second moment.
    lr_ratio_fn: optional ``name -> float`` learning-rate multiplier of both
      the Adam step and the decay.
    fused: use the fused per-leaf fast path where it applies.
    state_8bit: store the moments 8-bit blockwise
      (:func:`lambjax.scale_by_adam_8bit`).
    group_small_leaves: keep the state of small leaves that share a shape,
      dtype and masks stacked, one array per group, and update each group
      as one leaf: the same numbers, far fewer kernels on trees of many
      small leaves (:class:`lambjax.GroupedState`). Needs the fast path.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lambjax as lj
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = lj.adamw(learning_rate=0.003)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{f(params):.3f}')
    13.821

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return _adam_like(
    'adamw',
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    mu_dtype,
    nu_dtype,
    nesterov,
    weight_decay,
    mask,
    lr_ratio_fn,
    fused,
    decoupled=True,
    state_8bit=state_8bit,
    group_small_leaves=group_small_leaves,
  )


def adamw_dl(
  learning_rate: base.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: base.ScalarOrSchedule = 0.01,
  mask: base.MaskOrFn | None = None,
  layerwise_decay: float = 1.0,
  n_layers: int = 12,
  lr_ratio_fn: Callable[[str], float] | None = None,
  *,
  fused: bool = True,
  stacked: stacking.Stacked | str | None = None,
  state_8bit: bool = False,
  group_small_leaves: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with layer-wise learning-rate decay (PaddleNLP's AdamWDL).

  The leaf named ``n`` uses ``learning_rate * ratio(n)`` for both the Adam
  step and the decoupled decay:

  .. math::
    p \leftarrow p - \eta_t\,\rho(n)\Big(
      \frac{\hat m}{\sqrt{\hat v} + \epsilon} + wd\,p\Big),

  with :math:`\rho` = ``lr_ratio_fn`` or, by default,
  ``functools.partial(lj.layerwise_lr_decay, layerwise_decay, n_layers)``:
  ``encoder.layers.m.*`` (or flax's ``layers_m``) gets
  ``layerwise_decay ** (n_layers - m)``, embeddings
  ``layerwise_decay ** (n_layers + 1)``, everything else 1. The chain is
  ``scale_by_adam -> add_decayed_weights(mask) -> scale_by_lr_ratio ->
  scale_by_learning_rate``. This is the documented rule (single decay); see
  :class:`lambjax.paddle.AdamWDL` for Paddle's behaviour.

  Args:
    learning_rate: a number or a schedule of the update count.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the denominator, ``>= 0``.
    weight_decay: decoupled weight decay, ``>= 0``.
    mask: leaves that are decayed (``None``: all).
    layerwise_decay: the per-layer decay, ``> 0``.
    n_layers: number of layers, ``>= 1``.
    lr_ratio_fn: ``name -> float``; overrides the default rule.
    fused: use the fused per-leaf fast path where it applies.
    stacked: optional :class:`lambjax.Stacked`: each layer slice of a
      stacked (scanned) leaf gets the ratio of its own layer name, e.g.
      ``lj.Stacked('layers')`` turns ``layers.mlp.kernel`` slice ``m`` into
      ``layers.m.mlp.kernel``.
    state_8bit: store the moments 8-bit blockwise
      (:func:`lambjax.scale_by_adam_8bit`).
    group_small_leaves: keep the state of small leaves that share a shape,
      dtype and masks stacked, one array per group, and update each group
      as one leaf: the same numbers, far fewer kernels on trees of many
      small leaves (:class:`lambjax.GroupedState`). Needs the fast path.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lambjax as lj
    >>> params = {'embeddings': jnp.ones(2),
    ...           'encoder': {'layers': [{'w': jnp.ones(2)}, {'w': jnp.ones(2)}]},
    ...           'head': jnp.ones(2)}
    >>> solver = lj.adamw_dl(1e-2, weight_decay=0.0, layerwise_decay=0.5,
    ...                      n_layers=2)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = solver.update(grads, solver.init(params), params)
    >>> [float(u[0]) for u in jax.tree.leaves(updates)]  # emb, l0, l1, head
    [-0.00125, -0.0025, -0.005, -0.01]

  References:
    Clark et al., `ELECTRA <https://arxiv.org/abs/2003.10555>`_, 2020;
    Yang et al., `XLNet <https://arxiv.org/abs/1906.08237>`_, 2019;
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  _check_layerwise('adamw_dl', layerwise_decay, n_layers)
  if lr_ratio_fn is None:
    lr_ratio_fn = functools.partial(
      layerwise_lr_decay, layerwise_decay, n_layers
    )
  return _adam_like(
    'adamw_dl',
    learning_rate,
    b1,
    b2,
    eps,
    0.0,
    None,
    None,
    False,
    weight_decay,
    mask,
    lr_ratio_fn,
    fused,
    decoupled=True,
    stacked=stacked,
    state_8bit=state_8bit,
    group_small_leaves=group_small_leaves,
  )
