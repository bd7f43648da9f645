"""8-bit blockwise optimizer state (moments and momentum)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lambjax._src import base, fused

BLOCK = 256
# Second moments are stored on a log scale relative to the block maximum:
# code c means max * 2 ** (-c / _LOG_STEPS), so the relative error is at most
# 2 ** (1 / (2 * _LOG_STEPS)) - 1 (about 2.2%) over 2 ** -(255 / 16) of
# range; code 255 also stands for exact zeros.
_LOG_STEPS = 16
# The code is computed from the float's bits, not with log2/exp2 (XLA:CPU
# takes about 2 ns an element for each: benchmarks/RESULTS.md, "The 8-bit
# log code without log2 and exp2"). For r = m 2**e (m in [1, 2)),
# round(16 log2 m) is the number of thresholds 2**((j + 1/2) / 16) that m
# reaches, and 2**(-k / 16) is a power of two times one constant per set bit
# of k % 16.


def _ceil_f32(x: float) -> float:
  """The smallest float32 >= ``x``: for a float32 ``m``, ``m >= x`` exactly
  iff ``m >= _ceil_f32(x)`` (``x`` irrational here, so never a float32)."""
  f = np.float32(x)
  return float(f if float(f) >= x else np.nextafter(f, np.float32(np.inf)))


_THRESHOLDS = tuple(
  _ceil_f32(2.0 ** ((j + 0.5) / _LOG_STEPS)) for j in range(_LOG_STEPS)
)
# 2**(-2**b / 16) for the bits b of the code's low four bits.
_BIT_FACTORS = tuple(
  np.float32(2.0 ** (-(1 << b) / _LOG_STEPS)) for b in range(4)
)


class QuantizedTensor(NamedTuple):
  """A float tensor as 8-bit codes (the tensor's shape) and float32 scales.

  ``scale`` holds one float32 per block of ``BLOCK`` consecutive values of
  the flattened tensor: 1.016 bytes per value instead of 4.
  """

  codes: jax.Array
  scale: jax.Array


def _blocks(x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  flat = jnp.ravel(x).astype(dtype)
  pad = (-flat.size) % BLOCK
  return jnp.pad(flat, (0, pad)).reshape(-1, BLOCK)


def _unblocks(b: jax.Array, shape) -> jax.Array:
  size = int(np.prod(shape, dtype=np.int64))
  return b.reshape(-1)[:size].reshape(shape)


# The 8-bit steps compute in the block layout (``_blocks``: ``(n, BLOCK)``)
# and reshape only the results: XLA:CPU's loops over a 4-D conv kernel's
# shape cost more than over the blocks (ResNet-50, benchmarks/RESULTS.md).


def _tensor(codes: jax.Array, scale: jax.Array, shape) -> QuantizedTensor:
  """Block-layout ``codes`` back in the leaf's ``shape``."""
  return QuantizedTensor(_unblocks(codes, shape), scale)


def _quantized(quantize_blocks, x: jax.Array) -> QuantizedTensor:
  return _tensor(*quantize_blocks(_blocks(x)), x.shape)


def _signed_blocks(b: jax.Array) -> tuple[jax.Array, jax.Array]:
  scale = jnp.max(jnp.abs(b), axis=1)
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(b / safe[:, None] * 127.0), -127, 127)
  return codes.astype(jnp.int8), scale.astype(jnp.float32)


def _dequantized_signed_blocks(q: QuantizedTensor) -> jax.Array:
  return _blocks(q.codes) * (q.scale[:, None] / 127.0)


def quantize_signed(x: jax.Array) -> QuantizedTensor:
  """Linear absmax int8 per block (round to nearest): |error| <= max/254."""
  return _quantized(_signed_blocks, x)


def dequantize_signed(q: QuantizedTensor) -> jax.Array:
  return _unblocks(_dequantized_signed_blocks(q), q.codes.shape)


def quantize_positive(x: jax.Array) -> QuantizedTensor:
  """Log-scale uint8 per block for values >= 0 (second moments).

  Code ``round(-16 log2(x / max))``, clipped to ``[0, 254]``; 255 for zeros
  (and negatives). Rounded exactly: the code is that of the float32 ratio
  ``x / max`` with the logarithm taken in exact arithmetic.
  """
  return _quantized(_positive_blocks, x)


