"""Skipping steps whose gradients are not finite."""

from __future__ import annotations

import optax

from lambjax._src import base


def apply_if_finite(
  tx: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
  """Skips updates whose gradients hold a NaN or Inf (optax's semantics).

  This is :func:`optax.apply_if_finite` (reused) with argument checking. A
  step with a non-finite gradient returns zero updates and leaves the inner
  state bit-identical; after ``max_consecutive_errors`` such steps in a row
  the update goes through. The state (``optax.ApplyIfFiniteState``) counts
  ``notfinite_count`` (consecutive), ``total_notfinite`` and
  ``last_finite``; :func:`lambjax.get_lr` and :func:`lambjax.set_lr` see
  through it.

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
  return optax.apply_if_finite(tx, max_consecutive_errors)
