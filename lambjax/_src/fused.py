"""Fused per-leaf updates: the fast path under the aliases.

The building-block chain is the specification; these functions compute the
same numbers leaf by leaf in one function (moments, direction, decay, norms,
trust ratio, learning rate), with the *same state* as the chain (so a
checkpoint of one loads into the other). The aliases choose them
automatically where they apply (``fused=True``, the default) and fall back to
the chain otherwise (8-bit state). Hyperparameters may be numbers or scalar
arrays: ``optax.inject_hyperparams`` passes every number as one (traced under
``jax.jit``), and the pieces compute with it as the chain does. A
weight-decay schedule is evaluated at the decay link's own count, in the
link's own state, as ``optax.add_decayed_weights`` does.

Why it is faster on XLA:CPU (see benchmarks/RESULTS.md): the chain
materialises each stage's update tree, and ``optax.safe_norm`` reads every
tensor twice; here norms are one sum of squares with a scalar-level guard, and
LARS's norm of ``d = g + wd p`` reads ``g`` and ``p`` without writing ``d``
(``norm_operand``, on a view whose last dimension is long: PyTorch-layout
conv kernels ``(O, I, 1, 1)`` are summed as ``(O, I)``), so no update-sized
temporary is written. LAMB's direction is one; on XLA:CPU its large leaves
are done one at a time, so that temporary is one leaf's (see ``after``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lambjax._src import base, grouping, stacking, transform


def _norm_from_sumsq(s: jax.Array) -> jax.Array:
  """sqrt(s) with a zero (not NaN) gradient at s == 0."""
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def _any_zero_norm(a: jax.Array, b: jax.Array) -> jax.Array:
  """Whether ``_norm_from_sumsq`` of ``a`` or of ``b`` is zero, read from the
  sums.

  The same flag bit for bit (the norm is zero exactly where ``s > 0``
  fails: the square root of a positive float is positive). Taken from the sums,
  the norms' square roots have one consumer, the ratio's division, and XLA
  fuses the whole ratio into one scalar kernel per leaf instead of three:
  fewer kernels to compile (BERT-base LAMB: 1,274 -> 1,108).
  """
  return jnp.logical_not(jnp.logical_and(a > 0, b > 0))


def _sumsq(x: jax.Array) -> jax.Array:
  """``sum(x * x)`` of a whole leaf, on its :func:`reduction_view`.

  For a bf16 leaf that the update reads too, the view keeps XLA:CPU's
  float32 convert inside the reduction (benchmarks/RESULTS.md, "Sums of
  squares on a view"); for a float32 leaf it is as fast as the leaf's own
  shape, and the same view as LARS's spelled norm takes.
  """
  (x,) = reduction_view(x)
  return jnp.sum(x * x)


class Work(NamedTuple):
  """The fast path's work items, in order: single leaves, or (with
  ``group_small_leaves``) a group of small leaves as one stacked leaf.

  Attributes:
    names: the leaves' names (flatten order), for errors and lr ratios.
    members: per item, its leaves' indices (one, or the group's by row).
    group: per item, the group's index (``None``: a single leaf).
    digits: the digits of the run-time row indices, from the state.
    stacks: per group, the stacked state arrays from the state.
  """

  names: list[str]
  members: list[list[int]]
  group: list[int | None]
  digits: tuple[jax.Array, ...] = ()
  stacks: tuple[tuple[jax.Array, ...], ...] = ()

  @staticmethod
  def of(names: list[str], state: Any = None, parts: Sequence[Any] = ()):
    """Every leaf on its own, or (``state`` a :class:`grouping.GroupedState`
    whose slots are in the per-leaf ``parts``) each group as one item where
    its first member comes."""
    n = len(names)
    if state is None:
      return Work(names, [[i] for i in range(n)], [None] * n)
    groups = grouping.members('group_small_leaves', state, parts)
    first = {idx[0]: j for j, idx in enumerate(groups)}
    grouped = {i for idx in groups for i in idx}
    members, group = [], []
    for i in range(n):
      if i in first:
        members.append(groups[first[i]])
        group.append(first[i])
      elif i not in grouped:
        members.append([i])
        group.append(None)
    return Work(names, members, group, state.digits, state.stacks)

  def where(self, v: int) -> list[str]:
    return [self.names[i] for i in self.members[v]]

  def stack(self, v: int, xs: Sequence[Any]) -> Any:
    """Item ``v``'s array of the per-leaf ``xs``: the leaf's, or the group's
    stacked (a ``ValueError`` where the members' shapes or dtypes differ)."""
    idx = self.members[v]
    if self.group[v] is None:
      return xs[idx[0]]
    if any(xs[i] is None for i in idx):
      return None
    sig = [(jnp.shape(xs[i]), jnp.result_type(xs[i])) for i in idx]
    grouping.same('group_small_leaves', 'shape and dtype', self.where(v), sig)
    return grouping.stack([xs[i] for i in idx])

  def state(self, v: int, part: int, xs: Sequence[Any], like: Any) -> Any:
    """Item ``v``'s state array ``part``: the leaf's, or the group's stack
    (checked against ``like``, the item's gradient)."""
    j = self.group[v]
    if j is None:
      return xs[self.members[v][0]]
    s = self.stacks[j][part]
    if s.shape != like.shape:
      raise ValueError(
        f'group_small_leaves: group {j} of the state is {list(s.shape)}, the '
        f'gradients {list(like.shape)}; was it built for another tree?'
      )
    return s

  def flag(self, v: int, flags: Sequence[bool] | None, what: str) -> bool:
    """Item ``v``'s per-leaf flag (the members', which must agree)."""
    if flags is None:
      return False
    return bool(
      grouping.same(
        'group_small_leaves',
        what,
        self.where(v),
        [bool(flags[i]) for i in self.members[v]],
      )
    )

  def axis(self, v: int, stacked, shape) -> int | None:
    """The item's per-slice axis: a group's rows, or a stacked leaf's."""
    if self.group[v] is not None:
      return 0
    return stacking.leaf_axis(stacked, self.names[self.members[v][0]], shape)

  def lr_ratio(self, v: int, lr_ratio_fn, stacked, shape) -> Any:
    """The item's lr multiplier: ``None``, a float, or an array by slice."""
    if lr_ratio_fn is None:
      return None
    names = self.where(v)
    if self.group[v] is None:
      return stacking.lr_ratios(
        stacked, lr_ratio_fn, transform.lr_ratio_value, names[0], shape
      )
    values = [transform.lr_ratio_value(lr_ratio_fn, nm) for nm in names]
    return grouping.per_row(values, len(shape))

  def scatter(self, per_item: Sequence[Any], per_leaf: list[Any]) -> None:
    """Each leaf's result into ``per_leaf``: a single leaf's item, or its
    row of the group's (taken at the run-time row index)."""
    for v, idx in enumerate(self.members):
      j = self.group[v]
      if j is None:
        per_leaf[idx[0]] = per_item[v]
      elif per_item[v] is not None:
        rows = grouping.rows_of(per_item[v], self.digits)
        for i, row in zip(idx, rows, strict=True):
          per_leaf[i] = row

  def scatter_singles(self, per_item: Sequence[Any], per_leaf: list[Any]):
    """Single leaves' results into ``per_leaf`` (groups' stay in stacks)."""
    for v, idx in enumerate(self.members):
      if self.group[v] is None:
        per_leaf[idx[0]] = per_item[v]

  def ratios_per_leaf(self, per_item: Sequence[Any]) -> list[Any]:
    """Trust ratios per leaf (for diagnostics): static rows of a group's.
    Traced only where recorded: on 2,000 grouped leaves the row slices were
    a sixth of the trace, for values nothing read."""
    per_leaf = [None] * len(self.names)
    for v, idx in enumerate(self.members):
      for r, i in enumerate(idx):
        x = per_item[v]
        per_leaf[i] = x if self.group[v] is None or x is None else x[r]
    return per_leaf

  def new_stacks(self, *per_item: Sequence[Any]) -> tuple[Any, ...]:
    """The groups' new stacked state arrays (one per part)."""
    out = list(self.stacks)
    for v, j in enumerate(self.group):
      if j is not None:
        out[j] = tuple(part[v] for part in per_item)
    return tuple(out)


def _times_rho(x, ratio, rho):
  """``x`` times its trust ratio (``None``: not adapted) and lr multiplier
  ``rho`` (:meth:`Work.lr_ratio`; ``None`` or 1.0: none), as the chain's
  ``scale_by_trust_ratio`` and ``scale_by_lr_ratio`` multiply them."""
  if ratio is not None:
    x = x * ratio
  if rho is None or (isinstance(rho, float) and rho == 1.0):
    return x
  return x * jnp.asarray(rho, x.dtype)


def group_keys(
  params: Any,
  dtypes: Sequence[Sequence[Any]],
  flags: Sequence[Sequence[bool]],
  stacked: stacking.Stacked | None,
) -> list[Any]:
  """Per leaf, what must match for leaves to share a group (``None``: not
  grouped): small unstacked leaves by shape, dtypes (the param's and its
  state arrays', ``dtypes``) and flags."""
  keys = []
  for i, (name, p) in enumerate(base.flatten_with_names(params)[0]):
    p = base.leaf_value(p)
    shape = tuple(np.shape(p))
    if (
      not 0 < np.prod(shape, dtype=np.int64) <= _SMALL
      or stacking.leaf_axis(stacked, name, shape) is not None
    ):
      keys.append(None)
      continue
    keys.append(
      (
        shape,
        jnp.result_type(p).name,
        *(jnp.dtype(d[i]).name for d in dtypes),
        *(bool(f[i]) for f in flags),
      )
    )
  return keys


def grouped_init(params, inner, state_parts, set_parts, flags, stacked):
  """A :class:`grouping.GroupedState` of the chain state ``inner``:
  ``state_parts`` are its per-leaf trees (``set_parts`` puts new ones)."""
  flat = [jax.tree_util.tree_flatten(t) for t in state_parts]
  dtypes = [[jnp.result_type(x) for x in leaves] for leaves, _ in flat]
  groups = grouping.plan(group_keys(params, dtypes, flags, stacked))
  parts, stacks, rows = grouping.group([leaves for leaves, _ in flat], groups)
  trees = [
    jax.tree_util.tree_unflatten(treedef, part)
    for part, (_, treedef) in zip(parts, flat, strict=True)
  ]
  return grouping.GroupedState(set_parts(inner, trees), stacks, rows)


def _static(*values: Any) -> bool:
  """Whether every value is a Python/numpy number or ``None``: known when the
  step is traced, so the per-leaf pieces may close over it."""
  return all(v is None or base.is_static_number(v) for v in values)


def _maybe_nonzero(x: Any) -> bool:
  """False only for a static zero; an array (say one injected by
  ``optax.inject_hyperparams``) may hold anything, as the chain assumes."""
  return not base.is_static_number(x) or x != 0


def _jit_pieces(*hyperparams: Any) -> Callable[[Callable[..., Any]], Any]:
  """``jax.jit`` for the per-leaf pieces, unless a hyperparameter is a
  concrete array.

  ``optax.inject_hyperparams`` makes every number an array and rebuilds the
  optimizer at each update. Under ``jax.jit`` those arrays are tracers, which
  jitted pieces take as implicit arguments (traced once per leaf shape, as
  with numbers). Called eagerly they are concrete: a jitted piece closing
  over them would be compiled anew at every step, so the pieces run as plain
  functions instead.
  """
  concrete = any(
    isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)
    for v in hyperparams
  )
  return (lambda fn: fn) if concrete else jax.jit


