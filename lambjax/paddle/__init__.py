"""PaddlePaddle-faithful optimizers, clipping, regularizers and schedulers."""

from lambjax.paddle import lr as lr
