"""Tests for NMDense / NMDenseLinen and the export helpers (_src/integration/nm_layers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparsejax._src.formats.nm_format import NMSparse
from sparsejax._src.integration.nm_layers import (
  NM_INDICES_COLLECTION,
  NMDense,
  NMDenseLinen,
  NMIndices,
  nm_dense_from_kernel,
  nm_dense_linen_variables,
)
from sparsejax._src.primitives.nm_mask import is_nm_sparse, nm_mask


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _masked_kernel(k, nout, n, m, seed=0):
  w = jax.random.normal(jax.random.key(seed), (k, nout))
  return jnp.where(nm_mask(w, n, m), w, 0.0)


def test_nmdense_forward_equals_masked_dense_twin():
  layer = NMDense(64, 32, 2, 4, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  # The twin: the same kernel_init draw, projected to 2:4 by magnitude.
  rngs = nnx.Rngs(0)
  kernel = nnx.initializers.lecun_normal()(rngs.params(), (64, 32), jnp.float32)
  bias = nnx.initializers.normal(1.0)(rngs.params(), (32,), jnp.float32)
  masked = jnp.where(nm_mask(kernel, 2, 4), kernel, 0.0)
  np.testing.assert_array_equal(np.asarray(layer.dense_kernel()), np.asarray(masked))
  x = _x((5, 7, 64))
  y = layer(x)
  assert y.shape == (5, 7, 32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ masked + bias), rtol=1e-5, atol=1e-5)
  assert layer.values.shape == (32, 32) and layer.indices.dtype == jnp.int8
  assert isinstance(layer.indices, NMIndices) and not isinstance(layer.indices, nnx.Param)


def test_nmdense_interpret_kernels_match():
  layer = NMDense(64, 32, 1, 8, interpret=True, rngs=nnx.Rngs(3))
  x = _x((6, 64))
  y = jax.jit(lambda x: layer(x))(x)
  ref = x @ layer.dense_kernel() + layer.bias[...]
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_nmdense_dtype_and_no_bias():
  layer = NMDense(16, 8, 2, 4, use_bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer.bias is None
  y = layer(jnp.ones((2, 16)))
  assert y.dtype == jnp.bfloat16


def test_nmdense_optimizer_updates_values_not_indices():
  layer = NMDense(32, 8, 2, 4, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
  before_idx = np.asarray(layer.indices[...])
  before_val = np.asarray(layer.values[...])
  x = _x((4, 32))

  @nnx.jit
  def step(layer, opt, x):
    grads = nnx.grad(lambda mdl: jnp.sum(mdl(x) ** 2))(layer)
    opt.update(layer, grads)

  step(layer, opt, x)
  np.testing.assert_array_equal(np.asarray(layer.indices[...]), before_idx)
  assert not np.array_equal(np.asarray(layer.values[...]), before_val)
  assert len(jax.tree.leaves(nnx.state(layer, NMIndices))) == 1


def test_export_round_trip_nnx():
  kernel = _masked_kernel(64, 24, 2, 8)
  bias = _x((24,), seed=5)
  layer = nm_dense_from_kernel(kernel, bias, 2, 8)
  np.testing.assert_array_equal(np.asarray(layer.dense_kernel()), np.asarray(kernel))
  x = _x((3, 64))
  np.testing.assert_allclose(
    np.asarray(layer(x)), np.asarray(x @ kernel + bias), rtol=1e-5, atol=1e-5
  )
  # a kernel sparser than N:M (a whole zero group) is still exported exactly
  sparser = kernel.at[:8].set(0.0)
  np.testing.assert_array_equal(
    np.asarray(nm_dense_from_kernel(sparser, None, 2, 8).dense_kernel()), np.asarray(sparser)
  )


def test_export_round_trip_linen():
  kernel = _masked_kernel(64, 24, 1, 4, seed=2)
  bias = _x((24,), seed=6)
  variables = nm_dense_linen_variables(kernel, bias, 1, 4)
  model = NMDenseLinen(features=24, n=1, m=4)
  x = _x((3, 64))
  y = model.apply(variables, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ kernel + bias), rtol=1e-5, atol=1e-5)
  no_bias = nm_dense_linen_variables(kernel, None, 1, 4)
  y2 = NMDenseLinen(features=24, n=1, m=4, use_bias=False).apply(no_bias, x)
  np.testing.assert_allclose(np.asarray(y2), np.asarray(x @ kernel), rtol=1e-5, atol=1e-5)


def test_linen_init_is_consistent_and_trains_only_params():
  model = NMDenseLinen(features=16, n=2, m=4)
  variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
  assert set(variables) == {"params", NM_INDICES_COLLECTION}
  idx = variables[NM_INDICES_COLLECTION]["indices"]
  assert idx.dtype == jnp.int8 and idx.shape == (16, 16)
  # values and indices come from the same kernel draw: the decompressed kernel
  # is the 2:4 magnitude projection, so re-projecting it changes nothing.
  dense = NMSparse(
    values=variables["params"]["values"], indices=idx, n=2, m=4, shape=(32, 16)
  ).todense()
  assert bool(is_nm_sparse(dense, 2, 4))
  np.testing.assert_array_equal(np.asarray(jnp.where(nm_mask(dense, 2, 4), dense, 0)), dense)
  grads = jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, jnp.ones((2, 32)))))(
    variables["params"]
  )
  assert set(grads) == {"values", "bias"}


def test_export_errors():
  dense = _x((16, 4))
  with pytest.raises(ValueError, match=r"not 2:4 sparse along axis 0.*group 0.*non-zeros"):
    nm_dense_from_kernel(dense, None, 2, 4)
  with pytest.raises(ValueError, match=r"not 2:4 sparse"):
    nm_dense_linen_variables(dense, None, 2, 4)
  with pytest.raises(ValueError, match=r"in_features must be divisible by m.*in_features=18, m=4"):
    nm_dense_from_kernel(jnp.zeros((18, 4)), None, 2, 4)
  with pytest.raises(ValueError, match=r"2-D.*\(3, 3, 4, 4\)"):
    nm_dense_from_kernel(jnp.zeros((3, 3, 4, 4)), None, 2, 4)
  with pytest.raises(ValueError, match=r"bias.shape must be \(4,\)"):
    nm_dense_from_kernel(jnp.zeros((16, 4)), jnp.zeros((5,)), 2, 4)
  with pytest.raises(ValueError, match=r"in_features must be divisible by m.*in_features=10"):
    NMDense(10, 4, 2, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"n must be <= m.*n=5, m=4"):
    NMDense(16, 4, 5, 4, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------
# Training on scikit-learn's bundled digits (offline): NMDense MLP vs its
# masked-dense twin (same init, same fixed 2:4 topology, same batches).
# ---------------------------------------------------------------------------


def _digits():
  datasets = pytest.importorskip("sklearn.datasets")
  data = datasets.load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  return (x[:1500], y[:1500]), (x[1500:], y[1500:])


class _NMMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = NMDense(64, 128, 2, 4, rngs=rngs)
    self.l2 = NMDense(128, 128, 2, 4, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


class _MaskedMLP(nnx.Module):
  """Dense kernels times a constant 2:4 mask (gradient zero at pruned entries)."""

  def __init__(self, nm_model: _NMMLP):
    self.k1 = nnx.Param(nm_model.l1.dense_kernel())
    self.b1 = nnx.Param(nm_model.l1.bias[...])
    self.k2 = nnx.Param(nm_model.l2.dense_kernel())
    self.b2 = nnx.Param(nm_model.l2.bias[...])
    self.m1 = nnx.Variable(self.k1[...] != 0)
    self.m2 = nnx.Variable(self.k2[...] != 0)
    self.head = nnx.Linear(128, 10, rngs=nnx.Rngs(0))
    self.head.kernel = nnx.Param(nm_model.head.kernel[...])
    self.head.bias = nnx.Param(nm_model.head.bias[...])

  def __call__(self, x):
    h = jax.nn.relu(x @ (self.k1[...] * self.m1[...]) + self.b1[...])
    h = jax.nn.relu(h @ (self.k2[...] * self.m2[...]) + self.b2[...])
    return self.head(h)


def _train(model, train, steps=300, batch=128):
  x, y = train
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, xb, yb):
    def loss_fn(model):
      logits = model(xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(1)
  for _ in range(steps):
    i = rng.integers(0, len(x), batch)
    step(model, opt, jnp.asarray(x[i]), jnp.asarray(y[i]))


def _accuracy(model, data):
  x, y = data
  return float(np.mean(np.asarray(jnp.argmax(model(jnp.asarray(x)), -1)) == y))


def test_nm_mlp_trains_on_digits_like_masked_dense_twin():
  train, test = _digits()
  nm_model = _NMMLP(nnx.Rngs(0))
  twin = _MaskedMLP(nm_model)
  np.testing.assert_allclose(
    np.asarray(nm_model(jnp.asarray(test[0]))),
    np.asarray(twin(jnp.asarray(test[0]))),
    rtol=1e-5,
    atol=1e-5,
  )
  idx_before = np.asarray(nm_model.l1.indices[...])
  _train(nm_model, train)
  _train(twin, train)
  acc_nm, acc_twin = _accuracy(nm_model, test), _accuracy(twin, test)
  print(f"digits test accuracy: NMDense {acc_nm:.4f}, masked-dense twin {acc_twin:.4f}")
  assert acc_nm > 0.9, acc_nm
  assert abs(acc_nm - acc_twin) <= 0.02, (acc_nm, acc_twin)
  # topology unchanged and the twin's pruned weights stayed exactly zero
  np.testing.assert_array_equal(np.asarray(nm_model.l1.indices[...]), idx_before)
  assert bool(is_nm_sparse(twin.k1[...] * twin.m1[...], 2, 4))
