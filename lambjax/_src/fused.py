"""Fused per-leaf updates: the fast path under the aliases.

The building-block chain is the specification; these functions compute the
same numbers leaf by leaf in one function (moments, direction, decay, norms,
trust ratio, learning rate), with the *same state* as the chain (so a
checkpoint of one loads into the other). The aliases choose them
automatically where they apply (``fused=True``, the default) and fall back to
the chain otherwise (a weight-decay schedule, Nesterov Adam).

Why it is faster on XLA:CPU (see benchmarks/RESULTS.md): the chain
materialises each stage's update tree, and ``optax.safe_norm`` reads every
tensor twice; here norms are one sum of squares with a scalar-level guard, and
LARS's norms are computed from sums over the inputs only (``‖g + wd p‖² =
‖g‖² + 2 wd <g,p> + wd² ‖p‖²``, exact fallback on cancellation), so no
update-sized temporary is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lambjax._src import base, stacking, transform


def _norm_from_sumsq(s: jax.Array) -> jax.Array:
  """sqrt(s) with a zero (not NaN) gradient at s == 0."""
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def _sumsq(x: jax.Array) -> jax.Array:
  return jnp.sum(x * x)


def _times_lr_ratio(u, lr_ratio_fn, stacked, name):
  """``u`` times the leaf's (or each slice's) learning-rate multiplier."""
  if lr_ratio_fn is None:
    return u
  rho = stacking.lr_ratios(
    stacked, lr_ratio_fn, transform.lr_ratio_value, name, u.shape
  )
  if isinstance(rho, float) and rho == 1.0:
    return u
  return u * jnp.asarray(rho, u.dtype)


def _clamp(ratio, lo, hi):
  if lo is None and hi is None:
    return ratio
  return jnp.clip(ratio, lo, hi)


def _step_and_lr_state(lr_tx, lr_state):
  """The signed learning-rate step (-lr) and the next lr state, computed by
  the chain's own ``scale_by_learning_rate`` (no logic duplicated)."""
  step, new_state = lr_tx.update(jnp.ones((), jnp.float32), lr_state)
  return step, new_state


class WorkspaceState(NamedTuple):
  """State of ``lamb(..., workspace=True)``: the optimizer's own state and a
  persistent buffer per trust-ratio leaf.

  Attributes:
    inner_state: the state of the transformation without a workspace (the
      chain's state, unchanged).
    direction: per leaf, the last update direction ``r`` before the trust
      ratio (zeros before the first step); a zero-size array for leaves that
      are not adapted.
  """

  inner_state: Any
  direction: Any


def _direction_dtype(p, mu_dtype, nu_dtype):
  """The dtype of LAMB's direction ``m_hat / (sqrt(v_hat) + eps) + wd p``."""
  return jnp.result_type(
    p.dtype,
    p.dtype if mu_dtype is None else mu_dtype,
    p.dtype if nu_dtype is None else nu_dtype,
  )


