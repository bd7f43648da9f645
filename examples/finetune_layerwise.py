"""Fine-tuning a small transformer with layer-wise learning-rate decay.

    python examples/finetune_layerwise.py           # ~1 min on 2 CPU cores
    python examples/finetune_layerwise.py --help

A 4-layer Flax encoder (``tiny_bert.TinyBert``) is first trained with AdamW
to copy the previous token, then fine-tuned with ``lj.adamw_dl`` to copy the
token two places back. Layer-wise decay gives the layer ``m`` (0-based) the
rate ``lr * decay ** (n_layers - m)``, the embeddings ``lr * decay **
(n_layers + 1)`` and the head the full rate: the lower, more general layers
move least. The script prints each layer's effective learning rate and its
measured relative update size ``|update| / |param|`` (from
``lj.with_diagnostics``). Data are synthetic, generated locally.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_bert  # noqa: E402

import lambjax as lj  # noqa: E402


def _group(name: str) -> str:
  """The layer a parameter belongs to: embeddings, layers_i or head."""
  m = re.search(r'layers_(\d+)', name)
  if m:
    return f'layers_{m.group(1)}'
  return 'embeddings' if 'embedding' in name else 'head'


def effective_lrs(params, lr: float, decay: float, n_layers: int) -> dict:
  """``{layer: lr * ratio}`` as ``lj.adamw_dl`` applies it."""
  out = {}
  for name in jax.tree.leaves(lj.tree_names(params)):
    out[_group(name)] = lr * lj.layerwise_lr_decay(decay, n_layers, name)
  return out


def _fit(
  state, tokens, targets, steps, batch_size, seed, desc, progress, record=None
):
  """Trains; returns the state and ``lj.diagnostics`` after step ``record``."""
  from tqdm.auto import tqdm

  tokens, targets = jnp.asarray(tokens), jnp.asarray(targets)

  @jax.jit
  def step(state, idx):
    def loss_fn(p):
      logits = state.apply_fn({'params': p}, tokens[idx])
      return tiny_bert.loss_and_accuracy(logits, targets[idx])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), loss, acc

  rng = np.random.default_rng(seed)
  bar = tqdm(range(steps), desc=desc, disable=not progress)
  recorded = None
  for i in bar:
    idx = rng.integers(0, len(tokens), batch_size)
    state, loss, acc = step(state, idx)
    bar.set_postfix(loss=f'{float(loss):.3f}', acc=f'{float(acc):.3f}')
    if i == record:
      recorded = jax.device_get(lj.diagnostics(state.opt_state))
  return state, recorded


def main(
  pretrain_steps: int = 400,
  finetune_steps: int = 300,
  learning_rate: float = 3e-3,
  layerwise_decay: float = 0.6,
  n_layers: int = 4,
  batch_size: int = 64,
  num_samples: int = 4096,
  progress: bool = True,
  verbose: bool = True,
) -> dict:
  """Returns ``{'accuracy', 'effective_lr', 'relative_update'}``."""
  model = tiny_bert.TinyBert(n_layers=n_layers)
  params = tiny_bert.init_params(model)
  tokens, prev1 = tiny_bert.make_tokens(num_samples, shift=1, seed=0)
  _, prev2 = tiny_bert.make_tokens(num_samples, shift=2, seed=0)

  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=lj.adamw(learning_rate, weight_decay=0.01),
  )
  state, _ = _fit(
    state, tokens, prev1, pretrain_steps, batch_size, 1, 'pretrain', progress
  )

  warmup = max(1, finetune_steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup, finetune_steps
  )
  tx = lj.with_diagnostics(
    lj.adamw_dl(
      schedule,
      weight_decay=0.01,
      layerwise_decay=layerwise_decay,
      n_layers=n_layers,
    )
  )
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=state.params, tx=tx
  )
  # The diagnostics are read from the state at the peak learning rate.
  state, diag = _fit(
    state,
    tokens,
    prev2,
    finetune_steps,
    batch_size,
    2,
    'finetune',
    progress,
    record=warmup,
  )

  upd: dict[str, float] = {}
  par: dict[str, float] = {}
  for key, value in diag.items():
    kind, _, name = key.partition('/')
    if kind in ('update_norm', 'param_norm'):
      group = upd if kind == 'update_norm' else par
      group[_group(name)] = group.get(_group(name), 0.0) + float(value) ** 2
  relative = {g: np.sqrt(upd[g] / par[g]) for g in upd}
  lrs = effective_lrs(state.params, learning_rate, layerwise_decay, n_layers)
  logits = state.apply_fn({'params': state.params}, tokens[:1024])
  acc = float(tiny_bert.loss_and_accuracy(logits, prev2[:1024])[1])
  if verbose:
    print(f'\nlayer-wise decay {layerwise_decay}, peak lr {learning_rate}:')
    print(f'{"layer":12} {"effective lr":>13} {"|u|/|p| at peak lr":>21}')
    order = ['embeddings'] + [f'layers_{i}' for i in range(n_layers)] + ['head']
    for g in order:
      print(f'{g:12} {lrs[g]:13.2e} {relative[g]:21.2e}')
    print(f'fine-tuned accuracy (copy two back): {acc:.3f}')
  return {'accuracy': acc, 'effective_lr': lrs, 'relative_update': relative}


if __name__ == '__main__':
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--pretrain-steps', type=int, default=400)
  parser.add_argument('--finetune-steps', type=int, default=300)
  parser.add_argument('--learning-rate', type=float, default=3e-3)
  parser.add_argument('--layerwise-decay', type=float, default=0.6)
  parser.add_argument('--n-layers', type=int, default=4)
  a = parser.parse_args()
  main(
    a.pretrain_steps,
    a.finetune_steps,
    a.learning_rate,
    a.layerwise_decay,
    a.n_layers,
  )
