"""Tests for the N:M mask and compressed format (primitives/nm_mask.py, formats/nm_*.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax._src.formats.nm_format import (
  NMSparse,
  make_nm_sparse,
  nm_compress,
  nm_decompress,
  nm_nbytes,
  nm_take,
)
from sparsejax._src.formats.nm_packing import index_bits, pack_indices, unpack_indices
from sparsejax._src.primitives.nm_mask import is_nm_sparse, nm_mask

NM_PAIRS = [(1, 4), (2, 4), (2, 8), (1, 8), (4, 8)]
# One shape for most tests, so the library's jitted helpers compile once per N:M.
SHAPE = (64, 12)


def _weights(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _numpy_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
  """Independent reference: stable sort of -|w| per group (ties -> lowest index)."""
  flat = w.reshape(-1, w.shape[-1])
  k, c = flat.shape
  out = np.zeros_like(flat, dtype=bool)
  for g in range(k // m):
    for col in range(c):
      grp = np.abs(flat[g * m : (g + 1) * m, col])
      keep = np.argsort(-grp, kind="stable")[:n]
      out[g * m + keep, col] = True
  return out.reshape(w.shape)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", NM_PAIRS)
def test_mask_matches_numpy_and_has_n_per_group(n, m):
  w = _weights(SHAPE, seed=n * 10 + m)
  mask = nm_mask(w, n, m)
  assert mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask), _numpy_mask(np.asarray(w), n, m))
  counts = np.asarray(mask).reshape(SHAPE[0] // m, m, SHAPE[1]).sum(axis=1)
  assert (counts == n).all()


def test_mask_hand_worked():
  w = jnp.array([[0.1, 5.0], [-3.0, 0.0], [2.0, -1.0], [0.5, 1.0]])
  expected = np.array([[False, True], [True, False], [True, True], [False, False]])
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 2, 4)), expected)


def test_mask_ties_go_to_lowest_index():
  # |w| ties: column 0 all equal; column 1 has two tied maxima at rows 1 and 3
  # and -2 vs 2 at rows 0/2 (equal magnitude).
  w = jnp.array([[1.0, 2.0], [1.0, 3.0], [1.0, -2.0], [1.0, -3.0]])
  np.testing.assert_array_equal(
    np.asarray(nm_mask(w, 2, 4)), [[True, False], [True, True], [False, False], [False, True]]
  )
  np.testing.assert_array_equal(
    np.asarray(nm_mask(w, 3, 4)), [[True, True], [True, True], [True, False], [False, True]]
  )
  # zeros only: keep the first n positions.
  np.testing.assert_array_equal(
    np.asarray(nm_mask(jnp.zeros((8, 1)), 2, 8))[:, 0], [1, 1, 0, 0, 0, 0, 0, 0]
  )


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8)])
def test_mask_traced_n_equals_static_n(n, m):
  w = jnp.round(_weights(SHAPE, seed=3) * 2) / 2  # many ties
  static = nm_mask(w, n, m)
  traced = jax.jit(lambda w, n: nm_mask(w, n, m))(w, jnp.int32(n))
  np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))


def test_mask_conv_kernel_groups_along_flattened_input_axis():
  w = _weights((3, 3, 8, 4), seed=1)
  mask = nm_mask(w, 2, 4)
  assert mask.shape == w.shape
  flat = np.asarray(mask).reshape(-1, 4)
  np.testing.assert_array_equal(flat, _numpy_mask(np.asarray(w).reshape(-1, 4), 2, 4))
  # in=8 is divisible by 4, so every group sits at one kernel tap: 2 of 4 channels.
  per_tap = np.asarray(mask).reshape(3, 3, 2, 4, 4).sum(axis=3)
  assert (per_tap == 2).all()


def test_mask_jit_equals_eager():
  w = _weights((16, 8), seed=2)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(nm_mask, static_argnums=(1, 2))(w, 2, 4)), np.asarray(nm_mask(w, 2, 4))
  )


def test_is_nm_sparse():
  w = _weights((8, 3))
  assert bool(is_nm_sparse(w * nm_mask(w, 2, 4), 2, 4))
  assert not bool(is_nm_sparse(w, 2, 4))


# ---------------------------------------------------------------------------
# Compression round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "n,m,dtype",
  [(n, m, jnp.float32) for n, m in NM_PAIRS] + [(2, 4, jnp.bfloat16), (1, 8, jnp.bfloat16)],
)
def test_compress_decompress_round_trip(n, m, dtype):
  w = _weights(SHAPE, seed=n + m, dtype=dtype)
  mask = nm_mask(w, n, m)
  wm = jnp.where(mask, w, 0)
  nms = nm_compress(wm, n, m)
  assert nms.values.shape == (64 * n // m, 12) and nms.values.dtype == dtype
  assert nms.indices.dtype == jnp.int8 and nms.shape == (64, 12)
  np.testing.assert_array_equal(np.asarray(nm_decompress(nms)), np.asarray(wm))
  # magnitude compression of the unmasked w selects the same entries
  np.testing.assert_array_equal(np.asarray(nm_compress(w, n, m).todense()), np.asarray(wm))
  # explicit mask
  np.testing.assert_array_equal(
    np.asarray(nm_decompress(nm_compress(w, n, m, mask=mask))), np.asarray(wm)
  )
  idx = np.asarray(nms.indices).reshape(64 // m, n, 12)
  assert idx.min() >= 0 and idx.max() < m
  assert (np.diff(idx, axis=1) > 0).all()  # strictly ascending in each group


def test_compress_hand_worked_layout():
  # K=8 (two groups of 4), Nout=1, 2:4: row g*N + j = j-th kept entry of group g.
  w = jnp.array([[0.0], [5.0], [-1.0], [2.0], [7.0], [0.0], [0.0], [-8.0]])
  nms = nm_compress(w, 2, 4)
  np.testing.assert_array_equal(np.asarray(nms.values)[:, 0], [5.0, 2.0, 7.0, -8.0])
  np.testing.assert_array_equal(np.asarray(nms.indices)[:, 0], [1, 3, 0, 3])


def test_compress_explicit_mask_keeps_masked_entries_even_if_small():
  w = jnp.array([[1.0], [9.0], [2.0], [8.0]])
  mask = jnp.array([[True], [False], [True], [False]])
  nms = nm_compress(w, 2, 4, mask=mask)
  np.testing.assert_array_equal(np.asarray(nms.todense())[:, 0], [1.0, 0.0, 2.0, 0.0])


def test_compress_jit_equals_eager():
  w = _weights((32, 4))
  a = jax.jit(nm_compress, static_argnums=(1, 2))(w, 2, 8)
  b = nm_compress(w, 2, 8)
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))


def test_nm_take_is_sddmm_compression():
  w = _weights((16, 4))
  nms = nm_compress(w, 2, 4)
  dense = _weights((16, 4), seed=9)
  np.testing.assert_array_equal(
    np.asarray(nm_take(dense, nms)),
    np.asarray(nm_compress(dense, 2, 4, mask=nm_decompress(nms) != 0).values),
  )


def test_nmsparse_is_a_pytree_with_static_metadata():
  nms = nm_compress(_weights((8, 2)), 2, 4)
  leaves, treedef = jax.tree.flatten(nms)
  assert len(leaves) == 2
  back = jax.tree.unflatten(treedef, leaves)
  assert isinstance(back, NMSparse) and (back.n, back.m, back.shape) == (2, 4, (8, 2))
  doubled = jax.jit(lambda s: s.replace(values=s.values * 2))(nms)
  np.testing.assert_array_equal(np.asarray(doubled.values), 2 * np.asarray(nms.values))


# ---------------------------------------------------------------------------
# Packed metadata and sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", NM_PAIRS)
def test_pack_unpack_round_trip(n, m):
  nms = nm_compress(_weights(SHAPE, seed=n + m), n, m)
  rows = nms.indices.shape[0]
  for word_dtype in (jnp.uint8, jnp.int32):
    packed = pack_indices(nms.indices, m, word_dtype=word_dtype)
    per_word = jnp.dtype(word_dtype).itemsize * 8 // index_bits(m)
    assert packed.dtype == word_dtype and packed.shape == (-(-rows // per_word), SHAPE[1])
    back = unpack_indices(packed, m, rows)
    assert back.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back), np.asarray(nms.indices))


def test_pack_hand_worked_bits():
  idx = jnp.array([[1], [3], [0], [2], [3]], jnp.int8)  # 2-bit fields, 4 per uint8
  packed = pack_indices(idx, 4)
  assert packed.tolist() == [[1 | 3 << 2 | 0 << 4 | 2 << 6], [3]]
  # 4-bit fields, 8 per int32 word; the top nibble uses the sign bit.
  idx16 = jnp.array([[15], [1], [0], [0], [0], [0], [0], [15]], jnp.int8)
  word = int(pack_indices(idx16, 16, word_dtype=jnp.int32)[0, 0])
  assert word & 0xFFFFFFFF == 0xF000001F
  np.testing.assert_array_equal(
    np.asarray(unpack_indices(pack_indices(idx16, 16, word_dtype=jnp.int32), 16, 8)),
    np.asarray(idx16),
  )


def test_index_bits():
  assert [index_bits(m) for m in (2, 4, 5, 8, 16)] == [2, 2, 4, 4, 4]
  with pytest.raises(ValueError, match="m <= 16.*m=32"):
    index_bits(32)
  with pytest.raises(ValueError, match="m <= 16"):
    pack_indices(jnp.zeros((4, 1), jnp.int8), 32)


def test_nbytes_two_four_bf16_is_56_25_percent():
  nms = nm_compress(jnp.zeros((4096, 4096), jnp.bfloat16), 2, 4)
  assert nms.dense_nbytes == 32 * 2**20
  assert nms.nbytes == 18 * 2**20  # 16 MiB values + 2 MiB packed 2-bit indices
  assert nms.nbytes / nms.dense_nbytes == 0.5625
  # int8 indices in memory would be 75%; packed is what nbytes reports.
  assert (nms.values.nbytes + nms.indices.nbytes) / nms.dense_nbytes == 0.75


@pytest.mark.parametrize(
  "n,m,dtype,fraction",
  [
    (1, 4, jnp.bfloat16, 0.28125),
    (2, 8, jnp.bfloat16, 0.3125),
    (1, 8, jnp.bfloat16, 0.15625),
    (1, 8, jnp.float32, 0.140625),
    (2, 4, jnp.float32, 0.53125),
  ],
)
def test_nbytes_table_of_kernels_md(n, m, dtype, fraction):
  shape = (1024, 256)
  nms = jax.eval_shape(lambda: nm_compress(jnp.zeros(shape, dtype), n, m))
  assert nm_nbytes(nms) / (np.prod(shape) * jnp.dtype(dtype).itemsize) == fraction


def test_nbytes_of_a_pytree():
  nms = nm_compress(jnp.zeros((16, 8)), 2, 4)
  bias = jnp.zeros((8,))
  assert nm_nbytes({"k": nms, "b": bias}) == nms.nbytes + 32
  assert nms.nbytes == 8 * 8 * 4 + 2 * 8  # values + ceil(8/4) uint8 words per column


# ---------------------------------------------------------------------------
# Validation errors name the argument, the value and what is allowed
# ---------------------------------------------------------------------------


def _valid_arrays():
  v = jnp.ones((4, 3))
  i = jnp.tile(jnp.array([[0], [2]], jnp.int8), (2, 3))
  return v, i


def test_make_nm_sparse_accepts_valid_input():
  v, i = _valid_arrays()
  nms = make_nm_sparse(v, i.astype(jnp.int32), 2, 4, (8, 3))
  assert nms.indices.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(nms.todense())[:, 0], [1, 0, 1, 0, 1, 0, 1, 0])


@pytest.mark.parametrize(
  "kwargs,exc,pattern",
  [
    (dict(n=5, m=4), ValueError, r"n must be <= m.*n=5, m=4"),
    (dict(n=0, m=4), ValueError, r"n must be >= 1.*n=0"),
    (dict(n=1, m=0), ValueError, r"m must be >= 1.*m=0"),
    (dict(n=2.0, m=4), TypeError, r"n must be an int.*2\.0"),
    (dict(shape=(6, 3)), ValueError, r"shape\[0\].*divisible by m.*K=6, m=4"),
    (dict(values=jnp.ones((4, 3), jnp.int32)), TypeError, r"values must have a floating.*int32"),
    (
      dict(indices=jnp.ones((4, 3), jnp.float32)),
      TypeError,
      r"indices must have an integer.*float32",
    ),
    (
      dict(indices=jnp.full((4, 3), 4, jnp.int8)),
      ValueError,
      r"indices must lie in \[0, m\).*\[4, 4\]",
    ),
    (dict(indices=jnp.full((4, 3), -1, jnp.int8)), ValueError, r"indices must lie in \[0, m\).*-1"),
    (dict(indices=jnp.zeros((4, 3), jnp.int8)), ValueError, r"strictly increasing.*group 0"),
    (dict(values=jnp.ones((6, 3))), ValueError, r"values.shape must be.*\(4, 3\).*\(6, 3\)"),
    (dict(indices=jnp.zeros((4, 2), jnp.int8)), ValueError, r"indices.shape must equal.*\(4, 2\)"),
    (dict(layout="nk"), ValueError, r"layout must be one of.*'nk'"),
  ],
)
def test_make_nm_sparse_errors(kwargs, exc, pattern):
  v, i = _valid_arrays()
  args = dict(values=v, indices=i, n=2, m=4, shape=(8, 3))
  args.update(kwargs)
  with pytest.raises(exc, match=pattern):
    make_nm_sparse(**args)


def test_make_nm_sparse_skips_value_checks_under_jit():
  v, _ = _valid_arrays()
  bad = jnp.full((4, 3), 7, jnp.int8)
  out = jax.jit(lambda v, i: make_nm_sparse(v, i, 2, 4, (8, 3)).values)(v, bad)
  assert out.shape == (4, 3)


def test_decompress_rejects_concrete_invalid_indices():
  # Issue 18: a raw NMSparse (the constructor does not validate) with an index
  # outside [0, m) used to decompress silently to zeros at that entry.
  v, i = _valid_arrays()
  out_of_range = NMSparse(values=v, indices=i.at[1, 0].set(4), n=2, m=4, shape=(8, 3))
  with pytest.raises(
    ValueError, match=r"nm_decompress: nms.indices must lie in \[0, m\) = \[0, 4\).*\[0, 4\]"
  ):
    nm_decompress(out_of_range)
  with pytest.raises(ValueError, match=r"nms.indices must lie in \[0, m\)"):
    out_of_range.todense()
  negative = NMSparse(values=v, indices=i.at[0, 2].set(-1), n=2, m=4, shape=(8, 3))
  with pytest.raises(ValueError, match=r"nms.indices must lie in \[0, m\).*got values in \[-1,"):
    nm_decompress(negative)
  repeated = NMSparse(values=v, indices=i.at[1, 0].set(i[0, 0]), n=2, m=4, shape=(8, 3))
  with pytest.raises(ValueError, match=r"nms.indices must be strictly increasing.*group 0"):
    nm_decompress(repeated)


def test_decompress_cannot_check_traced_indices():
  # Under jit the indices are abstract: no check runs, and an out-of-range index
  # matches no slot, so its value is dropped (documented in nm_decompress).
  v, i = _valid_arrays()
  bad = i.at[1, 0].set(4)
  dense = jax.jit(lambda v, i: nm_decompress(NMSparse(v, i, 2, 4, (8, 3))))(v, bad)
  good = np.array(nm_decompress(NMSparse(v, i, 2, 4, (8, 3))))
  good[int(i[1, 0]), 0] = 0.0
  np.testing.assert_array_equal(np.asarray(dense), good)


def test_compress_and_mask_errors():
  w = jnp.ones((6, 3))
  with pytest.raises(ValueError, match=r"nm_mask.*w.shape=\(6, 3\).*K=6.*m=4"):
    nm_mask(w, 2, 4)
  with pytest.raises(ValueError, match=r"nm_compress.*K=6.*m=4"):
    nm_compress(w, 2, 4)
  with pytest.raises(ValueError, match=r"n must be <= m.*n=3, m=2"):
    nm_mask(jnp.ones((4, 2)), 3, 2)
  with pytest.raises(ValueError, match=r"nm_compress: w must be a 2-D.*\(2, 2, 4, 3\)"):
    nm_compress(jnp.ones((2, 2, 4, 3)), 2, 4)
  with pytest.raises(TypeError, match=r"nm_compress: w must have a floating dtype.*int32"):
    nm_compress(jnp.ones((8, 3), jnp.int32), 2, 4)
  with pytest.raises(ValueError, match=r"mask.shape must equal.*\(8, 3\).*\(8, 2\)"):
    nm_compress(jnp.ones((8, 3)), 2, 4, mask=jnp.ones((8, 2), bool))
  bad_mask = jnp.zeros((8, 3), bool).at[:3, 1].set(True)
  with pytest.raises(ValueError, match=r"exactly n=2 of every m=4.*group 0.*column 0 keeps 0"):
    nm_compress(jnp.ones((8, 3)), 2, 4, mask=bad_mask)
  with pytest.raises(ValueError, match=r"ndim >= 2"):
    nm_mask(jnp.ones((8,)), 2, 4)


def test_pack_errors():
  with pytest.raises(ValueError, match=r"indices must lie in \[0, m\).*\[0, 5\]"):
    pack_indices(jnp.array([[0], [5]], jnp.int8), 4)
  with pytest.raises(TypeError, match=r"word_dtype.*float32"):
    pack_indices(jnp.zeros((4, 1), jnp.int8), 4, word_dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"num_rows must be in \(4, 8\].*num_rows=3"):
    unpack_indices(jnp.zeros((2, 1), jnp.uint8), 4, 3)
