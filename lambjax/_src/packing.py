"""Optimizer state packed into one flat buffer per dtype (for accelerators).

On a GPU a per-leaf optimizer step is bound by the host issuing it: about 1
us per input buffer, 2.7 us per output buffer and 1.5 us per kernel on an
H100 (benchmarks/RESULTS.md, "What limits a per-leaf step on the GPU"). LAMB
on BERT-base passes Adam's two moments as 398 input and 398 output buffers.
:func:`with_packed_state` keeps the small ones in one flat buffer per dtype;
the maths and the params' layout are untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lambjax._src import base, grouping


@dataclasses.dataclass(frozen=True)
class PackedSlot:
  """Where one packed state array lives: ``buffers[dtype][offset:...]``.

  A pytree node with no leaves (its fields are static), so ``jax.tree``
  functions, :func:`lambjax.get_lr` / :func:`lambjax.set_lr` and ``jit`` pass
  over it; :func:`unpack_state` puts the array back.
  """

  dtype: str
  offset: int
  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


jax.tree_util.register_pytree_node(
  PackedSlot, lambda s: ((), s), lambda aux, _: aux
)


class PackedState(NamedTuple):
  """State of :func:`with_packed_state`.

  Attributes:
    inner: the wrapped optimizer's state with each packed array replaced by
      a :class:`PackedSlot`; scalars (counts, learning rates) and large
      arrays stay in place.
    buffers: one 1-D array per dtype name (``'float32'``, ...), the packed
      arrays raveled one after another in the inner state's leaf order.
  """

  inner: Any
  buffers: dict[str, jax.Array]


def _is_slot(x: Any) -> bool:
  return isinstance(x, PackedSlot)


def unpack_state(state: Any) -> Any:
  """The state with every :class:`PackedState` (or
  :class:`lambjax.GroupedState`) in it replaced by its inner state, packed
  or grouped arrays back in place: the chain's layout, for inspection (e.g.
  :func:`lambjax.diagnostics`) or to load into an optimizer built without
  packing or grouping. Works inside and outside ``jit``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.with_packed_state(lj.adam(1e-3))
    >>> state = tx.init({'w': jnp.ones(3)})
    >>> state.buffers['float32'].shape  # mu and nu of 'w'
    (6,)
    >>> lj.unpack_state(state)[0].mu['w']
    Array([0., 0., 0.], dtype=float32)
  """

  def array(x, buffers):
    if not _is_slot(x):
      return x
    buf = buffers.get(x.dtype) if isinstance(buffers, dict) else None
    if buf is None or buf.ndim != 1 or buf.shape[0] < x.offset + x.size:
      raise ValueError(
        f'unpack_state: a packed {x.dtype}{list(x.shape)} array at offset '
        f"{x.offset} is not in the state's buffers "
        f'({_describe(buffers)}); was it loaded from another optimizer?'
      )
    part = jax.lax.slice_in_dim(buf, x.offset, x.offset + x.size)
    return jnp.reshape(part, x.shape)

  def one(node):
    if isinstance(node, grouping.GroupedState):
      return unpack_state(grouping.unpack(node))
    if not isinstance(node, PackedState):
      return node
    return jax.tree.map(
      lambda x: array(x, node.buffers), node.inner, is_leaf=_is_slot
    )

  return jax.tree.map(
    one,
    state,
    is_leaf=lambda x: isinstance(x, PackedState | grouping.GroupedState),
  )


def _describe(buffers: Any) -> str:
  if not isinstance(buffers, dict):
    return f'not a dict: {type(buffers).__name__}'
  return (
    ', '.join(f'{k}{list(np.shape(v))}' for k, v in sorted(buffers.items()))
    or 'none'
  )


def _pack(state: Any, template: Any, max_size: int | None) -> PackedState:
  """Packs ``state``: where ``template`` (a packed inner state) has slots, or
  (``template`` None) every array of at most ``max_size`` elements and at
  least one dimension."""
  if template is None:
    leaves, treedef = jax.tree.flatten(state)
    kinds = list(leaves)
  else:
    kinds, treedef = jax.tree.flatten(template, is_leaf=_is_slot)
    leaves = treedef.flatten_up_to(state)
  parts: dict[str, list[jax.Array]] = {}
  offsets: dict[str, int] = {}
  out = []
  for x, kind in zip(leaves, kinds, strict=True):
    shape = tuple(np.shape(x))
    if template is None:
      # Not PRNG keys and other extended dtypes: they do not concatenate
      # with plain arrays, and are never many.
      pack = (
        len(shape) > 0
        and 0 < np.prod(shape) <= max_size
        and not jnp.issubdtype(jnp.result_type(x), jax.dtypes.extended)
      )
    else:
      pack = _is_slot(kind)
    if not pack:
      out.append(x)
      continue
    dt = jnp.result_type(x).name
    if template is not None and (kind.dtype, kind.shape) != (dt, shape):
      raise ValueError(
        'with_packed_state: the inner state changed from '
        f'{kind.dtype}{list(kind.shape)} to {dt}{list(shape)}; packing needs '
        'an optimizer whose state keeps its shapes and dtypes.'
      )
    slot = PackedSlot(dt, offsets.get(dt, 0), shape)
    offsets[dt] = slot.offset + slot.size
    parts.setdefault(dt, []).append(jnp.ravel(x))
    out.append(slot)
  buffers = {
    dt: jnp.asarray(
      xs[0] if len(xs) == 1 else jnp.concatenate(xs), dtype=jnp.dtype(dt)
    )
    for dt, xs in sorted(parts.items())
  }
  return PackedState(jax.tree.unflatten(treedef, out), buffers)


def with_packed_state(
  tx: optax.GradientTransformation, max_size: int = 1 << 20
) -> optax.GradientTransformationExtraArgs:
  """Keeps ``tx``'s small state arrays in one flat buffer per dtype.

  Same arithmetic and same params layout: ``update`` slices the arrays out
  of the buffers (static slices), runs ``tx.update`` and concatenates the
  new arrays back. In the tests the params come out bit for bit those of
  ``tx`` alone; a stored moment can differ by a rounding where XLA
  recomputes it inside the concatenation (FMA contraction).

  What changes is the number of buffers a step passes: on a GPU, where a
  per-leaf step is bound by the host issuing it, packing the moments of
  arrays of at most 1 M elements made ``lj.lamb`` on BERT-base 1.7x faster
  and ResNet-50 2.4x (H100, benchmarks/RESULTS.md, "Packing the optimizer
  state"). On XLA:CPU the concatenation is a real copy and it only costs
  (0.3-0.99x): use it on accelerators. Large arrays stay separate (a big
  moment's copy would cost more than its buffer does), so do scalars (counts
  and learning rates, which :func:`lambjax.get_lr` and
  :func:`lambjax.set_lr` find as before).

  The state is a :class:`PackedState`; :func:`unpack_state` gives the
  inner layout back. :func:`lambjax.state_dict` and the other state I/O
  functions save and load it as it is (a packed checkpoint loads into a
  packed template with the same ``max_size``). :func:`lambjax.state_sharding`
  replicates the buffers: packed arrays are never sharded, so with
  FSDP-sharded params set ``max_size`` below the smallest sharded leaf.

  Args:
    tx: any optax (or lambjax) gradient transformation.
    max_size: pack state arrays of at most this many elements (an int >= 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import lambjax as lj
    >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
    >>> tx = lj.with_packed_state(lj.lamb(1e-2, weight_decay=0.01))
    >>> state = tx.init(params)
    >>> {k: v.shape for k, v in state.buffers.items()}  # 2 moments x 15
    {'float32': (30,)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> updates['w'].shape, lj.get_lr(state)
    ((4, 3), Array(0.01, dtype=float32))
  """
  base.check_tx('with_packed_state', tx)
  if (
    isinstance(max_size, bool)
    or not isinstance(max_size, int | np.integer)
    or max_size < 1
  ):
    raise ValueError(
      f'with_packed_state: `max_size` must be an int >= 1, got {max_size!r}.'
    )
  max_size = int(max_size)
  inner_tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return _pack(inner_tx.init(params), None, max_size)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, PackedState):
      raise ValueError(
        'with_packed_state: `state` must be the PackedState that init '
        f'returned, got {type(state).__name__}.'
      )
    inner = unpack_state(state)
    updates, new_inner = inner_tx.update(updates, inner, params, **extra_args)
    return updates, _pack(new_inner, state.inner, None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
