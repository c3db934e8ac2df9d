"""Scores in the forms the native selections compute themselves, without a float copy.

A mask update ranks every weight of a layer by a drop score and a grow score. The
built-in criteria's scores are simple functions of arrays the update already holds:
``|w|`` (magnitude), ``|dL/dw|`` (RigL's growth) and SET's keyed hash of the flat index.
An XLA program materialises each as a float32 array (4 MiB per 1024x1024 layer, twice
per layer, in the step's temporary buffer); the native CPU kernels (``native_select``)
read the weights or gradients in place, or compute the hash, instead. A
:class:`ScoreForm` says which:

* ``VALUES``: ``operand`` is the score array (any criterion);
* ``MAGNITUDE``: the scores are ``|operand|`` (``operand``: a float32 array);
* ``HASH``: the scores are :func:`hash_uniform` ``(operand, shape)`` (``operand``: the
  two uint32 words of the criterion's key);
* ``KEYED_HASH``: the same with the words ``jax.random.bits(operand, (2,))`` of a raw
  threefry key (``threefry.supported``), drawn by the kernel (no threefry in XLA).

Every form materialises to exactly the array its criterion returns (:func:`as_array`),
so the XLA programs, and a native call given the materialised scores, select the same
masks (the tests compare all three).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsejax._src.primitives import threefry

VALUES, MAGNITUDE, HASH, KEYED_HASH = 0, 1, 2, 3  # the kernels' ScoreMode (select_ffi.cc)
_HASHES = (HASH, KEYED_HASH)


class ScoreForm(NamedTuple):
  """Scores shaped ``shape``, given as ``mode`` of ``operand`` (see the module docstring).

  Attributes:
    mode: ``VALUES``, ``MAGNITUDE``, ``HASH`` or ``KEYED_HASH``.
    operand: the scores, the array whose magnitudes they are, the hash words or the key.
    shape: the scores' shape.
  """

  mode: int
  operand: jax.Array
  shape: tuple[int, ...]


Scores = jax.Array | ScoreForm


def values(scores: jax.Array) -> ScoreForm:
  """The scores given as an array."""
  scores = jnp.asarray(scores)
  return ScoreForm(VALUES, scores, tuple(scores.shape))


def magnitude(x: jax.Array) -> ScoreForm:
  """``|x|``: read in place from a float32 ``x`` (other dtypes: the array ``jnp.abs(x)``)."""
  x = jnp.asarray(x)
  if x.dtype != jnp.float32:
    return values(jnp.abs(x))
  return ScoreForm(MAGNITUDE, x, tuple(x.shape))


def hashed(words: jax.Array, shape: tuple[int, ...]) -> ScoreForm:
  """:func:`hash_uniform` ``(words, shape)``, computed where it is read."""
  return ScoreForm(HASH, jnp.asarray(words, jnp.uint32), tuple(shape))


def keyed_hash(key: jax.Array, shape: tuple[int, ...]) -> ScoreForm:
  """:func:`hash_uniform` of the words ``jax.random.bits(key, (2,))``: drawn by the native
  kernel for a raw threefry key (``threefry.supported``), in XLA for any other key."""
  if threefry.supported(key):
    return ScoreForm(KEYED_HASH, key, tuple(shape))
  return hashed(jax.random.bits(key, (2,), jnp.uint32), shape)


def as_form(scores: Scores) -> ScoreForm:
  """``scores`` as a form (an array is ``VALUES``)."""
  return scores if isinstance(scores, ScoreForm) else values(scores)


def as_array(scores: Scores) -> jax.Array:
  """The scores as an array: exactly what the criterion behind the form returns."""
  if not isinstance(scores, ScoreForm):
    return jnp.asarray(scores)
  if scores.mode == VALUES:
    return scores.operand
  if scores.mode == MAGNITUDE:
    return jnp.abs(scores.operand)
  if scores.mode == KEYED_HASH:
    return hash_uniform(threefry.bits(scores.operand, 2), scores.shape)
  return hash_uniform(scores.operand, scores.shape)


def reshape(scores: Scores, shape: tuple[int, ...]) -> Scores:
  """The scores reshaped (row-major, as ``jnp.reshape``; a hash keeps its flat index)."""
  if not isinstance(scores, ScoreForm):
    return jnp.reshape(scores, shape)
  shape = jax.eval_shape(lambda: jnp.zeros(scores.shape, jnp.bool_).reshape(shape)).shape
  operand = scores.operand if scores.mode in _HASHES else scores.operand.reshape(shape)
  return ScoreForm(scores.mode, operand, shape)


def isfinite(scores: Scores) -> jax.Array | None:
  """Elementwise ``isfinite`` of the scores, or None where every score is finite (a
  hash); ``|x|`` is finite where ``x`` is."""
  form = as_form(scores)
  return None if form.mode in _HASHES else jnp.isfinite(form.operand)


def native_operands(*forms: ScoreForm) -> tuple[list[jax.Array], jax.Array, list[int]]:
  """The native kernels' arguments for ``forms``: one float32 buffer per form (empty for
  a hash), the hash words or keys of every form (``uint32 [2 * len(forms)]``, zeros where
  unused) and the modes."""
  buffers, words, modes = [], [], []
  for form in forms:
    if form.mode in _HASHES:
      buffers.append(jnp.zeros((0,), jnp.float32))
      words.append(form.operand)
    else:
      buffers.append(form.operand.astype(jnp.float32))
      words.append(jnp.zeros((2,), jnp.uint32))
    modes.append(int(form.mode))
  return buffers, jnp.concatenate(words), modes


def _fmix32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_uniform(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform float32 in [0, 1) per entry of ``shape``: a keyed hash of the flat index.

  Two rounds of the MurmurHash3 finalizer of ``index · 0x9E3779B9 ^ words[0]`` and
  ``^ words[1]``, 24 bits kept; elementwise, so it fuses into its reader (XLA) or is
  computed where it is read (the native kernels, ``Fmix32`` in ``select_ffi.cc``).

  Args:
    words: uint32 ``[2]``.
    shape: the output shape (fewer than ``2**32`` entries: the index is 32-bit).
  """
  words = jnp.asarray(words, jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  x = _fmix32(index * jnp.uint32(0x9E3779B9) ^ words[0])
  x = _fmix32(x ^ words[1])
  return (x >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))
