"""Small leaves of one shape kept as the rows of one state array.

``lamb(..., group_small_leaves=True)`` (and ``lars``, ``adam``, ``adamw``,
``adamw_dl``): see :class:`GroupedState`. The fast path (``fused.py``)
updates each group as one leaf with a trust ratio per row.

Each leaf's update is then row ``i`` of the group's update. A static
``update[i]`` would be a different kernel for every ``i`` (its offset), and
XLA:CPU compiles each anew: 500 such kernels cost 9-11.5 s
(benchmarks/RESULTS.md, "Many small leaves as rows of one array"). So the
row index is computed at run time from uint32 scalars the state carries
(two digits of the row number, shared by all groups): every row of a shape
is taken by the same kernel. Unsigned, so that jax adds no negative-index
arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GroupSlot:
  """Where a grouped leaf's state array lives: ``stacks[group][part][row]``.

  A pytree node with no leaves (its fields are static), as
  :class:`lambjax.PackedState`'s slots are; :func:`lambjax.unpack_state`
  puts the array back.
  """

  group: int
  row: int
  part: int


jax.tree_util.register_pytree_node(
  GroupSlot, lambda s: ((), s), lambda aux, _: aux
)


class GroupedState(NamedTuple):
  """State of an optimizer built with ``group_small_leaves=True``.

  Leaves of at most 4,096 elements, not declared :class:`lambjax.Stacked`,
  that share a shape, dtypes and masks (decayed, adapted) form a group of
  ``k``; their state arrays are stacked, ``(k, *shape)``. The step stacks
  the members' gradients (and params where read), runs the fast path's
  arithmetic once on the stack with a trust ratio per row, and takes each
  member's update back out at its run-time row index, so every member of a
  shape is finished by the same compiled kernel. The numbers are those of
  the chain (tested); the learning-rate multipliers of ``lr_ratio_fn`` may
  differ within a group.

  When it pays: on trees of many small leaves of few shapes, where
  XLA:CPU's compile time grows with the number of kernels (2,000 leaves of
  1,000: lamb compiles several times faster, benchmarks/RESULTS.md, "Many
  small leaves as rows of one array"); on a GPU the same kernels are also
  what the host issues one by one. It costs a copy of the grouped leaves'
  gradients (and params) into the stack each step, which is small where the
  leaves are. Leaves that are large, alone of their shape, or stacked stay
  as they are. Small leaves sharded over a mesh are gathered into their
  group's stack each step (a few KiB per leaf: with two ``(64,)`` leaves
  sharded over 8 devices, the compiled ``lamb`` step had 6 all-gathers,
  and none without the option): where small leaves are sharded, leave it
  off.

  Attributes:
    inner: the chain's state, with each grouped leaf's array replaced by a
      :class:`GroupSlot` (counts, learning rates and ungrouped leaves stay).
    stacks: per group, its stacked state arrays, shaped ``(k, *shape)``
      (Adam: first and second moment; LARS: the momentum).
    digits: the digits ``0, 1, ..., B - 1`` as uint32 scalar arrays, ``B``
      the ceiling of the square root of the largest group's size. The
      member in row ``r = a B + b`` takes its update out of the group's at
      index ``digits[a] * B + digits[b]``, computed at run time, so every member
      of a shape is finished by the same compiled kernel (static indices
      would compile one kernel each; 2,000 leaves need 45 digits). They
      never change.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import lambjax as lj
    >>> params = {'a': jnp.ones(3), 'b': jnp.ones(3), 'w': jnp.ones((2, 3))}
    >>> tx = lj.lamb(1e-2, weight_decay=0.01, group_small_leaves=True)
    >>> state = tx.init(params)
    >>> [s.shape for s in state.stacks[0]]  # 'a' and 'b': mu, nu
    [(2, 3), (2, 3)]
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> lj.unpack_state(state)[0].mu['b']
    Array([0.1, 0.1, 0.1], dtype=float32)
  """

  inner: Any
  stacks: tuple[tuple[jax.Array, ...], ...]
  digits: tuple[jax.Array, ...]


def is_slot(x: Any) -> bool:
  return isinstance(x, GroupSlot)


def plan(keys: Sequence[Hashable | None]) -> list[list[int]]:
  """Groups of leaf indices with the same key (``None``: never grouped), in
  order of their first member; a key seen once forms no group."""
  groups: dict[Hashable, list[int]] = {}
  for i, key in enumerate(keys):
    if key is not None:
      groups.setdefault(key, []).append(i)
  return [idx for idx in groups.values() if len(idx) > 1]


def group(
  parts: Sequence[list[Any]], groups: Sequence[list[int]]
) -> tuple[list[list[Any]], tuple[tuple[jax.Array, ...], ...], tuple[Any, ...]]:
  """Stacks each group's arrays.

  Args:
    parts: per-leaf state arrays, one list per part (Adam: ``[mu, nu]``).
    groups: from :func:`plan`.

  Returns:
    ``parts`` with grouped arrays replaced by slots, the stacks and the
    digits of the row indices (:class:`GroupedState`).
  """
  out = [list(p) for p in parts]
  stacks = []
  for j, idx in enumerate(groups):
    stacks.append(tuple(stack([part[i] for i in idx]) for part in parts))
    for r, i in enumerate(idx):
      for k in range(len(parts)):
        out[k][i] = GroupSlot(j, r, k)
  longest = max((len(idx) for idx in groups), default=0)
  base = math.isqrt(longest - 1) + 1 if longest else 0
  digits = tuple(jnp.asarray(r, jnp.uint32) for r in range(base))
  return out, tuple(stacks), digits


def check_state(where: str, state: Any) -> None:
  """A ``ValueError`` unless ``state`` is a :class:`GroupedState`."""
  if not isinstance(state, GroupedState):
    raise ValueError(
      f'{where}: with group_small_leaves=True `state` must be the '
      f'GroupedState that init returned, got {type(state).__name__}.'
    )


def members(
  where: str, state: GroupedState, parts: Sequence[list[Any]]
) -> list[list[int]]:
  """The groups of leaf indices that ``state``'s slots describe, checked."""
  check_state(where, state)
  n = len(state.stacks)
  found: list[dict[int, int]] = [{} for _ in range(n)]
  for k, part in enumerate(parts):
    for i, x in enumerate(part):
      if not is_slot(x):
        continue
      if x.part != k or not 0 <= x.group < n:
        raise ValueError(f'{where}: the grouped state does not fit: {x}.')
      if k == 0:
        found[x.group][x.row] = i
      elif found[x.group].get(x.row) != i:
        raise ValueError(f'{where}: the grouped state does not fit: {x}.')
  groups = []
  for j, rows in enumerate(found):
    k = len(rows)
    if sorted(rows) != list(range(k)) or not 2 <= k <= len(state.digits) ** 2:
      raise ValueError(
        f'{where}: group {j} of the grouped state has rows {sorted(rows)}; '
        'was it built for another tree?'
      )
    groups.append([rows[r] for r in range(k)])
  return groups


