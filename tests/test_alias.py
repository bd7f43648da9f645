"""lambjax aliases vs optax and vs float64 numpy references of the formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h

STEPS = 50


def _ndim_gt1(params):
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _not_bias(params):
  return lj.mask_by_name(lambda n: not n.endswith('bias'))(params)


def _sched(count):
  return 0.01 * jnp.minimum(1.0, (count + 1) / 10.0) * 0.98**count


def run_jitted(tx, params, grads_list):
  """Runs tx under jit; returns the param trajectory."""
  params = h.to_jax(params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  traj = []
  for g in grads_list:
    params, state = step(params, state, h.to_jax(g))
    traj.append(params)
  return traj


# (name, lambjax factory, optax factory): only optax's arguments.
OPTAX_CASES = [
  ('lamb', lj.lamb, optax.lamb, dict(learning_rate=1e-2)),
  ('lamb_wd', lj.lamb, optax.lamb, dict(learning_rate=1e-2, weight_decay=0.1)),
  (
    'lamb_mask',
    lj.lamb,
    optax.lamb,
    dict(learning_rate=1e-2, weight_decay=0.1, mask=_ndim_gt1),
  ),
  (
    'lamb_name_mask',
    lj.lamb,
    optax.lamb,
    dict(
      learning_rate=3e-3,
      weight_decay=0.05,
      mask=_not_bias,
      b1=0.8,
      b2=0.99,
      eps=1e-4,
    ),
  ),
  (
    'lamb_sched',
    lj.lamb,
    optax.lamb,
    dict(learning_rate=_sched, weight_decay=0.01, eps_root=1e-8),
  ),
  ('lars', lj.lars, optax.lars, dict(learning_rate=0.5)),
  (
    'lars_wd',
    lj.lars,
    optax.lars,
    dict(learning_rate=0.5, weight_decay=0.01, trust_coefficient=0.1),
  ),
  (
    'lars_masks',
    lj.lars,
    optax.lars,
    dict(
      learning_rate=0.5,
      weight_decay=0.05,
      weight_decay_mask=_ndim_gt1,
      trust_ratio_mask=_not_bias,
      eps=1e-3,
    ),
  ),
  (
    'lars_nesterov_sched',
    lj.lars,
    optax.lars,
    dict(learning_rate=_sched, weight_decay=0.01, momentum=0.5, nesterov=True),
  ),
  ('adam', lj.adam, optax.adam, dict(learning_rate=1e-2)),
  (
    'adam_hparams',
    lj.adam,
    optax.adam,
    dict(learning_rate=_sched, b1=0.5, b2=0.9, eps=1e-3, eps_root=1e-6),
  ),
  (
    'adam_nesterov',
    lj.adam,
    optax.adam,
    dict(learning_rate=1e-2, nesterov=True),
  ),
  (
    'adam_mu_bf16',
    lj.adam,
    optax.adam,
    dict(learning_rate=1e-2, mu_dtype=jnp.bfloat16),
  ),
  ('adamw', lj.adamw, optax.adamw, dict(learning_rate=1e-2)),
  (
    'adamw_mask',
    lj.adamw,
    optax.adamw,
    dict(learning_rate=1e-2, weight_decay=0.05, mask=_not_bias),
  ),
  (
    'adamw_sched',
    lj.adamw,
    optax.adamw,
    dict(
      learning_rate=_sched, weight_decay=lambda c: 0.1 / (1 + c), nesterov=True
    ),
  ),
]


@pytest.mark.parametrize(
  'lj_fn,optax_fn,kwargs',
  [c[1:] for c in OPTAX_CASES],
  ids=[c[0] for c in OPTAX_CASES],
)
def test_equals_optax_over_50_jitted_steps(lj_fn, optax_fn, kwargs):
  params = h.mixed_tree()
  grads = h.grads_sequence(params, STEPS)
  ours = run_jitted(lj_fn(**kwargs), params, grads)
  theirs = run_jitted(optax_fn(**kwargs), params, grads)
  # Trajectory-relative error per leaf, as in paddle-semantics.md s.9:
  # max |ours - optax| / max |optax| over the 50 steps.
  err = h.trajectory_rel_err(ours, theirs)
  assert err <= 1e-6, f'max trajectory-relative error {err}'
  # The always-zero-gradient leaf still moves only through weight decay.
  assert np.all(np.isfinite(np.asarray(ours[-1]['frozen'])))


# ---------------------------------------------------------------------------
# float64 numpy references, written from the documented formulas
# ---------------------------------------------------------------------------


def numpy_lamb(
  lr,
  b1=0.9,
  b2=0.999,
  eps=1e-6,
  wd=0.0,
  decay_mask=None,
  adapt_mask=None,
  lo=None,
  hi=None,
  ratio_fn=None,
):
  adam = h.NumpyAdam(b1, b2, eps)
  decay_mask = decay_mask or (lambda n: True)
  adapt_mask = adapt_mask or (lambda n: True)
  ratio_fn = ratio_fn or (lambda n: 1.0)

  def step(name, p, g, s, t):
    r = adam.direction(g, s, t) + (wd * p if decay_mask(name) else 0.0)
    tr = (
      h.ref_trust(h.norm(p), h.norm(r), lo=lo, hi=hi)
      if adapt_mask(name)
      else 1.0
    )
    eta = lr(t - 1) if callable(lr) else lr
    return p - eta * ratio_fn(name) * tr * r

  return step, lambda n, p: adam.init(p)


def numpy_lars_optax(
  lr,
  wd=0.0,
  coeff=1e-3,
  eps=0.0,
  momentum=0.9,
  nesterov=False,
  decay_mask=None,
  adapt_mask=None,
):
  decay_mask = decay_mask or (lambda n: True)
  adapt_mask = adapt_mask or (lambda n: True)

  def step(name, p, g, s, t):
    d = g + (wd * p if decay_mask(name) else 0.0)
    tr = (
      h.ref_trust(h.norm(p), h.norm(d), coeff, eps) if adapt_mask(name) else 1.0
    )
    u = -(lr(t - 1) if callable(lr) else lr) * tr * d
    s['v'] = u + momentum * s['v']
    step_ = u + momentum * s['v'] if nesterov else s['v']
    return p + step_

  return step, lambda n, p: {'v': np.zeros_like(p)}


def numpy_lars_paddle(lr, wd, coeff=1e-3, eps=0.0, momentum=0.9, excluded=()):
  """paddle-semantics.md section 2 (rescale_grad = 1)."""

  def step(name, p, g, s, t):
    w = 0.0 if any(e in name for e in excluded) else wd
    pn, gn = h.norm(p), h.norm(g)
    if w > 0 and pn > 0 and gn > 0:
      local_lr = lr * coeff * pn / (gn + w * pn + eps)
    else:
      local_lr = lr
    s['v'] = momentum * s['v'] + local_lr * (g + w * p)
    return p - s['v']

  return step, lambda n, p: {'v': np.zeros_like(p)}


def numpy_adamw(
  lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decay_mask=None, ratio_fn=None
):
  adam = h.NumpyAdam(b1, b2, eps)
  decay_mask = decay_mask or (lambda n: True)
  ratio_fn = ratio_fn or (lambda n: 1.0)

  def step(name, p, g, s, t):
    d = adam.direction(g, s, t) + (wd * p if decay_mask(name) else 0.0)
    return p - (lr(t - 1) if callable(lr) else lr) * ratio_fn(name) * d

  return step, lambda n, p: adam.init(p)


def _layerwise_ref(decay, n_layers, name):
  """PaddleNLP's rule, independently: see paddle-semantics.md section 5."""
  parts = name.split('.')
  for i, part in enumerate(parts):
    if part == 'layers' and i + 1 < len(parts) and parts[i + 1].isdigit():
      return decay ** (n_layers - int(parts[i + 1]))
    if part.startswith('layers_') and part[7:].isdigit():
      return decay ** (n_layers - int(part[7:]))
  return decay ** (n_layers + 1) if 'embedding' in name else 1.0