def scheduled_decay(weight_decay: Any, link_state: Any) -> tuple[Any, Any]:
  """This step's weight decay and the decay link's next state.

  For a number (or array) ``weight_decay``: itself, and ``link_state``
  unchanged. For a schedule: its value at the count in
  ``optax.add_decayed_weights``'s state (``WeightDecaySchedule``, inside
  ``optax.MaskedState`` when masked), as an array, and that count advanced
  as the link advances it, so the state is the chain's.
  """
  if not callable(weight_decay):
    return weight_decay, link_state
  if isinstance(link_state, optax.MaskedState):
    wd, inner = scheduled_decay(weight_decay, link_state.inner_state)
    return wd, link_state._replace(inner_state=inner)
  count = link_state.count
  # An array even where the schedule returns a Python number: a zero from a
  # schedule is still multiplied in (``0 * inf`` is NaN), as in the chain.
  wd = jnp.asarray(weight_decay(count))
  return wd, link_state._replace(count=optax.safe_increment(count))


def _clamp(ratio, lo, hi):
  if lo is None and hi is None:
    return ratio
  return jnp.clip(ratio, lo, hi)


# Small leaves (at most ``_SMALL`` elements) are updated in windows of up to
# ``_WINDOW``: each window's directions, then its norms and trust ratios at
# once (same-shape leaves summed together, one vector of ratio arithmetic),
# then its updates. That cuts a BERT-base LAMB step from 2,314 to 1,290
# kernels (ops XLA:CPU compiles, and a GPU's host issues one by one), and
# compile time on many small leaves by half (benchmarks/RESULTS.md, "Windows
# of small leaves"). Larger leaves go one at a time, as they come: batching
# them too made ResNet-50 compile slower (1.27x vs 1.14x) for no faster
# step, and they are few. One window over the whole tree compiled slower
# still (BERT-base lamb 3.0 s vs 2.0 s).
_WINDOW = 16
_SMALL = 4096
# On XLA:CPU a window also costs compile time: each leaf's update reads its
# sums and ratio at an offset into the window's vectors, so its kernel
# differs from every other leaf's, and XLA:CPU compiles each distinct kernel
# anew (~10 ms) where it reuses identical ones (~1 ms). Windows pay where
# they repeat, so there a window holds leaves of one shape and dtype, and a
# shape and dtype with fewer small leaves than a window goes leaf by leaf
# (identical kernels, but ~3x as many of them to run each step). Lower +
# compile of 24 / 48 / 96 leaves of 1,000 floats in windows against leaf by
# leaf: 2.1x / 1.0x / 0.8x. ResNet-50 against windows of mixed shapes: LAMB
# 0.84x, LARS 0.78x, steps tied (benchmarks/RESULTS.md, "The direction
# chain and windows of one shape"); leaf by leaf below 48 leaves compiled
# no faster and ran ResNet-50 LARS's step 4-6% slower.
_WINDOWED_MIN = _WINDOW


