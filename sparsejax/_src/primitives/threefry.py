"""JAX's threefry-2x32 key operations as unrolled elementwise code (no while loop).

On the CPU, JAX lowers each ``fold_in``, ``split`` and ``bits`` call to a rolled while
loop over the 20 rounds: a handful of compiled kernels per call, and a mask update
derives keys for every leaf. The same hash (Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3") written as elementwise ``jax.numpy`` operations fuses into one
kernel, with the same bits (tests compare them with ``jax.random``). Used for raw
``uint32[2]`` keys under the default partitionable threefry (:func:`supported`); other
keys go through ``jax.random``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
PARITY = 0x1BD11BDA


def supported(key) -> bool:
  """Whether ``key`` is a raw threefry key (``uint32[2]``, traced or not) under the
  default partitionable threefry, for which these functions equal ``jax.random``'s."""
  return (
    getattr(key, "dtype", None) == np.uint32
    and getattr(key, "shape", None) == (2,)
    and jax.config.jax_default_prng_impl == "threefry2x32"
    and bool(jax.config.jax_threefry_partitionable)
  )


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds) of counter words ``(x0, x1)`` under key words ``(k0, k1)``.

  All four are uint32 arrays that broadcast together (e.g. keys ``[L, 1]``, counters
  ``[1, 2]``); returns the two output words.
  """
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(PARITY))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def fold_in(key: jax.Array, data) -> jax.Array:
  """``jax.random.fold_in(key, data)`` for every entry of ``data``: ``[*data.shape, 2]``."""
  data = jnp.asarray(data).astype(jnp.uint32)
  o0, o1 = threefry2x32(key[0], key[1], jnp.zeros_like(data), data)
  return jnp.stack([o0, o1], axis=-1)


def split(keys: jax.Array) -> jax.Array:
  """``jax.random.split(key)`` of every key of ``keys [..., 2]``: ``[..., 2, 2]``."""
  lo = jnp.arange(2, dtype=jnp.uint32)
  o0, o1 = threefry2x32(keys[..., 0:1], keys[..., 1:2], jnp.zeros_like(lo), lo)
  return jnp.stack([o0, o1], axis=-1)


def bits(key: jax.Array, n: int) -> jax.Array:
  """``jax.random.bits(key, (n,), jnp.uint32)``."""
  lo = jnp.arange(n, dtype=jnp.uint32)
  o0, o1 = threefry2x32(key[0], key[1], jnp.zeros_like(lo), lo)
  return o0 ^ o1