NUMPY_CASES = [
  ('lamb', lj.lamb(1e-2), numpy_lamb(1e-2)),
  (
    'lamb_wd_mask_adapt',
    lj.lamb(
      2e-2,
      weight_decay=0.1,
      mask=lj.mask_by_name(r'kernel|embeddings'),
      trust_ratio_mask=lj.mask_by_name(r'kernel|embeddings'),
    ),
    numpy_lamb(
      2e-2,
      wd=0.1,
      decay_mask=lambda n: 'kernel' in n or 'embeddings' in n,
      adapt_mask=lambda n: 'kernel' in n or 'embeddings' in n,
    ),
  ),
  (
    'lamb_clamp_ratio_fn',
    lj.lamb(
      _sched,
      weight_decay=0.05,
      min_ratio=0.5,
      max_ratio=2.0,
      lr_ratio_fn=functools.partial(lj.layerwise_lr_decay, 0.7, 2),
    ),
    numpy_lamb(
      lambda c: 0.01 * min(1.0, (c + 1) / 10.0) * 0.98**c,
      wd=0.05,
      lo=0.5,
      hi=2.0,
      ratio_fn=functools.partial(_layerwise_ref, 0.7, 2),
    ),
  ),
  (
    'lars',
    lj.lars(0.5, weight_decay=0.01, trust_coefficient=0.1),
    numpy_lars_optax(0.5, wd=0.01, coeff=0.1),
  ),
  (
    'lars_nesterov_masks',
    lj.lars(
      0.5,
      weight_decay=0.02,
      weight_decay_mask=_ndim_gt1,
      trust_ratio_mask=_not_bias,
      nesterov=True,
      eps=1e-4,
    ),
    numpy_lars_optax(
      0.5,
      wd=0.02,
      eps=1e-4,
      nesterov=True,
      decay_mask=lambda n: n not in ('scale',) and not n.endswith('bias'),
      adapt_mask=lambda n: not n.endswith('bias'),
    ),
  ),
  (
    'lars_paddle',
    lj.lars(
      0.5,
      weight_decay=0.01,
      trust_coefficient=0.05,
      eps=1e-3,
      trust_ratio_form='paddle',
      weight_decay_mask=_not_bias,
    ),
    numpy_lars_paddle(0.5, 0.01, coeff=0.05, eps=1e-3, excluded=('bias',)),
  ),
  (
    'adam',
    lj.adam(1e-2, b1=0.8, eps=1e-6),
    numpy_adamw(1e-2, b1=0.8, eps=1e-6),
  ),
  (
    'adamw',
    lj.adamw(1e-2, weight_decay=0.05, mask=_not_bias),
    numpy_adamw(1e-2, wd=0.05, decay_mask=lambda n: not n.endswith('bias')),
  ),
  (
    'adamw_dl',
    lj.adamw_dl(
      1e-2, weight_decay=0.05, layerwise_decay=0.8, n_layers=2, mask=_not_bias
    ),
    numpy_adamw(
      1e-2,
      wd=0.05,
      decay_mask=lambda n: not n.endswith('bias'),
      ratio_fn=functools.partial(_layerwise_ref, 0.8, 2),
    ),
  ),
]


