"""Learning-rate schedules with PaddlePaddle's formulas, as pure functions.

Each factory validates its arguments eagerly (``ValueError`` naming the
argument) and returns ``count -> lr``: a pure, jit-safe function of the
update count (``0`` for the first update; traced counts welcome) whose value
at ``count = k`` is Paddle's ``scheduler()`` after ``k`` calls of
``scheduler.step()``. See ``paddle-semantics.md`` section 6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from lambjax._src import base

Schedule = Callable[[Any], Any]


def _k(count) -> jnp.ndarray:
  return jnp.asarray(count, jnp.float32)


def _positive_int(where: str, arg: str, value: Any, *, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f'{where}: `{arg}` must be an int, got {value!r}.')
  if value < 0 or (value == 0 and not allow_zero):
    want = '>= 0' if allow_zero else '>= 1'
    raise ValueError(f'{where}: `{arg}` must be {want}, got {value!r}.')


def _lr(where: str, value: Any, arg: str = 'learning_rate') -> None:
  base.check_number(where, arg, value, lo=0.0)


def step_decay(
  learning_rate: float, step_size: int, gamma: float = 0.1
) -> Schedule:
  """``lr * gamma ** (k // step_size)`` (Paddle's ``StepDecay``).

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.step_decay(1.0, step_size=2, gamma=0.5)
    >>> [float(s(k)) for k in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
  """
  _lr('step_decay', learning_rate)
  _positive_int('step_decay', 'step_size', step_size)
  base.check_number('step_decay', 'gamma', gamma, lo=0.0)
  return lambda count: (
    learning_rate
    * gamma
    ** jnp.floor_divide(jnp.asarray(count, jnp.int32), step_size).astype(
      jnp.float32
    )
  )


def multi_step_decay(
  learning_rate: float, milestones: Sequence[int], gamma: float = 0.1
) -> Schedule:
  """``lr * gamma ** #{m in milestones : m <= k}`` (``MultiStepDecay``).

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.multi_step_decay(1.0, [1, 3], gamma=0.1)
    >>> [round(float(s(k)), 4) for k in range(4)]
    [1.0, 0.1, 0.1, 0.01]
  """
  where = 'multi_step_decay'
  _lr(where, learning_rate)
  base.check_number(where, 'gamma', gamma, lo=0.0)
  ms = list(milestones)
  if not all(isinstance(m, int) and not isinstance(m, bool) for m in ms) or (
    ms != sorted(set(ms))
  ):
    raise ValueError(
      f'{where}: `milestones` must be increasing ints, got {milestones!r}.'
    )
  arr = jnp.asarray(ms, jnp.int32)
  return lambda count: (
    learning_rate
    * gamma ** jnp.sum(arr <= jnp.asarray(count, jnp.int32)).astype(jnp.float32)
  )


def piecewise_decay(
  boundaries: Sequence[int], values: Sequence[float]
) -> Schedule:
  """``values[#{b in boundaries : b <= k}]`` (``PiecewiseDecay``).

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.piecewise_decay([2, 4], [0.1, 0.01, 0.001])
    >>> [float(s(k)) for k in (0, 2, 4)]
    [0.1, 0.01, 0.001]
  """
  where = 'piecewise_decay'
  bs, vs = list(boundaries), list(values)
  if len(vs) != len(bs) + 1:
    raise ValueError(
      f'{where}: `values` must have len(boundaries) + 1 = {len(bs) + 1} '
      f'entries, got {len(vs)}.'
    )
  if bs != sorted(bs):
    raise ValueError(
      f'{where}: `boundaries` must be increasing, got {boundaries!r}.'
    )
  for v in vs:
    base.check_number(where, 'values', v, lo=0.0)
  b = jnp.asarray(bs, jnp.int32)
  v = jnp.asarray(vs, jnp.float32)
  return lambda count: v[jnp.sum(b <= jnp.asarray(count, jnp.int32))]


def noam_decay(
  d_model: float, warmup_steps: int, learning_rate: float = 1.0
) -> Schedule:
  r"""``lr * d_model**-0.5 * min(k**-0.5, warmup**-1.5 * k)`` (``NoamDecay``).

  ``k ** -0.5`` is taken as 1 at ``k = 0``, so the value at 0 is 0 (Paddle).
  With ``warmup_steps=0`` there is no warmup: the value is
  ``lr * d_model**-0.5 * max(k, 1)**-0.5``.

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.noam_decay(d_model=16, warmup_steps=4)
    >>> [round(float(s(k)), 4) for k in (0, 2, 4, 16)]
    [0.0, 0.0625, 0.125, 0.0625]
  """
  where = 'noam_decay'
  base.check_number(where, 'd_model', d_model, lo=0.0, lo_open=True)
  _positive_int(where, 'warmup_steps', warmup_steps, allow_zero=True)
  _lr(where, learning_rate)
  scale = learning_rate * d_model**-0.5

  def schedule(count):
    k = _k(count)
    decay = jnp.where(k == 0, 1.0, 1.0 / jnp.sqrt(jnp.maximum(k, 1.0)))
    if warmup_steps == 0:
      return scale * decay
    return scale * jnp.minimum(decay, warmup_steps**-1.5 * k)

  return schedule


def linear_warmup(
  learning_rate: float | Schedule,
  warmup_steps: int,
  start_lr: float,
  end_lr: float,
) -> Schedule:
  """Linear warmup then a constant or another schedule (``LinearWarmup``).

  ``start_lr + (end_lr - start_lr) * k / warmup_steps`` for
  ``k < warmup_steps``; afterwards ``learning_rate`` if it is a number, or
  ``learning_rate(k - warmup_steps)`` if it is a schedule (Paddle steps the
  inner scheduler with epoch ``k - warmup_steps``). ``warmup_steps=0`` means
  no warmup.

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.linear_warmup(0.5, warmup_steps=4, start_lr=0.0,
    ...                                end_lr=1.0)
    >>> [float(s(k)) for k in range(6)]
    [0.0, 0.25, 0.5, 0.75, 0.5, 0.5]
  """
  where = 'linear_warmup'
  if not callable(learning_rate):
    _lr(where, learning_rate)
  _positive_int(where, 'warmup_steps', warmup_steps, allow_zero=True)
  base.check_number(where, 'start_lr', start_lr, lo=0.0)
  base.check_number(where, 'end_lr', end_lr, lo=0.0)

  def after(count):
    if callable(learning_rate):
      rest = jnp.maximum(jnp.asarray(count, jnp.int32) - warmup_steps, 0)
      return jnp.asarray(learning_rate(rest), jnp.float32)
    return jnp.asarray(learning_rate, jnp.float32)

  def schedule(count):
    if warmup_steps == 0:
      return after(count)
    k = _k(count)
    warm = start_lr + (end_lr - start_lr) * k / warmup_steps
    return jnp.where(k < warmup_steps, warm, after(count))

  return schedule


def cosine_annealing(
  learning_rate: float, T_max: int, eta_min: float = 0.0
) -> Schedule:
  r"""``eta_min + (lr - eta_min) * (1 + cos(pi * k / T_max)) / 2``.

  Paddle's ``CosineAnnealingDecay``: periodic, so it rises again after
  ``T_max`` (period ``2 * T_max``), unlike ``optax.cosine_decay_schedule``.

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.cosine_annealing(1.0, T_max=2)
    >>> [round(float(s(k)), 4) for k in range(5)]
    [1.0, 0.5, 0.0, 0.5, 1.0]
  """
  where = 'cosine_annealing'
  _lr(where, learning_rate)
  _positive_int(where, 'T_max', T_max)
  base.check_number(where, 'eta_min', eta_min, lo=0.0)

  def schedule(count):
    # Reduce modulo the period first: exact, and keeps float32 accurate for
    # large counts.
    k = _k(jnp.mod(jnp.asarray(count), 2 * T_max))
    return eta_min + (learning_rate - eta_min) * 0.5 * (
      1.0 + jnp.cos(math.pi * k / T_max)
    )

  return schedule


def polynomial_decay(
  learning_rate: float,
  decay_steps: int,
  end_lr: float = 0.0001,
  power: float = 1.0,
  cycle: bool = False,
) -> Schedule:
  r"""``(lr - end_lr) * (1 - k / D) ** power + end_lr`` (``PolynomialDecay``).

  Without ``cycle``, ``k`` is clamped to ``D = decay_steps``. With
  ``cycle``, ``D`` becomes ``D * ceil(k / D)`` (``D`` at ``k = 0``), so the
  decay restarts from ``lr`` at every multiple of ``decay_steps``.

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.polynomial_decay(1.0, decay_steps=2, end_lr=0.0)
    >>> [float(s(k)) for k in range(4)]
    [1.0, 0.5, 0.0, 0.0]
    >>> s = lj.schedules.polynomial_decay(1.0, 2, end_lr=0.0, cycle=True)
    >>> [float(s(k)) for k in range(4)]
    [1.0, 0.5, 0.0, 0.25]
  """
  where = 'polynomial_decay'
  _lr(where, learning_rate)
  _positive_int(where, 'decay_steps', decay_steps)
  base.check_number(where, 'end_lr', end_lr, lo=0.0)
  base.check_number(where, 'power', power, lo=0.0)

  def schedule(count):
    k = _k(count)
    if cycle:
      c = jnp.asarray(count)
      if jnp.issubdtype(c.dtype, jnp.integer):  # Exact ceil(k / D).
        n = (c + decay_steps - 1) // decay_steps
      else:
        n = jnp.ceil(k / decay_steps)
      d = decay_steps * jnp.maximum(n, 1).astype(jnp.float32)
    else:
      d = float(decay_steps)
      k = jnp.minimum(k, d)
    return (learning_rate - end_lr) * (1.0 - k / d) ** power + end_lr

  return schedule


def exponential_decay(learning_rate: float, gamma: float) -> Schedule:
  """``lr * gamma ** k`` (``ExponentialDecay``).

  Examples:
    >>> import lambjax as lj
    >>> float(lj.schedules.exponential_decay(1.0, 0.5)(3))
    0.125
  """
  _lr('exponential_decay', learning_rate)
  base.check_number('exponential_decay', 'gamma', gamma, lo=0.0)
  return lambda count: learning_rate * gamma ** _k(count)


def inverse_time_decay(learning_rate: float, gamma: float) -> Schedule:
  """``lr / (1 + gamma * k)`` (``InverseTimeDecay``).

  Examples:
    >>> import lambjax as lj
    >>> float(lj.schedules.inverse_time_decay(1.0, 0.5)(2))
    0.5
  """
  _lr('inverse_time_decay', learning_rate)
  base.check_number('inverse_time_decay', 'gamma', gamma, lo=0.0)
  return lambda count: learning_rate / (1.0 + gamma * _k(count))


def natural_exp_decay(learning_rate: float, gamma: float) -> Schedule:
  """``lr * exp(-gamma * k)`` (``NaturalExpDecay``).

  Examples:
    >>> import lambjax as lj
    >>> round(float(lj.schedules.natural_exp_decay(1.0, 1.0)(1)), 6)
    0.367879
  """
  _lr('natural_exp_decay', learning_rate)
  base.check_number('natural_exp_decay', 'gamma', gamma, lo=0.0)
  return lambda count: learning_rate * jnp.exp(-gamma * _k(count))


def one_cycle(
  max_learning_rate: float,
  total_steps: int,
  divide_factor: float = 25.0,
  end_learning_rate: float = 0.0001,
  phase_pct: float = 0.3,
  anneal_strategy: str = 'cos',
  three_phase: bool = False,
) -> Schedule:
  r"""The one-cycle policy with Paddle's phase ends (``OneCycleLR``).

  Starts at ``max_learning_rate / divide_factor``, anneals up to
  ``max_learning_rate`` by step ``phase_pct * T - 1``, then down to
  ``end_learning_rate`` (absolute) at ``T - 1``; with ``three_phase`` the
  phases end at ``pct*T - 1``, ``2*pct*T - 2`` and ``T - 1`` through
  ``[init, max, init, end]``. In phase ``i``,
  ``frac = (k - start_i) / (end_i - start_i)`` and the anneal is
  ``s1 + (s0 - s1) * (1 + cos(pi * frac)) / 2`` (``'cos'``) or linear.
  Paddle raises past ``total_steps``; here counts are clamped to
  ``total_steps`` (jit-safe).

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.one_cycle(1.0, total_steps=11, divide_factor=10.0,
    ...                            end_learning_rate=0.0, phase_pct=0.5,
    ...                            anneal_strategy='linear')
    >>> [round(float(s(k)), 3) for k in (0, 2, 4.5, 10)]
    [0.1, 0.5, 1.0, 0.0]
  """
  where = 'one_cycle'
  base.check_number(where, 'max_learning_rate', max_learning_rate, lo=0.0)
  _positive_int(where, 'total_steps', total_steps)
  base.check_number(where, 'divide_factor', divide_factor, lo=0.0, lo_open=True)
  base.check_number(where, 'end_learning_rate', end_learning_rate, lo=0.0)
  base.check_number(
    where, 'phase_pct', phase_pct, lo=0.0, hi=1.0, lo_open=True, hi_open=True
  )
  if anneal_strategy not in ('cos', 'linear'):
    raise ValueError(
      f"{where}: `anneal_strategy` must be 'cos' or 'linear', got "
      f'{anneal_strategy!r}.'
    )
  init = max_learning_rate / divide_factor
  if three_phase:
    ends = [
      0.0,
      phase_pct * total_steps - 1,
      2 * phase_pct * total_steps - 2,
      total_steps - 1.0,
    ]
    lrs = [init, max_learning_rate, init, end_learning_rate]
  else:
    ends = [0.0, phase_pct * total_steps - 1, total_steps - 1.0]
    lrs = [init, max_learning_rate, end_learning_rate]
  for i in range(1, len(ends)):
    if not ends[i] > ends[i - 1]:
      raise ValueError(
        f'{where}: `total_steps` ({total_steps}) is too small for '
        f'`phase_pct` ({phase_pct}): phase {i} would be empty.'
      )

  def anneal(start, end, frac):
    if anneal_strategy == 'cos':
      return end + (start - end) / 2.0 * (jnp.cos(math.pi * frac) + 1.0)
    return (end - start) * frac + start

  def schedule(count):
    k = jnp.minimum(_k(count), float(total_steps))
    out = anneal(lrs[-2], lrs[-1], (k - ends[-2]) / (ends[-1] - ends[-2]))
    # Earlier phases take precedence: phase i covers k <= ends[i + 1].
    for i in reversed(range(len(ends) - 2)):
      val = anneal(lrs[i], lrs[i + 1], (k - ends[i]) / (ends[i + 1] - ends[i]))
      out = jnp.where(k <= ends[i + 1], val, out)
    return out

  return schedule


def inverse_square_root(
  warmup_steps: int, learning_rate: float = 1.0
) -> Schedule:
  r"""PaddleNLP's ``InverseSquareRootSchedule``.

  ``k * lr / warmup`` for ``k < warmup`` (0 at ``k = 0``), then
  ``lr * sqrt(warmup) / sqrt(k)``. With ``warmup_steps=0`` (where that
  formula is 0 or 0/0) there is no warmup and the value is
  ``lr / sqrt(max(k, 1))``.

  Examples:
    >>> import lambjax as lj
    >>> s = lj.schedules.inverse_square_root(warmup_steps=4)
    >>> [float(s(k)) for k in (0, 2, 4, 16)]
    [0.0, 0.5, 1.0, 0.5]
  """
  where = 'inverse_square_root'
  _positive_int(where, 'warmup_steps', warmup_steps, allow_zero=True)
  _lr(where, learning_rate)

  def schedule(count):
    k = _k(count)
    if warmup_steps == 0:
      return learning_rate / jnp.sqrt(jnp.maximum(k, 1.0))
    decay = (
      learning_rate * math.sqrt(warmup_steps) / jnp.sqrt(jnp.maximum(k, 1.0))
    )
    return jnp.where(k < warmup_steps, k * learning_rate / warmup_steps, decay)

  return schedule
