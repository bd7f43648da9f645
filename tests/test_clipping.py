"""Clipping transformations vs float64 numpy references."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

import lambjax as lj
from tests import helpers as h


def _grads():
  params = h.mixed_tree(9)
  return h.grads_sequence(params, 1, seed=10)[0]


@pytest.mark.parametrize('max_norm', [0.5, 3.0, 1e6])
def test_clip_by_global_norm(max_norm):
  g = _grads()
  total = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
  factor = max_norm / max(total, max_norm)  # Paddle's c / max(G, c).
  tx = lj.clip_by_global_norm(max_norm)
  out, _ = jax.jit(tx.update)(h.to_jax(g), tx.init(g))
  want = jax.tree.map(lambda x: x * factor, h.to_np64(g))
  assert h.max_rel_err(out, want) < 1e-6


@pytest.mark.parametrize('max_norm', [0.5, 2.0, 1e6])
def test_clip_by_norm_is_per_leaf(max_norm):
  g = _grads()
  tx = lj.clip_by_norm(max_norm)
  out, _ = jax.jit(tx.update)(h.to_jax(g), tx.init(g))

  def ref(x):
    n = h.norm(x)
    return x * max_norm / n if n > max_norm else x

  want = jax.tree.map(ref, h.to_np64(g))
  assert h.max_rel_err(out, want) < 1e-6
  # The always-zero leaf stays exactly zero (no NaN from 0/0).
  assert not np.any(np.asarray(out['frozen']))
  if max_norm == 0.5:  # Something was clipped, and norms are now <= c.
    norms = [h.norm(np.asarray(x)) for x in jax.tree.leaves(out)]
    assert max(norms) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize('lo,hi', [(None, 0.5), (-0.3, 0.5), (0.1, 0.2)])
def test_clip_by_value_asymmetric(lo, hi):
  g = _grads()
  tx = lj.clip_by_value(hi, lo)
  out, _ = jax.jit(tx.update)(h.to_jax(g), tx.init(g))
  low = -hi if lo is None else lo
  want = jax.tree.map(lambda x: np.clip(x, low, hi), h.to_np64(g))
  chex.assert_trees_all_close(out, want, rtol=1e-7, atol=0)


def test_symmetric_clip_by_value_equals_optax_clip():
  g = h.to_jax(_grads())
  ours, _ = lj.clip_by_value(0.4).update(g, optax.EmptyState())
  theirs, _ = optax.clip(0.4).update(g, optax.EmptyState())
  chex.assert_trees_all_equal(ours, theirs)
