"""Tests for the N:M Pallas kernels and nm_matmul (sparsejax/_src/kernels/nm_*.py).

All kernels run in Pallas interpret mode on CPU and are compared with a dense
float32 reference. The compiled GPU (Triton) and TPU (Mosaic) paths are only
*lowered* here (jax.export from CPU), never compiled or run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sparsejax._src.formats.nm_format import NMSparse, nm_compress, nm_decompress, nm_take
from sparsejax._src.kernels.nm_matmul import (
  nm_matmul,
  nm_matmul_dense_grad,
  nm_matmul_dv_kernel,
  nm_matmul_dx_kernel,
  nm_matmul_fwd_kernel,
  nm_matmul_reference,
)

NM_PAIRS = [(1, 4), (2, 4), (2, 8), (1, 8), (4, 8)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# B=40 is not a multiple of block_m=16 (padded to 48); grids: fwd (3, 3, 4),
# dx (3, 4, 3), dvalues (4, 3, 3) -> several steps on every axis.
SHAPE = (40, 256, 192)
BLOCKS = dict(block_m=16, block_n=64, block_k=64)


def _problem(b, k, nout, n, m, dtype, seed=0):
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (b, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (k, nout), jnp.float32)
  dy = jax.random.normal(kd, (b, nout), jnp.float32).astype(dtype)
  nms = nm_compress(w, n, m)
  return x, nms.replace(values=nms.values.astype(dtype)), dy


def _rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.cache
def _fwd_bwd(**kw):
  """Jitted (y, dx, dvalues) of nm_matmul through its custom VJP."""
  kw = dict(kw)

  def run(x, nms, dy):
    y, vjp = jax.vjp(lambda x, nms: nm_matmul(x, nms, **kw), x, nms)
    dx, dnms = vjp(dy)
    return y, dx, dnms.values

  return jax.jit(run)


def _reference(x, nms, dy):
  f32 = jnp.float32
  w = nm_decompress(nms).astype(f32)
  x, dy = x.astype(f32), dy.astype(f32)
  return x @ w, dy @ w.T, nm_take(x.T @ dy, nms)


def _check_against_reference(x, nms, dy, dtype, **kw):
  y, dx, dv = _fwd_bwd(**kw)(x, nms, dy)
  assert y.dtype == dtype and dx.dtype == dtype and dv.dtype == dtype
  assert y.shape == (x.shape[0], nms.shape[1]) and dx.shape == x.shape
  assert dv.shape == nms.values.shape
  y_ref, dx_ref, dv_ref = _reference(x, nms, dy)
  tol = TOL[dtype]
  assert _rel_err(y, y_ref) <= tol, ("forward", _rel_err(y, y_ref))
  assert _rel_err(dx, dx_ref) <= tol, ("dx", _rel_err(dx, dx_ref))
  assert _rel_err(dv, dv_ref) <= tol, ("dvalues", _rel_err(dv, dv_ref))


# Default suite: all five N:M with the "grid" schedule in fp32, plus the "loop"
# (GPU) schedule and bf16 once each; the rest of the product is marked slow.
_FAST = [("grid", jnp.float32, nm) for nm in NM_PAIRS] + [
  ("loop", jnp.float32, (2, 4)),
  ("loop", jnp.bfloat16, (2, 8)),
]
_ALL = [
  (s, d, nm) for s in ("grid", "loop") for d in (jnp.float32, jnp.bfloat16) for nm in NM_PAIRS
]
_SLOW = [c for c in _ALL if c not in _FAST]


def _case_id(case):
  schedule, dtype, (n, m) = case
  return f"{schedule}-{jnp.dtype(dtype).name}-{n}:{m}"


@pytest.mark.parametrize("case", _FAST, ids=_case_id)
def test_kernels_match_reference(case):
  schedule, dtype, (n, m) = case
  x, nms, dy = _problem(*SHAPE, n, m, dtype, seed=n * 10 + m)
  _check_against_reference(x, nms, dy, dtype, interpret=True, schedule=schedule, **BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW, ids=_case_id)
def test_kernels_match_reference_all_combinations(case):
  schedule, dtype, (n, m) = case
  x, nms, dy = _problem(*SHAPE, n, m, dtype, seed=n * 10 + m)
  _check_against_reference(x, nms, dy, dtype, interpret=True, schedule=schedule, **BLOCKS)


@pytest.mark.parametrize("schedule", ["loop", pytest.param("grid", marks=pytest.mark.slow)])
def test_kernels_pad_k_and_nout_not_multiple_of_block(schedule):
  # K=96 -> padded to 128 for block_k=64; Nout=72 -> 96 for block_n=32; B=5 -> 8.
  x, nms, dy = _problem(5, 96, 72, 2, 4, jnp.float32, seed=7)
  _check_against_reference(
    x, nms, dy, jnp.float32, interpret=True, schedule=schedule, block_m=8, block_n=32, block_k=64
  )


@pytest.mark.slow
@pytest.mark.parametrize("n,m", NM_PAIRS)
def test_kernels_default_blocks_larger_shape(n, m):
  x, nms, dy = _problem(300, 512, 384, n, m, jnp.float32, seed=3)
  _check_against_reference(x, nms, dy, jnp.float32, interpret=True)


def test_direct_kernel_entry_points():
  x, nms, dy = _problem(24, 128, 64, 2, 8, jnp.float32, seed=5)
  kw = dict(interpret=True, block_m=8, block_n=32, block_k=32)
  y_ref, dx_ref, dv_ref = _reference(x, nms, dy)
  fwd = jax.jit(functools.partial(nm_matmul_fwd_kernel, **kw))
  dx = jax.jit(functools.partial(nm_matmul_dx_kernel, **kw))
  dv = jax.jit(functools.partial(nm_matmul_dv_kernel, **kw))
  assert _rel_err(fwd(x, nms), y_ref) <= 1e-5
  assert _rel_err(dx(dy, nms), dx_ref) <= 1e-5
  assert _rel_err(dv(x, dy, nms), dv_ref) <= 1e-5


def test_check_grads_rev():
  x, nms, _ = _problem(8, 64, 32, 2, 4, jnp.float32, seed=11)
  f = jax.jit(
    lambda x, v: nm_matmul(
      x, nms.replace(values=v), interpret=True, block_m=8, block_n=16, block_k=32
    )
  )
  check_grads(f, (x, nms.values), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_grad_of_nonlinear_loss_matches_dense_autodiff():
  x, nms, _ = _problem(16, 128, 64, 1, 8, jnp.float32, seed=12)

  def loss_kernel(x, v):
    return jnp.sum(jnp.sin(nm_matmul(x, nms.replace(values=v), interpret=True, **BLOCKS)))

  def loss_dense(x, v):
    return jnp.sum(jnp.sin(x @ nm_decompress(nms.replace(values=v))))

  gk = jax.jit(jax.grad(loss_kernel, argnums=(0, 1)))(x, nms.values)
  gd = jax.grad(loss_dense, argnums=(0, 1))(x, nms.values)
  assert _rel_err(gk[0], gd[0]) <= 1e-5
  assert _rel_err(gk[1], gd[1]) <= 1e-5


def test_indices_get_no_cotangent():
  x, nms, dy = _problem(8, 64, 32, 2, 4, jnp.float32)
  f = functools.partial(nm_matmul, interpret=True, block_m=8, block_n=16, block_k=32)
  _, vjp = jax.vjp(f, x, nms)
  _, dnms = jax.jit(vjp)(dy)
  assert dnms.indices.dtype == jax.dtypes.float0
  assert dnms.indices.shape == nms.indices.shape
  # jax.grad w.r.t. the whole NMSparse needs allow_int and gives float0 indices.
  g = jax.grad(lambda nms: jnp.sum(nm_matmul(x, nms)), allow_int=True)(nms)
  assert g.indices.dtype == jax.dtypes.float0


def test_jit_matches_eager():
  x, nms, _ = _problem(8, 64, 32, 2, 8, jnp.float32, seed=4)
  kw = dict(interpret=True, block_m=8, block_n=16, block_k=32)
  eager = nm_matmul(x, nms, **kw)
  jitted = jax.jit(functools.partial(nm_matmul, **kw))(x, nms)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-6, atol=1e-6)


def test_cpu_dispatch_uses_reference_and_is_differentiable():
  x, nms, dy = _problem(40, 256, 192, 2, 4, jnp.float32)
  y, dx, dv = _fwd_bwd()(x, nms, dy)
  y_ref, dx_ref, dv_ref = _reference(x, nms, dy)
  assert _rel_err(y, y_ref) <= 1e-5
  assert _rel_err(dx, dx_ref) <= 1e-5
  assert _rel_err(dv, dv_ref) <= 1e-5
  text = jax.jit(lambda x, nms: nm_matmul(x, nms)).lower(x, nms).as_text()
  assert "tpu_custom_call" not in text and "triton" not in text


def test_leading_batch_dims_and_mixed_dtypes():
  x, nms, _ = _problem(12, 64, 32, 2, 4, jnp.float32)
  x3 = x.reshape(3, 4, 64).astype(jnp.bfloat16)  # bf16 x, f32 values -> f32 result
  y = jax.jit(functools.partial(nm_matmul, interpret=True, block_m=8, block_n=16, block_k=32))(
    x3, nms
  )
  assert y.shape == (3, 4, 32) and y.dtype == jnp.float32
  ref = x3.astype(jnp.float32) @ nm_decompress(nms)
  assert _rel_err(y, ref) <= 1e-5
  np.testing.assert_allclose(
    np.asarray(nm_matmul_reference(x3, nms)), np.asarray(ref), rtol=1e-5, atol=1e-5
  )


def test_unsupported_group_size_falls_back_to_reference():
  # M=3 is not a power of 2: nm_matmul uses the reference even with interpret=True.
  w = jax.random.normal(jax.random.key(1), (12, 8))
  nms = nm_compress(w, 1, 3)
  x = jax.random.normal(jax.random.key(2), (5, 12))
  y = nm_matmul(x, nms, interpret=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ nms.todense()), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"m a power of 2.*m=3"):
    nm_matmul_fwd_kernel(x, nms, interpret=True)


def test_empty_batch():
  x, nms, _ = _problem(4, 64, 32, 2, 4, jnp.float32)
  assert nm_matmul(x[:0], nms, interpret=True).shape == (0, 32)


def test_dense_gradient_probe():
  x, nms, dy = _problem(16, 128, 64, 2, 4, jnp.float32, seed=21)
  probe = jnp.zeros(nms.shape)

  def f(x, v, probe):
    return nm_matmul_dense_grad(x, nms.replace(values=v), probe, interpret=True, **BLOCKS)

  y, vjp = jax.vjp(f, x, nms.values, probe)
  dx, dv, dprobe = jax.jit(vjp)(dy)
  y_ref, dx_ref, dv_ref = _reference(x, nms, dy)
  assert _rel_err(y, y_ref) <= 1e-5 and _rel_err(dx, dx_ref) <= 1e-5
  assert _rel_err(dv, dv_ref) <= 1e-5
  assert _rel_err(dprobe, x.T @ dy) <= 1e-5  # dense: non-zero at pruned positions too
  assert np.count_nonzero(np.asarray(dprobe)) > np.count_nonzero(np.asarray(nms.todense()))
  # reference path (CPU dispatch) gives the same probe gradient
  g = jax.grad(lambda p: jnp.vdot(nm_matmul_dense_grad(x, nms, p), dy))(probe)
  assert _rel_err(g, x.T @ dy) <= 1e-5


def test_argument_errors():
  x, nms, _ = _problem(4, 64, 32, 2, 4, jnp.float32)
  with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal K.*64.*\(4, 32\)"):
    nm_matmul(x[:, :32], nms)
  with pytest.raises(TypeError, match=r"nms must be an NMSparse.*ndarray|ArrayImpl"):
    nm_matmul(x, nms.todense())
  with pytest.raises(TypeError, match=r"x must have a floating dtype.*int32"):
    nm_matmul(x.astype(jnp.int32), nms)
  with pytest.raises(ValueError, match=r"block_k must be a power of 2.*block_k=48"):
    nm_matmul(x, nms, interpret=True, block_k=48)
  with pytest.raises(ValueError, match=r"schedule must be one of.*'rows'"):
    nm_matmul(x, nms, interpret=True, schedule="rows")
  with pytest.raises(ValueError, match=r"block_k must be a multiple of m.*block_k=2, m=4"):
    nm_matmul(x, nms, interpret=True, block_k=2)
  with pytest.raises(ValueError, match=r"need a GPU or TPU backend.*'cpu'.*interpret=True"):
    nm_matmul_fwd_kernel(x, nms)
  with pytest.raises(ValueError, match=r"probe.shape must equal.*\(64, 32\)"):
    nm_matmul_dense_grad(x, nms, jnp.zeros((32, 64)))


def test_concrete_invalid_indices_raise():
  # Issue 18: a raw NMSparse with an index outside [0, m) used to multiply as if
  # that weight were zero. Concrete indices are now checked by every entry point.
  x, nms, dy = _problem(4, 64, 32, 2, 4, jnp.float32)
  bad = NMSparse(nms.values, nms.indices.at[0, 3].set(4), 2, 4, nms.shape)
  kw = dict(interpret=True, block_m=8, block_n=16, block_k=32)
  calls = [
    ("nm_matmul", lambda: nm_matmul(x, bad)),
    ("nm_matmul", lambda: nm_matmul(x, bad, **kw)),
    ("nm_matmul_reference", lambda: nm_matmul_reference(x, bad)),
    ("nm_matmul_dense_grad", lambda: nm_matmul_dense_grad(x, bad, jnp.zeros(bad.shape))),
    ("nm_matmul_fwd_kernel", lambda: nm_matmul_fwd_kernel(x, bad, **kw)),
    ("nm_matmul_dx_kernel", lambda: nm_matmul_dx_kernel(dy, bad, **kw)),
    ("nm_matmul_dv_kernel", lambda: nm_matmul_dv_kernel(x, dy, bad, **kw)),
  ]
  for name, call in calls:
    with pytest.raises(ValueError, match=rf"{name}: nms.indices must lie in \[0, m\) = \[0, 4\)"):
      call()
  # A closed-over (concrete) NMSparse is checked when jit traces the call.
  with pytest.raises(ValueError, match=r"nm_matmul: nms.indices must lie in"):
    jax.jit(lambda x: nm_matmul(x, bad))(x)
  unsorted = NMSparse(nms.values, nms.indices.at[1, 0].set(nms.indices[0, 0]), 2, 4, nms.shape)
  with pytest.raises(ValueError, match=r"nm_matmul: nms.indices must be strictly increasing"):
    nm_matmul(x, unsorted)


def test_traced_invalid_indices_are_not_checked():
  # Under jit with the indices as an argument nothing can be checked: the
  # out-of-range entry acts as a zero weight (documented in nm_matmul).
  x, nms, _ = _problem(4, 64, 32, 2, 4, jnp.float32)
  bad_idx = nms.indices.at[0, 3].set(4)
  f = jax.jit(lambda x, v, i: nm_matmul(x, NMSparse(v, i, 2, 4, nms.shape)))
  w = np.array(nms.todense())
  w[int(nms.indices[0, 3]), 3] = 0.0
  np.testing.assert_allclose(
    np.asarray(f(x, nms.values, bad_idx)), np.asarray(x) @ w, rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------------------
# Lowering for GPU (Triton) and TPU (Mosaic) from a CPU machine. This checks
# that the kernels pass Pallas' lowering rules (power-of-2 loads, supported
# primitives, no scratch on Triton); it does NOT compile or run them.
# ---------------------------------------------------------------------------


def _export_train_step(platform, custom_call, n, m, dtype):
  k, nout, b = 512, 384, 200

  def loss(x, v, i):
    nms = NMSparse(values=v, indices=i, n=n, m=m, shape=(k, nout))
    return jnp.sum(nm_matmul(x, nms).astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  exported = jax.export.export(
    step,
    platforms=[platform],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
  )(
    jax.ShapeDtypeStruct((b, k), dtype),
    jax.ShapeDtypeStruct((k * n // m, nout), dtype),
    jax.ShapeDtypeStruct((k * n // m, nout), jnp.int8),
  )
  return exported.mlir_module()


@pytest.mark.parametrize(
  "n,m,dtype", [(2, 4, jnp.bfloat16), (1, 8, jnp.float32), (3, 4, jnp.float16)]
)
def test_lowers_to_triton_for_cuda(n, m, dtype):
  text = _export_train_step("cuda", "__gpu$xla.gpu.triton", n, m, dtype)
  # forward, dx and dvalues kernels, with the Triton compiler params.
  assert text.count("@__gpu$xla.gpu.triton(") == 3
  assert "num_warps = 4" in text


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8)])
def test_lowers_to_mosaic_for_tpu(n, m):
  text = _export_train_step("tpu", "tpu_custom_call", n, m, jnp.bfloat16)
  assert text.count("@tpu_custom_call(") == 3