def window_keys(xs: Sequence[Any]) -> list[Any] | None:
  """Per leaf, what its window must share (shape and dtype); ``None``: any
  small leaves share windows (not XLA:CPU, whose compile costs are the ones
  measured; kernels issued one by one from a GPU's host cost there)."""
  if jax.default_backend() != 'cpu':
    return None
  return [(jnp.shape(x), jnp.result_type(x)) for x in xs]


def in_windows(
  sizes: Sequence[int],
  first: Callable[[int], Any],
  ratios: Callable[[list[Any]], list[Any]],
  last: Callable[[int, Any], None],
  keys: Sequence[Any] | None = None,
) -> None:
  """Leaf-by-leaf work, small leaves in windows.

  ``first(i)`` does leaf ``i``'s work before its trust ratio and returns what
  ``ratios`` needs (``None``: not adapted); ``ratios`` gets those of a
  window's adapted leaves and returns their ratios; ``last(i, ratio)``
  finishes leaf ``i`` (``ratio`` is ``None`` where not adapted). A leaf of
  more than ``_SMALL`` elements (``sizes[i]``) is a window of its own, done
  where it comes; the others wait for a full window (or the end), so leaves
  are finished out of order: write results by index. With ``keys``, a
  window holds leaves of one key, and a key of fewer than ``_WINDOWED_MIN``
  small leaves goes leaf by leaf.
  """

  def run(idx):
    entries = {i: e for i in idx if (e := first(i)) is not None}
    got = ratios(list(entries.values())) if entries else []
    by_leaf = dict(zip(entries, got, strict=True))
    for i in idx:
      last(i, by_leaf.get(i))

  small = [size <= _SMALL for size in sizes]
  key_of = list(keys) if keys is not None else [None] * len(sizes)
  counts: dict[Any, int] = {}
  for i in range(len(sizes)):
    if small[i]:
      counts[key_of[i]] = counts.get(key_of[i], 0) + 1
  pending: dict[Any, list[int]] = {}
  for i in range(len(sizes)):
    key = key_of[i]
    if not small[i] or (keys is not None and counts[key] < _WINDOWED_MIN):
      run([i])
      continue
    window = pending.setdefault(key, [])
    window.append(i)
    if len(window) == _WINDOW:
      run(pending.pop(key))
  for window in pending.values():
    run(window)


def is_large(x) -> bool:
  """More than ``_SMALL`` elements: a leaf done on its own."""
  return np.size(x) > _SMALL


def breadth_first() -> bool:
  """Whether XLA schedules this trace breadth first (XLA:CPU does).

  XLA:CPU's default scheduler (``xla_cpu_enable_concurrency_optimized_
  scheduler``) orders ops by depth: every leaf's LAMB direction ``r`` is
  computed before any leaf's update, so all of them are alive at once (418
  MiB of temporary on BERT-base, fresh pages every step). XLA:GPU and TPU
  schedule for memory themselves.
  """
  return jax.default_backend() == 'cpu'


def materialises_shared() -> bool:
  """Whether XLA writes out an elementwise value read by two fusions.

  XLA:CPU does: LARS's ``d = g + wd p``, read by its norm and by the update,
  becomes an update-sized temporary, so there LARS's norm reads ``g`` and
  ``p`` instead (``norm_operand``). XLA:GPU recomputes ``d`` inside each
  fusion (no temporary) and takes the direct norm. Only XLA:CPU takes the
  spelled form (TPUs, not measured, fuse as GPUs do).
  """
  return jax.default_backend() == 'cpu'


def slow_lone_ops(shape: Sequence[int]) -> bool:
  """Whether a lone elementwise op on ``shape`` runs slowly here.

  XLA:CPU compiles an elementwise op that fuses with nothing (a
  ``wrapped_*`` fusion) into a loop that is 8-12x slower on a short last
  dimension than the same op fused with one more op: ``p + t`` on a
  PyTorch-layout conv kernel ``(512, 512, 3, 3)`` takes 4.3 ms, ``p + (t +
  z)`` 0.5 ms, either on ``(512, 4608)`` 0.3 ms (benchmarks/RESULTS.md,
  "A lone add on a conv kernel"). Such shapes are those
  :func:`long_last_shape` changes.
  """
  return jax.default_backend() == 'cpu' and long_last_shape(shape) != tuple(
    shape
  )


def fuse_callers_add(updates: Any, anchor: jax.Array) -> Any:
  """``updates`` with an exact ``-0.0`` added where a lone op is slow.

  Where ``updates`` leaves a computation already written out (a state output
  such as LARS's new trace, or the result of a ``lax.cond``), the caller's
  ``optax.apply_updates`` compiles to a lone add, which XLA:CPU runs several
  times slower on a short last dimension (:func:`slow_lone_ops`). One more exact
  op fuses it: ``p + (u + z)`` is one loop. ``z`` is a run-time ``-0.0``
  made after ``anchor`` (any array; XLA cannot fold it away), so each leaf
  is unchanged bit for bit. Leaves elsewhere, and all leaves off XLA:CPU,
  are returned as they are.
  """
  if not any(slow_lone_ops(np.shape(x)) for x in jax.tree.leaves(updates)):
    return updates
  neg_zero = after(jnp.asarray(-0.0, jnp.float32), anchor)
  return jax.tree.map(
    lambda x: x + neg_zero.astype(x.dtype) if slow_lone_ops(np.shape(x)) else x,
    updates,
  )