def same(where: str, what: str, names: Sequence[str], values: Sequence[Any]):
  """The members' common value of a per-leaf property; a ``ValueError``
  where they differ (a mask or dtype changed since ``init``)."""
  for name, v in zip(names[1:], values[1:], strict=True):
    if v != values[0]:
      raise ValueError(
        f'{where}: grouped leaves {names[0]!r} and {name!r} differ in '
        f'{what} ({values[0]!r} vs {v!r}); group_small_leaves needs the '
        'same masks, shapes and dtypes as at init.'
      )
  return values[0]


def stack(xs: Sequence[jax.Array]) -> jax.Array:
  """``jnp.stack(xs)`` as one concatenation of the raveled arrays.

  ``jnp.stack`` reshapes each array to ``(1, *shape)`` first, a bitcast per
  leaf in the compiled step; on 2,000 leaves those made XLA:CPU's compile
  1.4x longer (16.2 vs 11.8 s, benchmarks/RESULTS.md)."""
  # lax's own ops: jnp's are jitted wrappers, each a nested trace (spelled
  # with jnp, these stacks and rows_of's slices were half the time to trace
  # 2,000 grouped leaves).
  flat = jax.lax.concatenate([jax.lax.reshape(x, (np.size(x),)) for x in xs], 0)
  return jax.lax.reshape(flat, (len(xs), *jnp.shape(xs[0])))


def rows_of(stacked: jax.Array, digits: Sequence[jax.Array]) -> list[Any]:
  """Each row of ``stacked``, taken at a run-time index: row ``r = a B + b``
  at ``digits[a] * B + digits[b]`` (``B = len(digits)``), the same kernel
  for every row."""
  base = len(digits)
  rows = stacked.shape[0]
  high = [  # digits[a] * B, each once
    jax.lax.mul(d, np.uint32(base)) for d in digits[: -(-rows // base)]
  ]
  zeros = (np.uint32(0),) * (stacked.ndim - 1)
  shape = (1, *stacked.shape[1:])
  out = []
  for r in range(rows):
    a, b = divmod(r, base)
    index = jax.lax.add(high[a], digits[b])
    row = jax.lax.dynamic_slice(stacked, (index, *zeros), shape)
    out.append(jax.lax.reshape(row, shape[1:]))
  return out


def per_row(values: Sequence[float], ndim: int) -> Any:
  """A float where all are equal, else float32 ``(k, 1, ...)`` of rank
  ``ndim`` (to scale a stack by row)."""
  if all(v == values[0] for v in values):
    return values[0]
  return np.asarray(values, np.float32).reshape(
    (len(values),) + (1,) * (ndim - 1)
  )


def unpack(state: GroupedState) -> Any:
  """The inner state with every slot's array back in place."""

  def array(x):
    if not is_slot(x):
      return x
    return state.stacks[x.group][x.part][x.row]

  return jax.tree.map(array, state.inner, is_leaf=is_slot)
