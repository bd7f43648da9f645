"""Writes the Colab notebooks of this folder (outputs stripped).

    python notebooks/make_notebooks.py

The notebooks are generated so that they stay small, uniform and free of
outputs; edit the cells here, then run this script. Each notebook opens with
an "Open in Colab" badge and an install cell that does nothing when lambjax
is already importable (as in the test suite, which executes every notebook
with ``LAMBJAX_SMALL=1`` for tiny settings).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = 'lambjax/lambjax'
HERE = Path(__file__).resolve().parent

INSTALL = """\
# Install (Colab): skipped when lambjax is already importable.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec('lambjax') is None:
  subprocess.run(['git', 'clone', '-q', 'https://github.com/REPO', '/content/lambjax'], check=True)
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', '/content/lambjax[examples]'], check=True)
  sys.path.insert(0, '/content/lambjax')
# The repository's examples/ folder, found from here or from the Colab clone.
for root in ('..', '.', '/content/lambjax'):
  if os.path.isdir(os.path.join(root, 'examples')):
    sys.path.insert(0, os.path.abspath(os.path.join(root, 'examples')))
    break
SMALL = os.environ.get('LAMBJAX_SMALL') == '1'  # Tiny settings for the tests.
""".replace('REPO', REPO)


def badge(name: str) -> str:
  url = f'https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb'
  return (
    f'[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})'
  )


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS['01_quickstart'] = [
  ('md', """# lambjax quickstart

LAMB on a Flax MLP, MNIST-1D generated locally. `lj.lamb` is an optax
`GradientTransformation`: it goes straight into a flax `TrainState`."""),
  ('code', """\
import jax, jax.numpy as jnp, optax
from flax import linen as nn
from flax.training import train_state
import lambjax as lj
from mnist1d_data import load_mnist1d

data = load_mnist1d(num_samples=2000 if SMALL else 10_000)
x, y = jnp.asarray(data['x']), jnp.asarray(data['y'])
print(x.shape, y.shape)"""),
  ('code', """\
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128, name='layers_0')(x))
    x = nn.relu(nn.Dense(128, name='layers_1')(x))
    return nn.Dense(10, name='head')(x)

model = MLP()
params = model.init(jax.random.key(0), x[:1])['params']
print(lj.tree_names(params))  # the names every name-based option sees"""),
  ('code', """\
epochs, batch = (2, 128) if SMALL else (20, 128)
steps = epochs * (len(x) // batch)
schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps)
tx = lj.lamb(schedule, weight_decay=1e-4, mask=lj.mask_by_name(r'kernel$'))
state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

@jax.jit
def step(state, idx):
  def loss_fn(p):
    logits = state.apply_fn({'params': p}, x[idx])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss

key = jax.random.key(1)
for epoch in range(epochs):
  key, sub = jax.random.split(key)
  for idx in jax.random.permutation(sub, len(x))[: len(x) // batch * batch].reshape(-1, batch):
    state, loss = step(state, idx)
  print(f'epoch {epoch + 1}: loss {float(loss):.3f}, lr {float(lj.get_lr(state.opt_state)):.4f}')"""),
  ('code', """\
logits = model.apply({'params': state.params}, jnp.asarray(data['x_test']))
acc = float((logits.argmax(-1) == data['y_test']).mean())
print(f'test accuracy {acc:.3f}')
assert acc > 0.2"""),
]

NOTEBOOKS['02_large_batch'] = [
  ('md', """# Large-batch training: LAMB vs AdamW vs LARS

The README's demo (`examples/large_batch.py`) in a notebook: 10 epochs of
MNIST-1D at batch 64 to 4096, square-root learning-rate scaling for LAMB and
AdamW, five seeds trained at once with `jax.vmap`. `lamb_recipe` is lambjax's
large-batch recipe (trust ratio on weight matrices only, `b1=0.8`, 5%
warmup)."""),
  ('code', """\
import large_batch as lb
from IPython.display import Image, display

settings = dict(batch_sizes=(64, 256), epochs=1, seeds=1, num_samples=2000) if SMALL else {}
results = lb.main(**settings, out='large_batch.png', progress=not SMALL)
display(Image('large_batch.png'))"""),
  ('code', """\
# Each result holds per-seed test / validation accuracy and the loss curve.
for (name, batch), r in sorted(results.items()):
  print(f'{name:12} {batch:5d}  {100 * r["test_acc"].mean():5.1f}%  final loss {r["loss"][-1].mean():.3f}')"""),
]

