"""Ways to spell two of LAMB's reductions on XLA:CPU, timed side by side.

``--what perlayer``: a stacked leaf's per-layer sum of squares (``(12,
768, 3072)``, 108 MiB, the layers on axis 0), spelled as one reduction over
both inner axes, in two stages (last axis first, or middle first), as a
batched dot, over a ``(12, n)`` or ``(12, n / 128, 128)`` view, layer by
layer (12 whole-slice sums) and as ``lax.map``; beside them the whole-leaf
sum.

``--what spelled``: the spelled LAMB norm ``sum(r * r)``, ``r = m_hat /
(sqrt(v_hat) + eps) + wd p``, on one ``30522 x 768`` leaf (BERT-base's word
embedding), with the bias corrections divided as the chain does, multiplied
by their reciprocals, or folded into one scale and one eps; beside them the
update pass ``p - lr r`` in two of those forms, an elementwise pass of the
same traffic with no sqrt or divide (``p - lr (m + v)``) and ``sum(p * p)``.

Each form is jitted alone; the forms run interleaved for ``--rounds``
rounds; median [min] ms; the relative error of each sum against float64
numpy.

    python benchmarks/reduction_forms.py --what perlayer --rounds 30
    python benchmarks/reduction_forms.py --what spelled --rounds 25
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def perlayer():
  shape = (12, 768, 3072)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  ref = np.sum(np.asarray(x, np.float64) ** 2, axis=(1, 2))
  forms = {
    'whole leaf': lambda x: jnp.sum(x * x),
    'axes (1, 2)': lambda x: jnp.sum(x * x, axis=(1, 2)),
    'last, then middle': lambda x: jnp.sum(jnp.sum(x * x, axis=2), axis=1),
    'middle, then last': lambda x: jnp.sum(jnp.sum(x * x, axis=1), axis=1),
    'einsum lij,lij->l': lambda x: jnp.einsum('lij,lij->l', x, x),
    '(12, n) view': lambda x: jnp.sum((x * x).reshape(12, -1), axis=1),
    '(12, n/128, 128)': lambda x: jnp.sum(
      jnp.sum((x * x).reshape(12, -1, 128), axis=2), axis=1
    ),
    'slice by slice': lambda x: jnp.stack(
      [jnp.sum(x[i] * x[i]) for i in range(shape[0])]
    ),
    'lax.map': lambda x: jax.lax.map(lambda y: jnp.sum(y * y), x),
  }
  refs = {name: ref for name in forms}
  refs['whole leaf'] = ref.sum()
  return forms, (x,), refs


def spelled():
  shape = (30522, 768)
  k = jax.random.split(jax.random.key(0), 3)
  m = jax.random.normal(k[0], shape) * 1e-3
  v = jax.random.uniform(k[1], shape, minval=1e-8, maxval=1e-6)
  p = jax.random.normal(k[2], shape)
  bc = (jnp.float32(1 - 0.9**7), jnp.float32(1 - 0.999**7))
  eps, wd, lr = 1e-6, 0.01, 0.01

  def divided(m, v, p, bc):
    return (m / bc[0]) / (jnp.sqrt(v / bc[1]) + eps) + wd * p

  def reciprocals(m, v, p, bc):
    return (m * (1 / bc[0])) / (jnp.sqrt(v * (1 / bc[1])) + eps) + wd * p

  def folded(m, v, p, bc):  # m / (bc0 sqrt(v / bc1) + bc0 eps)
    scale = bc[0] * bc[0] / bc[1]
    return m / (jnp.sqrt(v * scale) + bc[0] * eps) + wd * p

  def norm(r):
    return lambda *a: jnp.sum(jnp.square(r(*a)))

  md, vd, pd = (np.asarray(x, np.float64) for x in (m, v, p))
  b0, b1 = (float(b) for b in bc)
  r = (md / b0) / (np.sqrt(vd / b1) + eps) + wd * pd
  forms = {
    'norm, divided': norm(divided),
    'norm, reciprocals': norm(reciprocals),
    'norm, folded': norm(folded),
    'update, divided': lambda *a: a[2] - lr * divided(*a),
    'update, folded': lambda *a: a[2] - lr * folded(*a),
    'update, no sqrt/div': lambda m, v, p, bc: p - lr * (m + v),
    'sum(p * p)': lambda m, v, p, bc: jnp.sum(p * p),
  }
  # The last two are passes for their time only: no reference.
  refs = {name: np.sum(r * r) for name in forms if name.startswith('norm')}
  refs.update({n: pd - lr * r for n in forms if n.startswith('update, ')})
  del refs['update, no sqrt/div']
  return forms, (m, v, p, bc), refs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--what', default='perlayer', choices=('perlayer', 'spelled'))
  ap.add_argument('--rounds', type=int, default=25)
  args = ap.parse_args(argv)
  forms, inputs, refs = {'perlayer': perlayer, 'spelled': spelled}[args.what]()
  jitted = {name: jax.jit(f) for name, f in forms.items()}
  errors = {}  # '-': no reference.
  for name, ref in refs.items():
    out = np.asarray(jitted[name](*inputs), np.float64)
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    errors[name] = f'{err:.1e}'
  times = {name: [] for name in jitted}
  names = list(jitted)
  for r in range(args.rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(jitted[name](*inputs))
      times[name].append(time.perf_counter() - t0)
  print(
    f'# {args.what}; jax {jax.__version__} ({jax.default_backend()}); '
    f'{args.rounds} rounds; ms median [min]; error relative to the '
    'largest float64 value'
  )
  for name, ts in times.items():
    print(
      f'{name:20s} {1e3 * statistics.median(ts):8.2f} '
      f'[{1e3 * min(ts):.2f}]  error {errors.get(name, "-")}'
    )


if __name__ == '__main__':
  main()