def _positive_blocks(b: jax.Array) -> tuple[jax.Array, jax.Array]:
  scale = jnp.max(b, axis=1)
  safe = jnp.where(scale > 0, scale, 1.0)
  ratio = b / safe[:, None]
  pos = ratio > 0
  # ratio = m 2**e with m in [1, 2) (e <= 0 as ratio <= 1). A subnormal
  # ratio is zero where XLA flushes subnormals (XLA:CPU: code 255, as before);
  # elsewhere it reads e = -127 and clips to 254, as its code would.
  bits = jax.lax.bitcast_convert_type(ratio, jnp.int32)
  e = (bits >> 23) - 127
  m = jax.lax.bitcast_convert_type((bits & 0x7FFFFF) | 0x3F800000, jnp.float32)
  k = sum((m >= t).astype(jnp.int32) for t in _THRESHOLDS)  # round(16 log2 m)
  codes = jnp.where(pos, jnp.clip(-_LOG_STEPS * e - k, 0, 254), 255)
  return codes.astype(jnp.uint8), scale.astype(jnp.float32)


def dequantize_positive(q: QuantizedTensor) -> jax.Array:
  """``max * 2**(-c / 16)`` (zero for code 255), without ``exp2``: an exact
  power of two for ``c // 16``, times ``2**(-b / 16)`` for each set bit ``b``
  of ``c % 16`` (float32 constants), times the block's maximum. Relative
  error 2**-23.3 (``exp2``'s: 2**-20.8); the selects and products, unlike
  ``exp2``, are cheap enough for XLA to fuse into each consumer, so no
  dequantized copy is written (benchmarks/RESULTS.md)."""
  return _unblocks(_dequantized_positive_blocks(q), q.codes.shape)


def _dequantized_positive_blocks(q: QuantizedTensor) -> jax.Array:
  c = _blocks(q.codes, jnp.int32)
  value = jax.lax.bitcast_convert_type((127 - (c >> 4)) << 23, jnp.float32)
  for bit in range(4):
    on = (c & (1 << bit)) != 0
    value = value * jnp.where(on, _BIT_FACTORS[bit], jnp.float32(1.0))
  value = q.scale[:, None] * value
  return jnp.where(c >= 255, 0.0, value)


def _zeros(x, quantize):
  return quantize(jnp.zeros(jnp.shape(x), jnp.float32))


class QuantizedAdamState(NamedTuple):
  """Adam's count and 8-bit blockwise moments (one per leaf)."""

  count: jax.Array
  mu: base.PyTree
  nu: base.PyTree


