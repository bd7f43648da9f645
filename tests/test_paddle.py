"""lj.paddle vs float64 numpy implementations of paddle-semantics.md.

The reference below follows the spec's pipeline per parameter group:
clip (per group) -> coupled regularizer -> kernel, with lr_p = lr * scale.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj

P = lj.paddle
STEPS = 12

NAMES = [
  'embeddings.word_embeddings.weight',
  'encoder.layers.0.attn.weight',
  'encoder.layers.0.attn.bias',  # zero-initialised
  'encoder.layers.0.norm.weight',
  'encoder.layers.1.ffn.weight',
  'encoder.layers.1.norm.bias',
  'frozen.weight',  # gradient always zero
  'zero.weight',  # parameter tensor of zeros
  'pooler.dense.weight',
  'scale',  # 0-d
]


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {
    'embeddings.word_embeddings.weight': (6, 4),
    'encoder.layers.0.attn.weight': (4, 4),
    'encoder.layers.0.attn.bias': (4,),
    'encoder.layers.0.norm.weight': (4,),
    'encoder.layers.1.ffn.weight': (4, 3),
    'encoder.layers.1.norm.bias': (3,),
    'frozen.weight': (2, 3),
    'zero.weight': (3, 2),
    'pooler.dense.weight': (3, 3),
    'scale': (),
  }
  p = {n: rng.normal(size=shapes[n]) for n in NAMES}
  p['encoder.layers.0.attn.bias'] = np.zeros(4)
  p['zero.weight'] = np.zeros((3, 2))
  return p


def make_grads(params, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    g = {n: rng.normal(size=np.shape(v)) for n, v in params.items()}
    g['frozen.weight'] = np.zeros_like(params['frozen.weight'])
    out.append(g)
  return out


def nrm(x):
  return math.sqrt(float(np.sum(np.square(x))))


# --- numpy reference --------------------------------------------------------


def clip(kind, arg, gs):
  if kind is None:
    return gs
  if kind == 'global':
    G = math.sqrt(sum(float(np.sum(g * g)) for g in gs.values()))
    return {n: g * arg / max(G, arg) for n, g in gs.items()}
  if kind == 'norm':
    return {n: (g * arg / nrm(g) if nrm(g) > arg else g) for n, g in gs.items()}
  lo, hi = arg
  return {n: np.clip(g, lo, hi) for n, g in gs.items()}


def regularize(reg, g, p):
  if reg is None:
    return g
  kind, c = reg
  return g + c * p if kind == 'l2' else g + c * np.sign(p)


def run_reference(params, grads, groups, lr, kernel):
  """groups: [(names, cfg)], cfg has 'scale', 'clip', 'reg' and kernel args.

  Leaves in no group are frozen. kernel(name, p, g, state, t, lr_p, cfg).
  """
  p = {n: np.array(v, np.float64) for n, v in params.items()}
  state = {n: {} for n in p}
  traj = []
  for t, g in enumerate(grads, start=1):
    base_lr = lr(t - 1) if callable(lr) else lr
    for names, cfg in groups:
      gs = clip(
        cfg.get('clip'),
        cfg.get('clip_arg'),
        {n: np.array(g[n], np.float64) for n in names},
      )
      for n in names:
        gg = regularize(cfg.get('reg'), gs[n], p[n])
        p[n] = kernel(
          n, p[n], gg, state[n], t, base_lr * cfg.get('scale', 1.0), cfg
        )
    traj.append({n: v.copy() for n, v in p.items()})
  return traj


def adam_dir(g, s, t, b1, b2, eps):
  s.setdefault('m', np.zeros_like(g))
  s.setdefault('v', np.zeros_like(g))
  s['m'] = b1 * s['m'] + (1 - b1) * g
  s['v'] = b2 * s['v'] + (1 - b2) * g * g
  return (s['m'] / (1 - b1**t)) / (np.sqrt(s['v'] / (1 - b2**t)) + eps)


def k_lamb(n, p, g, s, t, lr, cfg):
  wd = 0.0 if cfg['exclude'](n) else cfg['wd']
  r = adam_dir(g, s, t, cfg['b1'], cfg['b2'], cfg['eps']) + wd * p
  ratio = 1.0
  if wd > 0 or cfg['always_adapt']:
    pn, rn = nrm(p), nrm(r)
    ratio = pn / rn if (pn > 0 and rn > 0) else 1.0
  return p - lr * ratio * r


def k_lars(n, p, g, s, t, lr, cfg):
  wd = 0.0 if any(e in n for e in cfg['exclude']) else cfg['wd']
  g = cfg['rescale'] * g
  pn, gn = nrm(p), nrm(g)
  if wd > 0 and pn > 0 and gn > 0:
    local = lr * cfg['coeff'] * pn / (gn + wd * pn + cfg['eps'])
  else:
    local = lr
  s['v'] = cfg['momentum'] * s.get('v', 0.0) + local * (g + wd * p)
  return p - s['v']


def k_adam(n, p, g, s, t, lr, cfg):
  return p - lr * adam_dir(g, s, t, cfg['b1'], cfg['b2'], cfg['eps'])


def k_adamw(n, p, g, s, t, lr, cfg):
  coeff = cfg['wd'] if cfg['decay'](n) else 0.0
  lr_e = lr * cfg['ratio'](n)
  d = adam_dir(g, s, t, cfg['b1'], cfg['b2'], cfg['eps'])
  return p * (1 - lr_e * coeff) - lr_e * d


def k_sgd(n, p, g, s, t, lr, cfg):
  return p - lr * g


def layerwise_ref(decay, n_layers, name):
  if 'encoder.layers' in name:
    idx = name.index('encoder.layers')
    m = int(name[idx:].split('.')[2])
    return decay ** (n_layers - m)
  if 'embedding' in name:
    return decay ** (n_layers + 1)
  return 1.0


ADAM_CFG = dict(b1=0.9, b2=0.999, eps=1e-8)
ALL = [(NAMES, {})]


def _lamb_cfg(**kw):
  cfg = dict(
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    wd=0.01,
    always_adapt=False,
    exclude=lambda n: False,
  )
  cfg.update(kw)
  return cfg


def _excl(n):
  return 'norm' in n or 'bias' in n


step_sched = P.lr.StepDecay(learning_rate=0.02, step_size=4, gamma=0.5)

CASES = {
  'lamb_default': (
    P.Lamb(learning_rate=0.01),
    0.01,
    k_lamb,
    [(NAMES, _lamb_cfg())],
  ),
  'lamb_exclude_clip': (
    P.Lamb(
      0.01,
      lamb_weight_decay=0.05,
      exclude_from_weight_decay_fn=_excl,
      grad_clip=P.ClipGradByGlobalNorm(2.0),
    ),
    0.01,
    k_lamb,
    [(NAMES, _lamb_cfg(wd=0.05, exclude=_excl, clip='global', clip_arg=2.0))],
  ),
  'lamb_always_adapt': (
    P.Lamb(
      0.01,
      lamb_weight_decay=0.05,
      exclude_from_weight_decay_fn=_excl,
      always_adapt=True,
    ),
    0.01,
    k_lamb,
    [(NAMES, _lamb_cfg(wd=0.05, exclude=_excl, always_adapt=True))],
  ),
  'lamb_zero_wd_schedule': (
    P.Lamb(step_sched, lamb_weight_decay=0.0, beta1=0.8, epsilon=1e-4),
    step_sched,
    k_lamb,
    [(NAMES, _lamb_cfg(wd=0.0, b1=0.8, eps=1e-4))],
  ),
  'lars': (
    P.LarsMomentum(
      0.1,
      momentum=0.9,
      lars_coeff=0.05,
      lars_weight_decay=0.01,
      exclude_from_weight_decay=['bias', 'norm'],
      epsilon=1e-3,
      rescale_grad=0.5,
      regularization=P.L2Decay(1e-3),
    ),
    0.1,
    k_lars,
    [
      (
        NAMES,
        dict(
          reg=('l2', 1e-3),
          wd=0.01,
          coeff=0.05,
          eps=1e-3,
          rescale=0.5,
          momentum=0.9,
          exclude=['bias', 'norm'],
        ),
      )
    ],
  ),
  'adam_l1_asym_clip': (
    P.Adam(
      0.01,
      weight_decay=P.L1Decay(0.01),
      grad_clip=P.ClipGradByValue(max=0.5, min=-0.3),
    ),
    0.01,
    k_adam,
    [
      (
        NAMES,
        dict(ADAM_CFG, reg=('l1', 0.01), clip='value', clip_arg=(-0.3, 0.5)),
      )
    ],
  ),
  'adam_l2_float_norm_clip': (
    P.Adam(0.01, weight_decay=0.05, grad_clip=P.ClipGradByNorm(1.0)),
    0.01,
    k_adam,
    [(NAMES, dict(ADAM_CFG, reg=('l2', 0.05), clip='norm', clip_arg=1.0))],
  ),
  'adam_groups': (
    P.Adam(
      0.01,
      weight_decay=0.01,
      grad_clip=P.ClipGradByGlobalNorm(3.0),
      parameters=[
        {
          'params': [
            'encoder.layers.0.attn.weight',
            'zero.weight',
            'frozen.weight',
          ],
          'learning_rate': 0.5,
          'weight_decay': P.L2Decay(0.05),
        },
        {
          'params': lambda n: n.startswith(('embeddings', 'pooler')),
          'beta1': 0.5,
          'grad_clip': P.ClipGradByGlobalNorm(1.0),
        },
      ],
    ),
    0.01,
    k_adam,
    [
      (
        ['encoder.layers.0.attn.weight', 'zero.weight', 'frozen.weight'],
        dict(
          ADAM_CFG, scale=0.5, reg=('l2', 0.05), clip='global', clip_arg=3.0
        ),
      ),
      (
        ['embeddings.word_embeddings.weight', 'pooler.dense.weight'],
        dict(ADAM_CFG, b1=0.5, reg=('l2', 0.01), clip='global', clip_arg=1.0),
      ),
    ],
  ),
  'adamw_decay_fn_lr_ratio': (
    P.AdamW(
      0.01,
      weight_decay=0.1,
      apply_decay_param_fun=lambda n: not _excl(n),
      lr_ratio=lambda n: 0.5 if 'encoder' in n else 1.0,
    ),
    0.01,
    k_adamw,
    [
      (
        NAMES,
        dict(
          ADAM_CFG,
          wd=0.1,
          decay=lambda n: not _excl(n),
          ratio=lambda n: 0.5 if 'encoder' in n else 1.0,
        ),
      )
    ],
  ),
  'adamwdl': (
    P.AdamWDL(
      0.01,
      weight_decay=0.1,
      layerwise_decay=0.7,
      n_layers=2,
      apply_decay_param_fun=lambda n: not _excl(n),
    ),
    0.01,
    k_adamw,
    [
      (
        NAMES,
        dict(
          ADAM_CFG,
          wd=0.1,
          decay=lambda n: not _excl(n),
          ratio=lambda n: layerwise_ref(0.7, 2, n),
        ),
      )
    ],
  ),
  'adamw_group_scale': (
    P.AdamW(
      0.01,
      weight_decay=0.1,
      parameters=[
        {'params': lambda n: 'encoder' in n, 'learning_rate': 0.3},
        {'params': lambda n: 'encoder' not in n, 'weight_decay': 0.0},
      ],
    ),
    0.01,
    k_adamw,
    [
      (
        [n for n in NAMES if 'encoder' in n],
        dict(
          ADAM_CFG, wd=0.1, scale=0.3, decay=lambda n: True, ratio=lambda n: 1.0
        ),
      ),
      (
        [n for n in NAMES if 'encoder' not in n],
        dict(ADAM_CFG, wd=0.0, decay=lambda n: True, ratio=lambda n: 1.0),
      ),
    ],
  ),
  'sgd_clip_l2': (
    P.SGD(0.1, weight_decay=P.L2Decay(0.01), grad_clip=P.ClipGradByNorm(0.5)),
    0.1,
    k_sgd,
    [(NAMES, dict(reg=('l2', 0.01), clip='norm', clip_arg=0.5))],
  ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_paddle_optimizer_vs_float64_reference(case):
  tx, lr, kernel, groups = CASES[case]
  params = make_params()
  grads = make_grads(params)
  ref = run_reference(params, grads, groups, lr, kernel)

  p = {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}
  state = tx.init(p)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for t, g in enumerate(grads):
    p, state = step(
      p, state, {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}
    )
    for n in NAMES:
      got = np.asarray(p[n], np.float64)
      want = ref[t][n]
      scale = max(np.max(np.abs(ref[-1][n])) if np.size(want) else 0, 1e-12)
      err = np.max(np.abs(got - want)) / scale if np.size(want) else 0.0
      assert err < 1e-5, f'step {t} leaf {n}: relative error {err:.2e}'
  grouped = {n for names, _ in groups for n in names}
  for n in set(NAMES) - grouped:  # Leaves in no group are frozen.
    np.testing.assert_array_equal(
      np.asarray(p[n]), params[n].astype(np.float32)
    )


def test_lamb_excluded_leaves_differ_from_optax_as_documented():
  """Paddle skips adaptation where wd == 0; optax.lamb does not."""
  params = {n: jnp.asarray(v, jnp.float32) for n, v in make_params().items()}
  g = {
    n: jnp.asarray(v, jnp.float32)
    for n, v in make_grads(make_params())[0].items()
  }
  ours = P.Lamb(
    0.01, lamb_weight_decay=0.05, exclude_from_weight_decay_fn=_excl
  )
  mask = lj.mask_by_name(lambda n: not _excl(n))
  theirs = optax.lamb(0.01, weight_decay=0.05, mask=mask)
  same = lj.lamb(0.01, weight_decay=0.05, mask=mask, trust_ratio_mask=mask)
  uo, _ = ours.update(g, ours.init(params), params)
  ut, _ = theirs.update(g, theirs.init(params), params)
  us, _ = same.update(g, same.init(params), params)
  chex.assert_trees_all_close(uo, us, rtol=1e-6)
  assert not np.allclose(
    uo['encoder.layers.0.norm.weight'], ut['encoder.layers.0.norm.weight']
  )
  np.testing.assert_allclose(
    uo['encoder.layers.0.attn.weight'],
    ut['encoder.layers.0.attn.weight'],
    rtol=1e-6,
  )


def test_get_set_lr_on_paddle_optimizers():
  p = {n: jnp.asarray(v, jnp.float32) for n, v in make_params().items()}
  tx = P.AdamW(
    0.01,
    parameters=[
      {'params': lambda n: 'encoder' in n, 'learning_rate': 0.1},
      {'params': lambda n: 'encoder' not in n},
    ],
  )
  s = tx.init(p)
  assert float(lj.get_lr(s)) == pytest.approx(0.01)  # The base rate.
  s = jax.jit(lambda s: lj.set_lr(s, 0.02))(s)
  assert float(lj.get_lr(s)) == pytest.approx(0.02)
  tx = P.Lamb(step_sched)
  s = tx.init(p)
  with pytest.raises(ValueError, match='schedule'):
    lj.set_lr(s, 0.1)


BAD = [
  (
    lambda: P.Adam(parameters=[{'params': ['scale'], 'bogus': 1}]),
    'unknown key',
  ),
  (lambda: P.Adam(parameters=[{'params': ['nope.weight']}]), 'nope.weight'),
  (
    lambda: P.Adam(parameters=[{'params': ['scale']}, {'params': ['scale']}]),
    'groups 0 and 1',
  ),
  (lambda: P.Adam(parameters=[{'learning_rate': 0.1}]), 'no "params"'),
  (lambda: P.ClipGradByGlobalNorm(-1.0), '`clip_norm`'),
  (lambda: P.ClipGradByNorm(-1.0), '`clip_norm`'),
  (lambda: P.ClipGradByValue(max=0.1, min=0.5), 'min'),
  (lambda: P.L2Decay(-1.0), 'coeff'),
  (lambda: P.Lamb(lamb_weight_decay=-0.1), 'lamb_weight_decay'),
  (lambda: P.Adam(beta1=1.5), '`beta1`'),
  (lambda: P.AdamWDL(n_layers=0), 'n_layers'),
  (lambda: P.LarsMomentum(momentum=-1.0), 'momentum'),
  (lambda: P.Adam(grad_clip='global'), 'grad_clip'),
]


@pytest.mark.parametrize('build,match', BAD, ids=[m for _, m in BAD])
def test_bad_input_raises(build, match):
  p = {n: jnp.asarray(v, jnp.float32) for n, v in make_params().items()}
  with pytest.raises(ValueError, match=match):
    build().init(p)


# --- multi precision and lazy mode ------------------------------------------


@pytest.mark.parametrize(
  'make',
  [
    lambda mp: P.Lamb(0.01, multi_precision=mp),
    lambda mp: P.AdamW(0.01, multi_precision=mp),
    lambda mp: P.LarsMomentum(0.1, multi_precision=mp),
    lambda mp: P.Adam(0.01, multi_precision=mp),
  ],
  ids=['lamb', 'adamw', 'lars', 'adam'],
)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_multi_precision_master_equals_float32_run(make, dtype):
  params32 = {n: jnp.asarray(v, jnp.float32) for n, v in make_params().items()}
  grads = make_grads(make_params())
  low = jax.tree.map(lambda x: x.astype(dtype), params32)
  tx, ref = make(True), make(False)
  s = tx.init(low)
  # The float32 reference run starts from the same (rounded) values.
  p_ref = jax.tree.map(lambda x: x.astype(jnp.float32), low)
  s_ref = ref.init(p_ref)
  step = jax.jit(tx.update)
  ref_step = jax.jit(ref.update)
  for g in grads:
    g_low = {n: jnp.asarray(v, dtype) for n, v in g.items()}
    u, s = step(g_low, s, low)
    low = optax.apply_updates(low, u)
    g32 = jax.tree.map(lambda x: x.astype(jnp.float32), g_low)
    u_ref, s_ref = ref_step(g32, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u_ref)
    chex.assert_trees_all_equal(
      low, jax.tree.map(lambda m: m.astype(dtype), s.master)
    )
    chex.assert_trees_all_close(s.master, p_ref, rtol=1e-6, atol=1e-7)
  assert all(x.dtype == dtype for x in jax.tree.leaves(low))
  for x in jax.tree.leaves(s.inner_state):
    assert x.dtype in (jnp.float32, jnp.int32)


@pytest.mark.parametrize(
  'make',
  [
    lambda lazy: P.Adam(0.05, lazy_mode=lazy),
    lambda lazy: P.AdamW(0.05, lazy_mode=lazy),
    lambda lazy: P.AdamWDL(0.05, lazy_mode=lazy, n_layers=2),
    lambda lazy: (
      lj.lazy_rows(lj.lamb(0.05, weight_decay=0.01))
      if lazy
      else lj.lamb(0.05, weight_decay=0.01)
    ),
  ],
  ids=['adam', 'adamw', 'adamwdl', 'lamb'],
)
def test_lazy_mode_keeps_rows_without_gradient(make):
  # Rows 5:10 get gradients for two steps and none after. From then on a
  # lazy step must leave their params and moments exactly as they were,
  # while the dense step keeps moving them with decaying moments.
  rng = np.random.default_rng(0)
  params = {
    'embeddings.weight': jnp.asarray(rng.normal(size=(12, 4)), jnp.float32),
    'head.weight': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
  }
  tx, dense = make(True), make(False)
  s, sd = tx.init(params), dense.init(params)
  p, pd = params, params
  step, step_dense = jax.jit(tx.update), jax.jit(dense.update)

  def rows(tree):
    return [
      np.asarray(x)[5:10]
      for x in jax.tree.leaves(tree)
      if np.shape(x) == (12, 4)
    ]

  for t in range(6):
    g = {
      'embeddings.weight': rng.normal(size=(12, 4)),
      'head.weight': rng.normal(size=(4, 3)),
    }
    if t >= 2:
      g['embeddings.weight'][5:10] = 0.0
    g = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}
    u, s = step(g, s, p)
    ud, sd = step_dense(g, sd, pd)
    if t < 2:
      # With no all-zero rows, lazy equals dense.
      chex.assert_trees_all_close(u, ud, rtol=1e-6, atol=1e-8)
    p, pd = optax.apply_updates(p, u), optax.apply_updates(pd, ud)
    if t == 1:
      kept_p, kept_s, kept_sd = rows(p), rows(s), rows(sd)
      emb = np.asarray(p['embeddings.weight'])
  assert kept_s and all(np.any(x) for x in kept_s)
  for now, then in zip(rows(p) + rows(s), kept_p + kept_s, strict=True):
    np.testing.assert_array_equal(now, then)
  # The dense step does move those rows: the check above can fail.
  assert not np.allclose(rows(pd)[0], kept_p[0])
  assert all(
    not np.allclose(now, then)
    for now, then in zip(rows(sd), kept_sd, strict=True)
  )
  # Rows with gradients keep moving.
  assert not np.allclose(np.asarray(p['embeddings.weight'])[:5], emb[:5])
