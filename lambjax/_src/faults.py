"""Skipping steps whose gradients are not finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lambjax._src import base, fused


def apply_if_finite(
  tx: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
  """Skips updates whose gradients hold a NaN or Inf (optax's semantics).

  A step with a non-finite gradient returns zero updates and leaves the
  inner state bit-identical; after ``max_consecutive_errors`` such steps in
  a row the update goes through. The state (``optax.ApplyIfFiniteState``)
  counts ``notfinite_count`` (consecutive), ``total_notfinite`` and
  ``last_finite``; :func:`lambjax.get_lr` and :func:`lambjax.set_lr` see
  through it.

  This is :func:`optax.apply_if_finite` (its init, state and update reused
  or spelled alike) with argument checking and two changes for speed, with
  the same numbers: the gradients are tested by :func:`all_finite` (one
  fast sum per leaf; optax's boolean reduction took 79 ms on BERT-base on
  XLA:CPU), and on XLA:CPU the updates of conv-kernel shapes carry one more
  exact op, so that the caller's add fuses (``fused.fuse_callers_add``).

  Args:
    tx: any lambjax (or optax) optimizer.
    max_consecutive_errors: an int ``>= 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.apply_if_finite(lj.lamb(1e-2), max_consecutive_errors=3)
    >>> p = {'w': jnp.ones(2)}
    >>> u, state = tx.update({'w': jnp.array([jnp.nan, 1.0])}, tx.init(p), p)
    >>> u['w'], int(state.total_notfinite)
    (Array([0., 0.], dtype=float32), 1)
  """
  base.check_tx('apply_if_finite', tx)
  if (
    isinstance(max_consecutive_errors, bool)
    or not isinstance(max_consecutive_errors, int)
    or max_consecutive_errors < 0
  ):
    raise ValueError(
      'apply_if_finite: `max_consecutive_errors` must be an int >= 0, got '
      f'{max_consecutive_errors!r}.'
    )
  tx = optax.with_extra_args_support(tx)
  init_fn = optax.apply_if_finite(tx, max_consecutive_errors).init

  def update_fn(updates, state, params=None, **extra_args):
    # From here on optax.apply_if_finite's update (0.2.8), but for the test
    # of the gradients (`all_finite`) and the last line.
    isfinite = all_finite(jax.tree.leaves(updates))
    notfinite_count = jnp.where(
      isfinite,
      jnp.zeros([], jnp.int32),
      optax.safe_increment(state.notfinite_count),
    )

    def do_update(_):
      return tx.update(updates, state.inner_state, params, **extra_args)

    def reject_update(_):
      return optax.tree.zeros_like(updates), state.inner_state

    new_updates, inner = jax.lax.cond(
      jnp.logical_or(isfinite, notfinite_count > max_consecutive_errors),
      do_update,
      reject_update,
      operand=None,
    )
    new_state = optax.ApplyIfFiniteState(
      notfinite_count=notfinite_count,
      last_finite=isfinite,
      total_notfinite=jnp.where(
        isfinite,
        state.total_notfinite,
        optax.safe_increment(state.total_notfinite),
      ),
      inner_state=inner,
    )
    # The updates come out of the cond, written out: the caller's add would
    # run alone, slowly on conv kernels on XLA:CPU.
    return fused.fuse_callers_add(new_updates, notfinite_count), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def all_finite(leaves: list[jax.Array]) -> jax.Array:
  """Whether every element of ``leaves`` is finite, as one boolean.

  optax's test, ``jnp.all`` of ``jnp.isfinite`` of each leaf, is a boolean
  reduction that XLA:CPU runs 3-4x slower than a sum (79 vs 23 ms on
  BERT-base's gradients). Here each leaf is summed (in float32 at least): a
  non-finite element makes the sum non-finite (``inf + x``, ``inf - inf``
  and NaN all are), and finite elements give a finite sum unless it
  overflows. Only a non-finite sum runs optax's exact test, under a
  ``lax.cond``: the answer is always optax's.
  """
  if not leaves:
    return jnp.array(True)
  fast = jnp.all(
    jnp.stack(
      [
        jnp.isfinite(jnp.sum(x, dtype=jnp.promote_types(x.dtype, jnp.float32)))
        for x in leaves
      ]
    )
  )
  exact = lambda: jnp.all(  # noqa: E731
    jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
  )
  return jax.lax.cond(fast, lambda: jnp.array(True), exact)
