"""Reading and changing the learning rate held in an optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lambjax._src import transform

# optax.inject_hyperparams states (the stateful one is optax >= 0.2.5).
_INJECT = tuple(
  getattr(optax, n)
  for n in ('InjectHyperparamsState', 'InjectStatefulHyperparamsState')
  if hasattr(optax, n)
)
_KINDS = transform._LR_STATES + _INJECT


def _is_lr_node(x: Any) -> bool:
  return isinstance(x, _KINDS)


def _lr_nodes(opt_state) -> list[Any]:
  return [
    x
    for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_lr_node)
    if _is_lr_node(x)
    and not (isinstance(x, _INJECT) and 'learning_rate' not in x.hyperparams)
  ]


def _the_node(where: str, opt_state):
  nodes = _lr_nodes(opt_state)
  if not nodes:
    raise ValueError(
      f'{where}: this optimizer state holds no learning rate; it must come '
      'from a lambjax optimizer (or optax.inject_hyperparams).'
    )
  return nodes[0]


def get_lr(opt_state: Any) -> jax.Array:
  """Returns the base learning rate the next update will use.

  Works for the state of every lambjax optimizer, also nested inside
  ``optax.chain``, ``optax.MultiSteps`` or ``lambjax.apply_if_finite``, and
  for ``optax.inject_hyperparams`` states. With a schedule it is the
  schedule's value at the current update count.

  Args:
    opt_state: an optimizer state.

  Returns:
    A float32 scalar array.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.lamb(learning_rate=lambda count: 0.1 / (1 + count))
    >>> state = tx.init(jnp.ones(2))
    >>> lj.get_lr(state)
    Array(0.1, dtype=float32)
  """
  node = _the_node('get_lr', opt_state)
  if isinstance(node, _INJECT):
    return jnp.asarray(node.hyperparams['learning_rate'], jnp.float32)
  return node.learning_rate


def set_lr(opt_state: Any, value: jax.typing.ArrayLike) -> Any:
  """Returns ``opt_state`` with a new constant learning rate.

  The rate is an array in the state, so this works inside ``jax.jit`` and
  does not cause a recompile.

  Args:
    opt_state: the state of a lambjax optimizer built with a constant
      learning rate (or an ``optax.inject_hyperparams`` state).
    value: the new learning rate (a number or a scalar array).

  Returns:
    The same state, with the new rate.

  Raises:
    ValueError: when a schedule or an injected array drives the learning
      rate (as Paddle's ``set_lr`` does with an LRScheduler), or the state
      holds no learning rate.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.adamw(learning_rate=1e-3)
    >>> state = lj.set_lr(tx.init(jnp.ones(2)), 5e-4)
    >>> lj.get_lr(state)
    Array(0.0005, dtype=float32)
  """
  if isinstance(value, int | float) and not value >= 0:
    raise ValueError(f'set_lr: `value` must be >= 0, got {value!r}.')
  nodes = _lr_nodes(opt_state)
  if not nodes:
    _the_node('set_lr', opt_state)
  for node in nodes:
    if isinstance(node, transform.ScheduledLearningRateState):
      raise ValueError(
        "set_lr: a schedule drives this optimizer's learning rate; "
        'set_lr only works with a constant learning rate.'
      )
    if isinstance(node, transform.InjectedLearningRateState):
      raise ValueError(
        'set_lr: this optimizer was given its learning rate as a jax array '
        '(e.g. by optax.inject_hyperparams); change it there.'
      )

  def replace(x):
    if isinstance(x, transform.LearningRateState):
      return x._replace(learning_rate=jnp.asarray(value, x.learning_rate.dtype))
    if isinstance(x, _INJECT):
      hp = dict(x.hyperparams)
      old = hp['learning_rate']
      hp['learning_rate'] = jnp.asarray(value, jnp.asarray(old).dtype)
      # Leave the inner state alone: its lr node is the injected value.
      return x._replace(hyperparams=hp)
    return x

  return jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_lr_node)