@jax.jit
def after(x: jax.Array, previous: jax.Array) -> jax.Array:
  """``x`` unchanged, as a value XLA computes after ``previous``.

  Unchanged bit for bit, -0.0 included; a NaN stays a NaN, though the
  backend's add may give it its canonical payload (XLA:GPU's does).

  Under a breadth-first schedule, making leaf ``i + 1``'s direction depend on
  leaf ``i``'s trust ratio puts leaf ``i``'s update (which frees its
  direction) first, so one buffer serves leaf after leaf (benchmarks/
  RESULTS.md, "One direction at a time"). An optimization barrier would not
  do: XLA:CPU drops it. The added term is exactly zero, also for a NaN or
  infinite ``previous``: nothing leaks from one leaf into another.
  """
  prev = jnp.sum(previous)
  # -0.0: the exact additive identity (x + -0.0 is x for every x, -0.0 too).
  zero = -jnp.abs(jnp.where(jnp.isfinite(prev), prev, 0.0)) * 0.0
  return x + zero.astype(x.dtype)


def sumsqs(xs: Sequence[jax.Array], axes: Sequence[int | None]) -> list[Any]:
  """``stacking.sumsq(x, axis)`` of each leaf, small ones in groups.

  Unstacked leaves of at most ``_SMALL`` elements that share a shape and
  dtype are stacked and summed by rows, one kernel for the group (LayerNorm
  scales and biases are most of a transformer's leaves). ``None`` entries
  stay ``None``.
  """
  out: list[Any] = [None] * len(xs)
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, (x, axis) in enumerate(zip(xs, axes, strict=True)):
    if x is None:
      continue
    if axis is None and 0 < x.size <= _SMALL:
      groups.setdefault((x.shape, x.dtype), []).append(i)
    elif axis is None:
      out[i] = _sumsq(x)
    else:
      out[i] = stacking.sumsq(x, axis)
  for idx in groups.values():
    if len(idx) == 1:
      out[idx[0]] = _sumsq(xs[idx[0]])
      continue
    rows = jnp.stack([jnp.ravel(xs[i]) for i in idx])
    total = jnp.sum(rows * rows, axis=1)
    for k, i in enumerate(idx):
      out[i] = jax.lax.index_in_dim(total, k, keepdims=False)
  return out


def batched(fn: Callable[..., Any], *args: Sequence[jax.Array]) -> list[Any]:
  """``[fn(a[i], b[i], ...) for i]``, computed once on concatenated vectors.

  ``fn`` must be elementwise. Per-leaf trust-ratio arithmetic on scalars
  (square roots, guards, the division, clamps) is a handful of tiny kernels
  per leaf; XLA fuses each into its own kernel, which on a BERT-sized tree is
  ~1,000 kernels to compile and launch. Done on one vector per dtype group it
  is one kernel, with the same elementwise arithmetic (bitwise the same
  values). Leaves are grouped by the dtypes of their arguments, so nothing is
  promoted; a lone leaf is computed directly.
  """
  n = len(args[0])
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i in range(n):
    key = tuple(jnp.result_type(a[i]) for a in args)
    groups.setdefault(key, []).append(i)
  out: list[Any] = [None] * n
  for idx in groups.values():
    if len(idx) == 1:
      out[idx[0]] = fn(*(a[idx[0]] for a in args))
      continue
    shapes = [jnp.shape(args[0][i]) for i in idx]
    offsets = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
    res = fn(*(jnp.concatenate([jnp.ravel(a[i]) for i in idx]) for a in args))
    for j, i in enumerate(idx):
      piece = jax.lax.slice_in_dim(res, int(offsets[j]), int(offsets[j + 1]))
      out[i] = jax.lax.reshape(piece, shapes[j])
  return out


def batched_ratios(ratio_fn, a_sums, b_sums, dtypes) -> list[Any]:
  """``ratio_fn(a, b, one)`` per leaf via :func:`batched`; ``one`` is a ones
  array in the leaf's param dtype, which the ratio takes (and groups by)."""
  ones = [
    jnp.ones(jnp.shape(b), dt) for b, dt in zip(b_sums, dtypes, strict=True)
  ]
  return batched(ratio_fn, a_sums, b_sums, ones)


def _step_and_lr_state(lr_tx, lr_state):
  """The signed learning-rate step (-lr) and the next lr state, computed by
  the chain's own ``scale_by_learning_rate`` (no logic duplicated)."""
  step, new_state = lr_tx.update(jnp.ones((), jnp.float32), lr_state)
  return step, new_state


class WorkspaceState(NamedTuple):
  """State of ``lamb(..., workspace=True)``: the optimizer's own state and a
  persistent buffer for each large trust-ratio leaf.

  Attributes:
    inner_state: the state of the transformation without a workspace (the
      chain's state, unchanged).
    direction: per leaf, the last update direction ``r`` before the trust
      ratio (zeros before the first step) where that direction takes more
      than 16 MiB; a zero-size array for the other leaves, and for leaves
      that are not adapted.
  """

  inner_state: Any
  direction: Any


# ``lamb(workspace=True)`` keeps a buffer for the directions of more than
# this many bytes only. What costs is XLA:CPU's block of temporaries: glibc
# serves an allocation above its mmap threshold (which adapts up to 32 MiB)
# with fresh pages, page-faulted every step, and reuses heap memory below
# it. With the large directions computed one at a time (``after``) that
# block is about the largest direction left out of the workspace, so only
# directions over 16 MiB go in. BERT-base: the word embedding's (89 MiB;
# temp 89.9 -> 9.0 MiB, state +89 MiB instead of +418 MiB for a buffer per
# leaf), and the step ran 1.11-1.13x faster than with a buffer per leaf
# (benchmarks/RESULTS.md, "A workspace for the large directions only");
# ResNet-50: none (9 MiB at most, temp 9 MiB either way).
_WORKSPACE_MIN_BYTES = 16 * 2**20


