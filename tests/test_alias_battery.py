"""A common battery run over every lambjax alias (after optax's alias_test)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import lambjax as lj

ALIASES = {
  'lamb': lambda lr=1e-2: lj.lamb(lr, weight_decay=1e-4),
  'lamb_masked': lambda lr=1e-2: lj.lamb(
    lr,
    weight_decay=1e-4,
    mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) > 1, p),
    trust_ratio_mask=lj.mask_by_name(r'kernel'),
  ),
  'lars': lambda lr=0.5: lj.lars(lr, weight_decay=1e-4, trust_coefficient=0.1),
  'lars_paddle': lambda lr=0.5: lj.lars(
    lr, weight_decay=1e-4, trust_coefficient=0.1, trust_ratio_form='paddle'
  ),
  'adam': lambda lr=1e-2: lj.adam(lr),
  'adamw': lambda lr=1e-2: lj.adamw(lr),
  'adamw_dl': lambda lr=1e-2: lj.adamw_dl(lr, layerwise_decay=0.9, n_layers=2),
}
NAMES = sorted(ALIASES)


def _parabola():
  target = jnp.array([1.0, -2.0, 0.5])
  return (
    lambda p: jnp.sum((p['x'] - target) ** 2),
    {'x': jnp.array([3.0, 1.0, -1.0])},
    {'x': target},
  )


def _rosenbrock():
  def f(p):
    x, y = p['x'][0], p['x'][1]
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2

  return f, {'x': jnp.array([-0.5, 0.5])}, {'x': jnp.array([1.0, 1.0])}


CONVERGENCE_LR = {
  'lamb': 3e-2,
  'lamb_masked': 3e-2,
  'lars': 0.3,
  'lars_paddle': 0.3,
  'adam': 3e-2,
  'adamw': 3e-2,
  'adamw_dl': 3e-2,
}


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize(
  'target', [_parabola, _rosenbrock], ids=['parabola', 'rosenbrock']
)
def test_converges_under_jit(name, target):
  loss, params, optimum = target()
  sched = optax.cosine_decay_schedule(CONVERGENCE_LR[name], 5000)
  tx = ALIASES[name](sched)
  # The aliases' small weight decay moves the optimum a little: loose atol.
  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(_, carry):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, 5000, body, (params, state))

  params, _ = run(params, state)
  np.testing.assert_allclose(
    np.asarray(params['x']), np.asarray(optimum['x']), atol=3e-2
  )


@pytest.mark.parametrize('name', NAMES)
def test_second_call_does_not_retrace(name):
  tx = ALIASES[name]()
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  state = tx.init(params)

  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(1)  # Runs only while tracing.
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  g = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    params, state = step(params, state, g)
  # set_lr on a constant-lr optimizer changes an array: still one trace.
  params, state = step(params, lj.set_lr(state, 1e-3), g)
  assert float(lj.get_lr(state)) == pytest.approx(1e-3)
  assert len(traces) == 1


@pytest.mark.parametrize('name', NAMES)
def test_bf16_params_get_bf16_updates(name):
  tx = ALIASES[name]()
  params = {
    'w': jnp.ones((3, 2), jnp.bfloat16),
    'b': jnp.zeros(2, jnp.bfloat16),
  }
  state = tx.init(params)
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  u, state = jax.jit(tx.update)(g, state, params)
  chex.assert_trees_all_equal_dtypes(u, params)
  chex.assert_tree_all_finite(u)
  new = optax.apply_updates(params, u)
  chex.assert_trees_all_equal_dtypes(new, params)


@pytest.mark.parametrize('name', NAMES)
def test_state_structure_shapes_and_dtypes_are_stable(name):
  tx = ALIASES[name]()
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2), 's': jnp.array(2.0)}
  state0 = tx.init(params)
  state = state0
  g = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  for _ in range(3):
    _, state = step(g, state, params)
  chex.assert_trees_all_equal_structs(state0, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  # And through lax.cond, which requires identical types in both branches.
  out = jax.lax.cond(True, lambda s: s, lambda s: state0, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, state0)


@pytest.mark.parametrize('name', NAMES)
def test_inside_chain_multisteps_and_extra_args(name):
  params = {'w': jnp.arange(6.0).reshape(3, 2) / 6, 'b': jnp.ones(2)}
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  # optax.chain with a clip in front, and an unknown extra argument.
  tx = optax.chain(optax.clip_by_global_norm(1.0), ALIASES[name]())
  u, _ = tx.update(g, tx.init(params), params, some_extra_arg=1)
  plain = ALIASES[name]()
  clipped = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
  u_ref, _ = plain.update(clipped, plain.init(params), params)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-6)
  # optax.MultiSteps: k=2 micro-steps give one update with the mean grad.
  ms = optax.MultiSteps(ALIASES[name](), every_k_schedule=2)
  s = ms.init(params)
  u1, s = jax.jit(ms.update)(g, s, params)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, params))
  g2 = jax.tree.map(lambda x: 3 * x, g)
  u2, s = jax.jit(ms.update)(g2, s, params)
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, g, g2)
  ref = ALIASES[name]()
  u_ref, _ = ref.update(mean_g, ref.init(params), params)
  chex.assert_trees_all_close(u2, u_ref, rtol=1e-5)


@pytest.mark.parametrize('name', ['lamb', 'adamw', 'lars', 'adam'])
def test_inject_hyperparams(name):
  fn = {'lamb': lj.lamb, 'adamw': lj.adamw, 'lars': lj.lars, 'adam': lj.adam}[
    name
  ]
  params = {'w': jnp.arange(6.0).reshape(3, 2) / 6, 'b': jnp.ones(2)}
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  mask = lj.mask_by_name(r'w$')
  kwargs = (
    {}
    if name == 'adam'
    else (
      {'weight_decay': 0.1, 'mask': mask}
      if name != 'lars'
      else {'weight_decay': 0.1, 'weight_decay_mask': mask}
    )
  )
  static = tuple(k for k in kwargs if 'mask' in k)
  injected = optax.inject_hyperparams(fn, static_args=static)(
    learning_rate=0.01, **kwargs
  )
  plain = fn(0.01, **kwargs)
  si, sp = injected.init(params), plain.init(params)
  step_i, step_p = jax.jit(injected.update), jax.jit(plain.update)
  for _ in range(3):
    ui, si = step_i(g, si, params)
    up, sp = step_p(g, sp, params)
    # Injected b1/b2/eps are float32 arrays (optax's own test: rtol=1e-3).
    chex.assert_trees_all_close(ui, up, rtol=5e-5)
  # Changing the injected learning rate takes effect (it is not shadowed by
  # the rate held in lambjax's own state), and get/set_lr see it.
  si = lj.set_lr(si, 0.02)
  assert float(lj.get_lr(si)) == pytest.approx(0.02)
  ui2, _ = step_i(g, si, params)
  up2, _ = step_p(g, lj.set_lr(sp, 0.02), params)
  chex.assert_trees_all_close(ui2, up2, rtol=5e-5)
  with pytest.raises(ValueError, match='inject_hyperparams'):
    lj.set_lr(si.inner_state, 0.1)


def test_inject_hyperparams_adamw_dl_names_static_args():
  """``layerwise_decay`` and ``n_layers`` fix every leaf's ratio from its
  name when the optimizer is built: injected, they must be static, and the
  error says how."""
  params = {'layers_0': {'w': jnp.ones((2, 2))}, 'head': jnp.ones(2)}
  g = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r'`n_layers`.*static_args'):
    optax.inject_hyperparams(lj.adamw_dl)(learning_rate=1e-3).init(params)
  tx = optax.inject_hyperparams(lj.adamw_dl, static_args=('n_layers',))(
    learning_rate=1e-3, n_layers=2
  )
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'`layerwise_decay`.*static_args'):
    jax.jit(tx.update)(g, state, params)
  tx = optax.inject_hyperparams(
    lj.adamw_dl, static_args=('layerwise_decay', 'n_layers')
  )(learning_rate=1e-3, layerwise_decay=0.5, n_layers=2)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  ref = lj.adamw_dl(1e-3, layerwise_decay=0.5, n_layers=2)
  r, _ = ref.update(g, ref.init(params), params)
  chex.assert_trees_all_close(u, r, rtol=5e-5)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name='layers_0')(x))
    return nn.Dense(1, name='layers_1')(x)


@pytest.mark.parametrize('name', NAMES)
def test_flax_train_state_under_jit(name):
  model = _MLP()
  x = jnp.linspace(-1, 1, 32).reshape(16, 2)
  y = jnp.sum(x, axis=1, keepdims=True)
  params = model.init(jax.random.key(0), x)['params']
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=ALIASES[name]()
  )

  @jax.jit
  def step(state):
    def loss(p):
      return jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)

    loss_v, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), loss_v

  losses = []
  for _ in range(60):
    state, loss_v = step(state)
    losses.append(float(loss_v))
  assert losses[-1] < 0.5 * losses[0]


class _NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List(
      [nnx.Linear(2, 8, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)]
    )

  def __call__(self, x):
    return self.layers[1](nnx.relu(self.layers[0](x)))


@pytest.mark.parametrize('name', NAMES)
def test_flax_nnx_optimizer_under_nnx_jit(name):
  model = _NNXModel(nnx.Rngs(0))
  opt = nnx.Optimizer(model, ALIASES[name](), wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 32).reshape(16, 2)
  y = jnp.sum(x, axis=1, keepdims=True)

  @nnx.jit
  def step(model, opt):
    def loss(m):
      return jnp.mean((m(x) - y) ** 2)

    loss_v, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return loss_v

  losses = [float(step(model, opt)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0]


def test_nnx_names_match_between_init_and_update():
  """Name masks see the same names from nnx's init (Variables) and update."""
  seen = []

  def pred(name):
    seen.append(name)
    return 'kernel' in name

  model = _NNXModel(nnx.Rngs(0))
  opt = nnx.Optimizer(
    model,
    lj.lamb(1e-2, weight_decay=0.1, mask=lj.mask_by_name(pred)),
    wrt=nnx.Param,
  )
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
  opt.update(model, grads)
  assert set(seen) == {
    f'layers.{i}.{k}' for i in (0, 1) for k in ('kernel', 'bias')
  }
