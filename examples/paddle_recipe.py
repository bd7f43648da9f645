"""A PaddleNLP-style BERT recipe in a Flax TrainState, with checkpoint/resume.

    python examples/paddle_recipe.py          # ~1 min on 2 CPU cores
    python examples/paddle_recipe.py --help

The PaddleNLP pretraining recipe, ported name for name:

    Paddle                                         lambjax
    paddle.optimizer.lr.PolynomialDecay(...)       lj.paddle.lr.PolynomialDecay(...)
    paddle.optimizer.lr.LinearWarmup(...)          lj.paddle.lr.LinearWarmup(...)
    paddle.nn.ClipGradByGlobalNorm(1.0)            lj.paddle.ClipGradByGlobalNorm(1.0)
    paddle.optimizer.Lamb(..., exclude_from_       lj.paddle.Lamb(..., exclude_from_
        weight_decay_fn=fn)                            weight_decay_fn=fn)

with LayerNorm parameters and biases excluded from weight decay (and so, as
in Paddle, from layer adaptation). The model is a small Flax encoder
(``tiny_bert.TinyBert``) on synthetic token data generated locally. Halfway
through, the run is checkpointed (``lj.save_state`` for the optimizer state,
``flax.serialization`` for the params; msgpack, no pickle), rebuilt from
scratch, restored and continued; the script checks that the resumed run ends
bit-identical to an uninterrupted one. On a GPU that needs
``XLA_FLAGS=--xla_gpu_deterministic_ops=true``: otherwise the embedding
gradient's scatter-add (atomics) makes even two uninterrupted runs differ in
the last bits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_bert  # noqa: E402

import lambjax as lj  # noqa: E402


def exclude_from_weight_decay(name: str) -> bool:
  """PaddleNLP's rule: no decay on LayerNorm parameters and biases."""
  return 'LayerNorm' in name or name.endswith('bias')


def make_optimizer(total_steps: int, learning_rate: float = 1e-2):
  warmup = max(1, total_steps // 10)
  decay = lj.paddle.lr.PolynomialDecay(
    learning_rate=learning_rate,
    decay_steps=total_steps - warmup,
    end_lr=0.0,
    power=1.0,
  )
  schedule = lj.paddle.lr.LinearWarmup(
    learning_rate=decay,
    warmup_steps=warmup,
    start_lr=0.0,
    end_lr=learning_rate,
  )
  return lj.paddle.Lamb(
    learning_rate=schedule,
    lamb_weight_decay=0.01,
    grad_clip=lj.paddle.ClipGradByGlobalNorm(clip_norm=1.0),
    exclude_from_weight_decay_fn=exclude_from_weight_decay,
  )


def _new_state(total_steps: int, learning_rate: float):
  model = tiny_bert.TinyBert()
  return train_state.TrainState.create(
    apply_fn=model.apply,
    params=tiny_bert.init_params(model),
    tx=make_optimizer(total_steps, learning_rate),
  )


@jax.jit
def _step(state, tokens, targets):
  def loss_fn(p):
    logits = state.apply_fn({'params': p}, tokens)
    return tiny_bert.loss_and_accuracy(logits, targets)

  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), loss, acc


def _batches(steps: int, batch_size: int, num_samples: int):
  tokens, targets = tiny_bert.make_tokens(num_samples, shift=1, seed=0)
  rng = np.random.default_rng(0)
  idx = rng.integers(0, num_samples, size=(steps, batch_size))
  return jnp.asarray(tokens[idx]), jnp.asarray(targets[idx])


def _train(state, batches, start, stop, bar):
  tokens, targets = batches
  loss = acc = jnp.nan
  for i in range(start, stop):
    state, loss, acc = _step(state, tokens[i], targets[i])
    bar.update(1)
    bar.set_postfix(
      loss=f'{float(loss):.3f}',
      lr=f'{float(lj.get_lr(state.opt_state)):.2e}',
    )
  return state, float(loss), float(acc)


def save(state, directory: Path) -> None:
  lj.save_state(directory / 'opt_state.msgpack', state.opt_state)
  (directory / 'params.msgpack').write_bytes(serialization.to_bytes(state))


def restore(template, directory: Path):
  params_state = serialization.from_bytes(
    template, (directory / 'params.msgpack').read_bytes()
  )
  opt_state = lj.load_state(directory / 'opt_state.msgpack', template.opt_state)
  return params_state.replace(opt_state=opt_state)


def main(
  steps: int = 600,
  batch_size: int = 64,
  learning_rate: float = 1e-2,
  num_samples: int = 4096,
  progress: bool = True,
  verbose: bool = True,
) -> dict:
  """Returns ``{'loss', 'accuracy', 'resumed_exact'}``."""
  from tqdm.auto import tqdm

  batches = _batches(steps, batch_size, num_samples)
  half = steps // 2
  with tqdm(total=2 * steps, disable=not progress) as bar:
    bar.set_description('uninterrupted')
    full, loss, acc = _train(
      _new_state(steps, learning_rate), batches, 0, steps, bar
    )
    bar.set_description('first half')
    state, _, _ = _train(
      _new_state(steps, learning_rate), batches, 0, half, bar
    )
    with tempfile.TemporaryDirectory() as tmp:
      save(state, Path(tmp))
      del state  # Resume from disk only, into a freshly built state.
      state = restore(_new_state(steps, learning_rate), Path(tmp))
    bar.set_description('resumed')
    state, _, _ = _train(state, batches, half, steps, bar)
  exact = all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves((full.params, full.opt_state)),
      jax.tree.leaves((state.params, state.opt_state)),
      strict=True,
    )
  )
  if verbose:
    print(f'final loss {loss:.4f}, batch accuracy {acc:.3f}')
    print(f'resumed run bit-identical to the uninterrupted one: {exact}')
  return {'loss': loss, 'accuracy': acc, 'resumed_exact': exact}


if __name__ == '__main__':
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split('\n', 1)[1],
  )
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--learning-rate', type=float, default=1e-2)
  a = parser.parse_args()
  main(a.steps, a.batch_size, a.learning_rate)
