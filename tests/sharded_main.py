"""Run by tests/test_sharding.py in a process with 8 host devices.

Every lambjax optimizer on an 8-device mesh, replicated (data parallel),
FSDP and ZeRO-1, must give the single-device params (1e-5 relative) after
6 steps, with the state coming out with the shardings asked for. The fast
path's norms gather no sharded leaf.
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lambjax as lj
from lambjax._src import fused as fused_lib

OPTS = {
  'lamb': lambda: lj.lamb(1e-2, weight_decay=0.01),
  'lamb_chain': lambda: lj.lamb(1e-2, weight_decay=0.01, fused=False),
  'lars': lambda: lj.lars(0.5, weight_decay=1e-3, trust_coefficient=0.1),
  'lars_paddle': lambda: lj.lars(
    0.5, weight_decay=1e-3, trust_ratio_form='paddle'
  ),
  'adam': lambda: lj.adam(1e-2),
  'adamw': lambda: lj.adamw(1e-2),
  'adamw_dl': lambda: lj.adamw_dl(1e-2, layerwise_decay=0.8, n_layers=2),
  'paddle.Lamb': lambda: lj.paddle.Lamb(
    1e-2, grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0)
  ),
  'paddle.LarsMomentum': lambda: lj.paddle.LarsMomentum(0.5),
  'paddle.AdamW': lambda: lj.paddle.AdamW(
    1e-2,
    parameters=[
      {'params': lambda n: 'kernel' in n, 'learning_rate': 0.5},
      {'params': lambda n: 'kernel' not in n},
    ],
  ),
  'clip_norm+lamb': lambda: optax.chain(lj.clip_by_norm(0.5), lj.lamb(1e-2)),
}


def train_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def max_relative_error(got, want) -> float:
  """The largest leaf's max |got - want| over its max |want|, in float64."""
  return max(
    float(np.max(np.abs(np.float64(a) - np.float64(b))))
    / max(float(np.max(np.abs(np.float64(b)))), 1e-30)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  )


def sharded_step(tx, params, shardings):
  """The jitted step of ``tx`` sharded as ``shardings``; its all-gathers."""
  s_shard = lj.state_sharding(tx, params, shardings)
  step = jax.jit(
    train_step(tx),
    in_shardings=(shardings, s_shard, shardings),
    out_shardings=(shardings, s_shard),
  )
  text = step.lower(params, tx.init(params), params).compile().as_text()
  return step, s_shard, len(re.findall(r' all-gather(-start)?\(', text))


def check_sharded_leaves(mesh, failures):
  """Leaves sharded one per dimension (every dimension at least 16: XLA:CPU's
  views of short last dimensions merge them), bf16 and float32.

  The fast path's norms are summed per shard and all-reduced, as the
  chain's are: its views keep the leaf's sharding, so no leaf is gathered
  whole (the check can fail: with views merging dimensions, the leaves are
  gathered). Three sharded steps equal the single-device steps: to 1e-5
  in float32, and in bf16 to 1e-2 (a sum in another order can move a
  trust ratio by a float32 rounding, and a bf16 param by one of its own,
  2**-8, each step)."""
  shapes = {
    'dense_rows': ((64, 48), 0),
    'dense_cols': ((48, 64), 1),
    'hwio_in': ((3, 3, 32, 48), 2),
    'hwio_out': ((3, 3, 48, 32), 3),
    'vec': ((96,), 0),
  }
  opts = {
    'lars': lambda: lj.lars(0.1, weight_decay=1e-4),
    'lamb': lambda: lj.lamb(1e-3, weight_decay=0.01),
    'paddle.LarsMomentum': lambda: lj.paddle.LarsMomentum(0.1),
    'paddle.Lamb': lambda: lj.paddle.Lamb(1e-3),
  }

  def spec(shape, dim):
    axes = [None] * len(shape)
    axes[dim] = 'data'
    return NamedSharding(mesh, P(*axes))

  shardings = {k: spec(*v) for k, v in shapes.items()}
  rng = np.random.default_rng(1)

  def draw(dtype):
    return {
      k: jnp.asarray(rng.normal(size=v[0]), dtype) for k, v in shapes.items()
    }

  for dtype, tol in ((jnp.bfloat16, 1e-2), (jnp.float32, 1e-5)):
    dname = jnp.dtype(dtype).name
    params, grads = draw(dtype), [draw(dtype) for _ in range(3)]
    for name, make in opts.items():
      tx = make()
      step, s_shard, n = sharded_step(tx, params, shardings)
      if n:
        failures.append(f'{name} {dname}: {n} all-gathers')
      ref, s = params, tx.init(params)
      single = jax.jit(train_step(tx))
      p = jax.device_put(params, shardings)
      st = jax.device_put(tx.init(params), s_shard)
      for g in grads:
        ref, s = single(ref, s, g)
        p, st = step(p, st, jax.device_put(g, shardings))
      err = max_relative_error(p, ref)
      if not err <= tol:
        failures.append(f'{name} {dname}: relative error {err:.2e}')
      print(f'{name:22s} {dname:10s} all-gathers {n}, max rel err {err:.1e}')
  own = fused_lib.reduction_shape
  fused_lib.reduction_shape = lambda shape, dtype: (  # Merged dimensions.
    (int(np.prod(shape)),) if len(shape) > 1 else tuple(shape)
  )
  try:
    n = sharded_step(opts['lars'](), draw(jnp.bfloat16), shardings)[2]
  finally:
    fused_lib.reduction_shape = own
  if n == 0:
    failures.append('merged views gather nothing: the check cannot fail')
  print(f'lars, views merging dimensions: all-gathers {n}')


