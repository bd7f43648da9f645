"""Wrappers: float32 master weights, lazy (row-sparse) updates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lambjax._src import base, grouping, packing
from lambjax._src.quantized import QuantizedTensor as _QTensor


class MasterWeightsState(NamedTuple):
  """``master``: float32 copies of the low-precision params (``MaskedNode``
  where a param is already float32); ``inner_state``: the wrapped
  optimizer's state, built on the float32 params."""

  master: Any
  inner_state: Any


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def with_master_weights(
  tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``tx`` on float32 master weights for bf16 / fp16 params.

  Paddle's ``multi_precision=True`` for any optimizer. The state holds a
  float32 copy of every low-precision param and ``tx``'s state built on the
  float32 params (so its moments are float32); gradients are cast to
  float32, ``tx`` updates the master (its norms, e.g. trust ratios, use the
  master), and the returned update moves each param to exactly the master
  cast to its dtype:

  .. math::
    m \leftarrow m + \mathrm{tx}(g_{32}; m), \qquad
    u = \mathrm{f32}(\mathrm{cast}(m)) - \mathrm{f32}(p).

  Updates of low-precision leaves are float32 so that
  ``optax.apply_updates`` lands exactly on ``cast(m)``. float32 leaves keep
  no copy and are updated as by ``tx`` alone.

  Args:
    tx: any optimizer.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`MasterWeightsState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import lambjax as lj
    >>> tx = lj.with_master_weights(lj.adam(1e-3))
    >>> p = {'w': jnp.ones(2, jnp.bfloat16)}
    >>> state = tx.init(p)
    >>> state.master['w'].dtype, state.inner_state[0].mu['w'].dtype
    (dtype('float32'), dtype('float32'))
    >>> u, state = tx.update({'w': jnp.ones(2, jnp.bfloat16)}, state, p)
    >>> p = optax.apply_updates(p, u)
    >>> bool((p['w'] == state.master['w'].astype(jnp.bfloat16)).all())
    True
  """
  base.check_tx('with_master_weights', tx)

  def low(x) -> bool:
    x = base.leaf_value(x)
    return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32

  def full32(master, params):
    return jax.tree.map(
      lambda m, p: (
        base.leaf_value(p).astype(jnp.float32) if _is_masked(m) else m
      ),
      master,
      params,
      is_leaf=_is_masked,
    )

  def init_fn(params):
    base.check_leaves('with_master_weights', params)
    master = jax.tree.map(
      lambda p: (
        base.leaf_value(p).astype(jnp.float32) if low(p) else optax.MaskedNode()
      ),
      params,
      is_leaf=base.is_nnx_variable,
    )
    return MasterWeightsState(master, tx.init(full32(master, params)))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f'with_master_weights: {base.NO_PARAMS_MSG}')
    p32 = full32(state.master, params)
    g32 = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
    u32, inner = tx.update(g32, state.inner_state, p32, **extra_args)
    new32 = jax.tree.map(lambda p, u: p + u, p32, u32)

    def out_update(m, p, u, n):
      if _is_masked(m):
        return u.astype(p.dtype)  # float32 leaf: tx's own update.
      return n.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32)

    new_updates = jax.tree.map(
      out_update, state.master, params, u32, new32, is_leaf=_is_masked
    )
    master = jax.tree.map(
      lambda m, n: m if _is_masked(m) else n,
      state.master,
      new32,
      is_leaf=_is_masked,
    )
    return new_updates, MasterWeightsState(master, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _row_keep(g: jax.Array) -> jax.Array | None:
  """Bool of shape (rows, 1, ...): True where the gradient row is nonzero."""
  if g.ndim == 0:
    return None
  nz = jnp.any(g != 0, axis=tuple(range(1, g.ndim)))
  return nz.reshape((g.shape[0],) + (1,) * (g.ndim - 1))


def _no_array_here(x: Any) -> bool:
  """A state node that stands for a leaf without holding its array: masked
  by ``optax.masked`` / ``optax.partition``, or a grouped leaf's slot."""
  return isinstance(x, optax.MaskedNode | grouping.GroupSlot)


def _check_rows_kept(state: Any) -> None:
  """A ``ValueError`` for state layouts whose rows lazy_rows cannot keep."""
  for x in jax.tree.leaves(
    state, is_leaf=lambda y: isinstance(y, packing.PackedState | _QTensor)
  ):
    if isinstance(x, packing.PackedState):
      raise ValueError(
        'lazy_rows: the state of `with_packed_state` keeps many leaves in '
        'one buffer, whose rows lazy_rows cannot keep; wrap the optimizer '
        'in lazy_rows first: with_packed_state(lazy_rows(tx)).'
      )
    if isinstance(x, _QTensor):
      raise ValueError(
        'lazy_rows: 8-bit state (`state_8bit=True`) quantizes blocks across '
        'rows, so rows without a gradient cannot keep their values; use '
        'float32 or bfloat16 state with lazy_rows.'
      )


def _select_rows(keep, new_tree, old_tree, params_def, shapes):
  """In every params-shaped subtree of the state, keep old rows.

  A subtree is params-shaped where it has the params' structure and each
  leaf's shape, with masked leaves (``optax.MaskedNode``, as in the state
  of ``optax.partition`` or ``optax.masked``) allowed. In a
  :class:`lambjax.GroupedState` the grouped leaves' rows are kept in their
  stacks."""
  keeps = params_def.flatten_up_to(keep)

  def params_like(new, old, pieces, slots):
    """Old rows kept in ``new``; a grouped leaf's keep goes to ``slots``."""
    kept = []
    old_pieces = params_def.flatten_up_to(old)
    for k, x, o in zip(keeps, pieces, old_pieces, strict=True):
      if isinstance(x, grouping.GroupSlot):
        slots[x.group, x.part, x.row] = k
      kept.append(x if k is None or _no_array_here(x) else jnp.where(k, x, o))
    return params_def.unflatten(kept)

  def walk(new, old, slots):
    pieces = base.params_shaped(new, params_def, shapes, _no_array_here)
    if pieces is not None:
      return params_like(new, old, pieces, slots)
    if isinstance(new, grouping.GroupedState):
      return grouped(new, old)
    if jax.tree_util.all_leaves([new]) or new is None:
      return new
    kids_new, treedef = jax.tree_util.tree_flatten(
      new, is_leaf=lambda y: y is not new
    )
    kids_old = treedef.flatten_up_to(old)
    return jax.tree_util.tree_unflatten(
      treedef,
      [walk(n, o, slots) for n, o in zip(kids_new, kids_old, strict=True)],
    )

  def grouped(new, old):
    slots: dict[tuple[int, int, int], Any] = {}  # (group, part, row) -> keep
    inner = walk(new.inner, old.inner, slots)
    stacks = []
    for j, (news, olds) in enumerate(zip(new.stacks, old.stacks, strict=True)):
      parts = []
      for part, (n, o) in enumerate(zip(news, olds, strict=True)):
        rows = [slots.get((j, part, r)) for r in range(n.shape[0])]
        if all(k is None for k in rows):
          parts.append(n)
          continue
        ones = jnp.ones((n.shape[1],) + (1,) * (n.ndim - 2), bool)
        mask = jnp.stack([ones if k is None else k for k in rows])
        parts.append(jnp.where(mask, n, o))
      stacks.append(tuple(parts))
    return new._replace(inner=inner, stacks=tuple(stacks))

  return walk(new_tree, old_tree, {})


def lazy_rows(
  tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Rows whose gradient row is all zero keep param and state unchanged.

  Paddle's ``lazy_mode=True`` (the sparse-gradient meaning, for embedding
  tables): for each leaf with at least one axis, the rows (axis 0) whose
  gradient is all zeros get a zero update, and every params-shaped part of
  ``tx``'s state (moments, momentum) keeps its old values on those rows.
  Counts still advance, as Paddle's per-parameter step does. 0-d leaves are
  updated normally. With no all-zero rows it equals ``tx``.

  The state's moments are found wherever they are laid out like the params:
  inside ``optax.partition`` / ``optax.masked`` (masked leaves allowed) and
  in a :class:`lambjax.GroupedState` (rows of its stacks). State whose rows
  cannot be kept raises a ``ValueError``: :func:`lambjax.with_packed_state`
  around ``tx`` (write ``with_packed_state(lazy_rows(tx))`` instead) and
  8-bit state, whose quantization blocks span rows.

  Args:
    tx: any optimizer (``lj.adam``, ``lj.adamw``, ``lj.lamb``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``tx``'s state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.lazy_rows(lj.adam(0.1))
    >>> emb = jnp.ones((3, 2))
    >>> g = jnp.array([[1.0, 1.0], [0.0, 0.0], [1.0, -1.0]])
    >>> u, _ = tx.update(g, tx.init(emb), emb)
    >>> u[1]
    Array([0., 0.], dtype=float32)
  """
  base.check_tx('lazy_rows', tx)

  def init_fn(params):
    state = tx.init(params)
    _check_rows_kept(state)
    return state

  def update_fn(updates, state, params=None, **extra_args):
    _check_rows_kept(state)
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    keep = jax.tree.map(_row_keep, updates)
    new_updates = jax.tree.map(
      lambda k, u: u if k is None else jnp.where(k, u, jnp.zeros_like(u)),
      keep,
      new_updates,
      is_leaf=lambda x: x is None,
    )
    params_def = jax.tree.structure(updates)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(updates)]
    new_state = _select_rows(keep, new_state, state, params_def, shapes)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