def scale_by_adam_8bit(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
) -> optax.GradientTransformation:
  r"""Adam's direction with 8-bit blockwise moments (about 0.25x the state).

  Each step dequantizes the moments to float32, applies Adam's update
  exactly as :func:`optax.scale_by_adam` does (float32), and stores them back
  as 8-bit codes with one float32 scale per block of 256 values:

  * ``mu``: linear absmax int8 (error at most ``max|block| / 254``);
  * ``nu``: log-scale uint8 relative to the block maximum (relative error at
    most 2.2%, range ``2**-16`` of the maximum; zeros stay zero), so the
    small second moments that a linear code would round to zero, and that
    would make ``m / sqrt(v)`` explode, keep their magnitude.

  The direction (and with LAMB/LARS the trust ratio and update) is computed
  in float32 from the dequantized moments. This follows bitsandbytes' 8-bit
  optimizers (blockwise dynamic quantisation), with a simpler code.

  Args:
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the denominator, ``>= 0``.
    eps_root: added inside the square root, ``>= 0``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`QuantizedAdamState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.scale_by_adam_8bit()
    >>> p = jnp.ones(1000)
    >>> state = tx.init(p)
    >>> state.mu.codes.dtype, state.nu.codes.dtype
    (dtype('int8'), dtype('uint8'))
    >>> u, state = tx.update(jnp.full(1000, 0.5), state)
    >>> float(u[0])  # first Adam step: sign(g)
    1.0

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  where = 'scale_by_adam_8bit'
  base.check_number(where, 'b1', b1, lo=0.0, hi=1.0, hi_open=True)
  base.check_number(where, 'b2', b2, lo=0.0, hi=1.0, hi_open=True)
  base.check_number(where, 'eps', eps, lo=0.0)
  base.check_number(where, 'eps_root', eps_root, lo=0.0)

  def init_fn(params):
    return QuantizedAdamState(
      count=jnp.zeros((), jnp.int32),
      mu=jax.tree.map(lambda p: _zeros(p, quantize_signed), params),
      nu=jax.tree.map(lambda p: _zeros(p, quantize_positive), params),
    )

  # Jitted once per transformation: traced once per leaf shape and dtype,
  # not op by op for every leaf, and inlined by XLA (the same program).
  @jax.jit
  def leaf(g, mq, vq, bc1, bc2):
    g32 = _blocks(g)  # In the block layout; only the results are reshaped.
    m = (1 - b1) * g32 + b1 * _dequantized_signed_blocks(mq)
    v = (1 - b2) * g32 * g32 + b2 * _dequantized_positive_blocks(vq)
    u = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps)
    return (
      _unblocks(u, g.shape).astype(g.dtype),
      _tensor(*_signed_blocks(m), g.shape),
      _tensor(*_positive_blocks(v), g.shape),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    bc1 = 1 - b1 ** count.astype(jnp.float32)
    bc2 = 1 - b2 ** count.astype(jnp.float32)

    g_leaves, treedef = jax.tree.flatten(updates)
    # Under XLA:CPU's breadth-first schedule every leaf's float32 moments
    # would be alive at once (BERT-base: 1,756 MiB of temp); large leaves
    # one after the other, as the fast path does (fused.after): 896 MiB.
    ordered = fused.breadth_first()
    out, previous = [], None
    for g, mq, vq in zip(
      g_leaves,
      treedef.flatten_up_to(state.mu),
      treedef.flatten_up_to(state.nu),
      strict=True,
    ):
      large = ordered and fused.is_large(g)
      if large and previous is not None:
        g = fused.after(g, previous)
      out.append(leaf(g, mq, vq, bc1, bc2))
      if large:
        previous = out[-1][2].scale
    pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
    return pick(0), QuantizedAdamState(count=count, mu=pick(1), nu=pick(2))

  return optax.GradientTransformation(init_fn, update_fn)


class QuantizedTraceState(NamedTuple):
  """Momentum stored as 8-bit blockwise codes."""

  trace: base.PyTree


def trace_8bit(decay: float = 0.9) -> optax.GradientTransformation:
  """:func:`optax.trace` (heavy-ball momentum) with an 8-bit linear trace.

  ``t <- decay * t + u``; returns ``t``. The trace is dequantized, updated in
  float32 and stored as int8 codes with a float32 absmax per 256 values.

  Args:
    decay: the momentum, ``>= 0``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`QuantizedTraceState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.trace_8bit(0.9)
    >>> u, s = tx.update(jnp.ones(3), tx.init(jnp.ones(3)))
    >>> u
    Array([1., 1., 1.], dtype=float32)
  """
  base.check_number('trace_8bit', 'decay', decay, lo=0.0)

  def init_fn(params):
    return QuantizedTraceState(
      trace=jax.tree.map(lambda p: _zeros(p, quantize_signed), params)
    )

  @jax.jit  # Once per transformation, as in ``scale_by_adam_8bit``.
  def leaf(u, tq):
    t = _blocks(u) + decay * _dequantized_signed_blocks(tq)
    return (
      _unblocks(t, u.shape).astype(u.dtype),
      _tensor(*_signed_blocks(t), u.shape),
    )

  def update_fn(updates, state, params=None):
    del params

    u_leaves, treedef = jax.tree.flatten(updates)
    out = [
      leaf(u, tq)
      for u, tq in zip(
        u_leaves, treedef.flatten_up_to(state.trace), strict=True
      )
    ]
    new_u = treedef.unflatten([o[0] for o in out])
    new_t = treedef.unflatten([o[1] for o in out])
    return new_u, QuantizedTraceState(trace=new_t)

  return optax.GradientTransformation(init_fn, update_fn)


def state_bytes(state: Any) -> int:
  """Bytes held by the arrays of an optimizer state (or any pytree).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> p = {'w': jnp.zeros((1024, 256))}
    >>> lj.state_bytes(lj.adamw(1e-3, state_8bit=True).init(p)) / lj.state_bytes(
    ...     lj.adamw(1e-3).init(p))
    0.25...
  """
  total = 0
  for name, x in base.flatten_with_names(state)[0]:
    if not hasattr(x, 'dtype') or not hasattr(x, 'shape'):
      raise ValueError(
        f'state_bytes: leaf {name or "<root>"!r} is {x!r}, not an array.'
      )
    total += int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
  return total
