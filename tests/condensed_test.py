"""Tests for the condensed constant-fan-in (SRigL) format and its inference paths."""

import logging
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax._src.formats import condensed as cd
from sparsejax._src.integration.condensed_layers import (
  CondensedBuffer,
  CondensedDense,
  condense_params,
  condensed_dense_apply,
)
from sparsejax._src.kernels import condensed_native

NATIVE = condensed_native.native_available()
needs_native = pytest.mark.skipif(
  not NATIVE,
  reason=f"native kernel not built: {condensed_native.native_unavailable_reason()}",
)
METHODS = ["auto", "gather", "dense", pytest.param("native", marks=needs_native)]
# Jitted: one compilation per case instead of one per eager op (jit vs eager is
# checked separately in test_matmul_jit_matches_eager).
matmul = jax.jit(cd.condensed_matmul, static_argnames="method")


def const_fan_in_mask(rng, shape, k, n_ablated=0):
  """Random mask whose active output neurons each keep exactly k inputs."""
  n_in, n_out = math.prod(shape[:-1]), shape[-1]
  mask = np.zeros((n_in, n_out), bool)
  ablated = set(rng.choice(n_out, n_ablated, replace=False).tolist())
  for n in range(n_out):
    if n not in ablated:
      mask[rng.choice(n_in, k, replace=False), n] = True
  return mask.reshape(shape)


def make_layer(seed=0, shape=(48, 24), k=7, n_ablated=3, bias=True, dtype=np.float32):
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal(shape).astype(dtype)
  mask = const_fan_in_mask(rng, shape, k, n_ablated)
  b = rng.standard_normal(shape[-1]).astype(dtype) if bias else None
  return kernel, mask, b


def reference(x, kernel, mask, bias):
  w = (kernel * mask).reshape(-1, kernel.shape[-1]).astype(np.float64)
  y = np.asarray(x, np.float64) @ w
  return y if bias is None else y + bias


def assert_close(y, ref, tol=1e-5):
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape
  scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
  np.testing.assert_array_less(np.abs(y - ref).max(initial=0.0), tol * scale)


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("shape", [(48, 24), (3, 3, 5, 8)], ids=["dense", "conv"])
@pytest.mark.parametrize("keep_dense", [False, True])
def test_round_trip_exact(shape, keep_dense):
  kernel, mask, _ = make_layer(shape=shape, k=6, n_ablated=2)
  c = cd.condense(kernel, mask, keep_dense=keep_dense)
  out = np.asarray(cd.uncondense(c))
  assert out.shape == shape and out.dtype == kernel.dtype
  np.testing.assert_array_equal(out, kernel * mask)
  np.testing.assert_array_equal(np.asarray(jax.jit(cd.uncondense)(c)), kernel * mask)
  assert c.in_features == math.prod(shape[:-1]) and c.out_features == shape[-1]
  assert c.kernel_shape == shape and c.fan_in == 6 and c.n_active == shape[-1] - 2


def test_format_fields():
  kernel, mask, b = make_layer(shape=(40, 16), k=5, n_ablated=4)
  mask = mask.astype(np.uint8)  # uint8 masks are accepted
  c = cd.condense(kernel, mask, b)
  keep = mask.astype(bool)
  active = np.flatnonzero(keep.any(0))
  np.testing.assert_array_equal(np.asarray(c.active), active)
  assert c.active.dtype == jnp.int32
  idx = np.asarray(c.indices)
  assert idx.shape == (12, 5) and np.all(np.diff(idx, axis=1) > 0)  # sorted ascending
  for r, n in enumerate(active):
    np.testing.assert_array_equal(idx[r], np.flatnonzero(keep[:, n]))
    np.testing.assert_array_equal(np.asarray(c.values[r]), kernel[idx[r], n])
  np.testing.assert_array_equal(np.asarray(c.bias), b)
  assert c.dense is None and c.density == pytest.approx(12 * 5 / (40 * 16))


def test_active_uses_any_not_sum():
  # Kept weights summing to zero must not ablate the neuron (SRigL uses sum != 0).
  kernel = np.array([[1.0, 2.0], [-1.0, 3.0]], np.float32)
  c = cd.condense(kernel, np.ones((2, 2), bool))
  assert c.active.tolist() == [0, 1]
  # A neuron whose kept weights are all exactly 0 is still active (the mask decides).
  c = cd.condense(np.zeros((2, 2), np.float32), np.ones((2, 2), bool))
  assert c.n_active == 2