@pytest.mark.parametrize(
  'tx,reference', [c[1:] for c in NUMPY_CASES], ids=[c[0] for c in NUMPY_CASES]
)
def test_against_float64_numpy_reference(tx, reference):
  params = h.mixed_tree(3)
  grads = h.grads_sequence(params, 20, seed=4)
  ours = run_jitted(tx, params, grads)
  ref = h.run_numpy(reference[0], reference[1], params, grads)
  for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
    err = h.max_rel_err(a, b)
    assert err <= 2e-5, f'step {t}: max relative error {err}'


def test_lamb_clamp_is_active():
  """The clamp case above must actually clamp, or it proves nothing."""
  p = jnp.array([100.0, 0.0])
  g = jnp.array([1.0, 1.0])
  tx = lj.lamb(1.0, max_ratio=2.0)
  u, _ = tx.update(g, tx.init(p), p)
  # Unclamped ratio would be 100 / ||(1, 1)|| ~ 70.7.
  np.testing.assert_allclose(np.asarray(u), -2.0 * np.ones(2), rtol=1e-5)


# ---------------------------------------------------------------------------
# adamw_dl closed form
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('style', ['paddle', 'flax'])
def test_adamw_dl_closed_form(style):
  n_layers, decay, lr, wd = 3, 0.7, 0.1, 0.05
  rng = np.random.default_rng(0)

  def layer(m):
    return {'w': rng.normal(size=(3,))}

  if style == 'paddle':
    params = {'encoder': {'layers': [layer(m) for m in range(n_layers)]}}
    layer_names = [f'encoder.layers.{m}.w' for m in range(n_layers)]
  else:
    params = {'params': {f'layers_{m}': layer(m) for m in range(n_layers)}}
    layer_names = [f'params.layers_{m}.w' for m in range(n_layers)]
  params['word_embeddings'] = rng.normal(size=(3,))
  params['head'] = rng.normal(size=(3,))
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
  expected_ratio = {
    n: decay ** (n_layers - m) for m, n in enumerate(layer_names)
  }
  expected_ratio['word_embeddings'] = decay ** (n_layers + 1)
  expected_ratio['head'] = 1.0

  tx = lj.adamw_dl(
    lr, weight_decay=wd, layerwise_decay=decay, n_layers=n_layers
  )
  p = h.to_jax(params)
  state = tx.init(p)
  step = jax.jit(tx.update)
  adam = h.NumpyAdam(eps=1e-8)
  adam_state = {}
  for t in range(1, 4):
    g = jax.tree.map(lambda x, t=t: x * t, grads)
    u, state = step(h.to_jax(g), state, p)
    p_np = h.to_np64(p)
    for name, leaf_u in h.names_and_leaves(jax.tree.map(np.asarray, u)):
      gi = dict(h.names_and_leaves(h.to_np64(g)))[name]
      pi = dict(h.names_and_leaves(p_np))[name]
      s = adam_state.setdefault(name, adam.init(pi))
      direction = adam.direction(gi, s, t)
      want = -lr * expected_ratio[name] * (direction + wd * pi)
      np.testing.assert_allclose(leaf_u, want, rtol=2e-5, err_msg=name)
    p = optax.apply_updates(p, u)


