"""Shared test data and float64 numpy references of the documented formulas.

Nothing here imports lambjax: these are independent re-implementations of the
update rules written in the docstrings and in ../shared/spec.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np


def mixed_tree(seed: int = 0) -> dict:
  """Matrices, vectors, a 0-d scalar, a zero bias and a frozen leaf."""
  rng = np.random.default_rng(seed)
  return {
    'encoder': {
      'layers': [
        {'kernel': rng.normal(size=(4, 3)), 'bias': np.zeros(3)},
        {'kernel': rng.normal(size=(3, 5)), 'bias': rng.normal(size=5)},
      ],
    },
    'embeddings': rng.normal(size=(6, 4)),
    'scale': np.array(1.5),
    'frozen': rng.normal(size=(2, 2)),  # Its gradient is always zero.
  }


def grads_sequence(params: dict, steps: int, seed: int = 1) -> list[dict]:
  """Random gradients; the 'frozen' leaf always gets zeros."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params)
    g['frozen'] = np.zeros_like(params['frozen'])
    out.append(g)
  return out


def train_step(tx):
  """``(params, state, grads) -> (params, state)``: update + apply_updates."""
  import optax

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run_steps(tx, params, grads_list):
  """Jitted update + apply over ``grads_list``: (params trajectory, state)."""
  step = jax.jit(train_step(tx))
  state = tx.init(params)
  traj = []
  for g in grads_list:
    params, state = step(params, state, g)
    traj.append(params)
  return traj, state


def to_jax(tree, dtype=jnp.float32):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def to_np64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def names_and_leaves(tree) -> list[tuple[str, np.ndarray]]:
  """Independent name rule: key path joined by '.' (dict keys, list idx)."""
  out = []

  def walk(prefix, node):
    if isinstance(node, dict):
      for k in sorted(node):
        walk(prefix + [str(k)], node[k])
    elif isinstance(node, list | tuple):
      for i, v in enumerate(node):
        walk(prefix + [str(i)], v)
    else:
      out.append(('.'.join(prefix), node))

  walk([], tree)
  return out


def map_named(fn, *trees):
  """Applies fn(name, *leaves) over dict/list trees, keeping the structure."""

  def walk(prefix, *nodes):
    first = nodes[0]
    if isinstance(first, dict):
      return {k: walk(prefix + [str(k)], *(n[k] for n in nodes)) for k in first}
    if isinstance(first, list):
      return [
        walk(prefix + [str(i)], *(n[i] for n in nodes))
        for i in range(len(first))
      ]
    return fn('.'.join(prefix), *nodes)

  return walk([], *trees)


def max_rel_err(actual, expected) -> float:
  """max |a - e| / max |e| per leaf, the worst over leaves (0 if e == 0)."""
  errs = []
  for a, e in zip(
    jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
  ):
    a = np.asarray(a, np.float64)
    e = np.asarray(e, np.float64)
    scale = max(np.max(np.abs(e)) if e.size else 0.0, 1e-30)
    errs.append(np.max(np.abs(a - e)) / scale if e.size else 0.0)
  return max(errs) if errs else 0.0


def trajectory_rel_err(actual_traj, expected_traj) -> float:
  """Per leaf: max over steps of |a - e| / max over steps of |e|; the worst."""
  act = [jax.tree.leaves(t) for t in actual_traj]
  exp = [jax.tree.leaves(t) for t in expected_traj]
  worst = 0.0
  for i in range(len(exp[0])):
    e = np.stack([np.asarray(x[i], np.float64) for x in exp])
    a = np.stack([np.asarray(x[i], np.float64) for x in act])
    scale = np.max(np.abs(e)) if e.size else 0.0
    if scale > 0:
      worst = max(worst, float(np.max(np.abs(a - e)) / scale))
  return worst


# ---------------------------------------------------------------------------
# float64 numpy references
# ---------------------------------------------------------------------------


def norm(x) -> float:
  return float(np.sqrt(np.sum(np.square(x))))


