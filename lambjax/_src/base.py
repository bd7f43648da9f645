"""Shared types, argument validation and tree checks for lambjax."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Params = Any
Updates = Any
MaskOrFn = Any  # A pytree prefix of bools, or a callable params -> such tree.
ScalarOrSchedule = float | jax.Array | Callable[[jax.typing.ArrayLike], Any]

NO_PARAMS_MSG = (
  'You are using a transformation that requires the current value of '
  'parameters, but you are not passing `params` when calling `update`.'
)


def is_static_number(x: Any) -> bool:
  """True for Python / numpy scalars: values we may branch on in Python."""
  if isinstance(x, bool):
    return False
  if isinstance(x, numbers.Number):
    return True
  return isinstance(x, np.ndarray) and x.ndim == 0


def check_number(
  where: str,
  arg: str,
  value: Any,
  *,
  lo: float | None = None,
  hi: float | None = None,
  lo_open: bool = False,
  hi_open: bool = False,
  allow_schedule: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``arg`` when a static hyperparameter is bad.

  Traced or array values (for example under ``optax.inject_hyperparams``) and
  schedules are not checked: they cannot be inspected at construction time.
  """
  if callable(value):
    if allow_schedule:
      return
    raise ValueError(f'{where}: `{arg}` must be a number, got {value!r}.')
  if isinstance(value, bool):
    raise ValueError(f'{where}: `{arg}` must be a number, got {value!r}.')
  if not is_static_number(value):
    if isinstance(value, jax.Array | np.ndarray) and np.ndim(value) == 0:
      return  # An array hyperparameter: checked by the user, not here.
    raise ValueError(f'{where}: `{arg}` must be a number, got {value!r}.')
  v = float(value)
  bad = v != v  # NaN
  if lo is not None:
    bad = bad or (v <= lo if lo_open else v < lo)
  if hi is not None:
    bad = bad or (v >= hi if hi_open else v > hi)
  if bad:
    lo_s = '' if lo is None else ('(' if lo_open else '[') + f'{lo:g}'
    hi_s = '' if hi is None else f'{hi:g}' + (')' if hi_open else ']')
    if lo is not None and hi is not None:
      want = f'in {lo_s}, {hi_s}'
    elif lo is not None:
      want = f'{">" if lo_open else ">="} {lo:g}'
    else:
      want = f'{"<" if hi_open else "<="} {hi:g}'
    raise ValueError(f'{where}: `{arg}` must be {want}, got {value!r}.')


def keystr(path: tuple[Any, ...]) -> str:
  """Joins a jax key path with '.' (the lambjax name of a leaf)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:  # Unknown key types: use their own string form.
      parts.append(str(k).strip('.[]\'"'))
  return '.'.join(parts)


def is_nnx_variable(x: Any) -> bool:
  """True for ``flax.nnx.Variable`` nodes (``nnx.Optimizer`` passes them)."""
  import sys

  nnx = sys.modules.get('flax.nnx')
  return nnx is not None and isinstance(x, nnx.Variable)


def _is_none(x: Any) -> bool:
  return x is None


def flatten_with_names(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
  """Flattens ``tree`` into ``(name, leaf)`` pairs and its treedef.

  ``nnx.Variable`` nodes count as leaves so that a model's names are the same
  whether ``nnx.Optimizer`` passes Variables (at init) or arrays (at update).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=is_nnx_variable
  )
  return [(keystr(p), x) for p, x in leaves], treedef


def leaf_value(x: Any) -> Any:
  """The array inside an ``nnx.Variable``, or ``x`` itself."""
  if is_nnx_variable(x):
    return x.get_value() if hasattr(x, 'get_value') else x.value
  return x


def check_leaves(where: str, params: PyTree) -> None:
  """Rejects integer, boolean and complex leaves with a clear ``ValueError``.

  lambjax optimizers are defined for real floating point parameters. An
  integer leaf (a step counter, an index table) has no gradient; keep it out
  of the optimized tree (``nnx.Optimizer(..., wrt=nnx.Param)``,
  ``optax.masked`` or ``optax.set_to_zero`` through ``optax.partition``).
  """
  named, _ = flatten_with_names(params)
  for name, leaf in named:
    x = leaf_value(leaf)
    if isinstance(x, optax.MaskedNode) or x is None:
      continue
    dtype = getattr(x, 'dtype', None)
    if dtype is None:
      dtype = np.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f'{where}: leaf {name or "<root>"!r} has dtype {dtype}; lambjax '
        'optimizers only accept floating point leaves. Leave non-float '
        'leaves out of the optimized tree (e.g. nnx.Optimizer(wrt=nnx.Param)'
        ' or optax.partition with optax.set_to_zero()).'
      )