@pytest.mark.parametrize("n_in,dtype", [(32767, jnp.int16), (32768, jnp.int32)])
def test_index_dtype(n_in, dtype):
  kernel = np.ones((n_in, 2), np.float32)
  mask = np.zeros((n_in, 2), bool)
  mask[[0, n_in - 1], :] = True
  c = cd.condense(kernel, mask)
  assert c.indices.dtype == dtype
  assert c.indices[0].tolist() == [0, n_in - 1]
  x = np.arange(n_in, dtype=np.float32)[None] / n_in
  assert_close(matmul(x, c, method="gather"), reference(x, kernel, mask, None))


def test_condensed_nbytes():
  kernel, mask, b = make_layer(shape=(48, 24), k=7, n_ablated=3)
  c = cd.condense(kernel, mask, b)
  assert cd.condensed_nbytes(c) == 21 * 7 * (4 + 2) + 4 * 21 + 4 * 24
  c = cd.condense(kernel, mask, keep_dense=True)
  assert cd.condensed_nbytes(c) == 21 * 7 * (4 + 2) + 4 * 21 + 48 * 24 * 4


def test_is_pytree():
  kernel, mask, b = make_layer()
  c = cd.condense(kernel, mask, b)
  leaves, treedef = jax.tree.flatten(c)
  assert len(leaves) == 4  # values, indices, active, bias (dense is None)
  c2 = jax.tree.unflatten(treedef, leaves)
  assert c2.kernel_shape == c.kernel_shape and c2.out_features == c.out_features
  doubled = jax.tree.map(lambda a: a * 2 if a.dtype == jnp.float32 else a, c)
  np.testing.assert_array_equal(np.asarray(doubled.values), 2 * np.asarray(c.values))


# ----------------------------------------------------------------------------- errors


def test_not_constant_fan_in_error():
  kernel, mask, _ = make_layer(shape=(20, 6), k=4, n_ablated=0)
  mask[np.flatnonzero(~mask[:, 2])[0], 2] = True  # neuron 2 now has fan-in 5
  mask[np.flatnonzero(mask[:, 4])[:2], 4] = False  # neuron 4 now has fan-in 2
  with pytest.raises(ValueError, match=r"mask is not constant fan-in") as err:
    cd.condense(kernel, mask)
  assert isinstance(err.value, cd.NotConstantFanInError)
  msg = str(err.value)
  assert "2 (1 neurons)" in msg and "4 (4 neurons)" in msg and "5 (1 neurons)" in msg


@pytest.mark.parametrize(
  "args,match",
  [
    (lambda k, m, b: (k, m[:-1], None), r"mask shape"),
    (lambda k, m, b: (k.astype(np.int32), m, None), r"kernel must be floating"),
    (lambda k, m, b: (k, np.zeros_like(m), None), r"mask keeps no entry"),
    (lambda k, m, b: (k[:, 0], m[:, 0], None), r"kernel must have rank >= 2"),
    (lambda k, m, b: (k, m, b[:-1]), r"bias must have shape"),
    (lambda k, m, b: (k, m, b.astype(np.int32)), r"bias must be floating"),
    (lambda k, m, b: (k, m.astype(np.complex64), None), r"mask must be bool or integer"),
  ],
  ids=["shape", "int-kernel", "empty-mask", "rank1", "bias-shape", "bias-dtype", "mask-dtype"],
)
def test_bad_inputs(args, match):
  kernel, mask, b = make_layer()
  with pytest.raises(ValueError, match=match):
    cd.condense(*args(kernel, mask, b))


def test_condense_under_jit_is_rejected():
  kernel, mask, _ = make_layer()
  with pytest.raises(ValueError, match=r"concrete `kernel`"):
    jax.jit(lambda k: cd.condense(k, mask).values)(kernel)


def test_matmul_bad_inputs():
  kernel, mask, b = make_layer()
  c = cd.condense(kernel, mask, b)
  with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 48\]"):
    cd.condensed_matmul(jnp.ones((2, 47)), c)
  with pytest.raises(ValueError, match=r"method must be one of"):
    cd.condensed_matmul(jnp.ones((2, 48)), c, method="csr")
  if NATIVE:
    with pytest.raises(ValueError, match=r"float32"):
      cd.condensed_matmul(jnp.ones((2, 48), jnp.bfloat16), c, method="native")