def adam_family(
  chain: optax.GradientTransformation,
  lr_tx: optax.GradientTransformation,
  *,
  b1: float,
  b2: float,
  eps: float,
  eps_root: float,
  mu_dtype: Any,
  weight_decay: float,
  decay_mask: Any,
  trust: bool,
  trust_mask: Any,
  min_ratio: float | None,
  max_ratio: float | None,
  lr_ratio_fn: Callable[[str], float] | None,
  record_index: int | None = None,
  stacked: stacking.Stacked | None = None,
  workspace: bool = False,
  nu_dtype: Any = None,
) -> optax.GradientTransformation:
  """Adam / AdamW / AdamWDL / LAMB in one function per leaf.

  ``chain`` must be ``scale_by_adam -> [add_decayed_weights] ->
  [scale_by_trust_ratio] -> [scale_by_lr_ratio] -> scale_by_learning_rate``;
  its state is used unchanged (stateless links pass through). With
  ``record_index``, the chain's trust-ratio link records its ratios
  (``TrustRatioState`` at that index of the chain state) and so does this.

  With ``workspace`` (LAMB only) the state is a :class:`WorkspaceState`: the
  direction ``r`` of each adapted leaf is written into a buffer carried in
  the state. ``r`` has two consumers (its norm and the update), so XLA:CPU
  materialises it; without a workspace that is a fresh temporary every step,
  whose page faults cost about a quarter of a BERT-base step on the
  benchmark machine. A donated state buffer is reused in place instead.
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  if workspace and not trust:
    raise ValueError('workspace needs the trust ratio (LAMB).')

  def init_fn(params):
    inner = chain.init(params)
    if not workspace:
      return inner
    adapt = base.leaf_flags(trust_mask, params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    bufs = [
      jnp.zeros(p.shape if a else (0,), _direction_dtype(p, mu_dtype, nu_dtype))
      for p, a in zip(leaves, adapt, strict=True)
    ]
    return WorkspaceState(inner, jax.tree_util.tree_unflatten(treedef, bufs))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # Accepted and ignored, as optax.chain does.
    if workspace:
      work = state.direction
      state = state.inner_state
    adam = state[0]
    step, lr_state = _step_and_lr_state(lr_tx, state[-1])
    count = optax.safe_increment(adam.count)
    bc1 = 1 - b1**count
    bc2 = 1 - b2**count
    named, treedef = base.flatten_with_names(updates)
    g_leaves = [x for _, x in named]
    mu_leaves = treedef.flatten_up_to(adam.mu)
    nu_leaves = treedef.flatten_up_to(adam.nu)
    p_leaves = (
      treedef.flatten_up_to(params)
      if params is not None
      else [None] * len(g_leaves)
    )
    decay = base.leaf_flags(decay_mask, params) if weight_decay else None
    adapt = base.leaf_flags(trust_mask, params) if trust else None
    w_leaves = treedef.flatten_up_to(work) if workspace else None
    out_u, out_m, out_v, out_w, ratios = [], [], [], [], []
    for i, ((name, g), mu, nu, p) in enumerate(
      zip(named, mu_leaves, nu_leaves, p_leaves, strict=True)
    ):
      m = (1 - b1) * g + b1 * mu
      v = (1 - b2) * (g * g) + b2 * nu
      m_hat = m / bc1.astype(m.dtype)
      v_hat = v / bc2.astype(v.dtype)
      u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
      if decay is not None and decay[i]:
        u = u + weight_decay * p
      axis = stacking.leaf_axis(stacked, name, g.shape)
      if workspace:
        # r leaves in the state, so XLA writes it into the donated buffer
        # instead of a fresh temporary (zero-size buffers: not adapted). The
        # whole-buffer update-slice reads as a use of the old buffer, so jit
        # keeps (and aliases) the donated input; XLA folds it to ``u``.
        w = w_leaves[i]
        same = w.shape == u.shape and w.dtype == u.dtype
        out_w.append(
          jax.lax.dynamic_update_slice(w, u, (0,) * u.ndim) if same else w
        )
      if adapt is not None and adapt[i]:
        pn = _norm_from_sumsq(stacking.sumsq(p, axis))
        un = _norm_from_sumsq(stacking.sumsq(u, axis))
        zero = jnp.logical_or(pn == 0.0, un == 0.0)
        ratio = _clamp(
          transform.guarded_ratio(pn, un, zero, p.dtype), min_ratio, max_ratio
        )
        u = u * ratio
        ratios.append(ratio)
      else:
        ratios.append(None)
      u = _times_lr_ratio(u, lr_ratio_fn, stacked, name)
      out_u.append(jnp.asarray(step, u.dtype) * u)
      out_m.append(m if mu_dtype is None else m.astype(mu_dtype))
      out_v.append(v.astype(nu.dtype))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    new_adam = adam._replace(count=count, mu=unflat(out_m), nu=unflat(out_v))
    new_state = [new_adam, *state[1:-1], lr_state]
    if record_index is not None:
      new_state[record_index] = transform.recorded(
        unflat, ratios, transform.init_trust_ratios(params, stacked)
      )
    new_state = tuple(new_state)
    if workspace:
      new_state = WorkspaceState(new_state, unflat(out_w))
    return unflat(out_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Below this size a temporary costs nothing: use the exact direct norm.
_EXPAND_MIN_SIZE = 4096


def _lars_dnorm(g, p, wd):
  """‖g + wd p‖ from sums over the inputs, exact fallback on cancellation."""
  gg, pp = _sumsq(g), _sumsq(p)
  if not wd:
    return _norm_from_sumsq(gg), _norm_from_sumsq(pp)
  if g.size < _EXPAND_MIN_SIZE:
    return _norm_from_sumsq(_sumsq(g + wd * p)), _norm_from_sumsq(pp)
  gp = jnp.sum(g * p)
  scale = gg + (wd * wd) * pp
  dd = gg + (2 * wd) * gp + (wd * wd) * pp
  # Relative rounding error of dd is ~eps * scale / dd: recompute directly
  # when more than ~1e-4 of it would be lost (g close to -wd p).
  cancel = dd < 1e-3 * scale
  dd = jax.lax.cond(
    cancel, lambda: _sumsq(g + wd * p), lambda: jnp.maximum(dd, 0.0)
  )
  return _norm_from_sumsq(dd), _norm_from_sumsq(pp)


def lars(
  chain: optax.GradientTransformation,
  lr_tx: optax.GradientTransformation,
  *,
  weight_decay: float,
  decay_mask: Any,
  trust_coefficient: float,
  eps: float,
  trust_mask: Any,
  momentum: float,
  nesterov: bool,
  form: str,
  min_ratio: float | None,
  max_ratio: float | None,
  lr_ratio_fn: Callable[[str], float] | None,
  record_index: int | None = None,
  stacked: stacking.Stacked | None = None,
) -> optax.GradientTransformation:
  """LARS (optax or Paddle form) in one function per leaf.

  ``chain``'s state is ``(..., lr_state, TraceState)``; it is used unchanged.
  In Paddle form ``decay_mask`` selects the adapted-and-decayed leaves and
  ``trust_mask`` is ignored.
  """

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # Accepted and ignored, as optax.chain does.
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    trace_state = state[-1]
    step, lr_state = _step_and_lr_state(lr_tx, state[-2])
    named, treedef = base.flatten_with_names(updates)
    p_leaves = treedef.flatten_up_to(params)
    t_leaves = treedef.flatten_up_to(trace_state.trace)
    decay = base.leaf_flags(decay_mask, params)
    adapt = decay if form == 'paddle' else base.leaf_flags(trust_mask, params)
    out_u, out_t, ratios = [], [], []
    for i, ((name, g), p, t) in enumerate(
      zip(named, p_leaves, t_leaves, strict=True)
    ):
      wd = weight_decay if decay[i] else 0.0
      d = g + wd * p if wd else g
      if adapt[i]:
        axis = stacking.leaf_axis(stacked, name, g.shape)
        if form == 'paddle':
          gn = _norm_from_sumsq(stacking.sumsq(g, axis))
          pn = _norm_from_sumsq(stacking.sumsq(p, axis))
          fallback = jnp.logical_or(pn == 0.0, gn == 0.0)
          if not wd:
            fallback = jnp.ones_like(fallback)
          den = gn + wd * pn + eps
        elif axis is not None:  # Per slice: the direct norms.
          dn = _norm_from_sumsq(stacking.sumsq(d, axis))
          pn = _norm_from_sumsq(stacking.sumsq(p, axis))
          fallback = jnp.logical_or(pn == 0.0, dn == 0.0)
          den = dn + eps
        else:
          dn, pn = _lars_dnorm(g, p, wd)
          fallback = jnp.logical_or(pn == 0.0, dn == 0.0)
          den = dn + eps
        ratio = _clamp(
          transform.guarded_ratio(
            trust_coefficient * pn, den, fallback, p.dtype
          ),
          min_ratio,
          max_ratio,
        )
        d = d * ratio
        ratios.append(ratio)
      else:
        ratios.append(None)
      d = _times_lr_ratio(d, lr_ratio_fn, stacked, name)
      u = jnp.asarray(step, d.dtype) * d
      new_t = u + momentum * t
      out_t.append(new_t)
      out_u.append(u + momentum * new_t if nesterov else new_t)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    new_trace = trace_state._replace(trace=unflat(out_t))
    new_state = [*state[:-2], lr_state, new_trace]
    if record_index is not None:
      new_state[record_index] = transform.recorded(
        unflat, ratios, transform.init_trust_ratios(params, stacked)
      )
    return unflat(out_u), tuple(new_state)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def applies(values: Sequence[Any]) -> bool:
  """The fast path needs static numbers for these hyperparameters."""
  return all(base.is_static_number(v) or v is None for v in values)
