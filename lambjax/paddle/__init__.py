"""PaddlePaddle-faithful optimizers, clipping, regularizers and schedulers.

Paddle's argument names, order and defaults; the exact rules of
paddlepaddle 3.3.1 (see the project's paddle-semantics reference).
"""

from lambjax._src.paddle import SGD as SGD
from lambjax._src.paddle import Adam as Adam
from lambjax._src.paddle import AdamW as AdamW
from lambjax._src.paddle import AdamWDL as AdamWDL
from lambjax._src.paddle import ClipGradByGlobalNorm as ClipGradByGlobalNorm
from lambjax._src.paddle import ClipGradByNorm as ClipGradByNorm
from lambjax._src.paddle import ClipGradByValue as ClipGradByValue
from lambjax._src.paddle import L1Decay as L1Decay
from lambjax._src.paddle import L2Decay as L2Decay
from lambjax._src.paddle import Lamb as Lamb
from lambjax._src.paddle import LarsMomentum as LarsMomentum
from lambjax._src.paddle import layerwise_lr_decay as layerwise_lr_decay
from lambjax.paddle import lr as lr