# ----------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lead", [(), (1,), (3,), (8,), (64,), (2, 4), (4, 2, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_matches_masked_dense(method, lead, bias):
  kernel, mask, b = make_layer(seed=len(lead) + sum(lead), bias=bias)
  c = cd.condense(kernel, mask, b)
  x = np.random.default_rng(1).standard_normal((*lead, 48)).astype(np.float32)
  y = matmul(x, c, method=method)
  assert y.shape == (*lead, 24) and y.dtype == jnp.float32
  assert_close(y, reference(x, kernel, mask, b))


@pytest.mark.parametrize("method", METHODS)
def test_matmul_jit_matches_eager(method):
  kernel, mask, b = make_layer(seed=3)
  c = cd.condense(kernel, mask, b, keep_dense=True)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 48)), jnp.float32)
  f = jax.jit(cd.condensed_matmul, static_argnames="method")
  np.testing.assert_allclose(
    np.asarray(f(x, c, method=method)),
    np.asarray(cd.condensed_matmul(x, c, method=method)),
    rtol=1e-6,
    atol=1e-6,
  )


@pytest.mark.parametrize("method", METHODS)
def test_ablated_neurons_output_only_bias(method):
  kernel, mask, b = make_layer(shape=(48, 24), k=7, n_ablated=5, seed=4)
  ablated = np.flatnonzero(~mask.any(0))
  assert ablated.size == 5
  c = cd.condense(kernel, mask, b)
  x = np.random.default_rng(5).standard_normal((3, 48)).astype(np.float32)
  y = np.asarray(matmul(x, c, method=method))
  np.testing.assert_array_equal(y[:, ablated], np.broadcast_to(b[ablated], (3, 5)))
  y0 = np.asarray(matmul(x, cd.condense(kernel, mask), method=method))
  np.testing.assert_array_equal(y0[:, ablated], 0.0)


@pytest.mark.parametrize("keep_dense", [False, True])
def test_dense_path_with_and_without_copy(keep_dense):
  kernel, mask, b = make_layer(seed=6)
  c = cd.condense(kernel, mask, b, keep_dense=keep_dense)
  assert (c.dense is not None) == keep_dense
  x = np.random.default_rng(7).standard_normal((16, 48)).astype(np.float32)
  assert_close(jax.jit(cd.condensed_matmul)(x, c), reference(x, kernel, mask, b))
  assert_close(matmul(x, c, method="dense"), reference(x, kernel, mask, b))


def test_conv_layout_matches_lax_conv():
  # A VALID conv whose input has the kernel's spatial size has one output position:
  # y = patches flattened in (kh, kw, in) order @ kernel.reshape(-1, out).
  kernel, mask, b = make_layer(shape=(3, 3, 4, 6), k=9, n_ablated=1, seed=8)
  x = np.random.default_rng(9).standard_normal((2, 3, 3, 4)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(
    x, kernel * mask, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  c = cd.condense(kernel, mask, b)
  for method in ("gather", "dense") + (("native",) if NATIVE else ()):
    y = matmul(x.reshape(2, -1), c, method=method)
    assert_close(y, np.asarray(conv).reshape(2, 6) + b)


def test_bfloat16_layers_use_xla_paths():
  kernel, mask, b = make_layer(seed=10)
  c = cd.condense(kernel.astype(jnp.bfloat16), mask, b.astype(jnp.bfloat16))
  assert c.values.dtype == jnp.bfloat16
  assert cd.select_condensed_method(c, 1, jnp.bfloat16) in ("gather", "dense")
  x = np.random.default_rng(11).standard_normal((2, 48)).astype(np.float32)
  ref = reference(x, kernel, mask, b)
  for method in ("auto", "gather", "dense"):
    y = matmul(jnp.asarray(x, jnp.bfloat16), c, method=method)
    assert y.dtype == jnp.bfloat16
    assert_close(y, ref, tol=5e-2)


def test_gradients_through_xla_paths():
  kernel, mask, b = make_layer(seed=12)
  c = cd.condense(kernel, mask, b)
  x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 48)), jnp.float32)
  w = jnp.asarray(kernel * mask)
  want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w + b)))(x)
  for method in ("gather", "dense"):
    got = jax.grad(lambda x, m=method: jnp.sum(jnp.sin(cd.condensed_matmul(x, c, method=m))))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch


def test_auto_dispatch():
  kernel, mask, b = make_layer(shape=(200, 50), k=10, n_ablated=0)  # 5% dense
  c = cd.condense(kernel, mask, b)
  expected_small = "native" if NATIVE else "gather"
  assert cd.select_condensed_method(c, 1) == expected_small
  assert cd.select_condensed_method(c, 64) == ("native" if NATIVE else "dense")
  assert cd.select_condensed_method(c, 0) == "dense"
  dense_mask = np.ones((20, 4), bool)  # 100% dense: neither native nor gather pays off
  assert cd.select_condensed_method(cd.condense(np.ones((20, 4), np.float32), dense_mask), 1) == (
    "dense"
  )


def test_fallback_when_native_missing(monkeypatch, caplog):
  monkeypatch.setattr(condensed_native, "native_available", lambda: False)
  monkeypatch.setattr(condensed_native, "native_unavailable_reason", lambda: "test says so")
  monkeypatch.setattr(cd, "_warned_fallback", False)
  kernel, mask, b = make_layer(shape=(200, 50), k=10, n_ablated=0)
  c = cd.condense(kernel, mask, b)
  with caplog.at_level(logging.WARNING, logger="sparsejax.condensed"):
    assert cd.select_condensed_method(c, 1) == "gather"
    assert cd.select_condensed_method(c, 3) == "dense"
  assert "test says so" in caplog.text and "XLA path" in caplog.text
  with pytest.raises(RuntimeError, match=r"test says so"):
    cd.condensed_matmul(jnp.ones((1, 200)), c, method="native")
  x = np.random.default_rng(14).standard_normal((1, 200)).astype(np.float32)
  assert_close(cd.condensed_matmul(x, c), reference(x, kernel, mask, b))


def test_import_without_native_extension():
  code = textwrap.dedent(
    """
        import numpy as np, sparsejax
        from sparsejax._src.formats import condensed as cd
        from sparsejax._src.kernels import condensed_native as cn
        assert not cn.native_available(), cn.native_unavailable_reason()
        assert "SPARSEJAX_DISABLE_NATIVE" in cn.native_unavailable_reason()
        # The public namespace reports the same status.
        assert not sparsejax.condensed.native_available()
        assert sparsejax.condensed.native_cpu_isa() is None
        assert "SPARSEJAX_DISABLE_NATIVE" in sparsejax.condensed.native_unavailable_reason()
        m = np.zeros((8, 4), bool); m[:2] = True
        c = cd.condense(np.ones((8, 4), np.float32), m)
        print(cd.condensed_matmul(np.ones(8, np.float32), c).tolist())
        """
  )
  env = dict(os.environ, SPARSEJAX_DISABLE_NATIVE="1", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[2.0, 2.0, 2.0, 2.0]"
  assert "native condensed CPU kernel unavailable" in out.stderr


# ----------------------------------------------------------------------------- native


@jax.jit(static_argnums=(5, 6, 7, 8))
def native(x, values, indices, active, bias, n_out, mode, isa, threads):
  return condensed_native.native_matmul(
    x, values, indices, active, bias, n_out, mode=mode, isa=isa, threads=threads
  )


@needs_native
@pytest.mark.parametrize("mode", ["gather", "gather512", "tiled", "auto"])
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("index_dtype", [np.int16, np.int32])
def test_native_every_code_path(mode, isa, index_dtype):
  # K=301 and k=37 leave SIMD tails; 130 rows span 3 batch tiles (64 + 64 + 2).
  kernel, mask, b = make_layer(shape=(301, 70), k=37, n_ablated=6, seed=15)
  c = cd.condense(kernel, mask, b)
  idx = c.indices.astype(index_dtype)
  rng = np.random.default_rng(16)
  for batch in (1, 2, 3, 17, 130):
    x = rng.standard_normal((batch, 301)).astype(np.float32)
    for threads in (1, 0):
      y = native(jnp.asarray(x), c.values, idx, c.active, c.bias, 70, mode, isa, threads)
      assert_close(y, reference(x, kernel, mask, b))


@needs_native
def test_native_large_layer_multithreaded():
  # Big enough to be split into chunks across XLA's intra-op threads.
  kernel, mask, b = make_layer(shape=(1024, 512), k=100, n_ablated=12, seed=17)
  c = cd.condense(kernel, mask, b)
  x = np.random.default_rng(18).standard_normal((2, 3, 1024)).astype(np.float32)
  y = jax.jit(lambda x, c: cd.condensed_matmul(x, c, method="native"))(x, c)
  assert_close(y, reference(x, kernel, mask, b))


@needs_native
def test_native_under_vmap():
  kernel, mask, b = make_layer(seed=19)
  c = cd.condense(kernel, mask, b)
  x = np.random.default_rng(20).standard_normal((3, 2, 48)).astype(np.float32)
  y = jax.vmap(lambda xi: cd.condensed_matmul(xi, c, method="native"))(x)
  assert_close(y, reference(x, kernel, mask, b))


# ----------------------------------------------------------------------------- layers


def test_condensed_dense_from_linear():
  linear = nnx.Linear(48, 24, rngs=nnx.Rngs(0))
  mask = const_fan_in_mask(np.random.default_rng(21), (48, 24), 6, n_ablated=2)
  layer = CondensedDense.from_linear(linear, mask)
  x = np.random.default_rng(22).standard_normal((5, 48)).astype(np.float32)
  ref = reference(x, np.asarray(linear.kernel[...]), mask, np.asarray(linear.bias[...]))
  assert_close(layer(jnp.asarray(x)), ref)
  assert_close(nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x)), ref)
  assert len(jax.tree.leaves(nnx.state(layer, CondensedBuffer))) == 4
  assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 0  # not trainable
  for method in ("gather", "dense"):
    assert_close(CondensedDense(layer.condensed, method=method)(jnp.asarray(x)), ref)


