"""Paddle's learning-rate schedulers as pure schedules.

``lj.paddle.lr.StepDecay(learning_rate=0.1, step_size=30)`` returns a
function ``count -> lr`` whose value at ``count = k`` is Paddle's
``scheduler()`` after ``k`` calls of ``scheduler.step()``. The keywords are
Paddle's (and PaddleNLP's for ``InverseSquareRootSchedule``); ``last_epoch``
shifts the count as in Paddle (``-1``: start at epoch 0) and ``verbose`` is
accepted and ignored.

Examples:
  >>> import lambjax as lj
  >>> sched = lj.paddle.lr.LinearWarmup(
  ...     learning_rate=lj.paddle.lr.PolynomialDecay(1.0, decay_steps=10),
  ...     warmup_steps=2, start_lr=0.0, end_lr=1.0)
  >>> [round(float(sched(k)), 4) for k in (0, 1, 2, 7)]
  [0.0, 0.5, 1.0, 0.5]
"""

from __future__ import annotations

from collections.abc import Callable as _Callable
from typing import Any as _Any

from lambjax._src import schedules as _s

__all__ = [
  'CosineAnnealingDecay',
  'ExponentialDecay',
  'InverseSquareRootSchedule',
  'InverseTimeDecay',
  'LinearWarmup',
  'MultiStepDecay',
  'NaturalExpDecay',
  'NoamDecay',
  'OneCycleLR',
  'PiecewiseDecay',
  'PolynomialDecay',
  'StepDecay',
]


def _shifted(schedule: _Callable, last_epoch: int) -> _Callable:
  if (
    isinstance(last_epoch, bool)
    or not isinstance(last_epoch, int)
    or (last_epoch < -1)
  ):
    raise ValueError(
      f'paddle.lr: `last_epoch` must be an int >= -1, got {last_epoch!r}.'
    )
  if last_epoch == -1:
    return schedule
  return lambda count: schedule(count + last_epoch + 1)


def StepDecay(
  learning_rate, step_size, gamma=0.1, last_epoch=-1, verbose=False
) -> _Callable[[_Any], _Any]:
  """Paddle ``StepDecay``: ``lr * gamma ** (k // step_size)``."""
  del verbose
  return _shifted(_s.step_decay(learning_rate, step_size, gamma), last_epoch)


def MultiStepDecay(
  learning_rate, milestones, gamma=0.1, last_epoch=-1, verbose=False
):
  """Paddle ``MultiStepDecay``: ``lr * gamma ** #{milestones <= k}``."""
  del verbose
  return _shifted(
    _s.multi_step_decay(learning_rate, milestones, gamma), last_epoch
  )


def PiecewiseDecay(boundaries, values, last_epoch=-1, verbose=False):
  """Paddle ``PiecewiseDecay``: ``values[#{boundaries <= k}]``."""
  del verbose
  return _shifted(_s.piecewise_decay(boundaries, values), last_epoch)


def NoamDecay(
  d_model, warmup_steps, last_epoch=-1, verbose=False, learning_rate=1.0
):
  """Paddle ``NoamDecay`` (0 at step 0)."""
  del verbose
  return _shifted(
    _s.noam_decay(d_model, warmup_steps, learning_rate), last_epoch
  )


def LinearWarmup(
  learning_rate, warmup_steps, start_lr, end_lr, last_epoch=-1, verbose=False
):
  """Paddle ``LinearWarmup`` over a float or another of these schedules."""
  del verbose
  return _shifted(
    _s.linear_warmup(learning_rate, warmup_steps, start_lr, end_lr), last_epoch
  )


def CosineAnnealingDecay(
  learning_rate, T_max, eta_min=0, last_epoch=-1, verbose=False
):
  """Paddle ``CosineAnnealingDecay`` (periodic, period ``2 * T_max``)."""
  del verbose
  return _shifted(
    _s.cosine_annealing(learning_rate, T_max, eta_min), last_epoch
  )


def PolynomialDecay(
  learning_rate,
  decay_steps,
  end_lr=0.0001,
  power=1.0,
  cycle=False,
  last_epoch=-1,
  verbose=False,
):
  """Paddle ``PolynomialDecay`` (with ``cycle``)."""
  del verbose
  return _shifted(
    _s.polynomial_decay(learning_rate, decay_steps, end_lr, power, cycle),
    last_epoch,
  )


def ExponentialDecay(learning_rate, gamma, last_epoch=-1, verbose=False):
  """Paddle ``ExponentialDecay``: ``lr * gamma ** k``."""
  del verbose
  return _shifted(_s.exponential_decay(learning_rate, gamma), last_epoch)


def InverseTimeDecay(learning_rate, gamma, last_epoch=-1, verbose=False):
  """Paddle ``InverseTimeDecay``: ``lr / (1 + gamma * k)``."""
  del verbose
  return _shifted(_s.inverse_time_decay(learning_rate, gamma), last_epoch)


def NaturalExpDecay(learning_rate, gamma, last_epoch=-1, verbose=False):
  """Paddle ``NaturalExpDecay``: ``lr * exp(-gamma * k)``."""
  del verbose
  return _shifted(_s.natural_exp_decay(learning_rate, gamma), last_epoch)


def OneCycleLR(
  max_learning_rate,
  total_steps,
  divide_factor=25.0,
  end_learning_rate=0.0001,
  phase_pct=0.3,
  anneal_strategy='cos',
  three_phase=False,
  last_epoch=-1,
  verbose=False,
):
  """Paddle ``OneCycleLR`` (phase ends ``pct*T - 1`` and ``T - 1``)."""
  del verbose
  return _shifted(
    _s.one_cycle(
      max_learning_rate,
      total_steps,
      divide_factor,
      end_learning_rate,
      phase_pct,
      anneal_strategy,
      three_phase,
    ),
    last_epoch,
  )


def InverseSquareRootSchedule(
  warmup_steps, learning_rate=1.0, last_epoch=-1, verbose=False
):
  """PaddleNLP ``InverseSquareRootSchedule``."""
  del verbose
  return _shifted(
    _s.inverse_square_root(warmup_steps, learning_rate), last_epoch
  )
