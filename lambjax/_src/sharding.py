"""Shardings of optimizer state: data parallel, FSDP and ZeRO-1."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lambjax._src import base, grouping, packing


def _is_masked(x) -> bool:
  """A leafless node that stays as it is: optax's masked-out node, or a
  packed or grouped array's slot (``with_packed_state``,
  ``group_small_leaves``; its buffer or stack is replicated)."""
  return isinstance(
    x, optax.MaskedNode | packing.PackedSlot | grouping.GroupSlot
  )


def _mesh_of(params_sharding) -> Any:
  for s in jax.tree.leaves(
    params_sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  ):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError(
    'state_sharding: `params_sharding` must hold jax.sharding.NamedSharding '
    'leaves (on a Mesh).'
  )


def _zero_spec(shape, mesh, axis, fallback):
  """Shard the largest dimension that ``axis`` divides; else ``fallback``."""
  n = mesh.shape[axis]
  dims = [
    d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n
  ]
  if not dims:
    return fallback
  spec = [None] * len(shape)
  spec[int(dims[0])] = axis
  return NamedSharding(mesh, P(*spec))


def state_sharding(
  tx: optax.GradientTransformation,
  params: Any,
  params_sharding: Any,
  *,
  zero_axis: str | None = None,
) -> Any:
  """Shardings for ``tx.init(params)``, for ``jit``'s in/out_shardings.

  Parameter-shaped parts of the state (moments, momentum, master weights)
  take their parameter's sharding (data parallel: replicated; FSDP: sharded
  like the params); scalars (counts, learning rates) are replicated. With
  ``zero_axis='data'`` the parameter-shaped parts are instead sharded over
  that mesh axis along the largest dimension it divides (ZeRO-1: replicated
  params, sharded optimizer state); a leaf it divides nowhere keeps its
  parameter's sharding. Per-leaf norms stay exact under any of these: jit's
  SPMD partitioner reduces across shards, never per shard.

  Args:
    tx: the optimizer.
    params: the params, or their ``jax.ShapeDtypeStruct``s.
    params_sharding: a pytree of ``NamedSharding`` with ``params``' structure.
    zero_axis: optional mesh axis name for ZeRO-1 state sharding.

  Returns:
    A pytree of ``jax.sharding.Sharding`` with the structure of
    ``tx.init(params)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> import lambjax as lj
    >>> mesh = Mesh(jax.devices()[:1], ('data',))
    >>> params = {'w': jnp.ones((4, 2))}
    >>> shard = {'w': NamedSharding(mesh, P())}
    >>> tx = lj.lamb(1e-3)
    >>> s = lj.state_sharding(tx, params, shard, zero_axis='data')
    >>> s[0].mu['w'].spec
    P('data', None)
  """
  mesh = _mesh_of(params_sharding)
  if zero_axis is not None and zero_axis not in mesh.shape:
    raise ValueError(
      f'state_sharding: `zero_axis` {zero_axis!r} is not an axis of the mesh '
      f'{dict(mesh.shape)}.'
    )
  shapes = jax.eval_shape(tx.init, params)
  p_def = jax.tree.structure(params)
  p_shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
  p_shard = p_def.flatten_up_to(params_sharding)
  replicated = NamedSharding(mesh, P())

  def for_param(i, leaf):
    if zero_axis is None:
      return p_shard[i]
    return _zero_spec(leaf.shape, mesh, zero_axis, p_shard[i])

  def walk(node):
    if node is None or _is_masked(node):
      return node
    parts = (
      base.params_shaped(node, p_def, p_shapes, _is_masked)
      if not jax.tree_util.all_leaves([node])
      else None
    )
    if parts is not None:
      return p_def.unflatten(
        [x if _is_masked(x) else for_param(i, x) for i, x in enumerate(parts)]
      )
    if jax.tree_util.all_leaves([node]):
      return replicated
    kids, treedef = jax.tree_util.tree_flatten(
      node, is_leaf=lambda y: y is not node
    )
    return jax.tree_util.tree_unflatten(treedef, [walk(k) for k in kids])

  return walk(shapes)
