"""Optimizer step time, compile time, bandwidth fraction and peak RSS.

lambjax vs optax side by side in one process, on float32 trees shaped like
BERT-base (HF BertModel), ResNet-50 and many small leaves (``--dtype
bfloat16``: bf16 params and grads, no master weights).

    python benchmarks/bench_step.py --quick        # < 3 min on 2 cores
    python benchmarks/bench_step.py                # everything
    python benchmarks/bench_step.py --trees bert --opts lamb,lars --rounds 15
    python benchmarks/bench_step.py --trees bert --opts lamb,lars --dtype bfloat16

Each step is jitted ``update + optax.apply_updates`` with params and state
donated, timed with ``block_until_ready``. Rounds are interleaved (every
implementation once per round, in rotating order) so machine noise hits all
of them alike; we report the median and min-max over rounds, and the median
of the per-round ratios optax/lambjax (> 1: lambjax is faster). The roof is an
in-place 4-read-3-write elementwise pass over the same number of float32s,
timed in the same rounds; ``roof`` = roof time / step time. The
``*_stacked`` rows step lambjax on the same parameters with the layers
stacked (``STACKED``: the ``nn.scan`` layout, a trust ratio per layer)
against optax on the per-leaf tree.

Memory (CPU, BERT-base lamb, each in a fresh process): the process's peak
RSS over a bare jax process, and the step's own peak: the step is compiled
ahead of time, then the peak RSS of four steps over the RSS just before
them (the first step allocates the temporaries; glibc keeps most of them,
so measuring after a warm-up step would hide them).
Both are given as multiples of params + grads + state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lambjax as lj

# ---------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------


def bert_base_shapes() -> dict[str, tuple[int, ...]]:
  """HF ``BertModel`` (bert-base-uncased) parameter shapes: 199 leaves."""
  h, inter, vocab = 768, 3072, 30522
  s = {
    'embeddings.word_embeddings.weight': (vocab, h),
    'embeddings.position_embeddings.weight': (512, h),
    'embeddings.token_type_embeddings.weight': (2, h),
    'embeddings.LayerNorm.weight': (h,),
    'embeddings.LayerNorm.bias': (h,),
  }
  for i in range(12):
    p = f'encoder.layer.{i}.'
    for n in ('query', 'key', 'value'):
      s[p + f'attention.self.{n}.weight'] = (h, h)
      s[p + f'attention.self.{n}.bias'] = (h,)
    s[p + 'attention.output.dense.weight'] = (h, h)
    s[p + 'attention.output.dense.bias'] = (h,)
    s[p + 'attention.output.LayerNorm.weight'] = (h,)
    s[p + 'attention.output.LayerNorm.bias'] = (h,)
    s[p + 'intermediate.dense.weight'] = (inter, h)
    s[p + 'intermediate.dense.bias'] = (inter,)
    s[p + 'output.dense.weight'] = (h, inter)
    s[p + 'output.dense.bias'] = (h,)
    s[p + 'output.LayerNorm.weight'] = (h,)
    s[p + 'output.LayerNorm.bias'] = (h,)
  s['pooler.dense.weight'] = (h, h)
  s['pooler.dense.bias'] = (h,)
  return s


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
  """torchvision ResNet-50 parameter shapes (conv + BN scale/bias, fc)."""
  s = {'conv1.weight': (64, 3, 7, 7), 'bn1.weight': (64,), 'bn1.bias': (64,)}
  cin = 64
  for li, (blocks, w) in enumerate(
    zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=1
  ):
    for b in range(blocks):
      p = f'layer{li}.{b}.'
      s[p + 'conv1.weight'] = (w, cin, 1, 1)
      s[p + 'conv2.weight'] = (w, w, 3, 3)
      s[p + 'conv3.weight'] = (4 * w, w, 1, 1)
      for k, c in (('bn1', w), ('bn2', w), ('bn3', 4 * w)):
        s[p + f'{k}.weight'] = (c,)
        s[p + f'{k}.bias'] = (c,)
      if b == 0:
        s[p + 'downsample.0.weight'] = (4 * w, cin, 1, 1)
        s[p + 'downsample.1.weight'] = (4 * w,)
        s[p + 'downsample.1.bias'] = (4 * w,)
      cin = 4 * w
  s['fc.weight'] = (1000, 2048)
  s['fc.bias'] = (1000,)
  return s


def resnet50_flax_shapes() -> dict[str, tuple[int, ...]]:
  """The same ResNet-50 in Flax's layout: conv kernels ``(kh, kw, I, O)``,
  the classifier ``(in, out)``. XLA:CPU's reductions are sensitive to the
  last dimension (benchmarks/RESULTS.md, "LARS's norm by the last
  dimension"), so the layout matters."""
  out = {}
  for name, shape in resnet50_shapes().items():
    if len(shape) == 4:
      shape = (shape[2], shape[3], shape[1], shape[0])
    elif len(shape) == 2:
      shape = shape[::-1]
    out[name] = shape
  return out


def many_small_shapes(n: int = 2000, size: int = 1000):
  return {f'layers.{i}.w': (size,) for i in range(n)}


TREES = {
  'bert': bert_base_shapes,
  'resnet50': resnet50_shapes,
  'resnet50_flax': resnet50_flax_shapes,  # Not in the default run.
  'many_small': many_small_shapes,
}


def stack_bert_layers(shapes):
  """BERT with its 12 encoder layers stacked (``nn.scan`` layout): 23 leaves."""
  out = {}
  for k, v in shapes.items():
    m = re.match(r'encoder\.layer\.(\d+)\.(.*)', k)
    if m is None:
      out[k] = v
    elif m.group(1) == '0':
      out['encoder.layer.' + m.group(2)] = (12, *v)
  return out


# The same parameters with their layers stacked, as a model scanned over its
# layers stores them: per tree, the stacked shapes and the ``lj.Stacked``
# pattern naming the stacked leaves (one trust ratio per layer).
STACKED = {
  'bert': (stack_bert_layers, r'encoder\.layer'),
  'many_small': (
    lambda s: {'layers.w': (len(s), *next(iter(s.values())))},
    'layers',
  ),
}


_TREES_MADE = {}


def _draw(shapes, seed):
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(rng.standard_normal(v, dtype=np.float32) * 0.02)
    for k, v in shapes.items()
  }