NOTEBOOKS['03_layerwise_decay'] = [
  ('md', """# Layer-wise learning-rate decay (AdamWDL)

`lj.adamw_dl` gives the leaf named `n` the rate `lr * ratio(n)`, by default
PaddleNLP's rule `lj.layerwise_lr_decay(decay, n_layers, n)`: layer `m` gets
`decay ** (n_layers - m)`, embeddings `decay ** (n_layers + 1)`, the rest 1."""),
  ('code', """\
import matplotlib.pyplot as plt
import numpy as np
import jax, jax.numpy as jnp, optax
import lambjax as lj

n_layers = 12
names = ['embeddings.word_embeddings'] + [f'encoder.layers.{m}.attention.q_proj.weight' for m in range(n_layers)] + ['pooler.dense.weight']
labels = ['emb'] + [str(m) for m in range(n_layers)] + ['pooler']
fig, ax = plt.subplots(figsize=(8, 3.5))
for decay in (0.65, 0.8, 0.95):
  ax.plot(labels, [lj.layerwise_lr_decay(decay, n_layers, n) for n in names], 'o-', label=f'decay {decay}')
ax.set(xlabel='layer', ylabel='lr multiplier', yscale='log', title='BERT-base, 12 layers')
ax.legend(); ax.grid(alpha=0.3)
plt.show()"""),
  ('code', """\
# One AdamWDL step, checked against the closed form of the first Adam step:
# p - lr * ratio * (sign(g) + wd * p)  (m_hat / sqrt(v_hat) = sign(g) at step 1).
params = {'embeddings': jnp.ones(3), 'layers_0': {'w': jnp.ones(3)}, 'layers_1': {'w': jnp.ones(3)}, 'head': jnp.ones(3)}
grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
tx = lj.adamw_dl(0.1, weight_decay=0.01, layerwise_decay=0.5, n_layers=2, eps=0.0)
updates, _ = tx.update(grads, tx.init(params), params)
for name, u in zip(jax.tree.leaves(lj.tree_names(params)), jax.tree.leaves(updates)):
  ratio = lj.layerwise_lr_decay(0.5, 2, name)
  expected = -0.1 * ratio * (-1.0 + 0.01)
  print(f'{name:12} ratio {ratio:6.3f}  update {float(u[0]):+.5f}  closed form {expected:+.5f}')
  np.testing.assert_allclose(u, expected, rtol=1e-4)  # float32 bias correction"""),
  ('code', """\
# A fine-tuning run with it: examples/finetune_layerwise.py
import finetune_layerwise
small = dict(pretrain_steps=20, finetune_steps=10, num_samples=256) if SMALL else {}
out = finetune_layerwise.main(**small, progress=not SMALL)"""),
]

NOTEBOOKS['04_schedules'] = [
  ('md', """# Every schedule: Paddle names, lambjax names, optax

`lj.paddle.lr.X` takes Paddle's keywords and gives, at count `k`, Paddle's
`scheduler()` after `k` calls of `scheduler.step()`. `lj.schedules.x` is the
same function with snake_case names. Where optax has the same schedule, it is
drawn too (dotted) and the largest difference printed."""),
  ('code', """\
import matplotlib.pyplot as plt
import numpy as np
import jax, jax.numpy as jnp, optax
import lambjax as lj
P, S = lj.paddle.lr, lj.schedules
T = 100
k = jnp.arange(T)
cases = [
  ('StepDecay', P.StepDecay(0.1, step_size=20, gamma=0.5), S.step_decay(0.1, 20, 0.5),
   optax.exponential_decay(0.1, 20, 0.5, staircase=True)),
  ('MultiStepDecay', P.MultiStepDecay(0.1, milestones=[30, 60, 80], gamma=0.3), S.multi_step_decay(0.1, [30, 60, 80], 0.3),
   optax.piecewise_constant_schedule(0.1, {30: 0.3, 60: 0.3, 80: 0.3})),
  ('PiecewiseDecay', P.PiecewiseDecay(boundaries=[25, 50], values=[0.1, 0.05, 0.01]), S.piecewise_decay([25, 50], [0.1, 0.05, 0.01]),
   optax.piecewise_constant_schedule(0.1, {25: 0.5, 50: 0.2})),
  ('NoamDecay', P.NoamDecay(d_model=64, warmup_steps=20), S.noam_decay(64, 20), None),
  ('LinearWarmup', P.LinearWarmup(learning_rate=0.1, warmup_steps=20, start_lr=0.0, end_lr=0.1), S.linear_warmup(0.1, 20, 0.0, 0.1),
   optax.linear_schedule(0.0, 0.1, 20)),
  ('CosineAnnealingDecay', P.CosineAnnealingDecay(0.1, T_max=T - 1, eta_min=0.01), S.cosine_annealing(0.1, T - 1, 0.01),
   optax.cosine_decay_schedule(0.1, T - 1, alpha=0.1)),
  ('PolynomialDecay', P.PolynomialDecay(0.1, decay_steps=80, end_lr=0.001, power=2.0), S.polynomial_decay(0.1, 80, 0.001, 2.0),
   optax.polynomial_schedule(0.1, 0.001, 2.0, 80)),
  ('ExponentialDecay', P.ExponentialDecay(0.1, gamma=0.97), S.exponential_decay(0.1, 0.97), optax.exponential_decay(0.1, 1, 0.97)),
  ('InverseTimeDecay', P.InverseTimeDecay(0.1, gamma=0.1), S.inverse_time_decay(0.1, 0.1), None),
  ('NaturalExpDecay', P.NaturalExpDecay(0.1, gamma=0.05), S.natural_exp_decay(0.1, 0.05), None),
  ('OneCycleLR', P.OneCycleLR(max_learning_rate=0.1, total_steps=T), S.one_cycle(0.1, T), None),
  ('InverseSquareRootSchedule', P.InverseSquareRootSchedule(warmup_steps=20, learning_rate=0.1), S.inverse_square_root(20, 0.1), None),
]
fig, axes = plt.subplots(3, 4, figsize=(14, 8), sharex=True)
for ax, (name, paddle_fn, ours, theirs) in zip(axes.flat, cases):
  a, b = np.asarray(jax.vmap(paddle_fn)(k)), np.asarray(jax.vmap(ours)(k))
  assert np.array_equal(a, b), name  # the two names are the same function
  ax.plot(k, a, label='lj.paddle.lr')
  ax.plot(k, b, '--', label='lj.schedules')
  note = ''
  if theirs is not None:
    c = np.asarray(jax.vmap(theirs)(k))
    ax.plot(k, c, ':', color='k', label='optax')
    note = f'  |Δ optax| ≤ {np.max(np.abs(c - a)):.1e}'
    assert np.max(np.abs(c - a)) < 1e-6, name  # same maths as optax's
  ax.set_title(name + note, fontsize=9)
  ax.grid(alpha=0.3)
axes.flat[0].legend(fontsize=8)
fig.tight_layout()
plt.show()"""),
]