def test_condense_params_and_apply():
  rng = np.random.default_rng(23)
  params = {
        "Dense_0": {"kernel": rng.standard_normal((16, 32)).astype(np.float32),
                    "bias": rng.standard_normal(32).astype(np.float32)},
        "Dense_1": {"kernel": rng.standard_normal((32, 32)).astype(np.float32),
                    "bias": rng.standard_normal(32).astype(np.float32)},
        "head": {"kernel": rng.standard_normal((32, 10)).astype(np.float32),
                 "bias": rng.standard_normal(10).astype(np.float32)},
    }  # fmt: skip
  irregular = rng.random((32, 32)) < 0.3  # not constant fan-in
  masks = {
    "Dense_0": {"kernel": const_fan_in_mask(rng, (16, 32), 4, 2), "bias": None},
    "Dense_1": {"kernel": irregular, "bias": None},
    "head": {"kernel": None, "bias": None},  # excluded from sparsity
  }
  tree = condense_params(params, masks)
  assert isinstance(tree["Dense_0"], cd.Condensed)
  assert isinstance(tree["Dense_1"], dict) and isinstance(tree["head"], dict)
  with pytest.raises(ValueError, match=r"layer Dense_1: mask is not constant fan-in"):
    condense_params(params, masks, strict=True)

  x = rng.standard_normal((4, 16)).astype(np.float32)

  def dense_mlp(x):
    h = np.maximum(reference(x, params["Dense_0"]["kernel"], masks["Dense_0"]["kernel"],
                                 params["Dense_0"]["bias"]), 0)  # fmt: skip
    h = np.maximum(reference(h, params["Dense_1"]["kernel"], 1, params["Dense_1"]["bias"]), 0)
    return reference(h, params["head"]["kernel"], 1, params["head"]["bias"])

  @jax.jit
  def condensed_mlp(tree, x):
    h = jax.nn.relu(condensed_dense_apply(tree["Dense_0"], x))
    h = jax.nn.relu(condensed_dense_apply(tree["Dense_1"], h))
    return condensed_dense_apply(tree["head"], h)

  assert_close(condensed_mlp(tree, x), dense_mlp(x), tol=1e-4)
  with pytest.raises(TypeError, match=r"layer must be a Condensed"):
    condensed_dense_apply(np.ones((2, 2)), x)


@needs_native
def test_native_batch_larger_than_super_batch():
  # The tiled path transposes at most 1024 rows at a time; 2100 rows take 3 passes.
  kernel, mask, b = make_layer(shape=(48, 24), k=7, n_ablated=3, seed=24)
  c = cd.condense(kernel, mask, b)
  x = np.random.default_rng(25).standard_normal((2100, 48)).astype(np.float32)
  assert_close(matmul(x, c, method="native"), reference(x, kernel, mask, b))