def check_same_tree(
  where: str, reference: PyTree, tree: PyTree, ref_what: str, what: str
) -> None:
  """Raises ``ValueError`` naming the first path where the trees differ.

  Compares structure and leaf shapes (a shape mismatch would otherwise
  broadcast silently or fail deep inside XLA).
  """
  ref, ref_def = flatten_with_names(reference)
  got, got_def = flatten_with_names(tree)
  if ref_def == got_def:
    for (name, r), (_, g) in zip(ref, got, strict=True):
      rs, gs = np.shape(leaf_value(r)), np.shape(leaf_value(g))
      if rs != gs:
        raise ValueError(
          f'{where}: {what} leaf {name!r} has shape {gs}, but the '
          f'{ref_what} leaf has shape {rs}.'
        )
    return
  ref_names = [n for n, _ in ref]
  got_names = [n for n, _ in got]
  for i in range(max(len(ref_names), len(got_names))):
    r = ref_names[i] if i < len(ref_names) else None
    g = got_names[i] if i < len(got_names) else None
    if r != g:
      if r is None or (g is not None and g not in ref_names):
        msg = f'{what} has leaf {g!r} that the {ref_what} does not have'
      else:
        msg = f'{what} is missing leaf {r!r} of the {ref_what}'
      raise ValueError(
        f'{where}: the {what} tree differs from the {ref_what} tree: {msg}.'
      )
  raise ValueError(
    f'{where}: the {what} tree differs from the {ref_what} tree in its node '
    f'types (same leaf names): {got_def} vs {ref_def}.'
  )


def leaf_flags(mask: Any, params: Any, default: bool = True) -> list[bool]:
  """Per-leaf booleans (flatten order) of an optax mask (prefix or callable)."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    return [default] * len(leaves)
  tree = mask(params) if callable(mask) else mask
  out: list[bool] = []

  def expand(m, sub):
    if isinstance(m, jax.core.Tracer):
      raise ValueError('masks must be static (Python bools), got a tracer.')
    out.extend([bool(m)] * len(jax.tree.leaves(sub)))
    return None

  jax.tree.map(expand, tree, params)
  if len(out) != len(leaves):
    raise ValueError('mask does not match the params tree.')
  return out


def params_shaped(
  node: Any, params_def: Any, shapes: list[tuple], stand_in: Callable
) -> list | None:
  """``node``'s parts at the params' leaf positions when ``node`` is laid out
  like the params, else None.

  Laid out like the params: ``node`` has the params' structure down to their
  leaves, and each part there is an array (or ``ShapeDtypeStruct``) of that
  leaf's shape, or a node for which ``stand_in`` is True (a leaf masked out
  by ``optax.masked`` / ``optax.partition``, or the slot of a packed or
  grouped leaf). Used to find the moments and other params-shaped parts of
  an optimizer's state."""
  try:
    parts = params_def.flatten_up_to(node)
  except (ValueError, TypeError):
    return None
  ok = all(
    stand_in(x) or (hasattr(x, 'shape') and tuple(x.shape) == tuple(s))
    for x, s in zip(parts, shapes, strict=True)
  )
  return parts if ok else None


def check_tx(where: str, tx: Any) -> None:
  """Raises ``ValueError`` unless ``tx`` is a gradient transformation."""
  if not (
    callable(getattr(tx, 'init', None))
    and callable(getattr(tx, 'update', None))
  ):
    raise ValueError(
      f'{where}: `tx` must be an optax GradientTransformation, got {tx!r}.'
    )


def check_mask(where: str, arg: str, mask: Any) -> None:
  """A mask is None, a bool, a callable, or a pytree whose leaves are bools.

  Checked at construction so that a typo (``mask=3``, ``mask='kernel'``)
  fails clearly instead of deep inside ``optax.masked``. Traced leaves (under
  ``inject_hyperparams``) are left alone.
  """
  if mask is None or isinstance(mask, bool) or callable(mask):
    return
  if isinstance(mask, str):
    raise ValueError(
      f'{where}: `{arg}` must be a pytree of bools or a callable; for names '
      f'use lj.mask_by_name({mask!r}).'
    )
  leaves = jax.tree.leaves(mask)
  if isinstance(mask, (int, float)) or not all(
    isinstance(x, (bool, np.bool_)) or isinstance(x, jax.core.Tracer)
    for x in leaves
  ):
    raise ValueError(
      f'{where}: `{arg}` must be None, a bool, a callable on params, or a '
      f'pytree of bools, got {mask!r}.'
    )