NOTEBOOKS['05_porting_from_paddle'] = [
  ('md', """# Porting a PaddlePaddle recipe

Paddle code and its lambjax port, line for line. Functions of a parameter
receive its name (`lj.tree_names`)."""),
  ('code', """\
import jax, jax.numpy as jnp, numpy as np, optax
import lambjax as lj

params = {
  'embeddings': {'word_embeddings': jnp.ones((10, 4))},
  'encoder': {'layers': [{'linear': {'weight': jnp.full((4, 4), 0.5), 'bias': jnp.zeros(4)},
                          'LayerNorm': {'weight': jnp.ones(4), 'bias': jnp.zeros(4)}}]},
}
print(jax.tree.leaves(lj.tree_names(params)))"""),
  ('code', """\
# Paddle:
#   scheduler = paddle.optimizer.lr.LinearWarmup(
#       learning_rate=paddle.optimizer.lr.PolynomialDecay(1e-3, decay_steps=90, end_lr=0.0),
#       warmup_steps=10, start_lr=0.0, end_lr=1e-3)
#   opt = paddle.optimizer.Lamb(learning_rate=scheduler, lamb_weight_decay=0.01,
#       grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
#       exclude_from_weight_decay_fn=lambda n: 'LayerNorm' in n or n.endswith('bias'),
#       parameters=model.parameters())
scheduler = lj.paddle.lr.LinearWarmup(
  learning_rate=lj.paddle.lr.PolynomialDecay(1e-3, decay_steps=90, end_lr=0.0),
  warmup_steps=10, start_lr=0.0, end_lr=1e-3)
opt = lj.paddle.Lamb(learning_rate=scheduler, lamb_weight_decay=0.01,
  grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0),
  exclude_from_weight_decay_fn=lambda n: 'LayerNorm' in n or n.endswith('bias'))
state = opt.init(params)
grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
for _ in range(12):
  updates, state = opt.update(grads, state, params)
  params_new = optax.apply_updates(params, updates)
print('lr after 12 steps:', float(lj.get_lr(state)))"""),
  ('code', """\
# The same optimizer from optax-style lambjax blocks: Paddle adapts only decayed
# leaves, which is trust_ratio_mask=mask.
decayed = lj.mask_by_name(lambda n: not ('LayerNorm' in n or n.endswith('bias')))
chain = optax.chain(lj.clip_by_global_norm(1.0),
                    lj.lamb(scheduler, weight_decay=0.01, mask=decayed, trust_ratio_mask=decayed))
p1, s1, p2, s2 = params, opt.init(params), params, chain.init(params)
for _ in range(5):
  u1, s1 = opt.update(grads, s1, p1); p1 = optax.apply_updates(p1, u1)
  u2, s2 = chain.update(grads, s2, p2); p2 = optax.apply_updates(p2, u2)
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
print(f'max difference after 5 steps: {err:.2e}')
assert err < 1e-6"""),
  ('code', """\
# Parameter groups: Paddle's list of dicts; names (or a predicate) pick the leaves.
opt = lj.paddle.AdamW(learning_rate=1e-3, weight_decay=0.01, parameters=[
  {'params': lambda n: n.startswith('embeddings'), 'learning_rate': 0.1},
  {'params': lambda n: n.startswith('encoder'), 'weight_decay': 0.0},
])
u, _ = opt.update(grads, opt.init(params), params)
for n, x in zip(jax.tree.leaves(lj.tree_names(params)), jax.tree.leaves(u)):
  print(f'{n:40} {float(jnp.abs(x).max()):.2e}')"""),
  ('code', """\
# Checkpoints: a plain dict of numpy arrays (no pickle), restored by structure.
sd = lj.state_dict(s1)
template = lj.paddle.Lamb(learning_rate=scheduler, lamb_weight_decay=0.01,
  grad_clip=lj.paddle.ClipGradByGlobalNorm(1.0),
  exclude_from_weight_decay_fn=lambda n: 'LayerNorm' in n or n.endswith('bias')).init(params)
restored = lj.load_state_dict(template, sd)
print('step count restored:', int(jax.tree.leaves(restored)[0]))"""),
]

