"""Per-layer training diagnostics kept in the optimizer state (opt-in)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lambjax._src import base, packing, transform


class DiagnosticsState(NamedTuple):
  """State of :func:`with_diagnostics`: the inner state plus the last norms.

  Every norm is a float32 scalar; the per-leaf ones are trees with the
  params' structure. All are zero before the first update.
  """

  inner_state: Any
  global_grad_norm: jax.Array
  grad_norm: base.PyTree
  param_norm: base.PyTree
  update_norm: base.PyTree


def _norm(x: jax.Array) -> jax.Array:
  """float32 L2 norm with a zero (not NaN) gradient at 0."""
  x = jnp.asarray(x, jnp.float32)
  s = jnp.sum(x * x)
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def _norms(tree: base.PyTree) -> base.PyTree:
  return jax.tree.map(_norm, tree, is_leaf=base.is_nnx_variable)


def with_diagnostics(
  tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Records gradient, parameter and update norms per leaf in the state.

  The wrapped optimizer's updates are unchanged. After each update the state
  holds, as float32 scalars: the global gradient norm, and for every leaf the
  norm of its gradient, of its parameter (before the update; 0 when
  ``params`` is not passed) and of its update. Read them, with the trust
  ratios of ``lamb``/``lars`` built with ``diagnostics=True``, through
  :func:`lambjax.diagnostics`. This costs one extra read of grads, params and
  updates per step, so it is opt-in: without it nothing is computed or
  stored.

  Args:
    tx: any optax / lambjax gradient transformation.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DiagnosticsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.with_diagnostics(lj.adamw(1e-3))
    >>> p = {'w': jnp.array([3.0, 4.0])}
    >>> _, state = tx.update({'w': jnp.array([0.0, 2.0])}, tx.init(p), p)
    >>> d = lj.diagnostics(state)
    >>> float(d['global_grad_norm']), float(d['param_norm/w'])
    (2.0, 5.0)
  """
  base.check_tx('with_diagnostics', tx)
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    zeros = jax.tree.map(
      lambda _: jnp.zeros((), jnp.float32),
      params,
      is_leaf=base.is_nnx_variable,
    )
    return DiagnosticsState(
      inner_state=tx.init(params),
      global_grad_norm=jnp.zeros((), jnp.float32),
      grad_norm=zeros,
      param_norm=zeros,
      update_norm=zeros,
    )

  def update_fn(updates, state, params=None, **extra_args):
    grad_norm = _norms(updates)
    new_updates, inner = tx.update(
      updates, state.inner_state, params, **extra_args
    )
    leaves = jax.tree.leaves(grad_norm)
    total = sum((n * n for n in leaves), jnp.zeros((), jnp.float32))
    return new_updates, DiagnosticsState(
      inner_state=inner,
      global_grad_norm=_norm(jnp.sqrt(total)),
      grad_norm=grad_norm,
      param_norm=state.param_norm if params is None else _norms(params),
      update_norm=_norms(new_updates),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_KINDS = (DiagnosticsState, transform.TrustRatioState)


def _nodes(state: Any) -> list[Any]:
  out = []
  for x in jax.tree_util.tree_leaves(
    state, is_leaf=lambda x: isinstance(x, _KINDS)
  ):
    if isinstance(x, _KINDS):
      out.append(x)
    if isinstance(x, DiagnosticsState):
      out.extend(_nodes(x.inner_state))
  return out


def _named(prefix: str, tree: base.PyTree, out: dict[str, Any]) -> None:
  named, _ = base.flatten_with_names(tree)
  for name, value in named:
    out[f'{prefix}/{name}' if name else prefix] = value


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """The recorded diagnostics of an optimizer state, as a flat dict.

  Keys: ``'global_grad_norm'``, and ``'grad_norm/NAME'``,
  ``'param_norm/NAME'``, ``'update_norm/NAME'`` from :func:`with_diagnostics`
  and ``'trust_ratio/NAME'`` from trust-ratio links that record (``NAME`` is
  the leaf's :func:`lambjax.tree_names` name), ready for a logger. Works on
  states nested in ``optax.chain``, ``MultiSteps``, ``apply_if_finite`` or
  parameter groups, and inside ``jax.jit`` (the values are arrays).

  Args:
    opt_state: an optimizer state.

  Returns:
    A dict of float32 scalar arrays.

  Raises:
    ValueError: if the state records no diagnostics.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.lamb(1e-3, diagnostics=True)
    >>> p = {'w': jnp.array([3.0, 4.0])}
    >>> _, state = tx.update({'w': jnp.array([1.0, 1.0])}, tx.init(p), p)
    >>> sorted(lj.diagnostics(state))  # doctest: +NORMALIZE_WHITESPACE
    ['global_grad_norm', 'grad_norm/w', 'param_norm/w', 'trust_ratio/w',
     'update_norm/w']
  """
  nodes = _nodes(packing.unpack_state(opt_state))
  if not nodes:
    raise ValueError(
      'diagnostics: this optimizer state records no diagnostics; build the '
      'optimizer with `diagnostics=True` (lamb, lars) or wrap it in '
      '`lj.with_diagnostics`.'
    )
  out: dict[str, Any] = {}
  for node in nodes:
    if isinstance(node, DiagnosticsState):
      out['global_grad_norm'] = node.global_grad_norm
      _named('grad_norm', node.grad_norm, out)
      _named('param_norm', node.param_norm, out)
      _named('update_norm', node.update_norm, out)
    else:
      _named('trust_ratio', node.ratio, out)
  return out
