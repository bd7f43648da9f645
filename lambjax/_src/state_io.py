"""Optimizer state to and from plain dicts and msgpack files (never pickle)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from lambjax._src import base

_TYPE = '_type'
_FORMAT = 'lambjax-state'
_VERSION = 2


def _children(x: Any) -> tuple[list[tuple[str, Any]], Any]:
  """One level of a pytree node: ``[(key, child)]`` and its treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    x, is_leaf=lambda y: y is not x
  )
  return [(base.keystr(p), c) for p, c in flat], treedef


def _is_leaf(x: Any) -> bool:
  # An empty node (optax.EmptyState) is not a leaf: all_leaves says so.
  return x is None or jax.tree_util.all_leaves([x])


def _tagged(x: Any) -> bool:
  """Nodes other than plain dicts/lists/tuples carry their type name."""
  return type(x) not in (dict, list, tuple)


def state_dict(opt_state: Any) -> dict:
  """Returns ``opt_state`` as a nested dict of numpy arrays and plain values.

  Every pytree node becomes a dict keyed like :func:`lambjax.tree_names`
  (field names, dict keys, decimal indices); nodes other than plain
  dicts/lists/tuples (the optimizer's state classes) also record their class
  name under ``'_type'``, so a state dict cannot be loaded into another
  optimizer by accident. Nothing is pickled.

  Args:
    opt_state: any optimizer state (a pytree of arrays).

  Returns:
    A nested ``dict``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> sd = lj.state_dict(lj.adam(1e-3).init({'w': jnp.zeros(2)}))
    >>> sd['0']['_type'], sd['0']['mu']['w'], sd['1']['learning_rate']
    ('ScaleByAdamState', array([0., 0.], dtype=float32), array(0.001, dtype=float32))
  """
  return _state_dict(opt_state, '')


def _state_dict(node: Any, path: str) -> Any:
  if _is_leaf(node):
    if node is None:
      return None
    value = np.asarray(node)
    # Objects, strings, times and records; bfloat16 is kind 'V' but no record.
    if value.dtype.kind in 'OUSMm' or value.dtype.fields is not None:
      raise ValueError(
        f'state_dict: leaf {path or "<root>"!r} is {node!r} '
        f'({type(node).__name__}), not an array; an optimizer state holds '
        'only arrays.'
      )
    return value
  kids, _ = _children(node)
  out: dict[str, Any] = {
    k: _state_dict(c, f'{path}.{k}' if path else k) for k, c in kids
  }
  opt_state = node
  if _tagged(opt_state):
    out[_TYPE] = type(opt_state).__name__
  return out


def _fail(path: str, msg: str):
  raise ValueError(
    f'load_state_dict: state dict does not fit the optimizer state at '
    f'{path or "<root>"!r}: {msg}.'
  )


def _load(template: Any, sd: Any, path: str) -> Any:
  if template is None:
    if sd is not None:
      _fail(path, f'expected None, got {type(sd).__name__}')
    return None
  if _is_leaf(template):
    if isinstance(sd, dict) or sd is None:
      _fail(path, f'expected an array, got {type(sd).__name__}')
    try:
      arr = np.asarray(sd)
    except Exception as e:  # noqa: BLE001 - any bad value is a bad file.
      _fail(path, f'not an array ({e})')
    want = np.asarray(template) if not hasattr(template, 'dtype') else template
    if arr.shape != tuple(want.shape):
      _fail(path, f'shape {arr.shape} != {tuple(want.shape)}')
    if arr.dtype != want.dtype:
      _fail(path, f'dtype {arr.dtype} != {want.dtype}')
    return jnp.asarray(arr) if isinstance(template, jax.Array) else arr
  if not isinstance(sd, dict):
    _fail(path, f'expected a dict, got {type(sd).__name__}')
  kids, treedef = _children(template)
  if _tagged(template):
    want_type = type(template).__name__
    if sd.get(_TYPE) != want_type:
      _fail(
        path,
        f'state type {sd.get(_TYPE)!r} != {want_type!r} '
        "(another optimizer's state?)",
      )
  new = []
  for k, c in kids:  # In order: report the first path that differs.
    if k not in sd:
      _fail(_join(path, k), 'missing')
    new.append(_load(c, sd[k], _join(path, k)))
  extra = sorted(set(sd) - {k for k, _ in kids} - {_TYPE})
  if extra:
    _fail(_join(path, extra[0]), 'unexpected key')
  return jax.tree_util.tree_unflatten(treedef, new)


