"""A small Flax transformer encoder and synthetic token data for the examples.

The data are generated locally (no hub): random token sequences whose target
at each position is the token ``shift`` places earlier (0 before the start),
a task only attention can solve. Parameter names follow BERT/HF and
PaddleNLP conventions as flax spells them (``embeddings``, ``layers_3``,
``LayerNorm``, ``bias``), so the name-based rules (layer-wise decay,
exclusions from weight decay) apply unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn


class EncoderLayer(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.SelfAttention(num_heads=self.heads, name='attention')(x)
    x = nn.LayerNorm(name='LayerNorm_attention')(x + h)
    h = nn.Dense(4 * self.dim, name='intermediate')(x)
    h = nn.Dense(self.dim, name='output')(nn.gelu(h))
    return nn.LayerNorm(name='LayerNorm_output')(x + h)


class TinyBert(nn.Module):
  """Token + position embeddings, ``n_layers`` encoder layers, a token head."""

  vocab: int = 16
  dim: int = 32
  heads: int = 2
  n_layers: int = 4
  max_len: int = 32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.dim, name='word_embeddings')(tokens)
    pos = self.param(
      'position_embeddings',
      nn.initializers.normal(0.02),
      (self.max_len, self.dim),
    )
    x = x + pos[: tokens.shape[-1]]
    for i in range(self.n_layers):
      x = EncoderLayer(self.dim, self.heads, name=f'layers_{i}')(x)
    return nn.Dense(self.vocab, name='head')(x)


def make_tokens(
  num: int, seq_len: int = 16, vocab: int = 16, shift: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, targets)``: targets[i] = tokens[i - shift] (0 at the start)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(num, seq_len), dtype=np.int32)
  targets = np.zeros_like(tokens)
  targets[:, shift:] = tokens[:, :-shift]
  return tokens, targets


def loss_and_accuracy(logits, targets):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return loss.mean(), jnp.mean(logits.argmax(-1) == targets)


def init_params(model: TinyBert, seed: int = 0, seq_len: int = 16):
  return model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))[
    'params'
  ]