def main():
  # XLA_FLAGS must be set before jax starts: test_sharding.py does that.
  assert 'xla_force_host_platform_device_count=8' in os.environ.get(
    'XLA_FLAGS', ''
  ), 'run with XLA_FLAGS=--xla_force_host_platform_device_count=8'
  devices = jax.devices()
  assert len(devices) == 8, devices
  mesh = Mesh(np.array(devices), ('data',))
  rng = np.random.default_rng(0)
  params = {
    'encoder': {
      'layers': [
        {'kernel': rng.normal(size=(16, 24)), 'bias': rng.normal(size=(24,))},
        {'kernel': rng.normal(size=(24, 8)), 'bias': np.zeros(8)},
      ]
    },
    'embeddings': rng.normal(size=(32, 16)),
    'odd': rng.normal(size=(3, 5)),  # 8 divides no dimension.
    'scale': np.array(1.5),
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [
    jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
    )
    for _ in range(6)
  ]

  def fsdp_spec(x):
    for d, n in enumerate(x.shape):
      if n % 8 == 0:
        spec = [None] * x.ndim
        spec[d] = 'data'
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  modes = {
    'replicated': (
      jax.tree.map(lambda x: NamedSharding(mesh, P()), params),
      None,
    ),
    'fsdp': (jax.tree.map(fsdp_spec, params), None),
    'zero1': (jax.tree.map(lambda x: NamedSharding(mesh, P()), params), 'data'),
  }
  failures = []
  for name, make in OPTS.items():
    tx = make()
    # Single-device reference.
    p, s = params, tx.init(params)
    step = jax.jit(train_step(tx))
    for g in grads:
      p, s = step(p, s, g)
    ref = p
    for mode, (p_shard, zero) in modes.items():
      s_shard = lj.state_sharding(tx, params, p_shard, zero_axis=zero)
      g_shard = p_shard
      sharded_step = jax.jit(
        train_step(tx),
        in_shardings=(p_shard, s_shard, g_shard),
        out_shardings=(p_shard, s_shard),
      )
      p = jax.device_put(params, p_shard)
      s = jax.device_put(tx.init(params), s_shard)
      for g in grads:
        p, s = sharded_step(p, s, jax.device_put(g, g_shard))
      err = max_relative_error(p, ref)
      if err > 1e-5:
        failures.append(f'{name}/{mode}: relative error {err:.2e}')
      # The state has the shardings asked for, and is really sharded where
      # it should be.
      wanted = jax.tree.leaves(
        s_shard, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
      )
      for x, want in zip(jax.tree.leaves(s), wanted, strict=True):
        if not x.sharding.is_equivalent_to(want, x.ndim):
          failures.append(
            f'{name}/{mode}: state sharding {x.sharding} != {want}'
          )
          break
      big = [x for x in jax.tree.leaves(s) if x.shape == (32, 16)]
      shard_shapes = {x.addressable_shards[0].data.shape for x in big}
      if mode in ('fsdp', 'zero1') and big and (32, 16) in shard_shapes:
        failures.append(f'{name}/{mode}: state not sharded {shard_shapes}')
      if mode == 'replicated' and big and shard_shapes != {(32, 16)}:
        failures.append(f'{name}/{mode}: state sharded {shard_shapes}')
      print(f'{name:22s} {mode:10s} max rel err {err:.1e}', flush=True)
  check_sharded_leaves(mesh, failures)
  if failures:
    print('\n'.join(failures))
    sys.exit(1)
  print('all sharded runs match the single-device run')


if __name__ == '__main__':
  main()