class NumpyAdam:
  """Adam moments and bias-corrected direction, one leaf at a time."""

  def __init__(self, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
    self.b1, self.b2, self.eps, self.eps_root = b1, b2, eps, eps_root

  def init(self, p):
    return {'m': np.zeros_like(p), 'v': np.zeros_like(p)}

  def direction(self, g, s, t):
    """Updates s in place; returns m_hat / (sqrt(v_hat + eps_root) + eps)."""
    s['m'] = self.b1 * s['m'] + (1 - self.b1) * g
    s['v'] = self.b2 * s['v'] + (1 - self.b2) * g * g
    m_hat = s['m'] / (1 - self.b1**t)
    v_hat = s['v'] / (1 - self.b2**t)
    return m_hat / (np.sqrt(v_hat + self.eps_root) + self.eps)


def ref_trust(pn, un, coeff=1.0, eps=0.0, lo=None, hi=None):
  r = 1.0 if (pn == 0 or un == 0) else coeff * pn / (un + eps)
  if lo is not None:
    r = max(r, lo)
  if hi is not None:
    r = min(r, hi)
  return r


def run_numpy(step_fn, init_fn, params, grads_list):
  """Runs a per-leaf numpy optimizer; returns the list of param trees."""
  p = to_np64(params)
  state = map_named(lambda n, x: init_fn(n, x), p)
  traj = []
  for t, g in enumerate(grads_list, start=1):
    g = to_np64(g)
    p = map_named(lambda n, x, gg, s, t=t: step_fn(n, x, gg, s, t), p, g, state)
    traj.append(p)
  return traj


def ordered_and_unordered_runs(
  monkeypatch, fused_module, make_tx, params, grads_list
):
  """``run_steps`` with ``fused_module.breadth_first`` forced on, then off.

  Returns ``(runs, calls)``: ``runs[ordered]`` the trajectory, ``calls[ordered]``
  how many times ``fused_module.after`` (the ordering dependency) was called
  while tracing that run.
  """
  count = [0]
  real_after = fused_module.after

  def counted(x, previous):
    count[0] += 1
    return real_after(x, previous)

  monkeypatch.setattr(fused_module, 'after', counted)
  runs, calls = {}, {}
  for ordered in (True, False):
    monkeypatch.setattr(fused_module, 'breadth_first', lambda o=ordered: o)
    before = count[0]
    runs[ordered] = run_steps(make_tx(), params, grads_list)
    calls[ordered] = count[0] - before
  return runs, calls


def assert_traced_once(jaxpr, name: str, n_calls: int) -> None:
  """``n_calls`` top-level calls of the jitted function ``name`` in
  ``jaxpr``, all sharing one traced body (traced once, not per call)."""
  calls = [e for e in jaxpr.eqns if e.params.get('name') == name]
  assert len(calls) == n_calls
  assert len({id(e.params['jaxpr']) for e in calls}) == 1


# PyTorch-layout conv kernels (short last dimensions), beside leaves whose
# last dimension is long: XLA:CPU runs an elementwise op that fuses with
# nothing several times slower on the former.
CONV_TREE_SHAPES = {
  'conv3': (32, 16, 3, 3),  # Large (over the fast path's small-leaf size).
  'conv1': (64, 32, 1, 1),  # Small: its norms in a window.
  'hwio': (3, 3, 16, 32),
  'dense': (48, 64),
  'scale': (),
}


def conv_tree(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(rng.normal(size=v), jnp.float32)
    for k, v in CONV_TREE_SHAPES.items()
  }


def _entry(hlo_text: str) -> str:
  return hlo_text[hlo_text.index('ENTRY') :]


def lone_adds_on_short_last_dims(hlo_text: str) -> list[tuple[int, ...]]:
  """The shapes of float32 adds that fused with nothing (XLA:CPU's
  ``wrapped_add`` fusions, such as a caller's ``p + u``) in the entry
  computation of a compiled program, on arrays whose last dimension is
  under 16."""
  shapes = [
    tuple(int(d) for d in dims.split(','))
    for dims in re.findall(
      r'%wrapped_add\S* = f32\[([\d,]+)\]', _entry(hlo_text)
    )
  ]
  return [x for x in shapes if len(x) > 1 and x[-1] < 16]


def lone_widening_converts(hlo_text: str) -> list[tuple[int, ...]]:
  """The shapes of converts to float32 of more than one element that fused
  with nothing (XLA:CPU's ``wrapped_convert`` fusions: a float32 copy of a
  narrower array written out) in the entry computation of a compiled
  program."""
  shapes = [
    tuple(int(d) for d in dims.split(','))
    for dims in re.findall(
      r'%wrapped_convert\S* = f32\[([\d,]+)\]', _entry(hlo_text)
    )
  ]
  return [x for x in shapes if np.prod(x) > 1]


def array_copies(hlo_text: str) -> list[str]:
  """The non-scalar ``copy`` instructions of a compiled program's entry
  computation and of the computations it calls (a cond's branches)."""
  return re.findall(r'%copy\S* = (\w+\[[\d,]+\])\S* copy\(', hlo_text)


def normal_like(params: dict, n: int, seed: int) -> list[dict]:
  """``n`` float32 trees of standard normals shaped like ``params``."""
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=np.shape(x)), jnp.float32), params
    )
    for _ in range(n)
  ]


def lockstep(tx_a, tx_b, params, grads_list):
  """Jitted train steps of two optimizers side by side: yields ``((params,
  state), (params, state))`` after each step; once all have run, checks
  that ``tx_a``'s step was traced once."""
  step_a, step_b = jax.jit(train_step(tx_a)), jax.jit(train_step(tx_b))
  a, b = (params, tx_a.init(params)), (params, tx_b.init(params))
  for g in grads_list:
    a, b = step_a(*a, g), step_b(*b, g)
    yield a, b
  assert step_a._cache_size() == 1  # No retrace.