def _join(path: str, key: str) -> str:
  return f'{path}.{key}' if path else key


def load_state_dict(template_state: Any, state_dict: dict) -> Any:
  """Restores a :func:`state_dict` into the structure of ``template_state``.

  Args:
    template_state: a state built by ``tx.init(params)`` for the same
      optimizer and params.
    state_dict: the dict to restore.

  Returns:
    A state with the template's structure and the dict's values.

  Raises:
    ValueError: naming the first path whose structure, state type, shape or
      dtype does not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.lamb(1e-3)
    >>> state = tx.init({'w': jnp.ones(3)})
    >>> restored = lj.load_state_dict(state, lj.state_dict(state))
    >>> bad = lj.state_dict(lj.adamw(1e-3).init({'w': jnp.ones(3)}))
    >>> lj.load_state_dict(state, bad)
    Traceback (most recent call last):
    ...
    ValueError: load_state_dict: ... at '2': ...
  """
  return _load(template_state, state_dict, '')


def to_bytes(opt_state: Any) -> bytes:
  """Serialises a state with msgpack (``flax.serialization``), no pickle.

  The file is an envelope ``{format, version, sha256, payload}`` whose
  payload is the msgpack of :func:`state_dict`; the SHA-256 makes any
  corruption (a flipped bit in a value included) a clean error on load
  instead of a silently wrong state.
  """
  payload = serialization.msgpack_serialize(state_dict(opt_state))
  return serialization.msgpack_serialize(
    {
      'format': _FORMAT,
      'version': _VERSION,
      'sha256': hashlib.sha256(payload).hexdigest(),
      'payload': payload,
    }
  )


def _restore(data: bytes, what: str) -> Any:
  try:
    return serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001 - msgpack raises many types.
    raise ValueError(f'not a lambjax checkpoint ({what}: {e!r})') from None


def from_bytes(template_state: Any, data: bytes) -> Any:
  """Inverse of :func:`to_bytes`.

  Raises:
    ValueError: bytes that are truncated, corrupted (checksum), not a lambjax
      checkpoint, of another version, or that do not fit the template.
  """
  if not isinstance(data, bytes | bytearray):
    raise ValueError(f'from_bytes: expected bytes, got {type(data).__name__}')
  env = _restore(bytes(data), 'envelope')
  if not isinstance(env, dict) or env.get('format') != _FORMAT:
    raise ValueError('not a lambjax checkpoint (missing format marker)')
  if env.get('version') != _VERSION:
    raise ValueError(
      f'unsupported lambjax checkpoint version {env.get("version")!r}'
    )
  payload = env.get('payload')
  if not isinstance(payload, bytes) or not isinstance(env.get('sha256'), str):
    raise ValueError('not a lambjax checkpoint (no payload)')
  if hashlib.sha256(payload).hexdigest() != env['sha256']:
    raise ValueError('corrupted lambjax checkpoint (checksum mismatch)')
  return load_state_dict(template_state, _restore(payload, 'payload'))


def save_state(path: str | os.PathLike, opt_state: Any) -> None:
  """Writes ``opt_state`` to ``path`` (msgpack), atomically.

  Examples:
    >>> import tempfile, os, jax.numpy as jnp
    >>> import lambjax as lj
    >>> tx = lj.adamw(1e-3)
    >>> state = tx.init({'w': jnp.ones(2)})
    >>> path = os.path.join(tempfile.mkdtemp(), 'opt.msgpack')
    >>> lj.save_state(path, state)
    >>> lj.get_lr(lj.load_state(path, state))
    Array(0.001, dtype=float32)
  """
  if not isinstance(path, str | os.PathLike):
    raise TypeError(
      f'save_state: `path` must be a str or os.PathLike, got {path!r}.'
    )
  path = Path(path)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_bytes(to_bytes(opt_state))
  tmp.replace(path)


def load_state(path: str | os.PathLike, template_state: Any) -> Any:
  """Reads a state written by :func:`save_state` into ``template_state``.

  Raises:
    ValueError: the file is truncated, corrupted, not a lambjax checkpoint,
      or does not fit ``template_state`` (naming the first differing path).
  """
  data = Path(path).read_bytes()
  try:
    return from_bytes(template_state, data)
  except ValueError as e:
    raise ValueError(f'{os.fspath(path)}: {e}') from None