def make_tree(shapes, seed, keep=True):
  """A fresh float32 tree of N(0, 0.02^2) values, the same for each seed.

  Drawing BERT-base's 110 M normals takes ~2 s and every runner needs its
  own (donated) buffers, so the last tree shape's draws are kept and
  copied. ``keep=False`` keeps nothing (for memory measurements).
  """
  if not keep:
    return _draw(shapes, seed)
  key = (tuple(shapes.items()), seed)
  if key not in _TREES_MADE:
    if _TREES_MADE and next(iter(_TREES_MADE))[0] != key[0]:
      _TREES_MADE.clear()  # a new tree shape: drop the last one's draws
    _TREES_MADE[key] = _draw(shapes, seed)
  return jax.tree.map(jnp.copy, _TREES_MADE[key])


# ---------------------------------------------------------------------------
# Optimizers: (lambjax, optax counterpart)
# ---------------------------------------------------------------------------


def _decay_mask(params):
  return {
    k: not (k.endswith('bias') or 'LayerNorm' in k or 'bn' in k) for k in params
  }


_WD_SCHEDULE = optax.linear_schedule(0.04, 0.4, 10_000)

OPTS = {
  'lamb': (
    lambda: lj.lamb(1e-3, weight_decay=0.01),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'lars': (
    lambda: lj.lars(0.1, weight_decay=1e-4, trust_coefficient=0.001),
    lambda: optax.lars(0.1, weight_decay=1e-4, trust_coefficient=0.001),
  ),
  'adamw': (
    lambda: lj.adamw(1e-3, weight_decay=0.01),
    lambda: optax.adamw(1e-3, weight_decay=0.01),
  ),
  'adam': (lambda: lj.adam(1e-3), lambda: optax.adam(1e-3)),
  'lamb_workspace': (
    lambda: lj.lamb(1e-3, weight_decay=0.01, workspace=True),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  # Small state arrays in one buffer per dtype: for accelerators (a per-leaf
  # GPU step is bound by the host's per-buffer cost); costs on CPU.
  'lamb_packed': (
    lambda: lj.with_packed_state(lj.lamb(1e-3, weight_decay=0.01)),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  # Small leaves' state stacked by shape (lj.GroupedState): one kernel per
  # small leaf, for trees of many small leaves (compile time).
  'lamb_grouped': (
    lambda: lj.lamb(1e-3, weight_decay=0.01, group_small_leaves=True),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'lars_grouped': (
    lambda: lj.lars(
      0.1, weight_decay=1e-4, trust_coefficient=0.001, group_small_leaves=True
    ),
    lambda: optax.lars(0.1, weight_decay=1e-4, trust_coefficient=0.001),
  ),
  'adamw_grouped': (
    lambda: lj.adamw(1e-3, weight_decay=0.01, group_small_leaves=True),
    lambda: optax.adamw(1e-3, weight_decay=0.01),
  ),
  # Under optax.inject_hyperparams every numeric argument (b1, b2, eps,
  # weight_decay, ...) is an array in the state, against optax's the same way.
  'lamb_injected': (
    lambda: optax.inject_hyperparams(lj.lamb)(1e-3, weight_decay=0.01),
    lambda: optax.inject_hyperparams(optax.lamb)(1e-3, weight_decay=0.01),
  ),
  'lars_injected': (
    lambda: optax.inject_hyperparams(lj.lars)(
      0.1, weight_decay=1e-4, trust_coefficient=0.001
    ),
    lambda: optax.inject_hyperparams(optax.lars)(
      0.1, weight_decay=1e-4, trust_coefficient=0.001
    ),
  ),
  'adamw_injected': (
    lambda: optax.inject_hyperparams(lj.adamw)(1e-3, weight_decay=0.01),
    lambda: optax.inject_hyperparams(optax.adamw)(1e-3, weight_decay=0.01),
  ),
  # A weight-decay schedule (DINO/ViT-style, rising 0.04 -> 0.4) and NAdamW.
  # optax.lamb / optax.lars take no schedule, so their own chains with one.
  'lamb_wd_schedule': (
    lambda: lj.lamb(1e-3, weight_decay=_WD_SCHEDULE),
    lambda: optax.chain(
      optax.scale_by_adam(eps=1e-6),
      optax.add_decayed_weights(_WD_SCHEDULE),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(1e-3),
    ),
  ),
  'lars_wd_schedule': (
    lambda: lj.lars(0.1, weight_decay=_WD_SCHEDULE, trust_coefficient=0.001),
    lambda: optax.chain(
      optax.add_decayed_weights(_WD_SCHEDULE),
      optax.scale_by_trust_ratio(trust_coefficient=0.001),
      optax.scale_by_learning_rate(0.1),
      optax.trace(decay=0.9),
    ),
  ),
  'nadamw': (
    lambda: lj.adamw(1e-3, weight_decay=0.01, nesterov=True),
    lambda: optax.nadamw(1e-3, weight_decay=0.01),
  ),
  'lamb_8bit': (
    lambda: lj.lamb(1e-3, weight_decay=0.01, state_8bit=True),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'adamw_8bit': (
    lambda: lj.adamw(1e-3, weight_decay=0.01, state_8bit=True),
    lambda: optax.adamw(1e-3, weight_decay=0.01),
  ),
  'lamb_bf16': (
    lambda: lj.lamb(
      1e-3, weight_decay=0.01, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'adamw_dl': (
    lambda: lj.adamw_dl(1e-3, layerwise_decay=0.8, n_layers=12),
    lambda: optax.adamw(1e-3, weight_decay=0.01),
  ),
  'paddle.Lamb': (
    lambda: lj.paddle.Lamb(1e-3, 0.01),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'paddle.Lamb_workspace': (
    lambda: lj.paddle.Lamb(1e-3, 0.01, workspace=True),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'paddle.LarsMomentum': (
    lambda: lj.paddle.LarsMomentum(0.1, 0.9, 0.001, 1e-4),
    lambda: optax.lars(0.1, weight_decay=1e-4, trust_coefficient=0.001),
  ),
  'paddle.AdamW': (
    lambda: lj.paddle.AdamW(1e-3, weight_decay=0.01),
    lambda: optax.adamw(1e-3, weight_decay=0.01),
  ),
  'paddle.Adam': (lambda: lj.paddle.Adam(1e-3), lambda: optax.adam(1e-3)),
  'paddle.AdamWDL': (
    lambda: lj.paddle.AdamWDL(1e-3, layerwise_decay=0.8),
    lambda: optax.adamw(1e-3, weight_decay=0.01),
  ),
  # The layers stacked (STACKED; lambjax_side): lambjax's factory takes the
  # stacked leaves' pattern. Against optax's on the per-leaf tree, the only
  # layout where optax takes a trust ratio per layer.
  'lamb_stacked': (
    lambda pattern: lj.lamb(
      1e-3, weight_decay=0.01, stacked=lj.Stacked(pattern)
    ),
    lambda: optax.lamb(1e-3, weight_decay=0.01),
  ),
  'lars_stacked': (
    lambda pattern: lj.lars(
      0.1,
      weight_decay=1e-4,
      trust_coefficient=0.001,
      stacked=lj.Stacked(pattern),
    ),
    lambda: optax.lars(0.1, weight_decay=1e-4, trust_coefficient=0.001),
  ),
}


def lambjax_side(opt, tree, shapes):
  """lambjax's optimizer for row ``opt`` on ``tree``, and the shapes it steps.

  ``*_stacked`` rows step the same parameters with their layers stacked
  (``STACKED[tree]``), each layer keeping its own trust ratio; other rows
  step ``shapes``. ``None`` for a stacked row on a tree with no stacked
  layout.
  """
  make = OPTS[opt][0]
  if not opt.endswith('_stacked'):
    return make(), shapes
  if tree not in STACKED:
    return None
  stack, pattern = STACKED[tree]
  return make(pattern), stack(shapes)


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def roof_fn(a, b, c, d):
  """4 reads (a, b, c, d), 3 in-place writes (a, c, d)."""
  return (
    jax.tree.map(lambda x, y: x + 1e-3 * y, a, b),
    jax.tree.map(lambda x, y: 0.9 * x + y, c, b),
    jax.tree.map(lambda x, y: 0.99 * x + y, d, b),
  )


def block(tree):
  jax.tree.map(lambda x: x.block_until_ready(), tree)


class Runner:
  """One implementation: its compiled step and its live (donated) buffers."""

  def __init__(self, name, tx, shapes, grads, dtype=jnp.float32):
    self.name = name
    self.grads = grads
    params = jax.tree.map(lambda x: x.astype(dtype), make_tree(shapes, 0))
    state = tx.init(params)
    step = make_step(tx)
    t0 = time.perf_counter()
    self.compiled = step.lower(params, state, grads).compile()
    self.compile_s = time.perf_counter() - t0
    self.params, self.state = params, state
    self.times = []
    self.run()  # warm up

  def run(self, inner=1):
    t0 = time.perf_counter()
    for _ in range(inner):
      self.params, self.state = self.compiled(
        self.params, self.state, self.grads
      )
    block((self.params, self.state))
    return (time.perf_counter() - t0) / inner


class Roof:
  def __init__(self, shapes):
    self.bufs = [make_tree(shapes, i) for i in range(4)]
    self.compiled = (
      jax.jit(roof_fn, donate_argnums=(0, 2, 3)).lower(*self.bufs).compile()
    )
    self.times = []
    self.run()

  def run(self, inner=1):
    a, b, c, d = self.bufs
    t0 = time.perf_counter()
    for _ in range(inner):
      a, c, d = self.compiled(a, b, c, d)
    block((a, c, d))
    self.bufs = [a, b, c, d]
    return (time.perf_counter() - t0) / inner


def fmt_ms(xs):
  return (
    f'{1e3 * statistics.median(xs):8.1f} '
    f'[{1e3 * min(xs):.1f}-{1e3 * max(xs):.1f}]'
  )


def bench_tree(
  tree, opts, rounds, skip_optax_compile_over=None, inner=1, dtype='float32'
):
  shapes = TREES[tree]()
  n = sum(int(np.prod(s)) for s in shapes.values())
  size = jnp.dtype(dtype).itemsize
  print(
    f'\n## {tree}: {len(shapes)} leaves, {n / 1e6:.1f} M params '
    f'({size * n / 2**20:.0f} MiB per copy{"" if size == 4 else ", " + dtype})',
    flush=True,
  )
  grads = jax.tree.map(lambda x: x.astype(dtype), make_tree(shapes, 99))
  roof = Roof(shapes)
  rows = []
  for opt in opts:
    side = lambjax_side(opt, tree, shapes)
    if side is None:
      print(f'{opt:20s} (no stacked layout of {tree})', flush=True)
      continue
    tx, our_shapes = side
    our_grads = grads
    if our_shapes is not shapes:
      our_grads = jax.tree.map(
        lambda x: x.astype(dtype), make_tree(our_shapes, 99)
      )
    ours = Runner('lambjax', tx, our_shapes, our_grads, dtype)
    theirs_fn = OPTS[opt][1]
    theirs = None
    if (
      skip_optax_compile_over is None or len(shapes) <= skip_optax_compile_over
    ):
      theirs = Runner('optax', theirs_fn(), shapes, grads, dtype)
    impls = [ours, roof] + ([theirs] if theirs else [])
    for r in range(rounds):
      order = impls[r % len(impls) :] + impls[: r % len(impls)]
      for impl in order:
        impl.times.append(impl.run(inner))
    roof_t = roof.times[-rounds:]
    row = {
      'tree': tree,
      'opt': opt,
      'dtype': dtype,
      'leaves': len(shapes),
      'lambjax_leaves': len(our_shapes),
      'params': n,
      'lambjax_ms': 1e3 * statistics.median(ours.times),
      'lambjax_compile_s': ours.compile_s,
      'roof_fraction': statistics.median(
        [a / b for a, b in zip(roof_t, ours.times, strict=True)]
      ),
    }
    line = (
      f'{opt:20s} lambjax {fmt_ms(ours.times)} ms  compile '
      f'{ours.compile_s:6.2f} s  roof {row["roof_fraction"]:.2f}'
    )
    if theirs:
      ratio = statistics.median(
        [b / a for a, b in zip(ours.times, theirs.times, strict=True)]
      )
      row.update(
        optax_ms=1e3 * statistics.median(theirs.times),
        optax_compile_s=theirs.compile_s,
        speedup=ratio,
      )
      line += (
        f' | optax {fmt_ms(theirs.times)} ms  compile '
        f'{theirs.compile_s:6.2f} s | optax/lambjax {ratio:.2f}x'
      )
    print(line, flush=True)
    rows.append(row)
    del ours, theirs
  print(f'{"roof (4r3w pass)":20s} {fmt_ms(roof.times)} ms', flush=True)
  return rows


def _child_setup(opt, impl, tree):
  """Code for a fresh process: one optimizer's params, grads, state, step."""
  return f"""
import sys
sys.argv = ['x']
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench_step as b, jax
shapes = b.TREES[{tree!r}]()
grads = b.make_tree(shapes, 99, keep=False)
tx = b.OPTS[{opt!r}][{0 if impl == 'lambjax' else 1}]()
params = b.make_tree(shapes, 0, keep=False)
state = tx.init(params)
step = b.make_step(tx)
"""


# The same process: bytes of params+grads+state, and of the workspace.
_SIZES = """
nbytes = sum(x.nbytes for x in jax.tree.leaves((params, grads, state)))
work = getattr(state, 'direction', None)  # lamb(workspace=True)'s buffer
wbytes = sum(x.nbytes for x in jax.tree.leaves(work))
"""


def peak_rss(opt, impl, tree):
  """Runs one optimizer in a fresh process; returns MiB as a dict.

  ``extra``: the process's peak RSS (VmHWM) minus a bare jax process's,
  data generation and compilation included. ``arrays``: params + grads +
  state; ``core``: the same without a workspace buffer. ``data``: RSS after
  making the arrays and the state, over a bare jax process and the arrays
  (imports and the allocator slack of data generation). ``compile``: what
  lowering and compiling the step (ahead of time, from the live arrays)
  left in RSS.
  ``first``: the first step's peak over the RSS just before it, which is
  where a step's temporaries are first allocated (glibc keeps what it
  frees below its mmap ceiling, so later steps find them mapped).
  ``steps``: the peak of that step and three more over the same RSS.
  """
  # ru_maxrss survives fork+exec on Linux (a child starts at the parent's
  # peak), so read VmHWM, which belongs to the new address space.
  status = (
    "lambda k: int([l for l in open('/proc/self/status') if "
    'l.startswith(k)][0].split()[1]) / 1024'
  )
  code = (
    _child_setup(opt, impl, tree)
    + f"""
st = {status}
def reset_peak():  # VmHWM := VmRSS
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
b.block((params, state, grads))
made = st('VmRSS')
step = step.lower(params, state, grads).compile()
compiled = st('VmRSS')
peak = st('VmHWM')
reset_peak()
params, state = step(params, state, grads)
b.block((params, state))
first = st('VmHWM') - compiled
for _ in range(3):
  params, state = step(params, state, grads)
b.block((params, state))
steps = st('VmHWM') - compiled
peak = max(peak, st('VmHWM'))
{_SIZES}print(peak, nbytes / 2**20, (nbytes - wbytes) / 2**20, made,
      compiled - made, first, steps)
"""
  )
  base_code = (
    'import jax, jax.numpy as jnp; jnp.ones(1).block_until_ready(); '
    f'print(({status})("VmHWM"))'
  )
  base = float(
    subprocess.run(
      [sys.executable, '-c', base_code],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  ).stdout.split()
  peak, arrays, core, made, comp, first, steps = (float(x) for x in out)
  return {
    'extra': peak - base,
    'arrays': arrays,
    'core': core,
    'data': made - base - arrays,
    'compile': comp,
    'first': first,
    'steps': steps,
  }


def peak_device_mem(opt, impl, tree):
  """Accelerator memory of one optimizer's step, in a fresh process.

  Returns MiB: (the allocator's peak bytes in use over init, compile and
  four steps; params+grads+state; params+grads+moments). Data is made on
  the host, so the peak is the live arrays plus what the step allocates.
  """
  code = (
    _child_setup(opt, impl, tree)
    + f"""
for _ in range(4):
  params, state = step(params, state, grads)
b.block((params, state))
peak = jax.local_devices()[0].memory_stats()['peak_bytes_in_use']
{_SIZES}print(peak / 2**20, nbytes / 2**20, (nbytes - wbytes) / 2**20)
"""
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  ).stdout.split()
  return tuple(float(x) for x in out[-3:])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    '--quick',
    action='store_true',
    help='bert + many_small, lamb/lamb_workspace/lars/adamw/adam, 5 rounds',
  )
  ap.add_argument('--trees', default=None)
  ap.add_argument('--opts', default=None)
  ap.add_argument('--rounds', type=int, default=None)
  ap.add_argument('--no-rss', action='store_true')
  ap.add_argument(
    '--inner',
    type=int,
    default=None,
    help='steps per timed round (default 1 on CPU, 20 on an accelerator, '
    'where one step is ~1 ms and dispatch runs ahead as in training)',
  )
  ap.add_argument('--json', default=None, help='write the rows here')
  ap.add_argument(
    '--dtype',
    default='float32',
    choices=['float32', 'bfloat16'],
    help='params and grads (state as each optimizer makes it); the roof '
    'stays a float32 pass',
  )
  a = ap.parse_args(argv)
  trees = (
    a.trees or ('bert,many_small' if a.quick else 'bert,resnet50,many_small')
  ).split(',')
  opts = (
    a.opts
    or ('lamb,lamb_workspace,lars,adamw,adam' if a.quick else ','.join(OPTS))
  ).split(',')
  rounds = a.rounds or (5 if a.quick else 11)
  cpu = jax.default_backend() == 'cpu'
  inner = a.inner or (1 if cpu else 20)
  print(
    f'# machine: {platform.machine()}, nproc {os.cpu_count()}, '
    f'jax {jax.__version__} ({jax.default_backend()}), optax '
    f'{optax.__version__}, lambjax {lj.__version__}'
  )
  print(
    f'# device {jax.devices()[0].device_kind}; rounds {rounds} of {inner} '
    'step(s); times are medians [min-max] over rounds, per step'
  )
  rows = []
  for tree in trees:
    # optax's compile on 2,000 leaves takes minutes: quick mode skips it.
    skip = 500 if (a.quick and tree == 'many_small') else None
    tree_opts = opts
    if tree == 'many_small' and not a.opts:
      # Each compile there takes ~15-150 s: the core optimizers only.
      tree_opts = (
        ['lars', 'lars_grouped']
        if a.quick
        else ['lamb', 'lars', 'adamw', 'adam', 'lamb_grouped', 'lars_grouped']
      )
    rows += bench_tree(tree, tree_opts, rounds, skip, inner, a.dtype)
  # Memory is measured on the float32 trees only.
  rss = not a.no_rss and a.dtype == 'float32'
  if rss and not cpu and 'bert' in trees and 'lamb' in opts:
    print('\n## peak device memory, BERT-base lamb step (fresh process)')
    runs = [('lamb', 'lambjax'), ('lamb', 'optax')]
    if 'lamb_workspace' in opts:
      runs.append(('lamb_workspace', 'lambjax'))
    for opt, impl in runs:
      peak, arrays, core = peak_device_mem(opt, impl, 'bert')
      print(
        f'{opt:15s} {impl:8s} peak {peak:6.0f} MiB; '
        f'params+grads+state {arrays:.0f} MiB: {peak / arrays:.2f}x, '
        f'params+grads+moments {core:.0f} MiB: {peak / core:.2f}x',
        flush=True,
      )
      rows.append(
        {
          'tree': 'bert',
          'opt': opt,
          'impl': impl,
          'device_peak_mib': peak,
          'arrays_mib': arrays,
          'core_mib': core,
        }
      )
  if rss and cpu and 'bert' in trees and 'lamb' in opts:
    print(
      '\n## RSS, BERT-base lamb (fresh process; process peak over a bare '
      'jax process, step peak over the RSS just before the step)'
    )
    runs = [('lamb', 'lambjax'), ('lamb', 'optax')]
    if 'lamb_workspace' in opts and not a.quick:  # quick: < 3 min
      runs.append(('lamb_workspace', 'lambjax'))
    for opt, impl in runs:
      r = peak_rss(opt, impl, 'bert')
      arrays = r['arrays']
      print(
        f'{opt:15s} {impl:8s} process peak +{r["extra"]:5.0f} MiB: '
        f'{r["extra"] / arrays:.2f}x params+grads+state ({arrays:.0f} MiB), '
        f'{r["extra"] / r["core"]:.2f}x params+grads+moments; step peak '
        f'{(arrays + r["steps"]) / arrays:.2f}x (+{r["steps"]:.0f} MiB, '
        f'first step +{r["first"]:.0f}); beyond the '
        f'arrays: data {r["data"]:.0f}, compile {r["compile"]:.0f} MiB',
        flush=True,
      )
      rows.append(
        {'tree': 'bert', 'opt': opt, 'impl': impl}
        | {f'rss_{k}_mib': v for k, v in r.items()}
      )
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == '__main__':
  main()
