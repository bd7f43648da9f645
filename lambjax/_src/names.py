"""Parameter names and name-based masks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from lambjax._src import base


def tree_names(tree: base.PyTree) -> base.PyTree:
  """Returns a pytree of strings naming each leaf of ``tree``.

  A leaf's name is its key path joined with ``"."``: dict keys and attribute
  names as they are, sequence indices in decimal. ``flax.nnx.Variable`` nodes
  count as leaves, so a model gets the same names from ``nnx.Optimizer``'s
  ``init`` (Variables) and ``update`` (arrays).

  Args:
    tree: any pytree (params, grads, a flax ``FrozenDict`` or ``nnx.State``).

  Returns:
    A pytree with the structure of ``tree`` whose leaves are the names.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> lj.tree_names({'encoder': {'layers': [{'weight': jnp.ones(2)}]}})
    {'encoder': {'layers': [{'weight': 'encoder.layers.0.weight'}]}}
  """
  try:
    named, treedef = base.flatten_with_names(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f'tree_names: `tree` is not a pytree jax can flatten ({e}); dict keys '
      'must be mutually sortable (e.g. all str).'
    ) from None
  return jax.tree_util.tree_unflatten(treedef, [n for n, _ in named])


def mask_by_name(
  predicate: Callable[[str], bool] | str,
) -> Callable[[base.PyTree], base.PyTree]:
  """Turns a predicate on parameter names into an optax mask function.

  The result can be passed to every ``mask=`` argument of lambjax and optax
  (``lj.lamb(mask=...)``, ``optax.masked``, ``optax.add_decayed_weights``).

  Args:
    predicate: a function ``name -> bool`` called with each leaf's
      :func:`tree_names` name, or a regular expression string (matched with
      ``re.search``).

  Returns:
    A function ``params -> pytree of bool`` with the structure of ``params``.

  .. warning::
    ``optax.inject_hyperparams`` treats every callable argument as a
    schedule; pass ``static_args=('mask',)`` when you inject a lambjax
    optimizer that takes a callable mask.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
    >>> lj.mask_by_name(lambda n: not n.endswith('bias'))(params)
    {'dense': {'bias': False, 'kernel': True}}
    >>> lj.mask_by_name(r'kernel$')(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  if isinstance(predicate, str):
    try:
      pattern = re.compile(predicate)
    except re.error as e:
      raise ValueError(
        f'mask_by_name: `predicate` {predicate!r} is not a valid regular '
        f'expression: {e}.'
      ) from None
    fn: Callable[[str], Any] = lambda name: pattern.search(name) is not None
  elif callable(predicate):
    fn = predicate
  else:
    raise ValueError(
      'mask_by_name: `predicate` must be a callable name -> bool or a regular '
      f'expression string, got {predicate!r}.'
    )

  def mask_fn(params: base.PyTree) -> base.PyTree:
    named, treedef = base.flatten_with_names(params)
    return jax.tree_util.tree_unflatten(
      treedef, [bool(fn(name)) for name, _ in named]
    )

  return mask_fn
