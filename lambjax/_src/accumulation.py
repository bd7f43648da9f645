"""Gradient accumulation that runs the optimizer only when it applies."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lambjax._src import base, fused


class AccumulationState(NamedTuple):
  """State of :func:`accumulate_gradients`.

  Attributes:
    mini_step: micro-steps accumulated so far in this cycle (``0..k-1``).
    gradient_step: optimizer updates applied so far.
    inner_state: the wrapped optimizer's state (changes only on updates).
    acc_grads: running mean of this cycle's gradients.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_state: Any
  acc_grads: Any


def accumulate_gradients(
  tx: optax.GradientTransformation,
  every_k_steps: int,
  *,
  accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Averages gradients over ``every_k_steps`` calls, then updates once.

  The semantics of :class:`optax.MultiSteps` (same running mean, so the same
  numbers): calls ``1 .. k-1`` of a cycle return zero updates and leave the
  wrapped state untouched; call ``k`` runs ``tx`` on the mean gradient. The
  difference is the work done: ``optax.MultiSteps`` (0.2.8) runs ``tx.update``
  on *every* micro-step and then selects the old state back with
  ``jnp.where`` over the whole optimizer state; here a ``lax.cond`` runs
  ``tx.update`` only on the applying step, so a micro-step costs one pass
  over the accumulator (updated in place) and the zero updates. (Under
  ``jax.vmap`` a ``lax.cond`` becomes a select and both branches run, as for
  any cond.)

  Args:
    tx: any optimizer.
    every_k_steps: an int ``>= 1`` (1: no accumulation, ``tx`` itself
      every call).
    accumulator_dtype: dtype of the running mean (default: the params').

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`AccumulationState`. ``lj.get_lr`` / ``lj.set_lr`` see through it.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.accumulate_gradients(lj.adam(0.1), every_k_steps=2)
    >>> p = jnp.zeros(2)
    >>> s = tx.init(p)
    >>> u, s = tx.update(jnp.array([1.0, -1.0]), s, p)  # accumulates
    >>> u
    Array([0., 0.], dtype=float32)
    >>> u, s = tx.update(jnp.array([3.0, -1.0]), s, p)  # adam on the mean
    >>> u, int(s.gradient_step)
    (Array([-0.1,  0.1], dtype=float32), 1)
  """
  base.check_tx('accumulate_gradients', tx)
  if (
    isinstance(every_k_steps, bool)
    or not isinstance(every_k_steps, int)
    or every_k_steps < 1
  ):
    raise ValueError(
      'accumulate_gradients: `every_k_steps` must be an int >= 1, got '
      f'{every_k_steps!r}.'
    )
  tx = optax.with_extra_args_support(tx)
  k = every_k_steps

  def init_fn(params):
    acc = jax.tree.map(
      lambda p: jnp.zeros(
        jnp.shape(p), accumulator_dtype or jnp.result_type(p)
      ),
      params,
    )
    return AccumulationState(
      mini_step=jnp.zeros((), jnp.int32),
      gradient_step=jnp.zeros((), jnp.int32),
      inner_state=tx.init(params),
      acc_grads=acc,
    )

  def update_fn(updates, state, params=None, **extra_args):
    n = state.mini_step

    def mean(g, a):
      # optax.MultiSteps' running mean (0.2.8), spelled as it is there.
      return (a + (g - a) / (n + 1)).astype(a.dtype)

    def inner_update(inner):
      grads = jax.tree.map(
        lambda g, a: mean(g, a).astype(g.dtype), updates, state.acc_grads
      )
      return tx.update(grads, inner, params, **extra_args)

    if k == 1:
      new_updates, inner = inner_update(state.inner_state)
      acc = jax.tree.map(jnp.zeros_like, state.acc_grads)
      return new_updates, state._replace(
        gradient_step=state.gradient_step + 1, inner_state=inner, acc_grads=acc
      )

    def apply(inner):
      return (*inner_update(inner), jnp.ones((), jnp.int32))

    def accumulate(inner):
      shapes = jax.eval_shape(
        lambda: tx.update(updates, inner, params, **extra_args)[0]
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return zeros, inner, jnp.zeros((), jnp.int32)

    new_updates, inner, stepped = jax.lax.cond(
      n == k - 1, apply, accumulate, state.inner_state
    )
    # The new accumulator in one pass, reset on the applying step. It is made
    # outside the cond (whose applying branch computes the mean from the same
    # inputs), as an array returned through a cond branch is copied, and after
    # it (it reads ``stepped``), so that it may overwrite the old one in place.
    acc = jax.tree.map(
      lambda g, a: jnp.where(stepped == 1, jnp.zeros_like(a), mean(g, a)),
      updates,
      state.acc_grads,
    )
    return fused.fuse_callers_add(new_updates, stepped), AccumulationState(
      mini_step=(n + 1) % k,
      gradient_step=state.gradient_step + stepped,
      inner_state=inner,
      acc_grads=acc,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
