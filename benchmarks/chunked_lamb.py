"""LAMB's first pass in cache-sized chunks (a ``fori_loop``) on XLA:CPU.

lambjax's LAMB step is six array passes on XLA:CPU, 15 transfers against
the roof's 7 (benchmarks/RESULTS.md, "What limits LAMB on XLA:CPU"). Done
chunk by chunk in a loop, the moments, the direction ``r`` and both norms
of a chunk would meet in cache, leaving 10 transfers: read ``g, m, v, p``,
write ``m, v, r``; then read ``r, p``, write ``p``. This script times that
design against ``lj.lamb`` and the in-run roof on the same leaves, in one
process, interleaved rounds, params donated::

    python benchmarks/chunked_lamb.py --shapes 30522x768,3072x768,768x768 \
      --chunks 65536,262144,1048576 --rounds 11

``chunked C`` writes ``r`` into a fresh buffer each step, ``chunked C w``
into a carried (donated) one, as ``lamb(workspace=True)`` does. The loop
writes ``m``, ``v`` and ``r`` with in-place ``dynamic_update_slice``; the
direction reads the chunks back from the written ``m`` and ``v``, and the
norm takes ``r`` before it is written, so that each big buffer has one
reader per iteration (with two, XLA copies the whole buffer every
iteration: 40x slower). ``copies`` counts whole-leaf copies left in the
compiled program (0 expected). Not a library feature: a measurement.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import bench_step as b
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lambjax as lj

B1, B2, EPS, WD, LR = 0.9, 0.999, 1e-6, 0.01, 1e-3


def _ratio(pp, uu):
  pn, un = jnp.sqrt(pp), jnp.sqrt(uu)
  return jnp.where((pn == 0) | (un == 0), 1.0, pn / un)


def chunked_leaf(p, g, m, v, w, bc1, bc2, size):
  """One leaf: a loop over chunks of ``size``, then ``p - lr ratio r``."""
  n = p.size
  size = min(size, n)
  pf, gf, mf, vf, wf = (x.reshape(-1) for x in (p, g, m, v, w))

  def body(i, carry):
    mf, vf, wf, pp, uu = carry
    # The last chunk ends at n; what it overlaps is already done.
    s = jnp.minimum(i * size, n - size)
    sl = lambda x: lax.dynamic_slice(x, (s,), (size,))  # noqa: E731
    done = jnp.arange(size) + s < i * size
    gc, mc, vc = sl(gf), sl(mf), sl(vf)
    m2 = (1 - B1) * gc + B1 * mc
    v2 = (1 - B2) * (gc * gc) + B2 * vc
    mf = lax.dynamic_update_slice(mf, jnp.where(done, mc, m2), (s,))
    vf = lax.dynamic_update_slice(vf, jnp.where(done, vc, v2), (s,))
    mn, vn, pc = sl(mf), sl(vf), sl(pf)
    r = (mn / bc1) / (jnp.sqrt(vn / bc2) + EPS) + WD * pc
    wf = lax.dynamic_update_slice(wf, jnp.where(done, sl(wf), r), (s,))
    pz, rz = jnp.where(done, 0.0, pc), jnp.where(done, 0.0, r)
    return mf, vf, wf, pp + jnp.sum(pz * pz), uu + jnp.sum(rz * rz)

  z = jnp.zeros((), jnp.float32)
  k = -(-n // size)
  mf, vf, wf, pp, uu = lax.fori_loop(0, k, body, (mf, vf, wf, z, z))
  new_p = p - LR * _ratio(pp, uu) * wf.reshape(p.shape)
  return new_p, mf.reshape(p.shape), vf.reshape(p.shape), wf.reshape(p.shape)


def chunked_step(size, carried):
  def step(params, state, grads):
    m, v, w, count = state
    count = count + 1
    bc1, bc2 = 1 - B1**count, 1 - B2**count
    out = []
    for p, g, mi, vi, wi in zip(params, grads, m, v, w, strict=True):
      wi = wi if carried else jnp.zeros_like(p)
      out.append(chunked_leaf(p, g, mi, vi, wi, bc1, bc2, size))
    ps, ms, vs, ws = (list(x) for x in zip(*out, strict=True))
    return ps, (ms, vs, ws if carried else w, count)

  return jax.jit(step, donate_argnums=(0, 1))


class Case:
  def __init__(self, name, step, params, state, grads):
    self.name, self.params, self.state, self.grads = name, params, state, grads
    self.compiled = step.lower(params, state, grads).compile()
    text = self.compiled.as_text()
    small = min(x.size for x in jax.tree.leaves(params))
    sizes = [
      int(np.prod([int(d) for d in m.group(1).split(',') if d]))
      for m in re.finditer(r'= f32\[([\d,]*)\]\S* copy\(', text)
    ]
    self.copies = sum(size >= small for size in sizes)
    self.times = []
    self.run()

  def run(self):
    t0 = time.perf_counter()
    self.params, self.state = self.compiled(self.params, self.state, self.grads)
    b.block((self.params, self.state))
    return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--shapes', default='30522x768,3072x768,768x768')
  ap.add_argument('--chunks', default='65536,262144,1048576')
  ap.add_argument('--rounds', type=int, default=11)
  args = ap.parse_args()
  shapes = [tuple(int(d) for d in s.split('x')) for s in args.shapes.split(',')]
  named = {f'l{i}': s for i, s in enumerate(shapes)}
  n = sum(int(np.prod(s)) for s in shapes)
  print(f'# jax {jax.__version__}, {jax.default_backend()}; leaves {shapes}')
  print(f'# {n / 1e6:.1f} M params; medians of {args.rounds} rounds')

  def tree(seed):
    return list(b.make_tree(named, seed).values())

  grads = tree(99)
  zeros = lambda: [jnp.zeros(s) for s in shapes]  # noqa: E731
  cases = []
  tx = lj.lamb(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  params = b.make_tree(named, 0)
  cases.append(
    Case(
      'lj.lamb',
      b.make_step(tx),
      params,
      tx.init(params),
      b.make_tree(named, 99),
    )
  )
  for size in (int(c) for c in args.chunks.split(',')):
    for carried in (False, True):
      name = f'chunked {size}' + (' w' if carried else '')
      state = (zeros(), zeros(), zeros(), jnp.zeros((), jnp.int32))
      step = chunked_step(size, carried)
      cases.append(Case(name, step, tree(0), state, grads))
  roof = b.Roof(named)
  # One step from the same start: the loop must give lj.lamb's params.
  p0 = b.make_tree(named, 0)
  ref, _ = b.make_step(tx)(p0, tx.init(p0), b.make_tree(named, 99))
  ref = list(ref.values())
  for c in cases[1:]:
    size = int(c.name.split()[1])
    state = (zeros(), zeros(), zeros(), jnp.zeros((), jnp.int32))
    got, _ = chunked_step(size, 'w' in c.name)(tree(0), state, grads)
    err = max(
      float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
      for x, y in zip(got, ref, strict=True)
    )
    print(f'# {c.name}: max |params - lj.lamb params| / max|params| {err:.1e}')
  for _ in range(args.rounds):
    for c in cases:
      c.times.append(c.run())
    roof.times.append(roof.run())
  r = statistics.median(roof.times)
  print(f'{"roof (4r3w pass)":22s} {1e3 * r:7.1f} ms')
  for c in cases:
    t = statistics.median(c.times)
    fracs = [x / y for x, y in zip(roof.times, c.times, strict=True)]
    print(
      f'{c.name:22s} {1e3 * t:7.1f} ms [{1e3 * min(c.times):.1f}-'
      f'{1e3 * max(c.times):.1f}]  roof {statistics.median(fracs):.2f}'
      f'  whole-leaf copies {c.copies}'
    )


if __name__ == '__main__':
  main()