def test_layerwise_lr_decay_rule():
  f = functools.partial(lj.layerwise_lr_decay, 0.8, 3)
  assert f('embeddings.word_embeddings.weight') == pytest.approx(0.8**4)
  assert f('encoder.layers.0.attn.q.weight') == pytest.approx(0.8**3)
  assert f('encoder.layers.2.ffn.bias') == pytest.approx(0.8)
  assert f('params.layers_1.Dense_0.kernel') == pytest.approx(0.8**2)
  assert f('pooler.dense.weight') == 1.0
  assert f('sublayers.1.weight') == 1.0  # 'layers' must be a whole key.
  with pytest.raises(ValueError, match='n_layers'):
    f('encoder.layers.3.weight')  # index >= n_layers


# ---------------------------------------------------------------------------
# Extra options really do something
# ---------------------------------------------------------------------------


def test_lamb_trust_ratio_mask_gives_paddle_rule_on_excluded_leaves():
  """Leaves outside trust_ratio_mask take a plain Adam step."""
  p = {'w': jnp.array([3.0, 4.0]), 'b': jnp.array([10.0, 0.0])}
  g = {'w': jnp.array([1.0, 1.0]), 'b': jnp.array([1.0, -1.0])}
  m = lj.mask_by_name(lambda n: n == 'w')
  tx = lj.lamb(0.1, weight_decay=0.0, trust_ratio_mask=m)
  u, _ = tx.update(g, tx.init(p), p)
  adam_dir = np.sign(np.asarray(g['b'])) / (1 + 1e-6)  # first Adam step
  np.testing.assert_allclose(np.asarray(u['b']), -0.1 * adam_dir, rtol=2e-5)
  w_dir = np.sign(np.asarray(g['w'])) / (1 + 1e-6)
  ratio = 5.0 / np.linalg.norm(w_dir)
  np.testing.assert_allclose(
    np.asarray(u['w']), -0.1 * ratio * w_dir, rtol=1e-5
  )


def test_lr_ratio_after_trust_ratio_is_not_cancelled():
  p = {'w': jnp.array([3.0, 4.0])}
  g = {'w': jnp.array([1.0, 1.0])}
  plain = lj.lamb(0.1)
  halved = lj.lamb(0.1, lr_ratio_fn=lambda n: 0.5)
  u1, _ = plain.update(g, plain.init(p), p)
  u2, _ = halved.update(g, halved.init(p), p)
  np.testing.assert_allclose(
    np.asarray(u2['w']), 0.5 * np.asarray(u1['w']), rtol=1e-6
  )