NOTEBOOKS['06_trust_ratios'] = [
  ('md', """# Per-layer trust ratios during training

`lj.lamb(..., diagnostics=True)` keeps each leaf's last trust ratio (and the
gradient, parameter and update norms) in the optimizer state; `lj.diagnostics`
reads them, here inside a jitted `lax.scan` so every step is recorded. Off by
default, and then it costs nothing."""),
  ('code', """\
import jax, jax.numpy as jnp, optax, numpy as np
import matplotlib.pyplot as plt
from flax import linen as nn
import lambjax as lj
import large_batch as lb

data = lb.load_splits(2000 if SMALL else 40_000)
x, y = jnp.asarray(data['x']), jnp.asarray(data['y'])
model = lb.MLP()
params = model.init(jax.random.key(0), x[:1])['params']
batch = 256 if SMALL else 4096
steps = (2 if SMALL else 10) * lb.steps_per_epoch(len(x), batch)
tx = lj.lamb(lb.warmup_linear_decay(0.08, steps), weight_decay=1e-4,
             mask=lb.KERNELS, diagnostics=True)

@jax.jit
def run(params, key):
  opt_state = tx.init(params)
  idx = jax.random.randint(key, (steps, batch), 0, len(x))
  def step(carry, i):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, x[i]), y[i]).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (loss, lj.diagnostics(opt_state))
  return jax.lax.scan(step, (params, opt_state), idx)

(params, _), (loss, diag) = run(params, jax.random.key(1))
print('recorded:', sorted(diag)[:6], '...')"""),
  ('code', """\
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
for key in sorted(k for k in diag if k.startswith('trust_ratio/')):
  ax0.plot(np.asarray(diag[key]), label=key.split('/', 1)[1])
ax0.set(yscale='log', xlabel='step', ylabel='trust ratio ||p|| / ||r||', title=f'LAMB, batch {batch}')
ax0.legend(fontsize=7); ax0.grid(alpha=0.3)
ax1.plot(np.asarray(diag['global_grad_norm']), label='global grad norm')
ax1.plot(np.asarray(loss), label='loss')
ax1.set(yscale='log', xlabel='step'); ax1.legend(); ax1.grid(alpha=0.3)
plt.show()
assert all(np.isfinite(np.asarray(v)).all() for v in diag.values())"""),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  nb = new_notebook()
  nb.metadata = {
    'kernelspec': {
      'display_name': 'Python 3',
      'language': 'python',
      'name': 'python3',
    },
    'language_info': {'name': 'python'},
    'colab': {'provenance': []},
  }
  title, *rest = cells
  nb.cells = [
    new_markdown_cell(badge(name) + '\n\n' + title[1]),
    new_code_cell(INSTALL),
  ]
  for kind, src in rest:
    nb.cells.append(
      new_markdown_cell(src) if kind == 'md' else new_code_cell(src)
    )
  for i, cell in enumerate(nb.cells):
    cell['id'] = f'{name}-{i}'
  return nb


def main() -> None:
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(name, cells), HERE / f'{name}.ipynb')
    print(f'wrote notebooks/{name}.ipynb')


if __name__ == '__main__':
  main()
