"""Gradient clipping: global norm, per-leaf norm, asymmetric value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lambjax._src import base, stacking


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  r"""Rescales all updates together so their global norm is at most ``max_norm``.

  :math:`G = \sqrt{\sum_\ell \|g_\ell\|^2}`; if :math:`G > c` every leaf is
  multiplied by :math:`c / G`. This is :func:`optax.clip_by_global_norm`
  (reused) with argument checking; it equals Paddle's
  ``ClipGradByGlobalNorm`` (:math:`g \cdot c / \max(G, c)`).

  Args:
    max_norm: the largest global norm allowed, ``>= 0``.

  Returns:
    A stateless ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.clip_by_global_norm(1.0)
    >>> g = {'a': jnp.array([3.0]), 'b': jnp.array([4.0])}
    >>> tx.update(g, tx.init(g))[0]['b']
    Array([0.8], dtype=float32)

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2012.
  """
  base.check_number('clip_by_global_norm', 'max_norm', max_norm, lo=0.0)
  return optax.clip_by_global_norm(max_norm)


def clip_by_norm(
  max_norm: float, *, stacked: stacking.Stacked | str | None = None
) -> optax.GradientTransformation:
  r"""Clips each leaf separately to L2 norm at most ``max_norm``.

  :math:`g \leftarrow g \cdot c / \|g\|` where :math:`\|g\| > c`, else
  :math:`g` unchanged (a zero gradient stays zero). This is Paddle's
  ``ClipGradByNorm`` (per tensor), unlike :func:`clip_by_global_norm`.

  Args:
    max_norm: the largest per-leaf norm allowed, ``>= 0``.
    stacked: optional :class:`lambjax.Stacked`: stacked leaves are clipped
      layer slice by layer slice.

  Returns:
    A stateless ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.clip_by_norm(1.0)
    >>> g = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.5])}
    >>> out = tx.update(g, tx.init(g))[0]
    >>> out['a'], out['b']
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
  """
  base.check_number('clip_by_norm', 'max_norm', max_norm, lo=0.0)
  stacked = stacking.check('clip_by_norm', stacked)

  def clip_leaf(g, axis=None):
    axes = stacking.reduce_axes(g.ndim, axis)
    norm = optax.safe_norm(g, 0.0, axis=axes, keepdims=axis is not None)
    clipped = g * (max_norm / jnp.where(norm > max_norm, norm, 1.0)).astype(
      g.dtype
    )
    return jnp.where(norm > max_norm, clipped, g)

  def update_fn(updates, state, params=None):
    del params
    if stacked is None:
      return jax.tree.map(clip_leaf, updates), state
    named, treedef = base.flatten_with_names(updates)
    out = [
      None
      if g is None
      else clip_leaf(g, stacking.leaf_axis(stacked, name, g.shape))
      for name, g in named
    ]
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_value(
  max: float,  # noqa: A002 - Paddle's and the contract's argument name.
  min: float | None = None,  # noqa: A002
) -> optax.GradientTransformation:
  r"""Clips every update element into ``[min, max]``.

  :math:`g \leftarrow \mathrm{clip}(g, \mathrm{min}, \mathrm{max})` with
  ``min = -max`` by default; asymmetric bounds are allowed (Paddle's
  ``ClipGradByValue``; :func:`optax.clip` is symmetric only).

  Args:
    max: the upper bound.
    min: the lower bound, ``<= max``; ``None`` means ``-max``.

  Returns:
    A stateless ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.clip_by_value(0.5, min=-0.3)
    >>> g = jnp.array([-1.0, 0.1, 1.0])
    >>> tx.update(g, tx.init(g))[0]
    Array([-0.3,  0.1,  0.5], dtype=float32)
  """
  base.check_number('clip_by_value', 'max', max)
  lo = -max if min is None else min
  base.check_number('clip_by_value', 'min', lo)
  if lo > max:
    raise ValueError(f'clip_by_value: `min` ({lo}) must be <= `max` ({max}).')

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(
      lambda g: jnp.clip(
        g, jnp.asarray(lo, g.dtype), jnp.asarray(max, g.dtype)
      ),
      updates,
    ), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
