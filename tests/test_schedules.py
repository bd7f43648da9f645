"""Schedules vs float64 Python implementations of paddle-semantics.md s.6."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lambjax as lj

S = lj.schedules
P = lj.paddle.lr

# --- float64 references, written from the spec's table --------------------


def ref_noam(k, d, w, lr=1.0):
  a = 1.0 if k == 0 else k**-0.5
  return lr * d**-0.5 * min(a, w**-1.5 * k)


def ref_poly(k, lr, D, end, power, cycle):
  if cycle:
    Dp = D if k == 0 else D * math.ceil(k / D)
    return (lr - end) * (1 - k / Dp) ** power + end
  return (lr - end) * (1 - min(k, D) / D) ** power + end


def ref_onecycle(
  k, mx, T, div=25.0, end=1e-4, pct=0.3, strat='cos', three=False
):
  init = mx / div
  if three:
    steps = [0, pct * T - 1, 2 * pct * T - 2, T - 1]
    lrs = [init, mx, init, end]
  else:
    steps = [0, pct * T - 1, T - 1]
    lrs = [init, mx, end]
  for i in range(len(steps) - 1):  # Paddle's loop over phases.
    if k <= steps[i + 1] or i == len(lrs) - 2:
      frac = (k - steps[i]) / (steps[i + 1] - steps[i])
      s0, s1 = lrs[i], lrs[i + 1]
      if strat == 'cos':
        return s1 + (s0 - s1) / 2 * (math.cos(math.pi * frac) + 1)
      return (s1 - s0) * frac + s0
  raise AssertionError


def ref_isqrt(k, w, lr=1.0):
  return k * lr / w if k < w else lr * math.sqrt(w) / math.sqrt(k)


def ref_cos(k, lr, T, eta=0.0):
  return eta + (lr - eta) * (1 + math.cos(math.pi * k / T)) / 2


CASES = [
  ('step', S.step_decay(0.5, 3, 0.7), lambda k: 0.5 * 0.7 ** (k // 3)),
  (
    'step_paddle',
    P.StepDecay(learning_rate=0.5, step_size=3, gamma=0.7),
    lambda k: 0.5 * 0.7 ** (k // 3),
  ),
  (
    'multistep',
    P.MultiStepDecay(0.5, milestones=[2, 5, 9], gamma=0.5),
    lambda k: 0.5 * 0.5 ** sum(m <= k for m in (2, 5, 9)),
  ),
  (
    'piecewise',
    P.PiecewiseDecay(boundaries=[3, 6], values=[1.0, 0.5, 0.1]),
    lambda k: [1.0, 0.5, 0.1][sum(b <= k for b in (3, 6))],
  ),
  (
    'noam',
    P.NoamDecay(d_model=64, warmup_steps=10, learning_rate=2.0),
    lambda k: ref_noam(k, 64, 10, 2.0),
  ),
  ('noam_w0', S.noam_decay(64, 0), lambda k: 64**-0.5 * max(k, 1) ** -0.5),
  (
    'warmup_const',
    P.LinearWarmup(0.3, warmup_steps=5, start_lr=0.0, end_lr=0.6),
    lambda k: 0.6 * k / 5 if k < 5 else 0.3,
  ),
  (
    'warmup_cosine',
    P.LinearWarmup(
      P.CosineAnnealingDecay(learning_rate=0.4, T_max=7, eta_min=0.01),
      warmup_steps=4,
      start_lr=0.1,
      end_lr=0.4,
    ),
    lambda k: 0.1 + 0.3 * k / 4 if k < 4 else ref_cos(k - 4, 0.4, 7, 0.01),
  ),
  (
    'warmup_w0',
    S.linear_warmup(S.exponential_decay(1.0, 0.9), 0, 0.0, 1.0),
    lambda k: 0.9**k,
  ),
  (
    'cosine_periodic',
    P.CosineAnnealingDecay(1.0, T_max=10, eta_min=0.1),
    lambda k: ref_cos(k, 1.0, 10, 0.1),
  ),
  (
    'poly',
    P.PolynomialDecay(1.0, decay_steps=10, end_lr=0.01, power=2.0),
    lambda k: ref_poly(k, 1.0, 10, 0.01, 2.0, False),
  ),
  (
    'poly_cycle',
    P.PolynomialDecay(1.0, 7, end_lr=0.01, power=1.5, cycle=True),
    lambda k: ref_poly(k, 1.0, 7, 0.01, 1.5, True),
  ),
  ('exp', P.ExponentialDecay(1.0, gamma=0.9), lambda k: 0.9**k),
  ('inv_time', P.InverseTimeDecay(1.0, gamma=0.5), lambda k: 1 / (1 + 0.5 * k)),
  ('nat_exp', P.NaturalExpDecay(1.0, gamma=0.1), lambda k: math.exp(-0.1 * k)),
  (
    'onecycle_cos',
    P.OneCycleLR(max_learning_rate=1.0, total_steps=40),
    lambda k: ref_onecycle(k, 1.0, 40),
  ),
  (
    'onecycle_lin3',
    P.OneCycleLR(
      0.5,
      40,
      divide_factor=10.0,
      end_learning_rate=1e-3,
      phase_pct=0.25,
      anneal_strategy='linear',
      three_phase=True,
    ),
    lambda k: ref_onecycle(k, 0.5, 40, 10.0, 1e-3, 0.25, 'linear', True),
  ),
  (
    'isqrt',
    P.InverseSquareRootSchedule(warmup_steps=6, learning_rate=0.5),
    lambda k: ref_isqrt(k, 6, 0.5),
  ),
  (
    'isqrt_w0',
    S.inverse_square_root(0, 0.5),
    lambda k: 0.5 / math.sqrt(max(k, 1)),
  ),
  (
    'last_epoch',
    P.StepDecay(0.5, 3, 0.7, last_epoch=4),
    lambda k: 0.5 * 0.7 ** ((k + 5) // 3),
  ),
]


@pytest.mark.parametrize(
  'schedule,ref', [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_schedule_vs_reference_under_jit(schedule, ref):
  ks = np.arange(41)
  got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(ks)))
  want = np.array([ref(int(k)) for k in ks])
  # float32 vs float64: relative, plus an absolute floor of 2e-7 of the
  # schedule's peak (cos near its minimum loses relative precision).
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7 * want.max())
  assert np.all(np.isfinite(got))
  # Python ints work too (not only traced counts).
  assert float(schedule(3)) == pytest.approx(ref(3), rel=2e-6, abs=1e-9)


def test_paddle_edges():
  assert float(P.NoamDecay(512, 4000)(0)) == 0.0
  cos = P.CosineAnnealingDecay(1.0, T_max=10)
  assert float(cos(10)) == pytest.approx(0.0, abs=1e-7)
  assert float(cos(20)) == pytest.approx(1.0)  # Periodic: rises again.
  oc = P.OneCycleLR(1.0, total_steps=10, phase_pct=0.3)
  assert float(oc(2)) == pytest.approx(1.0)  # Peak at pct*T - 1 = 2.
  assert float(oc(9)) == pytest.approx(1e-4)  # End at T - 1 = 9.


def test_same_as_optax_where_the_maths_is_the_same():
  ks = jnp.arange(30)
  pairs = [
    (
      S.step_decay(0.5, 3, 0.7),
      optax.exponential_decay(0.5, 3, 0.7, staircase=True),
    ),
    (
      S.polynomial_decay(1.0, 10, 0.01, 2.0),
      optax.polynomial_schedule(1.0, 0.01, 2.0, 10),
    ),
    (S.exponential_decay(1.0, 0.9), optax.exponential_decay(1.0, 1, 0.9)),
  ]
  for ours, theirs in pairs:
    np.testing.assert_allclose(
      np.asarray(jax.vmap(ours)(ks)),
      np.asarray(jax.vmap(theirs)(ks)),
      rtol=2e-6,
    )


def test_schedule_drives_an_optimizer_and_get_lr_follows_it():
  sched = P.LinearWarmup(P.PolynomialDecay(0.1, 10), 3, 0.0, 0.1)
  tx = lj.lamb(sched)
  p = {'w': jnp.ones(3)}
  state = tx.init(p)
  step = jax.jit(tx.update)
  for k in range(6):
    assert float(lj.get_lr(state)) == pytest.approx(float(sched(k)))
    _, state = step(p, state, p)


BAD = [
  (S.step_decay, dict(learning_rate=0.1, step_size=0), 'step_size'),
  (S.step_decay, dict(learning_rate=-0.1, step_size=2), 'learning_rate'),
  (
    S.multi_step_decay,
    dict(learning_rate=0.1, milestones=[5, 2]),
    'milestones',
  ),
  (S.piecewise_decay, dict(boundaries=[1, 2], values=[0.1]), 'values'),
  (S.noam_decay, dict(d_model=0, warmup_steps=2), 'd_model'),
  (S.noam_decay, dict(d_model=8, warmup_steps=-1), 'warmup_steps'),
  (
    S.linear_warmup,
    dict(learning_rate=0.1, warmup_steps=2.5, start_lr=0, end_lr=0.1),
    'warmup_steps',
  ),
  (S.cosine_annealing, dict(learning_rate=0.1, T_max=0), 'T_max'),
  (S.polynomial_decay, dict(learning_rate=0.1, decay_steps=0), 'decay_steps'),
  (S.exponential_decay, dict(learning_rate=0.1, gamma=-1.0), 'gamma'),
  (
    S.one_cycle,
    dict(max_learning_rate=0.1, total_steps=10, phase_pct=1.5),
    'phase_pct',
  ),
  (
    S.one_cycle,
    dict(max_learning_rate=0.1, total_steps=10, anneal_strategy='exp'),
    'anneal_strategy',
  ),
  (
    S.one_cycle,
    dict(max_learning_rate=0.1, total_steps=2, phase_pct=0.1),
    'total_steps',
  ),
  (S.inverse_square_root, dict(warmup_steps=-3), 'warmup_steps'),
  (
    P.StepDecay,
    dict(learning_rate=0.1, step_size=2, last_epoch=-5),
    'last_epoch',
  ),
]


@pytest.mark.parametrize(
  'fn,kwargs,arg', BAD, ids=[f'{f.__name__}-{a}' for f, _, a in BAD]
)
def test_bad_arguments_raise(fn, kwargs, arg):
  with pytest.raises(ValueError, match=f'`{arg}`'):
    fn(**kwargs)
