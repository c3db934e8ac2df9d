"""``jax.random.uniform`` on the host (NumPy), bit for bit: the initial masks' scores.

``tx.init`` runs outside ``jit`` and draws one uniform score per weight for its random
masks. Through JAX each layer shape compiles its own threefry program (tens of MB of
compiler memory and ~0.15 s each on a CPU, more than the draw itself); here the same
threefry-2x32 counter hash (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2,
3") runs in place over NumPy words instead. It reproduces JAX's partitionable threefry
(``jax_threefry_partitionable``, the default): the counter of an entry is its flat
row-major index, so the bits do not depend on the array's shape, only on its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from sparsejax._src.primitives import threefry
from sparsejax._src.primitives.threefry import PARITY, ROTATIONS

_MASK32 = 0xFFFFFFFF


def supported(key) -> bool:
  """Whether :func:`uniform` reproduces ``jax.random.uniform(key, ...)`` for this key.

  True for a concrete raw threefry key (``uint32[2]``, e.g. ``jax.random.PRNGKey``) under
  the default configuration; False under another PRNG implementation, the legacy
  (non-partitionable) threefry, a typed key or a traced one.
  """
  return (
    isinstance(key, (jax.Array, np.ndarray))
    and not isinstance(key, jax.core.Tracer)
    and threefry.supported(key)
  )


def threefry2x32(key: Sequence[int], x0: np.ndarray, x1: np.ndarray) -> None:
  """Threefry-2x32 with 20 rounds, in place on the counter words ``x0``, ``x1`` (uint32).

  Args:
    key: the two key words.
    x0, x1: uint32 arrays of one shape: the counters' high and low words, overwritten by
      the two output words.
  """
  k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
  ks = (k0, k1, k0 ^ k1 ^ PARITY)
  tmp = np.empty_like(x1)
  x0 += np.uint32(ks[0])
  x1 += np.uint32(ks[1])
  for i in range(5):
    for r in ROTATIONS[i % 2]:
      x0 += x1
      np.left_shift(x1, np.uint32(r), out=tmp)  # x1 = rotl(x1, r) ^ x0
      x1 >>= np.uint32(32 - r)
      x1 |= tmp
      x1 ^= x0
    x0 += np.uint32(ks[(i + 1) % 3])
    x1 += np.uint32((ks[(i + 2) % 3] + i + 1) & _MASK32)


def fold_in(key, data: int) -> np.ndarray:
  """``jax.random.fold_in(key, data)`` as a NumPy ``uint32[2]`` key, bit for bit.

  Args:
    key: a key for which :func:`supported` is True.
    data: a non-negative integer below ``2**32``.

  Returns:
    uint32 ``[2]``: a raw key for which :func:`supported` is True.
  """
  _check_key(key)
  hi, lo = np.zeros(1, np.uint32), np.array([data], np.uint32)
  threefry2x32(np.asarray(key), hi, lo)
  return np.concatenate([hi, lo])


def _check_key(key) -> None:
  if not supported(key):
    raise ValueError(
      "`key` must be a concrete raw threefry key (uint32[2]) under the default "
      f"partitionable threefry; got {getattr(key, 'dtype', type(key))} "
      f"{getattr(key, 'shape', '')}."
    )


def uniform(key, shape: Sequence[int]) -> np.ndarray:
  """``jax.random.uniform(key, shape, jnp.float32)`` as a NumPy array, bit for bit.

  Args:
    key: a key for which :func:`supported` is True.
    shape: the output shape (fewer than ``2**32`` entries).

  Returns:
    float32 ``[*shape]`` in ``[0, 1)``.

  Raises:
    ValueError: for an unsupported key or a shape of ``2**32`` entries or more.
  """
  out = uniform_keys(key, shape)
  out |= np.uint32(0x3F800000)  # 23 mantissa bits with exponent 0: [1, 2), minus 1
  out = out.view(np.float32)
  out -= np.float32(1.0)
  return out


def uniform_keys(key, shape: Sequence[int]) -> np.ndarray:
  """The 23-bit integers ``m`` behind :func:`uniform` (its value is ``m / 2**23``).

  The scores' order with their ties, without the floats: a top-k of these keys selects
  what a top-k of the uniform scores does. Drawn in chunks, so the threefry's working
  words stay small next to the output.

  Args / Raises: as :func:`uniform`.

  Returns:
    uint32 ``[*shape]`` below ``2**23``.
  """
  _check_key(key)
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**32:
    raise ValueError(f"`shape` {tuple(shape)} has {size} entries; at most 2**32 - 1.")
  words = np.asarray(key)
  out = np.empty(size, np.uint32)
  for start in range(0, size, _CHUNK):
    lo = np.arange(start, min(start + _CHUNK, size), dtype=np.uint32)  # the flat index
    hi = np.zeros_like(lo)  # the counter's high word
    threefry2x32(words, hi, lo)
    hi ^= lo  # 32-bit draws: the two output words xored
    np.right_shift(hi, np.uint32(9), out=out[start : start + lo.size])
  return out.reshape(tuple(shape))


_CHUNK = 1 << 16  # entries per threefry pass
