"""Learning-rate schedules (optax-style names, Paddle's formulas).

Each returns a pure ``count -> lr`` function usable as ``learning_rate`` of
any lambjax or optax optimizer. See :mod:`lambjax.paddle.lr` for the same
schedules under Paddle's class names and keywords.
"""

from lambjax._src.schedules import cosine_annealing as cosine_annealing
from lambjax._src.schedules import exponential_decay as exponential_decay
from lambjax._src.schedules import inverse_square_root as inverse_square_root
from lambjax._src.schedules import inverse_time_decay as inverse_time_decay
from lambjax._src.schedules import linear_warmup as linear_warmup
from lambjax._src.schedules import multi_step_decay as multi_step_decay
from lambjax._src.schedules import natural_exp_decay as natural_exp_decay
from lambjax._src.schedules import noam_decay as noam_decay
from lambjax._src.schedules import one_cycle as one_cycle
from lambjax._src.schedules import piecewise_decay as piecewise_decay
from lambjax._src.schedules import polynomial_decay as polynomial_decay
from lambjax._src.schedules import step_decay as step_decay
