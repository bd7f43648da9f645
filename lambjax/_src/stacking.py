"""Stacked (scanned) layers: per-layer-slice norms and names."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np


class Stacked(NamedTuple):
  """Declares leaves that hold several layers stacked along one axis.

  Models built with ``flax.linen.scan``, ``nnx.vmap`` or ``nnx.scan`` keep
  ``L`` layers in one array with a layer axis (usually the leading one).
  Pass ``stacked=lj.Stacked(pattern, axis)`` to an optimizer or block and the
  leaves whose :func:`lambjax.tree_names` name matches the regular expression
  ``pattern`` are treated as ``L`` separate leaves for everything that is
  per leaf: trust ratios, per-leaf norm clipping and layer-wise
  learning-rate ratios. Slice ``i`` is named by inserting ``.i`` after the
  name component where ``pattern`` matches, so ``'encoder.layers.mlp.kernel'``
  with ``pattern='layers'`` gives ``'encoder.layers.3.mlp.kernel'``, the name
  the same layer has when layers are a Python list (and what
  :func:`lambjax.layerwise_lr_decay` reads). Elementwise parts (Adam's
  moments, weight decay, momentum) are the same either way, and the state
  keeps the params' shapes.

  Attributes:
    pattern: regular expression searched in each leaf's name.
    axis: the layer axis of the matching leaves (negative counts from the
      end).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> params = {'layers': {'w': jnp.stack([jnp.ones(2), 3 * jnp.ones(2)])}}
    >>> tx = lj.scale_by_trust_ratio(stacked=lj.Stacked('layers'))
    >>> u = {'layers': {'w': jnp.ones((2, 2))}}
    >>> out = tx.update(u, tx.init(params), params)[0]['layers']['w']
    >>> out.round(4)  # 1x, 3x (GPUs' sqrt and divide are within an ulp)
    Array([[1., 1.],
           [3., 3.]], dtype=float32)
  """

  pattern: str
  axis: int = 0


def check(where: str, stacked: Any) -> Stacked | None:
  """``None``, a ``Stacked``, or a bare pattern string (axis 0)."""
  if stacked is None:
    return None
  if isinstance(stacked, str):
    stacked = Stacked(stacked)
  if not isinstance(stacked, Stacked):
    raise ValueError(
      f'{where}: `stacked` must be None, a regex string or lj.Stacked, got '
      f'{stacked!r}.'
    )
  if not isinstance(stacked.pattern, str):
    raise ValueError(
      f'{where}: `stacked.pattern` must be a str, got {stacked.pattern!r}.'
    )
  try:
    re.compile(stacked.pattern)
  except re.error as e:
    raise ValueError(
      f'{where}: `stacked.pattern` {stacked.pattern!r} is not a valid '
      f'regular expression: {e}.'
    ) from None
  if isinstance(stacked.axis, bool) or not isinstance(stacked.axis, int):
    raise ValueError(
      f'{where}: `stacked.axis` must be an int, got {stacked.axis!r}.'
    )
  return stacked


def leaf_axis(stacked: Stacked | None, name: str, shape) -> int | None:
  """The (non-negative) layer axis of a leaf, or ``None`` if not stacked."""
  if stacked is None or re.search(stacked.pattern, name) is None:
    return None
  ndim = len(shape)
  axis = stacked.axis + ndim if stacked.axis < 0 else stacked.axis
  if not 0 <= axis < ndim:
    raise ValueError(
      f'stacked: leaf {name!r} matches {stacked.pattern!r} but has shape '
      f'{tuple(shape)}, which has no axis {stacked.axis}.'
    )
  return axis


def slice_name(stacked: Stacked, name: str, i: int) -> str:
  """``name`` with ``.i`` after the component where the pattern matches."""
  m = re.search(stacked.pattern, name)
  end = name.find('.', m.end())
  end = len(name) if end < 0 else end
  return f'{name[:end]}.{i}{name[end:]}'


def reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...] | None:
  """Axes a per-slice norm reduces over (``None``: all, one norm)."""
  if axis is None:
    return None
  return tuple(d for d in range(ndim) if d != axis)


def sumsq(x: jnp.ndarray, axis: int | None) -> jnp.ndarray:
  """Sum of squares over the leaf, or per slice (keepdims) when stacked."""
  if axis is None:
    return jnp.sum(x * x)
  return jnp.sum(x * x, axis=reduce_axes(x.ndim, axis), keepdims=True)


def per_slice(values, ndim: int, axis: int) -> np.ndarray:
  """float32 values shaped to broadcast along ``axis`` of an ``ndim`` leaf."""
  shape = [1] * ndim
  shape[axis] = len(values)
  return np.asarray(values, np.float32).reshape(shape)


def lr_ratios(stacked, lr_ratio_fn, ratio_value, name, shape):
  """The leaf's lr multiplier: a float, or per-slice array when stacked."""
  axis = leaf_axis(stacked, name, shape)
  if axis is None:
    return ratio_value(lr_ratio_fn, name)
  values = [
    ratio_value(lr_ratio_fn, slice_name(stacked, name, i))
    for i in range(shape[axis])
  ]
  if all(v == values[0] for v in values):
    return values[0]
  return per_slice(values, len(shape), axis)