# LAMB takes the norm of a direction of more than this many bytes from a
# spelling of its own (``spelled_direction`` in ``adam_family``) on XLA:CPU.
# Up to glibc's largest mmap threshold (it adapts up to 32 MiB) XLA:CPU's
# block of temporaries is heap memory used again from step to step, and the
# direction is read back from the 32 MiB L3: there writing it out is cheaper
# than computing it twice (two 27 MiB leaves: 0.51 of the roof written out,
# 0.45 spelled; one of 36 MiB: 0.40 and 0.55; benchmarks/RESULTS.md, "LAMB's
# norm spelled apart").
_SPELLED_MIN_BYTES = 32 * 2**20


def spells_norm(u: jax.Array) -> bool:
  """Whether LAMB's norm of direction ``u`` (one whole leaf) is spelled."""
  itemsize = jnp.dtype(u.dtype).itemsize
  nbytes = u.size * itemsize
  return materialises_shared() and itemsize >= 4 and nbytes > _SPELLED_MIN_BYTES


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
  nesterov: bool = False,
  group_small: bool = False,
) -> optax.GradientTransformation:
  """Adam / AdamW / AdamWDL / LAMB (Nesterov's too) in one function per leaf.

  ``chain`` must be ``scale_by_adam -> [add_decayed_weights] ->
  [scale_by_trust_ratio] -> [scale_by_lr_ratio] -> scale_by_learning_rate``;
  its state is used unchanged (stateless links pass through; a weight-decay
  schedule's count advances as in the chain). With
  ``record_index``, the chain's trust-ratio link records its ratios
  (``TrustRatioState`` at that index of the chain state) and so does this.

  With ``workspace`` (LAMB only) the state is a :class:`WorkspaceState`: the
  direction ``r`` of each adapted leaf larger than ``_WORKSPACE_MIN_BYTES``
  is written into a buffer carried in the state. ``r`` has two consumers
  (its norm and the update), so XLA:CPU materialises it; without a
  workspace a large one is fresh mmapped memory every step, whose page
  faults cost about a fifth of a BERT-base step on the benchmark machine.
  A donated state buffer is reused in place instead. On XLA:CPU a
  direction over ``_SPELLED_MIN_BYTES`` that is not buffered is not
  written at all: its norm computes it anew (``spelled_direction``).
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  if workspace and not trust:
    raise ValueError('workspace needs the trust ratio (LAMB).')
  if workspace and group_small:
    raise ValueError(
      '`workspace=True` and `group_small_leaves=True` cannot be combined.'
    )
  jit = _jit_pieces(b1, b2, eps, eps_root, weight_decay, min_ratio, max_ratio)

  # The per-leaf arithmetic, as jitted functions made once per optimizer:
  # traced once per leaf shape and dtype instead of op by op for every leaf,
  # and inlined by XLA, so the compiled step is the same (BERT-base: trace,
  # lower and compile in 0.78-0.90 of the time, benchmarks/RESULTS.md);
  # eager calls reuse their compilations from step to step.
  def from_moments(m, v, g, p, bcs, e, wd):
    """The direction from the new moments (decayed where ``p`` is given).

    ``bcs``: the bias corrections ``(1 - b1^t, 1 - b2^t[, 1 - b1^(t+1)])``;
    ``e``, ``wd``: eps and the weight decay where they are this step's arrays
    (``None``: the optimizer's own)."""
    if nesterov:  # optax.scale_by_adam(nesterov=True): NAdam's m_hat.
      m_hat = b1 * (m / bcs[2].astype(m.dtype)) + (1 - b1) * (
        g / bcs[0].astype(g.dtype)
      )
    else:
      m_hat = m / bcs[0].astype(m.dtype)
    v_hat = v / bcs[1].astype(v.dtype)
    u = m_hat / (jnp.sqrt(v_hat + eps_root) + (eps if e is None else e))
    if p is not None:
      u = u + (weight_decay if wd is None else wd) * p
    return u

  @jit
  def direction(g, mu, nu, p, bcs, e, wd):
    """Moments, and the direction (see ``from_moments``)."""
    m = (1 - b1) * g + b1 * mu
    v = (1 - b2) * (g * g) + b2 * nu
    return m, v, from_moments(m, v, g, p, bcs, e, wd)

  @jit
  def spelled_direction(m, v, p, pd, bcs, e, wd):
    """LAMB's direction spelled for its norm alone; the same value.

    The update reads the direction ``r`` too. Read by two fusions, XLA:CPU
    writes ``r`` out; for a large leaf that is a temporary above glibc's
    mmap threshold, fresh pages every step (BERT-base's word embedding: 89
    MiB). Spelled apart, the norm's reduction computes ``r`` from ``m``,
    ``v`` and ``p`` itself and nothing is written: the direction's
    arithmetic twice for one array write and two reads (that leaf's step
    1.45x faster, benchmarks/RESULTS.md, "LAMB's norm spelled apart"). The
    bias corrections, ``eps`` and the decay are made scalars of their own
    after ``‖p‖²`` (the same values), so no subexpression is shared with
    the update's ``r``, as in :func:`norm_operand`: a shared ``sqrt(v_hat)``
    or a broadcast bias correction would be written out in full. ``pd``:
    ``p`` where ``r`` holds ``wd p``, else ``None``. The result has
    :func:`reduction_shape`.
    """
    anchor = _sumsq(p)
    bcs = tuple(after(b, anchor) for b in bcs)
    vdt = v.dtype if _static(eps) else None  # As the update's eps.
    e = after(jnp.asarray(eps if e is None else e, vdt), anchor)
    if pd is None:
      m, v = reduction_view(m, v)
    else:
      d = weight_decay if wd is None else wd
      wd = after(jnp.asarray(d, jnp.result_type(d, p)), anchor)
      m, v, pd = reduction_view(m, v, pd)
    return from_moments(m, v, None, pd, bcs, e, wd)

  @jit
  def trust_ratio(pp, uu, one):
    pn, un = _norm_from_sumsq(pp), _norm_from_sumsq(uu)
    zero = _any_zero_norm(pp, uu)
    ratio = transform.guarded_ratio(pn, un, zero, one.dtype)
    return _clamp(ratio, min_ratio, max_ratio)

  @jit
  def bias_corrections(count):
    # Jitted so that eager steps compile it once: with a concrete ``count``,
    # ``b1**count`` is a static ``integer_pow``, a new program every step.
    if nesterov:
      return 1 - b1**count, 1 - b2**count, 1 - b1 ** optax.safe_increment(count)
    return 1 - b1**count, 1 - b2**count

  def flags(params):
    """Per-leaf decayed and adapted flags (``None``: none is)."""
    decay = (
      base.leaf_flags(decay_mask, params)
      if _maybe_nonzero(weight_decay)
      else None
    )
    adapt = base.leaf_flags(trust_mask, params) if trust else None
    return decay, adapt

  def init_fn(params):
    inner = chain.init(params)
    if group_small:
      n = len(jax.tree.leaves(params, is_leaf=base.is_nnx_variable))
      return grouped_init(
        params,
        inner,
        [inner[0].mu, inner[0].nu],
        lambda st, t: (st[0]._replace(mu=t[0], nu=t[1]), *st[1:]),
        [f or [False] * n for f in flags(params)],
        stacked,
      )
    if not workspace:
      return inner
    adapt = base.leaf_flags(trust_mask, params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    bufs = []
    for p, a in zip(leaves, adapt, strict=True):
      dt = _direction_dtype(p, mu_dtype, nu_dtype)
      big = a and np.size(p) * dt.itemsize > _WORKSPACE_MIN_BYTES
      bufs.append(jnp.zeros(p.shape if big else (0,), dt))
    return WorkspaceState(inner, jax.tree_util.tree_unflatten(treedef, bufs))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # Accepted and ignored, as optax.chain does.
    if workspace:
      work = state.direction
      state = state.inner_state
    grouped = state if group_small else None
    if group_small:
      grouping.check_state('group_small_leaves', state)
      state = state.inner
    adam = state[0]
    step, lr_state = _step_and_lr_state(lr_tx, state[-1])
    count = optax.safe_increment(adam.count)
    bcs = bias_corrections(count)
    links = list(state[1:-1])  # The decay link first, where there is one.
    wd = None
    if callable(weight_decay):
      wd, links[0] = scheduled_decay(weight_decay, links[0])
    named, treedef = base.flatten_with_names(updates)
    g_leaves = [x for _, x in named]
    mu_leaves = treedef.flatten_up_to(adam.mu)
    nu_leaves = treedef.flatten_up_to(adam.nu)
    p_leaves = (
      treedef.flatten_up_to(params)
      if params is not None
      else [None] * len(g_leaves)
    )
    decay, adapt = flags(params)
    w_leaves = treedef.flatten_up_to(work) if workspace else None
    items = Work.of(
      [name for name, _ in named], grouped, [mu_leaves, nu_leaves]
    )
    n = len(items.members)
    dirs, out_m, out_v, out_w, out_u, ratios = ([None] * n for _ in range(6))
    # One large direction at a time (see ``after``), also with a workspace:
    # the directions it leaves out are temporaries.
    one_at_a_time = trust and breadth_first()
    previous: list[Any] = []  # The last large leaf's trust ratio.
    gs = [items.stack(v, g_leaves) for v in range(n)]

    def first(v):
      g = gs[v]
      mu = items.state(v, 0, mu_leaves, g)
      nu = items.state(v, 1, nu_leaves, g)
      decayed = items.flag(v, decay, 'weight decay')
      adapted = items.flag(v, adapt, 'trust ratio')
      p = items.stack(v, p_leaves) if decayed or adapted else None
      gate = previous and is_large(g)
      if gate and (mu.dtype != g.dtype or nu.dtype != g.dtype):
        # Moments stored in another dtype: the float32 m and v are temporaries
        # as well, so they wait too (BERT-base, bf16 moments: temp 505 -> 306
        # MiB, step 1.18x faster).
        g = after(g, previous[-1])
      e = None
      if gate:
        # Through eps, not the bias corrections: XLA then rewrites the
        # divisions as before and the numbers stay bit for bit the same.
        # An array eps keeps its own dtype, as in the chain's arithmetic.
        vdt = jnp.result_type(g, nu) if _static(eps) else None
        e = after(jnp.asarray(eps, vdt), previous[-1])
      m, v_, u = direction(g, mu, nu, p if decayed else None, bcs, e, wd)
      buffered = False  # Whether ``u`` goes into a workspace buffer.
      if workspace:
        # r leaves in the state, so XLA writes it into the donated buffer
        # instead of a fresh temporary (zero-size buffers: not adapted). The
        # whole-buffer update-slice reads as a use of the old buffer, so jit
        # keeps (and aliases) the donated input; XLA folds it to ``u``.
        w = w_leaves[v]
        same = w.shape == u.shape and w.dtype == u.dtype
        out_w[v] = (
          jax.lax.dynamic_update_slice(w, u, (0,) * u.ndim) if same else w
        )
        buffered = same
      dirs[v] = u
      out_m[v] = m if mu_dtype is None else m.astype(mu_dtype)
      out_v[v] = v_.astype(nu.dtype)
      if not adapted:
        return None
      axis = items.axis(v, stacked, g.shape)
      # Moments stored as computed: the spelled direction then reads the
      # step's outputs. Recast, the float32 m and v would be temporaries read
      # by two fusions, and written out.
      kept = out_m[v].dtype == m.dtype and out_v[v].dtype == v_.dtype
      whole = axis is None and not nesterov  # (No Nesterov LAMB here.)
      if whole and kept and spells_norm(u) and not buffered:
        # Not ``u`` itself (see ``spelled_direction``).
        pd = p if decayed else None
        return p, spelled_direction(m, v_, p, pd, bcs, e, wd), axis
      return p, u, axis

    def window_ratios(entries):
      axes = [axis for *_, axis in entries]
      pps = sumsqs([p for p, _, _ in entries], axes)
      uus = sumsqs([u for _, u, _ in entries], axes)
      dtypes = [p.dtype for p, _, _ in entries]
      return batched_ratios(trust_ratio, pps, uus, dtypes)

    def last(v, ratio):
      rho = items.lr_ratio(v, lr_ratio_fn, stacked, dirs[v].shape)
      u = _times_rho(dirs[v], ratio, rho)
      out_u[v] = jnp.asarray(step, u.dtype) * u
      ratios[v] = ratio
      g = gs[v]
      if one_at_a_time and ratio is not None and is_large(g):
        # The chain runs through the large leaves only: a small leaf's ratio
        # does not wait for the large leaf before it, so a large leaf that
        # waited for it could run beside that one.
        previous[:] = [ratio]
        # Moments stored in another dtype: the direction re-reads the old
        # stored moments, which the new ones overwrite in place (donated);
        # written after the trust ratio, they are written after that read,
        # and XLA needs no copy of the old ones first.
        for out in (out_m, out_v):
          if out[v].dtype != g.dtype:
            out[v] = after(out[v], ratio)

    sizes = [np.size(x) for x in gs]
    in_windows(sizes, first, window_ratios, last, window_keys(gs))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    leaf_u = [None] * len(g_leaves)
    leaf_m, leaf_v = list(mu_leaves), list(nu_leaves)  # Slots stay.
    items.scatter(out_u, leaf_u)
    items.scatter_singles(out_m, leaf_m)
    items.scatter_singles(out_v, leaf_v)
    new_adam = adam._replace(count=count, mu=unflat(leaf_m), nu=unflat(leaf_v))
    new_state = [new_adam, *links, lr_state]
    if record_index is not None:
      new_state[record_index] = transform.recorded(
        unflat,
        items.ratios_per_leaf(ratios),
        transform.init_trust_ratios(params, stacked),
      )
    new_state = tuple(new_state)
    if group_small:
      new_state = grouped._replace(
        inner=new_state, stacks=items.new_stacks(out_m, out_v)
      )
    if workspace:
      new_state = WorkspaceState(new_state, unflat(out_w))
    return unflat(leaf_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Below this size a temporary costs nothing: LARS uses the direct norm.
_EXPAND_MIN_SIZE = 4096
# XLA:CPU's YNN reduction of LARS's spelled ``‖g - (-wd) p‖²`` runs 2-10x
# slower when the leaf's last dimension is shorter than this (PyTorch/Paddle-
# layout conv kernels ``(O, I, 3, 3)``, ``(O, I, 1, 1)``; matrices ``(n, 8)``)
# than on the same elements viewed with a long last dimension:
# benchmarks/RESULTS.md, "LARS's norm on a long last dimension".
_LONG_LAST = 16


def long_last_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """``shape`` with trailing dimensions merged until the last is at least
  ``_LONG_LAST`` (the rest merged into rows): ``(2048, 512, 1, 1)`` ->
  ``(2048, 512)``, ``(64, 3, 7, 7)`` -> ``(192, 49)``, ``(1024, 8)`` ->
  ``(8192,)``; unchanged where the last dimension is long already."""
  shape = tuple(int(d) for d in shape)
  last, k = 1, len(shape)
  while k > 0 and last < _LONG_LAST:
    k -= 1
    last *= shape[k]
  if k == len(shape) - 1:
    return shape
  return (int(np.prod(shape[:k])), last) if k else (last,)


def reduction_shape(shape: Sequence[int], dtype: Any) -> tuple[int, ...]:
  """The view of a ``shape``, ``dtype`` leaf that a whole-leaf reduction
  takes on XLA:CPU (elsewhere ``shape`` itself).

  :func:`long_last_shape` where that changes the shape. A float narrower
  than float32 gets a view other than its own shape in any case: a leading
  unit dimension, ``(768, 3072)`` -> ``(1, 768, 3072)``. XLA:CPU computes
  in float32, and where the leaf is read by an elementwise fusion too, a sum
  on the leaf's own shape compiles to a lone convert of the leaf feeding
  the YNN reduction: a float32 copy written out, a temporary twice the
  leaf's size (bf16 BERT-base LARS: 835 MiB). On a view the reduction's
  fusion converts for itself (benchmarks/RESULTS.md, "Sums of squares on a
  view"). A unit dimension keeps every sharding of the leaf expressible
  on the view; merging dimensions did not (a leaf sharded on its last
  dimension, flattened, was all-gathered for its norm). The long-last view
  still merges: a leaf sharded on a merged short dimension (a ``(1024,
  8)`` leaf on its 8) is gathered for its norm.
  """
  shape = tuple(int(d) for d in shape)
  if jax.default_backend() != 'cpu':
    return shape
  view = long_last_shape(shape)
  narrow = jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
  if view != shape or not narrow:
    return view
  return (1, *shape)


def reduction_view(*xs: jax.Array) -> tuple[jax.Array, ...]:
  """Same-shape ``xs`` reshaped to the first one's :func:`reduction_shape`,
  for a reduction.

  A reshape alone would not do: XLA's simplifier folds a full reduction of
  a reshape back onto the original shape. Through an optimization barrier
  the fusion keeps the view (a bitcast, no copy) and the barrier is gone by
  the time the program runs.
  """
  shape = reduction_shape(xs[0].shape, xs[0].dtype)
  if shape == xs[0].shape:
    return xs
  return jax.lax.optimization_barrier(tuple(x.reshape(shape) for x in xs))


def norm_operand(
  g: jax.Array, p: jax.Array, wd: float, axis: int | None = None
) -> jax.Array:
  """LARS's ``d = g + wd p`` spelled for its norm alone; the same value.

  The update reads ``d`` too. Spelled alike, XLA's CSE merges the two and
  XLA:CPU writes ``d`` out as an update-sized temporary (a value read by two
  fusions); spelled apart, the norm's fusion computes ``d`` from ``g`` and
  ``p`` itself: 3 array reads for both norms, where sums over the inputs
  (``‖g‖² + 2 wd <g,p> + wd² ‖p‖²``) would take 4 and a guard against
  cancellation (BERT-base step 1.1x faster, benchmarks/RESULTS.md). ``-wd``
  is made this leaf's own scalar: a constant's broadcast would be shared by
  same-shape leaves, and XLA:CPU writes a shared broadcast out in full.
  ``g - (-wd) p`` is ``g + wd p`` exactly (``(-wd) p = -(wd p)``; ``after``
  adds an exact ``-0.0``). The result has :func:`reduction_shape`, which is
  all a norm needs.

  A stacked leaf (layer ``axis``) keeps its own shape, as its norms are per
  layer, and its scalar is made after one element of ``p``: made after its
  per-layer sums, as a whole leaf's is after its sum, it had ``p * p``
  written out in full (BERT-base stacked: the step 1.8x faster and 324 MiB
  of ``d`` gone, benchmarks/RESULTS.md, "Stacked layers on CPU").
  """
  # In the dtype of ``wd * p``: ``p``'s for a Python number, wider for an
  # array ``wd`` (as ``optax.inject_hyperparams`` passes it), as in the chain.
  anchor = _sumsq(p) if axis is None else p[(0,) * p.ndim]
  neg_wd = after(jnp.asarray(-wd, jnp.result_type(wd, p)), anchor)
  if axis is None:
    g, p = reduction_view(g, p)
  return g - neg_wd * p


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
  group_small: bool = False,
) -> optax.GradientTransformation:
  """LARS (optax or Paddle form) in one function per leaf.

  ``chain``'s state is ``(..., lr_state, TraceState)``; it is used unchanged.
  In Paddle form ``decay_mask`` selects the adapted-and-decayed leaves and
  ``trust_mask`` is ignored.
  """

  # Jitted once per optimizer, as in ``adam_family``.
  jit = _jit_pieces(
    weight_decay, trust_coefficient, eps, momentum, min_ratio, max_ratio
  )

  @jit
  def trust_ratio(a, pp, one):
    an, pn = _norm_from_sumsq(a), _norm_from_sumsq(pp)
    fallback = _any_zero_norm(pp, a)
    if form == 'paddle':
      fallback = transform.paddle_fallback(fallback, weight_decay)
      den = an + weight_decay * pn + eps
    else:
      den = an + eps
    ratio = transform.guarded_ratio(
      trust_coefficient * pn, den, fallback, one.dtype
    )
    return _clamp(ratio, min_ratio, max_ratio)

  @jit
  def momentum_step(d, t, step):
    """The update and the new trace from the scaled direction ``d``."""
    u = step.astype(d.dtype) * d
    new_t = u + momentum * t
    return (u + momentum * new_t if nesterov else new_t), new_t

  def flags(params):
    decay = base.leaf_flags(decay_mask, params)
    adapt = decay if form == 'paddle' else base.leaf_flags(trust_mask, params)
    return decay, adapt

  def init_fn(params):
    inner = chain.init(params)
    if not group_small:
      return inner
    return grouped_init(
      params,
      inner,
      [inner[-1].trace],
      lambda st, t: (*st[:-1], st[-1]._replace(trace=t[0])),
      flags(params),
      stacked,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # Accepted and ignored, as optax.chain does.
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    grouped = state if group_small else None
    if group_small:
      grouping.check_state('group_small_leaves', state)
      state = state.inner
    trace_state = state[-1]
    step, lr_state = _step_and_lr_state(lr_tx, state[-2])
    # A schedule (optax form only) is in the decay link, the first.
    links = list(state[:-2])
    wd, links[0] = scheduled_decay(weight_decay, links[0])
    named, treedef = base.flatten_with_names(updates)
    p_leaves = treedef.flatten_up_to(params)
    t_leaves = treedef.flatten_up_to(trace_state.trace)
    g_leaves = [g for _, g in named]
    decay, adapt = flags(params)
    items = Work.of([name for name, _ in named], grouped, [t_leaves])
    n = len(items.members)
    ds, out_u, out_t, ratios = ([None] * n for _ in range(4))
    gs = [items.stack(v, g_leaves) for v in range(n)]
    ps = [items.stack(v, p_leaves) for v in range(n)]
    axes = [items.axis(v, stacked, gs[v].shape) for v in range(n)]
    decayed = [items.flag(v, decay, 'weight decay') for v in range(n)]
    adapted = [items.flag(v, adapt, 'trust ratio') for v in range(n)]
    # Large decayed leaves, stacked layers too (optax form, XLA:CPU): the norm
    # of ``d`` spelled apart (``norm_operand``), so that XLA does not write
    # ``d`` out. Not groups of small leaves (not measured there).
    expand = form != 'paddle' and _maybe_nonzero(wd) and materialises_shared()
    spelled = {
      v
      for v in range(n)
      if expand
      and adapted[v]
      and decayed[v]
      and items.group[v] is None
      and np.size(ps[v]) >= _EXPAND_MIN_SIZE
    }

    def first(v):
      # What the norms need: ``(a, p, axis, dtype)``, ``a`` the array whose
      # squares sum to ``‖g‖²`` (Paddle) or ``‖d‖²``.
      g, p = gs[v], ps[v]
      ds[v] = g + wd * p if decayed[v] and _maybe_nonzero(wd) else g
      if not adapted[v]:
        return None
      axis = axes[v]
      if form == 'paddle':
        return g, p, axis, p.dtype
      if v in spelled:
        return norm_operand(g, p, wd, axis), p, axis, p.dtype
      return ds[v], p, axis, p.dtype  # Direct: small, a group, no decay.

    def window_ratios(entries):
      axes = [axis for _, _, axis, _ in entries]
      a_sums = sumsqs([a for a, _, _, _ in entries], axes)
      p_sums = sumsqs([p for _, p, _, _ in entries], axes)
      dtypes = [dt for *_, dt in entries]
      return batched_ratios(trust_ratio, a_sums, p_sums, dtypes)

    def last(v, ratio):
      rho = items.lr_ratio(v, lr_ratio_fn, stacked, ds[v].shape)
      d = _times_rho(ds[v], ratio, rho)
      t = items.state(v, 0, t_leaves, gs[v])
      out_u[v], out_t[v] = momentum_step(d, t, step)
      ratios[v] = ratio

    sizes = [np.size(p) for p in ps]
    in_windows(sizes, first, window_ratios, last, window_keys(gs))
    if not nesterov:
      # The update is the new trace, a state output too, so the caller's
      # ``p + u`` would be a lone add: one more exact op fuses it.
      out_u = fuse_callers_add(out_u, step)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    leaf_u, leaf_t = [None] * len(g_leaves), list(t_leaves)
    items.scatter(out_u, leaf_u)
    items.scatter_singles(out_t, leaf_t)
    new_trace = trace_state._replace(trace=unflat(leaf_t))
    new_state = [*links, lr_state, new_trace]
    if record_index is not None:
      new_state[record_index] = transform.recorded(
        unflat,
        items.ratios_per_leaf(ratios),
        transform.init_trust_ratios(params, stacked),
      )
    new_state = tuple(new_state)
    if group_small:
      new_state = grouped._replace(
        inner=new_state, stacks=items.new_stacks(out_t)
      )
    return unflat(leaf_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _takes(v: Any) -> bool:
  """A number, ``None`` or a scalar numeric array."""
  return _static(v) or (
    isinstance(v, jax.Array | np.ndarray)
    and np.ndim(v) == 0
    and jnp.issubdtype(v.dtype, jnp.number)
  )


def applies(values: Sequence[Any], weight_decay: Any = None) -> bool:
  """Whether the fast path takes these hyperparameters: numbers, ``None``, or
  scalar arrays (``optax.inject_hyperparams`` passes every number as one);
  ``weight_decay`` may also be a schedule (:func:`scheduled_decay`)."""
  return (callable(weight_decay) or _takes(weight_decay)) and all(
    _takes(v) for v in values
  )
