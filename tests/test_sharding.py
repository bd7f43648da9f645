"""Sharded (8 simulated devices) runs equal one device's; state_sharding."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lambjax as lj


def _eight_cpu_devices_env():
  """A child process with 8 simulated CPU devices, also on a GPU machine."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def test_eight_device_mesh_matches_single_device():
  env = _eight_cpu_devices_env()
  script = Path(__file__).with_name('sharded_main.py')
  root = Path(__file__).resolve().parent.parent
  out = subprocess.run(
    [sys.executable, str(script)],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=900,
  )
  print(out.stdout[-4000:])
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  assert 'all sharded runs match' in out.stdout


def test_sharded_equals_single_device_property(capsys):
  """The hypothesis property of tests/sharded_property.py, 200 examples."""
  env = _eight_cpu_devices_env()
  root = Path(__file__).resolve().parent.parent
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-q',
      '-p',
      'no:cacheprovider',
      '-p',
      'no:benchmark',  # pytest-benchmark, where installed, warns under xdist.
      '--hypothesis-show-statistics',
      '-o',
      'addopts=',
      str(Path(__file__).with_name('sharded_property.py')),
    ],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=900,
  )
  stats = out.stdout[out.stdout.find('Hypothesis Statistics') :]
  with capsys.disabled():  # Show the example count in the test output.
    print('\n[8-device property] ' + stats.strip()[:1500])
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  passing = re.search(r'(\d+) passing', out.stdout)
  assert passing and int(passing.group(1)) >= 200, out.stdout[-2000:]


def test_state_sharding_structure_and_abstract_params():
  mesh = Mesh(jax.devices()[:1], ('data',))
  params = {
    'w': jax.ShapeDtypeStruct((4, 2), jnp.float32),
    'b': jax.ShapeDtypeStruct((3,), jnp.float32),
  }
  shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  for tx in (
    lj.lamb(1e-3),
    lj.lars(0.1),
    lj.paddle.AdamW(parameters=[{'params': ['w']}, {'params': ['b']}]),
  ):
    s = lj.state_sharding(tx, params, shard, zero_axis='data')
    state = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(
      s, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    ) == jax.tree.structure(state)
  with pytest.raises(ValueError, match='zero_axis'):
    lj.state_sharding(lj.lamb(1e-3), params, shard, zero_axis='model')
